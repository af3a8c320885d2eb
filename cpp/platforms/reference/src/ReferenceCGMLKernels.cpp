#include "ReferenceCGMLKernels.h"
#include "openmm_cgml/internal/LearnedStep.h"
#include <ATen/Parallel.h>
#include "openmm/OpenMMException.h"
#include "openmm/Platform.h"
#include "openmm/internal/ContextImpl.h"
#include "openmm/reference/ReferencePlatform.h"
#include <mutex>

using namespace CGML;
using namespace OpenMM;

namespace {

ReferencePlatform::PlatformData& platformData(ContextImpl& context) {
    return *static_cast<ReferencePlatform::PlatformData*>(context.getPlatformData());
}

// Vec3 is three contiguous doubles, so a std::vector<Vec3> is an [N,3] float64 array.
torch::Tensor view(std::vector<Vec3>& values) {
    static_assert(sizeof(Vec3) == 3 * sizeof(double), "Vec3 must be three packed doubles");
    return torch::from_blob(values.data(), {(int64_t) values.size(), 3}, torch::kFloat64);
}

} // namespace

void ReferenceIntegrateCGMLStepKernel::initialize(const System& system, const CGMLIntegrator& integrator) {
    masses.resize(system.getNumParticles());
    for (int i = 0; i < system.getNumParticles(); i++)
        masses[i] = system.getParticleMass(i);
}

void ReferenceIntegrateCGMLStepKernel::writeHistoryToContext(ContextImpl& context, CGMLIntegrator& integrator) {
    ReferencePlatform::PlatformData& data = platformData(context);
    LearnedStep& learned = integrator.getLearnedStep();
    const torch::Tensor& history = learned.getHistory();
    view(*data.positions).copy_(history[history.size(0) - 1]);
    view(*data.velocities).copy_(learned.historyVelocity(integrator.getStepSize()));
}

void ReferenceIntegrateCGMLStepKernel::execute(ContextImpl& context, CGMLIntegrator& integrator) {
    ReferencePlatform::PlatformData& data = platformData(context);
    torch::Tensor positions = view(*data.positions);
    torch::Tensor velocities = view(*data.velocities);
    const double dt = integrator.getStepSize();
    LearnedStep& learned = integrator.getLearnedStep();
    if (integrator.synchronizeHistory(positions, velocities))
        writeHistoryToContext(context, integrator);

    torch::Tensor box = torch::zeros({3, 3}, torch::kFloat32);
    if (integrator.usesPeriodicBox())
        for (int i = 0; i < 3; i++)
            for (int j = 0; j < 3; j++)
                box[i][j] = (float) data.periodicBoxVectors[i][j];

    LearnedStep::Options options;
    options.deterministic = integrator.getDeterministic();
    options.langevinSteps = integrator.getLangevinSteps();
    options.langevinStepSize = integrator.getLangevinStepSize();
    options.langevinSchedule = LearnedStep::parseLangevinSchedule(integrator.getLangevinSchedule(), "the Langevin schedule");
    options.langevinLevels = integrator.getLangevinLevels();
    options.exclusionDistance = integrator.getExclusionDistance();
    options.bondLengthLimit = integrator.getBondLengthLimit();
    options.masses = &masses;
    if (integrator.getNumThreads() > 0 && at::get_num_threads() != integrator.getNumThreads())
        at::set_num_threads(integrator.getNumThreads());
    // predict() throws before anything is written: on failure the context keeps its last good state
    torch::Tensor next = learned.predict(box, options, context.getStepCount() + 1);
    velocities.copy_((next - positions) / dt);
    positions.copy_(next);
    learned.push(next);
    context.setTime(context.getTime() + dt);
    context.setStepCount(context.getStepCount() + 1);
}

double ReferenceIntegrateCGMLStepKernel::computeKineticEnergy(ContextImpl& context, const CGMLIntegrator& integrator) {
    const std::vector<Vec3>& velocities = *platformData(context).velocities;
    double energy = 0;
    for (size_t i = 0; i < masses.size(); i++)
        energy += masses[i] * velocities[i].dot(velocities[i]);
    return 0.5 * energy;
}

KernelImpl* ReferenceCGMLKernelFactory::createKernelImpl(std::string name, const Platform& platform,
                                                         ContextImpl& context) const {
    if (name == IntegrateCGMLStepKernel::Name())
        return new ReferenceIntegrateCGMLStepKernel(name, platform);
    throw OpenMMException("ReferenceCGMLKernelFactory: no kernel named '" + name + "'");
}

void CGML::registerReferenceCGMLKernels() {
    static std::mutex lock;
    std::lock_guard<std::mutex> guard(lock);
    const std::vector<std::string> names = {IntegrateCGMLStepKernel::Name()};
    for (int i = 0; i < Platform::getNumPlatforms(); i++) {
        Platform& platform = Platform::getPlatform(i);
        // CPU derives from ReferencePlatform and shares its PlatformData, but a factory
        // registered on "Reference" alone is not consulted by "CPU": register on each.
        if (dynamic_cast<ReferencePlatform*>(&platform) != NULL && !platform.supportsKernels(names))
            platform.registerKernelFactory(IntegrateCGMLStepKernel::Name(), new ReferenceCGMLKernelFactory());
    }
}

// OpenMM plugin entry points: Platform::loadPluginLibrary / loadPluginsFromDirectory call
// these after loading the library, so a C++ program that loads this plugin gets the
// kernel without calling registerReferenceCGMLKernels itself (as openmm-torch does).
extern "C" OPENMM_EXPORT void registerPlatforms() {
}

extern "C" OPENMM_EXPORT void registerKernelFactories() {
    CGML::registerReferenceCGMLKernels();
}
