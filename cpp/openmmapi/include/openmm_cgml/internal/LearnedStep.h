#ifndef OPENMM_CGML_LEARNED_STEP_H_
#define OPENMM_CGML_LEARNED_STEP_H_

#include <torch/script.h>
#include <ATen/core/Generator.h>
#include <iosfwd>
#include <memory>
#include <set>
#include <string>
#include <vector>

namespace torch::inductor {
class AOTIModelPackageLoader;
}

namespace CGML {

/**
 * The learned step, independent of any OpenMM platform: the TorchScript models, the
 * history of the last seqLen frames and the random generator. Every platform kernel
 * moves positions in and out; this class is the one implementation of docs/method.md
 * steps 4-5 (predict with the dynamics model, refine with annealed Langevin dynamics).
 *
 * Positions and history are float64 [.., N, 3] tensors in nm; model inputs are float32.
 */
class LearnedStep {
public:
    /**
     * Step size of each noise level of the annealed Langevin refinement. Constant: every
     * level uses eps. NCSN (Song & Ermon 2019): level i uses alpha_i = eps * sigma_i^2 /
     * sigma_L^2, sigma_L the smallest sigma of the ladder (so the smallest level uses eps).
     */
    enum class LangevinSchedule { Constant, NCSN };
    /** "constant" or "ncsn"; anything else throws std::invalid_argument naming `what`. */
    static LangevinSchedule parseLangevinSchedule(const std::string& name, const std::string& what);
    static std::string langevinScheduleName(LangevinSchedule schedule);

    struct Options {
        bool deterministic = false;
        int langevinSteps = 0;
        double langevinStepSize = 0.0;
        LangevinSchedule langevinSchedule = LangevinSchedule::Constant;
        /** Noise levels the refinement runs: the smallest this many of the ladder; -1: all. */
        int langevinLevels = -1;
        /** Excluded volume (nm): non-bonded beads closer than this are pushed apart after the step; 0: off. */
        double exclusionDistance = 0.0;
        /** CG-bonded beads farther apart than this (nm) are pulled together after the step; 0: off. */
        double bondLengthLimit = 0.0;
        /** Bead masses (amu) weighting the distance corrections; null or empty: equal weights. */
        const std::vector<double>* masses = nullptr;
    };

    /** Largest seq_len accepted from a model (a sanity bound: the history is [seqLen, N, 3]). */
    static const int maxSequenceLength = 10000;

    LearnedStep(const std::string& dynamicsBytes, const std::string& scoreBytes);
    ~LearnedStep();

    int getSequenceLength() const { return seqLen; }
    double getModelStepSize() const { return modelStepSize; }
    bool hasScoreModel() const { return hasScore; }
    const torch::Tensor& getSigmas() const { return sigmas; }
    int getDefaultLangevinSteps() const { return defaultLangevinSteps; }
    /** Bead-feature width F the models declare (optional int attribute num_features), or -1. */
    int getExpectedFeatures() const { return expectedFeatures; }
    double getDefaultLangevinStepSize() const { return defaultLangevinStepSize; }
    /** The score model's optional string attribute langevin_schedule; Constant if absent. */
    LangevinSchedule getDefaultLangevinSchedule() const { return defaultLangevinSchedule; }
    /** The dynamics model's optional float attribute exclusion_distance (nm), or 0 if absent. */
    double getDefaultExclusionDistance() const { return defaultExclusionDistance; }
    /** The dynamics model's optional float attribute bond_length_limit (nm), or 0 if absent. */
    double getDefaultBondLengthLimit() const { return defaultBondLengthLimit; }
    /** Non-bonded bead pairs moved apart by the excluded-volume correction so far. */
    long long getExclusionCorrections() const { return exclusionCorrections; }
    /** CG bonds shortened by the bond-length limit so far. */
    long long getBondLimitCorrections() const { return bondLimitCorrections; }
    /**
     * Keep the step's result inside the pair distances the data shows. Excluded volume
     * (`distance` > 0): every pair of beads that are not CG-bonded and closer than
     * `distance` (nm; minimum image in a periodic `box`) is pushed apart along its
     * separation to exactly `distance`. Bond-length limit (`bondLimit` > 0): every CG bond
     * longer than `bondLimit` is pulled in to exactly `bondLimit`. Each correction moves
     * the lighter bead more and keeps the pair's centre of mass (so momentum is
     * conserved); pairs are resolved one after another (as SHAKE resolves constraints)
     * in up to maxExclusionSweeps sweeps, from a Verlet neighbour list (rebuilt when a
     * bead has moved more than half its skin). Returns
     * the number of pair corrections made.
     */
    int enforceDistanceLimits(torch::Tensor& x, const torch::Tensor& box, double distance, double bondLimit,
                              const std::vector<double>* masses);
    /** Excluded volume only: enforceDistanceLimits(x, box, distance, 0, masses). */
    int resolveOverlaps(torch::Tensor& x, const torch::Tensor& box, double distance,
                        const std::vector<double>* masses) {
        return enforceDistanceLimits(x, box, distance, 0.0, masses);
    }
    static const int maxExclusionSweeps = 20;

    /** The step size of each level of the ladder (nm^2) under a schedule and base step eps. */
    std::vector<double> langevinStepSizes(double eps, LangevinSchedule schedule) const;

    /** Graph inputs shared by all steps: features [N,F] float32, bonds [E,2] int64, box [3,3]. */
    void setFeatures(torch::Tensor features) { this->features = std::move(features); }
    void setBonds(torch::Tensor bonds) { this->bonds = std::move(bonds); bondExclusions.clear(); }
    const torch::Tensor& getFeatures() const { return features; }
    const torch::Tensor& getBondTensor() const { return bonds; }

    void seed(uint64_t seed);

    /**
     * Run a network from an AOTInductor package (openmm_cgml.compiled) instead of the
     * archive's: each call builds its graph with the archive's build_graph method and
     * passes it to the package, with (history, features) for the dynamics model and
     * (latent, features, sigma) for the score model. An empty path goes back to the
     * archive. Throws std::invalid_argument if there is no such model, the archive has no
     * build_graph method, or the package cannot be loaded; the current route is kept then.
     */
    /**
     * "<bytes>:<crc32 hex>" of an archive (openmm_cgml.compiled.archive_fingerprint): a
     * package made by openmm_cgml.compiled carries its archive's in its metadata, and
     * runs only with that archive.
     */
    static std::string archiveFingerprint(const std::string& bytes);
    /** archiveFingerprint: the fingerprint of the archive this step was built from (its
     *  owner has the bytes; computed only when a package is set, ~7 ms per MB). */
    void setCompiledDynamics(const std::string& packagePath, const std::string& archiveFingerprint);
    void setCompiledScore(const std::string& packagePath, const std::string& archiveFingerprint);
    const std::string& getCompiledDynamicsPath() const { return compiledDynamics.path; }
    const std::string& getCompiledScorePath() const { return compiledScore.path; }

    /** History [T,N,3] float64, oldest first, or an undefined tensor. */
    const torch::Tensor& getHistory() const { return history; }
    /** Keep the last seqLen frames of [F,N,3] (F >= seqLen). */
    void setHistory(const torch::Tensor& frames);
    void clearHistory() { history = torch::Tensor(); }
    /** Whether positions x and velocities v (float64 [N,3]) are the newest history frame. */
    bool matchesHistory(const torch::Tensor& x, const torch::Tensor& v, double dt) const;
    /** x_{t-k} = x - k v dt for k = seqLen-1 .. 0. */
    void rebuildHistory(const torch::Tensor& x, const torch::Tensor& v, double dt);
    /** Velocity (x_t - x_{t-1}) / dt of the newest history frame (zero if seqLen == 1). */
    torch::Tensor historyVelocity(double dt) const;

    /**
     * Predict the next positions (float64 [N,3]) from the history; the history is not
     * changed. Throws OpenMMException naming the step and the stage on bad model output
     * or a non-finite result.
     */
    torch::Tensor predict(const torch::Tensor& box, const Options& options, long long stepNumber);
    /** Append a frame, dropping the oldest. */
    void push(const torch::Tensor& x);

    void writeState(std::ostream& stream) const;
    /**
     * Restore what writeState wrote. Everything is validated before anything changes: the
     * history must be [seqLen, numBeads, 3] (numBeads < 0: any count the stream can hold)
     * with finite values, the random state must have this generator's size, and no size
     * may claim more bytes than the stream has left. Throws OpenMMException otherwise and
     * leaves the history and the random state as they were.
     *
     * These bytes come from checkpoints and integrator XML, which also carry TorchScript
     * models (code): load them only from trusted sources. The checks guard against
     * corruption and mismatched files, not against a malicious author.
     */
    void readState(std::istream& stream, int64_t numBeads = -1);

private:
    torch::Tensor runDynamics(const torch::Tensor& history32, const torch::Tensor& box, long long stepNumber,
                              torch::Tensor& stdOut, torch::Tensor& latentOut);
    torch::Tensor runScore(const torch::Tensor& x, const torch::Tensor& latent, const torch::Tensor& box,
                           const torch::Tensor& sigma, long long stepNumber);
    torch::Tensor normal(int64_t numBeads);

    /** A compiled network in use (loader null: the archive's network). */
    struct CompiledNetwork {
        std::shared_ptr<torch::inductor::AOTIModelPackageLoader> loader;
        std::string path;
    };
    static void loadCompiled(CompiledNetwork& target, const std::string& packagePath, bool hasModel,
                             const torch::jit::Module& archive, const std::string& fingerprint, const std::string& what);
    /** The archive's graph on positions x, then the package on (leading inputs ++ graph). */
    std::vector<torch::Tensor> runCompiled(const CompiledNetwork& network, const torch::jit::Module& archive,
                                           const torch::Tensor& x, const torch::Tensor& box,
                                           std::vector<torch::Tensor> inputs, size_t outputs, const std::string& what);

    torch::jit::Module dynamics, score;
    CompiledNetwork compiledDynamics, compiledScore;
    bool hasScore;
    int seqLen;
    double modelStepSize;
    torch::Tensor sigmas;  // float32 [L]
    int defaultLangevinSteps;
    double defaultLangevinStepSize;
    LangevinSchedule defaultLangevinSchedule;
    int expectedFeatures;
    double defaultExclusionDistance, defaultBondLengthLimit;
    long long exclusionCorrections, bondLimitCorrections;
    std::vector<std::set<int>> bondExclusions;  // per bead, its CG-bonded partners (built on first use)
    torch::Tensor features, bonds, history;
    at::Generator generator;
};

} // namespace CGML

#endif
