#include "CGMLIntegratorProxy.h"
#include "openmm_cgml/CGMLIntegrator.h"
#include "openmm_cgml/internal/Base64.h"
#include "openmm_cgml/internal/LearnedStep.h"
#include "openmm/OpenMMException.h"
#include "openmm/serialization/SerializationNode.h"
#include <cmath>
#include <cstring>
#include <memory>
#include <mutex>
#include <sstream>

using namespace CGML;
using namespace OpenMM;

// Version 2 added langevinSchedule; version 1 XML (without it) loads with the constant
// schedule, the only one its writer knew. Version 3 added exclusionDistance,
// bondLengthLimit (older XML keeps the dynamics model's defaults) and numThreads (0).
// Version 4 added langevinLevels; older XML runs the whole ladder.
static const int formatVersion = 4;

CGMLIntegratorProxy::CGMLIntegratorProxy() : SerializationProxy("CGMLIntegrator") {
}

void CGMLIntegratorProxy::serialize(const void* object, SerializationNode& node) const {
    // OpenMM hands over the object as its base class, Integrator
    const CGMLIntegrator& integrator = dynamic_cast<const CGMLIntegrator&>(*reinterpret_cast<const Integrator*>(object));
    node.setIntProperty("version", formatVersion);
    node.setDoubleProperty("stepSize", integrator.getStepSize());
    node.setBoolProperty("allowStepSizeOverride", integrator.getAllowStepSizeOverride());
    node.setIntProperty("randomSeed", integrator.getRandomNumberSeed());
    node.setBoolProperty("deterministic", integrator.getDeterministic());
    node.setIntProperty("langevinSteps", integrator.getLangevinSteps());
    node.setDoubleProperty("langevinStepSize", integrator.getLangevinStepSize());
    node.setStringProperty("langevinSchedule", integrator.getLangevinSchedule());
    node.setIntProperty("langevinLevels", integrator.getLangevinLevels());
    node.setDoubleProperty("exclusionDistance", integrator.getExclusionDistance());
    node.setDoubleProperty("bondLengthLimit", integrator.getBondLengthLimit());
    node.setIntProperty("numThreads", integrator.getNumThreads());
    node.setIntProperty("periodicMode", integrator.getPeriodicMode());
    node.setIntProperty("integrationForceGroups", integrator.getIntegrationForceGroups());
    node.createChildNode("DynamicsModel").setStringProperty("base64", base64Encode(integrator.getDynamicsModelBytes()));
    if (integrator.hasScoreModel())
        node.createChildNode("ScoreModel").setStringProperty("base64", base64Encode(integrator.getScoreModelBytes()));
    const std::vector<float>& features = integrator.getBeadFeatures();
    node.createChildNode("BeadFeatures")
        .setIntProperty("rows", integrator.getNumFeatureRows())
        .setIntProperty("columns", integrator.getNumFeatures())
        .setStringProperty("base64", base64Encode(std::string((const char*) features.data(), features.size() * sizeof(float))));
    const std::vector<long long>& bonds = integrator.getBonds();
    node.createChildNode("Bonds").setStringProperty(
        "base64", base64Encode(std::string((const char*) bonds.data(), bonds.size() * sizeof(long long))));
    std::ostringstream state;
    const_cast<CGMLIntegrator&>(integrator).getLearnedStep().writeState(state);
    node.createChildNode("State").setStringProperty("base64", base64Encode(state.str()));
}

namespace {

const std::string xmlError = "CGMLIntegrator XML: ";

std::string decodeChild(const SerializationNode& child, const std::string& element) {
    try {
        return base64Decode(child.getStringProperty("base64"));
    }
    catch (const std::invalid_argument& e) {
        throw OpenMMException(xmlError + "the base64 of <" + element + "> is invalid: " + e.what());
    }
}

std::string decode(const SerializationNode& node, const std::string& element) {
    return decodeChild(node.getChildNode(element), element);
}

} // namespace

// The XML is code-like input: it carries TorchScript models. Deserialize only trusted
// XML. The checks below turn corrupt or inconsistent XML into an OpenMMException.
void* CGMLIntegratorProxy::deserialize(const SerializationNode& node) const {
    int version = node.getIntProperty("version");
    if (version < 1 || version > formatVersion)
        throw OpenMMException("Unsupported version number for CGMLIntegrator: " + std::to_string(version));
    double stepSize = node.getDoubleProperty("stepSize");
    if (!(stepSize > 0) || !std::isfinite(stepSize)) {
        std::ostringstream msg;
        msg << xmlError << "stepSize must be positive and finite, got " << stepSize;
        throw OpenMMException(msg.str());
    }
    std::string score;
    for (const SerializationNode& child : node.getChildren())
        if (child.getName() == "ScoreModel")
            score = decodeChild(child, "ScoreModel");
    std::unique_ptr<CGMLIntegrator> integrator;
    try {
        integrator.reset(new CGMLIntegrator(decode(node, "DynamicsModel"), score, stepSize,
                                            node.getBoolProperty("allowStepSizeOverride")));
        integrator->setRandomNumberSeed(node.getIntProperty("randomSeed"));
        integrator->setDeterministic(node.getBoolProperty("deterministic"));
        integrator->setLangevinSteps(node.getIntProperty("langevinSteps"));
        if (integrator->hasScoreModel())
            integrator->setLangevinStepSize(node.getDoubleProperty("langevinStepSize"));
        integrator->setLangevinSchedule(version >= 2 ? node.getStringProperty("langevinSchedule") : "constant");
        if (version >= 4)
            integrator->setLangevinLevels(node.getIntProperty("langevinLevels"));
        if (version >= 3) {  // older XML keeps the dynamics model's defaults
            integrator->setExclusionDistance(node.getDoubleProperty("exclusionDistance"));
            integrator->setBondLengthLimit(node.getDoubleProperty("bondLengthLimit"));
            integrator->setNumThreads(node.getIntProperty("numThreads"));
        }
        integrator->setPeriodicMode(node.getIntProperty("periodicMode"));
        integrator->setIntegrationForceGroups(node.getIntProperty("integrationForceGroups"));

        const SerializationNode& featureNode = node.getChildNode("BeadFeatures");
        std::string featureBytes = decode(node, "BeadFeatures");
        int rows = featureNode.getIntProperty("rows"), columns = featureNode.getIntProperty("columns");
        if (featureBytes.size() % sizeof(float) != 0)
            throw OpenMMException(xmlError + "BeadFeatures holds " + std::to_string(featureBytes.size()) +
                                  " bytes, not a whole number of float32 values");
        if (rows < 0 || columns < 0 || (uint64_t) rows * (uint64_t) columns * sizeof(float) != featureBytes.size())
            throw OpenMMException(xmlError + "BeadFeatures holds " + std::to_string(featureBytes.size()) + " bytes but rows x columns = " +
                                  std::to_string(rows) + " x " + std::to_string(columns) + " float32 values need " +
                                  std::to_string((long long) rows * columns * (long long) sizeof(float)));
        std::vector<float> features(featureBytes.size() / sizeof(float));
        std::memcpy(features.data(), featureBytes.data(), featureBytes.size());
        integrator->setBeadFeatures(features, rows, columns);

        std::string bondBytes = decode(node, "Bonds");
        if (bondBytes.size() % (2 * sizeof(long long)) != 0)
            throw OpenMMException(xmlError + "Bonds holds " + std::to_string(bondBytes.size()) +
                                  " bytes, not a whole number of [bead, bead] int64 pairs (16 bytes each)");
        std::vector<long long> bonds(bondBytes.size() / sizeof(long long));
        std::memcpy(bonds.data(), bondBytes.data(), bondBytes.size());
        integrator->setBonds(bonds);

        std::istringstream state(decode(node, "State"));
        integrator->restoreState(state);
        if (state.peek() != std::char_traits<char>::eof())
            throw OpenMMException(xmlError + "State has trailing bytes after the history and random state");
    }
    catch (const OpenMMException& e) {
        const std::string what = e.what();
        if (what.rfind(xmlError, 0) == 0)
            throw;
        throw OpenMMException(xmlError + what);
    }
    catch (const std::exception& e) {  // invalid_argument from the setters and the model loader
        throw OpenMMException(xmlError + e.what());
    }
    return integrator.release();
}

void CGML::registerCGMLSerializationProxies() {
    static std::once_flag once;
    std::call_once(once, [] { SerializationProxy::registerProxy(typeid(CGMLIntegrator), new CGMLIntegratorProxy()); });
}

namespace {
// Register the proxy when the library is loaded (linked or dlopen'ed as a plugin), so
// XmlSerializer knows CGMLIntegrator without an explicit call.
struct RegisterProxiesOnLoad {
    RegisterProxiesOnLoad() { CGML::registerCGMLSerializationProxies(); }
} registerProxiesOnLoad;
} // namespace
