#ifndef OPENMM_CGML_INTEGRATOR_H_
#define OPENMM_CGML_INTEGRATOR_H_

#include "openmm/Integrator.h"
#include "openmm/Kernel.h"
#include "openmm/System.h"
#include <torch/types.h>
#include <memory>
#include <string>
#include <vector>

namespace CGML {

class LearnedStep;

/**
 * An Integrator that advances a coarse-grained system by one large learned step per
 * call (Fu et al., TMLR 2023). A TorchScript dynamics model predicts a Gaussian over
 * each bead's acceleration from the last seqLen frames; an optional TorchScript score
 * model refines the prediction by annealed Langevin dynamics. No forces are computed.
 *
 * Units are OpenMM's: positions in nm, time in ps. The models work in nm with dt = 1
 * (accelerations in nm per step^2); see docs/contract.md for the TorchScript contract.
 *
 * The integrator owns the history of the last seqLen frames (oldest first). If no
 * history was set, the first step builds one from the context's positions x and
 * velocities v as x_{t-k} = x - k v dt; whenever the context's positions or velocities
 * no longer match the newest frame (the user set new ones), it is rebuilt the same way.
 * Checkpoints carry the history and the random state; serialization carries the model
 * bytes, the configuration, the history and the random state.
 *
 * Trust: integrator XML carries TorchScript models, which are code, and checkpoints are
 * loaded into such models. Load both only from trusted sources (PyTorch's stance on
 * pickles). Restoring validates sizes, shapes and lengths so that a corrupt, truncated or
 * mismatched file raises an OpenMMException instead of crashing, but it does not make an
 * untrusted file safe.
 *
 * Refused with an OpenMMException when a Context is created: Systems with constraints,
 * virtual sites or massless particles (the learned step moves every particle), a model
 * that declares num_features > 0 without bead features, and periodic mode 1 on a System
 * that does not use PBC and whose default box was never set (OpenMM's 2 nm placeholder).
 */
class CGMLIntegrator : public OpenMM::Integrator {
public:
    /**
     * Create an integrator from serialized TorchScript archives (the bytes of .pt files).
     *
     * @param dynamicsModel  bytes of the dynamics module archive
     * @param scoreModel     bytes of the score module archive, or empty for none
     * @param stepSize       step size in ps; <= 0 means the dynamics model's step_size_ps
     * @param allowStepSizeOverride  accept a step size different from the model's
     */
    CGMLIntegrator(const std::string& dynamicsModel, const std::string& scoreModel = "",
                   double stepSize = 0.0, bool allowStepSizeOverride = false);
    ~CGMLIntegrator();

    void step(int steps) override;
    void setStepSize(double size) override;

    const std::string& getDynamicsModelBytes() const { return dynamicsBytes; }
    const std::string& getScoreModelBytes() const { return scoreBytes; }
    bool hasScoreModel() const { return !scoreBytes.empty(); }
    /** The step size (ps) the dynamics model was trained for. */
    double getModelStepSize() const;
    bool getAllowStepSizeOverride() const { return allowStepSizeOverride; }
    void setAllowStepSizeOverride(bool allow) { allowStepSizeOverride = allow; }
    /** Number of frames the dynamics model reads (its seq_len). */
    int getSequenceLength() const;

    /**
     * Per-bead features, row-major [numBeads, numFeatures] float32. If the dynamics (or
     * score) model declares an int attribute num_features, numFeatures must equal it.
     */
    void setBeadFeatures(const std::vector<float>& values, int numBeads, int numFeatures);
    const std::vector<float>& getBeadFeatures() const { return features; }
    int getNumFeatures() const { return numFeatures; }
    int getNumFeatureRows() const { return featureRows; }
    /** CG bonds, each listed once, as pairs of bead indices (flattened [E,2]). */
    void setBonds(const std::vector<long long>& pairs);
    const std::vector<long long>& getBonds() const { return bonds; }

    /**
     * Set the history, row-major [numFrames, numBeads, 3] in nm, oldest first, frames one
     * step apart. Only the last seqLen frames are kept. If the integrator is bound to a
     * context, its positions and velocities are set from the newest frames.
     */
    void setHistory(const std::vector<double>& frames, int numFrames, int numBeads);
    /** The current history, flattened [getHistoryFrames(), getHistoryBeads(), 3], or empty if none. */
    std::vector<double> getHistory() const;
    bool hasHistory() const;
    int getHistoryFrames() const;
    int getHistoryBeads() const;

    int getRandomNumberSeed() const { return randomSeed; }
    /**
     * Seed of the random generator; 0 (the default) picks a unique seed. The generator is
     * seeded when the integrator is next bound to a Context, and then keeps its stream
     * (across reinitialize() and new Contexts) unless the seed is set again; a checkpoint
     * or a deserialized integrator restores the stream exactly.
     */
    void setRandomNumberSeed(int seed) { randomSeed = seed; needsSeeding = true; }
    bool getDeterministic() const { return deterministic; }
    /** Deterministic mode: use the predicted mean and no Langevin noise. */
    void setDeterministic(bool value) { deterministic = value; }
    int getLangevinSteps() const { return langevinSteps; }
    void setLangevinSteps(int steps);
    double getLangevinStepSize() const { return langevinStepSize; }
    void setLangevinStepSize(double eps);
    /**
     * Step-size schedule of the annealed Langevin refinement over the noise ladder:
     * "constant" (every level uses the Langevin step size eps) or "ncsn" (Song & Ermon
     * 2019: level i uses eps * sigma_i^2 / sigma_L^2, sigma_L the smallest sigma). The
     * default is the score model's optional str attribute langevin_schedule, else
     * "constant". Any other value throws std::invalid_argument. Like the Langevin steps
     * and step size, it is configuration: serialized, not part of checkpoints.
     */
    void setLangevinSchedule(const std::string& schedule);
    std::string getLangevinSchedule() const;
    /** The step size of each level of the ladder (nm^2) under the current schedule. */
    std::vector<double> getLangevinStepSizes() const;
    /** Noise levels of the score model's ladder (0 without a score model). */
    int getNumNoiseLevels() const;
    /**
     * How many noise levels the refinement anneals through: the smallest this many of
     * the ladder (the larger sigmas are skipped). Default: all of them. Must be in
     * [1, getNumNoiseLevels()] (0 without a score model); other values throw
     * std::invalid_argument. The step sizes of the levels kept do not change. Like the
     * other Langevin settings, it is configuration: serialized, not part of checkpoints.
     */
    void setLangevinLevels(int levels);
    int getLangevinLevels() const { return langevinLevels; }
    /**
     * Excluded volume (nm): after each step (and its refinement), beads that are not
     * CG-bonded and closer than this are pushed apart to exactly this distance (each
     * pair's centre of mass fixed; see LearnedStep::resolveOverlaps). 0 turns it off. The
     * default is the dynamics model's optional float attribute exclusion_distance, else 0.
     * Configuration: serialized, not part of checkpoints. Throws std::invalid_argument for
     * a negative or non-finite value.
     */
    void setExclusionDistance(double distance);
    double getExclusionDistance() const { return exclusionDistance; }
    /** Bead pairs moved apart by the excluded-volume correction since the integrator was created. */
    long long getExclusionCorrections() const;
    /**
     * Bond-length limit (nm): after each step (and its refinement), CG-bonded beads
     * farther apart than this are pulled in to exactly this distance (each pair's centre
     * of mass fixed), in the same sweeps as the excluded volume. 0 turns it off. The
     * default is the dynamics model's optional float attribute bond_length_limit, else 0.
     * Configuration: serialized, not part of checkpoints.
     */
    void setBondLengthLimit(double limit);
    double getBondLengthLimit() const { return bondLengthLimit; }
    /** CG bonds shortened by the bond-length limit since the integrator was created. */
    long long getBondLimitCorrections() const;
    /**
     * Intra-op threads libtorch uses for the model calls of each step; 0 (the default)
     * leaves libtorch's own setting (its default: one per core). libtorch's thread count
     * is per process, so this also sets it for other torch work in the process.
     * Configuration: serialized, not part of checkpoints. Throws std::invalid_argument if
     * negative.
     */
    void setNumThreads(int threads);
    int getNumThreads() const { return numThreads; }
    /**
     * Run the dynamics (score) network from an AOTInductor package compiled on this
     * machine (openmm_cgml.compiled; LearnedSimulator.createIntegrator(compiled=True)
     * makes and sets them) instead of the archive's TorchScript network; the graph is
     * still built by the archive. An empty path goes back to the archive. The results
     * agree with the archive's to float32 round-off. A run-time choice like the thread
     * count, but not serialized: a package holds machine code for this CPU, so a
     * deserialized integrator runs the archives until these are called again. Throws
     * std::invalid_argument (the current route kept) if there is no such model, the
     * archive predates the compiled route, or the package cannot be loaded.
     */
    void setCompiledDynamicsModel(const std::string& packagePath);
    const std::string& getCompiledDynamicsModel() const;
    void setCompiledScoreModel(const std::string& packagePath);
    const std::string& getCompiledScoreModel() const;
    /** The score model's noise ladder (nm, largest first); empty without a score model. */
    std::vector<double> getSigmas() const;
    /** -1: follow System::usesPeriodicBoundaryConditions(); 0: non-periodic; 1: periodic. */
    void setPeriodicMode(int mode);
    int getPeriodicMode() const { return periodicMode; }

    /**
     * Restore history and random state written by LearnedStep::writeState (checkpoints, XML).
     * Validated against the model's seq_len and the bound System's particle count (or the
     * bead features' rows when unbound); on any error it throws OpenMMException and
     * nothing changes. Load only trusted checkpoints (see the class comment).
     */
    void restoreState(std::istream& stream);
    /** Access for kernels. */
    LearnedStep& getLearnedStep();
    bool usesPeriodicBox() const;
    /**
     * Called by kernels before each step with the context's positions and velocities
     * (float64 [N,3] tensors). Rebuilds the history if they no longer match it. Returns
     * true if a history set by the user before the first step must be written into the
     * context instead.
     */
    bool synchronizeHistory(const torch::Tensor& positions, const torch::Tensor& velocities);

protected:
    void initialize(OpenMM::ContextImpl& context) override;
    void cleanup() override;
    std::vector<std::string> getKernelNames() override;
    double computeKineticEnergy() override;
    bool kineticEnergyRequiresForce() const override { return false; }
    /** Velocities are backward differences (x_t - x_{t-1}) / dt: half a step behind. */
    double getVelocityTimeOffset() const override { return getStepSize() / 2; }
    void createCheckpoint(std::ostream& stream) const override;
    void loadCheckpoint(std::istream& stream) override;

private:
    void checkStepSize(double size) const;
    void checkParticleCount(int numParticles) const;
    void checkSystem(const OpenMM::System& system) const;
    std::string dynamicsBytes, scoreBytes;
    std::unique_ptr<LearnedStep> learnedStep;
    bool allowStepSizeOverride;
    std::vector<float> features;
    int numFeatures, featureRows;
    std::vector<long long> bonds;
    int randomSeed;
    bool deterministic;
    int langevinSteps;
    double langevinStepSize;
    int langevinSchedule;  // a LearnedStep::LangevinSchedule
    int langevinLevels;
    double exclusionDistance, bondLengthLimit;
    int numThreads;
    int periodicMode;
    bool periodic;
    bool needsSeeding;    // seed the generator at the next initialize()
    bool pendingHistory;  // set by setHistory() while unbound: it wins over the context at the first step
    OpenMM::Kernel kernel;
};

} // namespace CGML

#endif
