// pybind11 bindings of the openmm-cgml plugin: the CGMLIntegrator C++ object, plus the
// glue that lets openmm's SWIG API accept it as an openmm.Integrator.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "CGMLIntegratorProxy.h"
#include "ReferenceCGMLKernels.h"
#include "openmm/OpenMMException.h"
#include "openmm/serialization/XmlSerializer.h"
#include "openmm_cgml/CGMLIntegrator.h"
#include <sstream>
#include <stdexcept>

#include "swigpyrun.h"

namespace py = pybind11;
using CGML::CGMLIntegrator;

namespace {

using DoubleArray = py::array_t<double, py::array::c_style | py::array::forcecast>;
using FloatArray = py::array_t<float, py::array::c_style | py::array::forcecast>;
using IndexArray = py::array_t<long long, py::array::c_style | py::array::forcecast>;

std::string optionalBytes(const py::object& value) {
    return value.is_none() ? std::string() : std::string(value.cast<py::bytes>());
}

swig_type_info* integratorType() {
    // openmm registers its SWIG type table when imported; make sure it is.
    py::module_::import("openmm");
    swig_type_info* type = SWIG_TypeQuery("OpenMM::Integrator *");
    if (type == NULL)
        throw std::runtime_error("openmm's SWIG type table has no 'OpenMM::Integrator *' (incompatible openmm build?)");
    return type;
}

} // namespace

PYBIND11_MODULE(_cgml, m) {
    m.doc() = "C++ core of openmm_cgml (use openmm_cgml.CGMLIntegrator)";
    // linked, not loaded as a plugin: OpenMM calls no registerKernelFactories for us
    CGML::registerReferenceCGMLKernels();
    py::register_exception<OpenMM::OpenMMException>(m, "CGMLError", PyExc_RuntimeError);

    py::class_<CGMLIntegrator>(m, "CGMLIntegratorImpl")
        .def(py::init([](py::bytes dynamics, py::object score, double stepSize, bool allowOverride) {
                 return new CGMLIntegrator(std::string(dynamics), optionalBytes(score), stepSize, allowOverride);
             }),
             py::arg("dynamics"), py::arg("score"), py::arg("step_size"), py::arg("allow_step_size_override"))
        .def("getSequenceLength", &CGMLIntegrator::getSequenceLength)
        .def("getModelStepSize", &CGMLIntegrator::getModelStepSize)
        .def("hasScoreModel", &CGMLIntegrator::hasScoreModel)
        .def("getSigmas", &CGMLIntegrator::getSigmas)
        .def("getAllowStepSizeOverride", &CGMLIntegrator::getAllowStepSizeOverride)
        .def("setAllowStepSizeOverride", &CGMLIntegrator::setAllowStepSizeOverride)
        .def("setBeadFeatures",
             [](CGMLIntegrator& self, FloatArray values) {
                 if (values.ndim() != 2)
                     throw std::invalid_argument("bead features must be a 2-D array [beads, features]");
                 std::vector<float> data(values.data(), values.data() + values.size());
                 self.setBeadFeatures(data, (int) values.shape(0), (int) values.shape(1));
             })
        .def("getBeadFeatures",
             [](const CGMLIntegrator& self) {
                 FloatArray out({(py::ssize_t) self.getNumFeatureRows(), (py::ssize_t) self.getNumFeatures()});
                 std::copy(self.getBeadFeatures().begin(), self.getBeadFeatures().end(), out.mutable_data());
                 return out;
             })
        .def("setBonds",
             [](CGMLIntegrator& self, py::array raw) {
                 // no silent casts: a float or [2, E] array would become wrong pairs
                 const char kind = raw.dtype().kind();
                 if (kind != 'i' && kind != 'u')
                     throw std::invalid_argument("bonds must be an integer array of bead indices");
                 if (raw.ndim() != 2 || raw.shape(1) != 2)
                     throw std::invalid_argument("bonds must have shape [E, 2]");
                 IndexArray pairs = IndexArray::ensure(raw);
                 if (!pairs)
                     throw py::error_already_set();
                 self.setBonds(std::vector<long long>(pairs.data(), pairs.data() + pairs.size()));
             })
        .def("getBonds",
             [](const CGMLIntegrator& self) {
                 IndexArray out({(py::ssize_t) self.getBonds().size() / 2, (py::ssize_t) 2});
                 std::copy(self.getBonds().begin(), self.getBonds().end(), out.mutable_data());
                 return out;
             })
        .def("setHistory",
             [](CGMLIntegrator& self, DoubleArray frames) {
                 if (frames.ndim() != 3 || frames.shape(2) != 3)
                     throw std::invalid_argument("the history must be a 3-D array [frames, beads, 3]");
                 self.setHistory(std::vector<double>(frames.data(), frames.data() + frames.size()),
                                 (int) frames.shape(0), (int) frames.shape(1));
             })
        .def("getHistory",
             [](const CGMLIntegrator& self) -> py::object {
                 if (!self.hasHistory())
                     return py::none();
                 // shaped from the history itself, never from seq_len: the copy cannot overrun
                 std::vector<double> values = self.getHistory();
                 const py::ssize_t frames = self.getHistoryFrames(), beads = self.getHistoryBeads();
                 if ((size_t) (frames * beads * 3) != values.size())
                     throw std::runtime_error("CGMLIntegrator: inconsistent history sizes");
                 DoubleArray out({frames, beads, (py::ssize_t) 3});
                 std::copy(values.begin(), values.end(), out.mutable_data());
                 return std::move(out);
             })
        .def("getRandomNumberSeed", &CGMLIntegrator::getRandomNumberSeed)
        .def("setRandomNumberSeed", &CGMLIntegrator::setRandomNumberSeed)
        .def("getDeterministic", &CGMLIntegrator::getDeterministic)
        .def("setDeterministic", &CGMLIntegrator::setDeterministic)
        .def("getLangevinSteps", &CGMLIntegrator::getLangevinSteps)
        .def("setLangevinSteps", &CGMLIntegrator::setLangevinSteps)
        .def("getLangevinStepSize", &CGMLIntegrator::getLangevinStepSize)
        .def("setLangevinStepSize", &CGMLIntegrator::setLangevinStepSize)
        .def("getLangevinSchedule", &CGMLIntegrator::getLangevinSchedule)
        .def("setLangevinSchedule", &CGMLIntegrator::setLangevinSchedule)
        .def("getLangevinStepSizes", &CGMLIntegrator::getLangevinStepSizes)
        .def("getNumNoiseLevels", &CGMLIntegrator::getNumNoiseLevels)
        .def("getLangevinLevels", &CGMLIntegrator::getLangevinLevels)
        .def("setLangevinLevels", &CGMLIntegrator::setLangevinLevels)
        .def("getExclusionDistance", &CGMLIntegrator::getExclusionDistance)
        .def("setExclusionDistance", &CGMLIntegrator::setExclusionDistance)
        .def("getExclusionCorrections", &CGMLIntegrator::getExclusionCorrections)
        .def("getBondLengthLimit", &CGMLIntegrator::getBondLengthLimit)
        .def("setBondLengthLimit", &CGMLIntegrator::setBondLengthLimit)
        .def("getBondLimitCorrections", &CGMLIntegrator::getBondLimitCorrections)
        .def("getNumThreads", &CGMLIntegrator::getNumThreads)
        .def("setNumThreads", &CGMLIntegrator::setNumThreads)
        .def("getCompiledDynamicsModel", &CGMLIntegrator::getCompiledDynamicsModel)
        .def("setCompiledDynamicsModel", &CGMLIntegrator::setCompiledDynamicsModel)
        .def("getCompiledScoreModel", &CGMLIntegrator::getCompiledScoreModel)
        .def("setCompiledScoreModel", &CGMLIntegrator::setCompiledScoreModel)
        .def("getPeriodicMode", &CGMLIntegrator::getPeriodicMode)
        .def("setPeriodicMode", &CGMLIntegrator::setPeriodicMode)
        .def("serialize",
             [](const CGMLIntegrator& self) {
                 std::stringstream stream;
                 OpenMM::XmlSerializer::serialize<OpenMM::Integrator>(&self, "Integrator", stream);
                 return stream.str();
             })
        .def_static(
            "deserialize",
            [](const std::string& xml) {
                std::stringstream stream(xml);
                OpenMM::Integrator* integrator = OpenMM::XmlSerializer::deserialize<OpenMM::Integrator>(stream);
                CGMLIntegrator* result = dynamic_cast<CGMLIntegrator*>(integrator);
                if (result == NULL) {
                    delete integrator;
                    throw std::invalid_argument("the XML describes an Integrator that is not a CGMLIntegrator");
                }
                return result;
            },
            py::return_value_policy::take_ownership)
        .def("swigPointer", [](CGMLIntegrator& self) {
            // A non-owning SWIG pointer: SWIG never deletes the object, pybind11 owns it.
            OpenMM::Integrator* base = &self;
            PyObject* pointer = SWIG_NewPointerObj((void*) base, integratorType(), SWIG_POINTER_NOSHADOW);
            if (pointer == NULL)
                throw py::error_already_set();
            return py::reinterpret_steal<py::object>(pointer);
        });
}
