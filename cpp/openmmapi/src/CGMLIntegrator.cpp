#include "openmm_cgml/CGMLIntegrator.h"
#include "openmm_cgml/CGMLKernels.h"
#include "openmm_cgml/internal/LearnedStep.h"
#include "openmm/Context.h"
#include "openmm/OpenMMException.h"
#include "openmm/internal/ContextImpl.h"
#include <algorithm>
#include <cmath>
#include <random>
#include <sstream>
#include <stdexcept>

using namespace CGML;
using namespace OpenMM;

CGMLIntegrator::CGMLIntegrator(const std::string& dynamicsModel, const std::string& scoreModel, double stepSize,
                               bool allowStepSizeOverride)
    : dynamicsBytes(dynamicsModel), scoreBytes(scoreModel), allowStepSizeOverride(allowStepSizeOverride),
      numFeatures(0), featureRows(0), randomSeed(0), deterministic(false), periodicMode(-1), periodic(false), needsSeeding(true), pendingHistory(false) {
    learnedStep.reset(new LearnedStep(dynamicsBytes, scoreBytes));
    langevinSteps = learnedStep->getDefaultLangevinSteps();
    langevinStepSize = learnedStep->getDefaultLangevinStepSize();
    langevinSchedule = (int) learnedStep->getDefaultLangevinSchedule();
    langevinLevels = getNumNoiseLevels();
    exclusionDistance = learnedStep->getDefaultExclusionDistance();
    bondLengthLimit = learnedStep->getDefaultBondLengthLimit();
    numThreads = 0;
    setStepSize(stepSize > 0 ? stepSize : learnedStep->getModelStepSize());
}

CGMLIntegrator::~CGMLIntegrator() {
}

LearnedStep& CGMLIntegrator::getLearnedStep() {
    return *learnedStep;
}

double CGMLIntegrator::getModelStepSize() const {
    return learnedStep->getModelStepSize();
}

int CGMLIntegrator::getSequenceLength() const {
    return learnedStep->getSequenceLength();
}

void CGMLIntegrator::checkStepSize(double size) const {
    if (!(size > 0) || !std::isfinite(size)) {
        std::ostringstream msg;
        msg << "the step size must be positive and finite, got " << size;
        throw std::invalid_argument(msg.str());
    }
    double model = learnedStep->getModelStepSize();
    if (!allowStepSizeOverride && std::abs(size - model) > 1e-9 * model) {
        std::ostringstream msg;
        msg << "the step size " << size << " ps differs from the dynamics model's step_size_ps " << model
            << " ps; the model predicts one step of its own size. Pass allowStepSizeOverride=True to use it anyway";
        throw std::invalid_argument(msg.str());
    }
}

void CGMLIntegrator::setStepSize(double size) {
    checkStepSize(size);
    Integrator::setStepSize(size);
}

void CGMLIntegrator::checkParticleCount(int numParticles) const {
    if (featureRows > 0 && featureRows != numParticles)
        throw OpenMMException("CGMLIntegrator: bead features have " + std::to_string(featureRows) +
                              " rows but the System has " + std::to_string(numParticles) + " particles");
    for (long long index : bonds)
        if (index >= numParticles)
            throw OpenMMException("CGMLIntegrator: bond index " + std::to_string(index) +
                                  " is out of range for a System of " + std::to_string(numParticles) + " particles");
    if (learnedStep->getHistory().defined() && learnedStep->getHistory().size(1) != numParticles)
        throw OpenMMException("CGMLIntegrator: the history has " + std::to_string(learnedStep->getHistory().size(1)) +
                              " beads but the System has " + std::to_string(numParticles) + " particles");
}

void CGMLIntegrator::checkSystem(const System& system) const {
    // The learned step moves every particle by the model's prediction: it has no way to
    // keep constraints, to place virtual sites, or to hold massless (fixed) particles still.
    if (system.getNumConstraints() > 0)
        throw OpenMMException("CGMLIntegrator: the System has " + std::to_string(system.getNumConstraints()) +
                              " constraint(s); the learned step cannot honour constraints (remove them from the CG System)");
    for (int i = 0; i < system.getNumParticles(); i++) {
        if (system.isVirtualSite(i))
            throw OpenMMException("CGMLIntegrator: particle " + std::to_string(i) +
                                  " is a virtual site; the learned step cannot place virtual sites (every particle must be a bead)");
        if (system.getParticleMass(i) == 0.0)
            throw OpenMMException("CGMLIntegrator: particle " + std::to_string(i) +
                                  " has zero mass; massless (fixed) particles would be moved by the learned step");
    }
    const int expected = learnedStep->getExpectedFeatures();
    if (expected > 0 && featureRows == 0)
        throw OpenMMException("CGMLIntegrator: the dynamics model expects " + std::to_string(expected) +
                              " feature columns per bead but no bead features were set (call setBeadFeatures)");
    if (periodicMode == 1 && !system.usesPeriodicBoundaryConditions()) {
        // OpenMM gives every System a 2 nm cube until setDefaultPeriodicBoxVectors is called;
        // forcing PBC on such a System would hand the models a box nobody chose.
        Vec3 a, b, c;
        system.getDefaultPeriodicBoxVectors(a, b, c);
        if (a == Vec3(2, 0, 0) && b == Vec3(0, 2, 0) && c == Vec3(0, 0, 2))
            throw OpenMMException("CGMLIntegrator: periodic boundary conditions were forced on (periodic mode 1) but the "
                                  "System has no periodic box of its own: its default box is still OpenMM's placeholder "
                                  "2 nm cube, which the models would take as the real box. Set it with "
                                  "System.setDefaultPeriodicBoxVectors (or do not force periodic boundary conditions)");
    }
}

void CGMLIntegrator::setBeadFeatures(const std::vector<float>& values, int numBeads, int numFeatures) {
    if (numBeads < 0 || numFeatures < 0 || (size_t) numBeads * numFeatures != values.size())
        throw std::invalid_argument("bead features must be a [beads, features] array");
    if (!std::all_of(values.begin(), values.end(), [](float v) { return std::isfinite(v); }))
        throw std::invalid_argument("bead features contain NaN or infinite values");
    if (context != NULL && numBeads != context->getSystem().getNumParticles())
        throw std::invalid_argument("bead features have " + std::to_string(numBeads) + " rows but the System has " +
                                    std::to_string(context->getSystem().getNumParticles()) + " particles");
    const int expected = learnedStep->getExpectedFeatures();
    if (expected >= 0 && numFeatures != expected && !(numBeads == 0 && numFeatures == 0))
        throw std::invalid_argument("bead features have " + std::to_string(numFeatures) + " columns, the dynamics model expects " +
                                    std::to_string(expected) + " (its num_features)");
    features = values;
    featureRows = numBeads;
    this->numFeatures = numFeatures;
    learnedStep->setFeatures(torch::from_blob(features.data(), {numBeads, numFeatures}, torch::kFloat32).clone());
}

void CGMLIntegrator::setBonds(const std::vector<long long>& pairs) {
    if (pairs.size() % 2 != 0)
        throw std::invalid_argument("bonds must be an [E, 2] array of bead indices");
    int limit = context != NULL ? context->getSystem().getNumParticles() : -1;
    for (size_t i = 0; i < pairs.size(); i++) {
        if (pairs[i] < 0 || (limit >= 0 && pairs[i] >= limit))
            throw std::invalid_argument("bond " + std::to_string(i / 2) + " has bead index " + std::to_string(pairs[i]) +
                                        (limit >= 0 ? " out of range [0, " + std::to_string(limit) + ")" : ", which is negative"));
        if (i % 2 == 1 && pairs[i] == pairs[i - 1])
            throw std::invalid_argument("bond " + std::to_string(i / 2) + " joins bead " + std::to_string(pairs[i]) + " to itself");
    }
    bonds = pairs;
    learnedStep->setBonds(torch::from_blob(bonds.data(), {(int64_t) bonds.size() / 2, 2}, torch::kInt64).clone());
}

void CGMLIntegrator::setHistory(const std::vector<double>& frames, int numFrames, int numBeads) {
    if (numFrames < 0 || numBeads < 0 || (size_t) numFrames * numBeads * 3 != frames.size())
        throw std::invalid_argument("the history must be a [frames, beads, 3] array");
    if (context != NULL && numBeads != context->getSystem().getNumParticles())
        throw std::invalid_argument("the history has " + std::to_string(numBeads) + " beads but the System has " +
                                    std::to_string(context->getSystem().getNumParticles()) + " particles");
    torch::Tensor t = torch::from_blob(const_cast<double*>(frames.data()), {numFrames, numBeads, 3}, torch::kFloat64);
    learnedStep->setHistory(t);
    pendingHistory = (context == NULL);
    if (context != NULL)
        kernel.getAs<IntegrateCGMLStepKernel>().writeHistoryToContext(*context, *this);
}

bool CGMLIntegrator::synchronizeHistory(const torch::Tensor& positions, const torch::Tensor& velocities) {
    if (pendingHistory && learnedStep->getHistory().defined()) {
        pendingHistory = false;
        return true;
    }
    pendingHistory = false;
    if (!learnedStep->matchesHistory(positions, velocities, getStepSize()))
        learnedStep->rebuildHistory(positions, velocities, getStepSize());
    return false;
}

int CGMLIntegrator::getHistoryFrames() const {
    return hasHistory() ? (int) learnedStep->getHistory().size(0) : 0;
}

std::vector<double> CGMLIntegrator::getHistory() const {
    const torch::Tensor& h = learnedStep->getHistory();
    if (!h.defined())
        return {};
    torch::Tensor c = h.contiguous();
    return std::vector<double>(c.data_ptr<double>(), c.data_ptr<double>() + c.numel());
}

bool CGMLIntegrator::hasHistory() const {
    return learnedStep->getHistory().defined();
}

int CGMLIntegrator::getHistoryBeads() const {
    return hasHistory() ? (int) learnedStep->getHistory().size(1) : 0;
}

void CGMLIntegrator::setLangevinSteps(int steps) {
    if (steps < 0)
        throw std::invalid_argument("the number of Langevin steps must be >= 0");
    langevinSteps = steps;
}

void CGMLIntegrator::setLangevinStepSize(double eps) {
    if (!(eps > 0) || !std::isfinite(eps))
        throw std::invalid_argument("the Langevin step size must be positive and finite");
    langevinStepSize = eps;
}

void CGMLIntegrator::setLangevinSchedule(const std::string& schedule) {
    langevinSchedule = (int) LearnedStep::parseLangevinSchedule(schedule, "the Langevin schedule");
}

std::string CGMLIntegrator::getLangevinSchedule() const {
    return LearnedStep::langevinScheduleName((LearnedStep::LangevinSchedule) langevinSchedule);
}

int CGMLIntegrator::getNumNoiseLevels() const {
    return learnedStep->hasScoreModel() ? (int) learnedStep->getSigmas().size(0) : 0;
}

void CGMLIntegrator::setLangevinLevels(int levels) {
    const int available = getNumNoiseLevels();
    if (available == 0 && levels != 0)
        throw std::invalid_argument("the integrator has no score model, so no noise levels to refine over");
    if (available > 0 && (levels < 1 || levels > available))
        throw std::invalid_argument("the number of Langevin levels must be in [1, " + std::to_string(available) +
                                    "] (the score model's ladder), got " + std::to_string(levels));
    langevinLevels = levels;
}

std::vector<double> CGMLIntegrator::getLangevinStepSizes() const {
    return learnedStep->langevinStepSizes(langevinStepSize, (LearnedStep::LangevinSchedule) langevinSchedule);
}

void CGMLIntegrator::setExclusionDistance(double distance) {
    if (!(distance >= 0) || !std::isfinite(distance))
        throw std::invalid_argument("the exclusion distance must be >= 0 and finite (nm)");
    exclusionDistance = distance;
}

long long CGMLIntegrator::getExclusionCorrections() const {
    return learnedStep->getExclusionCorrections();
}

void CGMLIntegrator::setBondLengthLimit(double limit) {
    if (!(limit >= 0) || !std::isfinite(limit))
        throw std::invalid_argument("the bond-length limit must be >= 0 and finite (nm)");
    bondLengthLimit = limit;
}

void CGMLIntegrator::setCompiledDynamicsModel(const std::string& packagePath) {
    learnedStep->setCompiledDynamics(packagePath, packagePath.empty() ? "" : LearnedStep::archiveFingerprint(dynamicsBytes));
}

const std::string& CGMLIntegrator::getCompiledDynamicsModel() const {
    return learnedStep->getCompiledDynamicsPath();
}

void CGMLIntegrator::setCompiledScoreModel(const std::string& packagePath) {
    learnedStep->setCompiledScore(packagePath, packagePath.empty() ? "" : LearnedStep::archiveFingerprint(scoreBytes));
}

const std::string& CGMLIntegrator::getCompiledScoreModel() const {
    return learnedStep->getCompiledScorePath();
}

void CGMLIntegrator::setNumThreads(int threads) {
    if (threads < 0)
        throw std::invalid_argument("the number of threads must be >= 0 (0: libtorch's default)");
    numThreads = threads;
}

long long CGMLIntegrator::getBondLimitCorrections() const {
    return learnedStep->getBondLimitCorrections();
}

std::vector<double> CGMLIntegrator::getSigmas() const {
    torch::Tensor s = learnedStep->getSigmas().to(torch::kFloat64).contiguous();
    return std::vector<double>(s.data_ptr<double>(), s.data_ptr<double>() + s.numel());
}

void CGMLIntegrator::setPeriodicMode(int mode) {
    if (mode < -1 || mode > 1)
        throw std::invalid_argument("periodic mode must be -1 (follow the System), 0 or 1");
    if (context != NULL)
        throw std::invalid_argument("set the periodic mode before creating the Context");
    periodicMode = mode;
}

bool CGMLIntegrator::usesPeriodicBox() const {
    return periodic;
}

void CGMLIntegrator::initialize(ContextImpl& contextRef) {
    if (owner != NULL && &contextRef.getOwner() != owner)
        throw OpenMMException("This Integrator is already bound to a context");
    const System& system = contextRef.getSystem();
    checkSystem(system);
    checkParticleCount(system.getNumParticles());
    context = &contextRef;
    owner = &contextRef.getOwner();
    periodic = periodicMode == -1 ? system.usesPeriodicBoundaryConditions() : periodicMode == 1;
    if (featureRows == 0)  // no features set: [N, 0], as the contract's [N, F] with F = 0
        learnedStep->setFeatures(torch::zeros({(int64_t) system.getNumParticles(), 0}, torch::kFloat32));
    kernel = context->getPlatform().createKernel(IntegrateCGMLStepKernel::Name(), contextRef);
    kernel.getAs<IntegrateCGMLStepKernel>().initialize(system, *this);
    if (needsSeeding) {
        uint64_t seed = randomSeed != 0 ? (uint64_t) (unsigned int) randomSeed : (uint64_t) std::random_device()();
        learnedStep->seed(seed);
        needsSeeding = false;
    }
}

void CGMLIntegrator::cleanup() {
    kernel = Kernel();
    context = NULL;
    owner = NULL;
}

std::vector<std::string> CGMLIntegrator::getKernelNames() {
    return {IntegrateCGMLStepKernel::Name()};
}

double CGMLIntegrator::computeKineticEnergy() {
    return kernel.getAs<IntegrateCGMLStepKernel>().computeKineticEnergy(*context, *this);
}

void CGMLIntegrator::step(int steps) {
    if (context == NULL)
        throw OpenMMException("This Integrator is not bound to a context!");
    checkStepSize(getStepSize());
    for (int i = 0; i < steps; i++)
        kernel.getAs<IntegrateCGMLStepKernel>().execute(*context, *this);
}

void CGMLIntegrator::createCheckpoint(std::ostream& stream) const {
    learnedStep->writeState(stream);
}

void CGMLIntegrator::loadCheckpoint(std::istream& stream) {
    restoreState(stream);
}

void CGMLIntegrator::restoreState(std::istream& stream) {
    // The bead count the history must have: the bound System's, else that of the features.
    int64_t beads = context != NULL ? context->getSystem().getNumParticles() : (featureRows > 0 ? featureRows : -1);
    learnedStep->readState(stream, beads);  // validates everything before changing anything
    pendingHistory = false;
    needsSeeding = false;
}
