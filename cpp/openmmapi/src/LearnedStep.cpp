#include "openmm_cgml/internal/LearnedStep.h"
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include "openmm/OpenMMException.h"
#include "openmm/Vec3.h"
#include "openmm/reference/ReferenceNeighborList.h"
#include <ATen/CPUGeneratorImpl.h>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <istream>
#include <ostream>
#include <sstream>
#include <stdexcept>
#include <unordered_map>
#include <cstdio>

using namespace CGML;
using OpenMM::OpenMMException;

namespace {

torch::jit::Module loadArchive(const std::string& bytes, const std::string& what) {
    if (bytes.empty())
        throw std::invalid_argument("the " + what + " model is empty (no bytes were given)");
    std::istringstream stream(bytes);
    try {
        torch::jit::Module module = torch::jit::load(stream, torch::kCPU);
        module.eval();
        return module;
    }
    catch (const c10::Error& e) {
        throw std::invalid_argument("could not load the " + what + " model as a TorchScript archive: " +
                                    e.what_without_backtrace());
    }
    catch (const std::exception& e) {  // e.g. TorchScript compilation errors of a damaged archive
        std::string message = e.what();
        message.erase(0, message.find_first_not_of(" \n"));
        throw std::invalid_argument("could not load the " + what + " model as a TorchScript archive: " + message);
    }
}

torch::IValue requireAttribute(const torch::jit::Module& module, const std::string& what, const std::string& name) {
    if (!module.hasattr(name))
        throw std::invalid_argument("the " + what + " model has no attribute '" + name +
                                    "' required by the openmm-cgml TorchScript contract");
    return module.attr(name);
}

int requireInt(const torch::jit::Module& module, const std::string& what, const std::string& name) {
    torch::IValue value = requireAttribute(module, what, name);
    if (!value.isInt())
        throw std::invalid_argument("the " + what + " model's attribute '" + name + "' must be an int");
    return (int) value.toInt();
}

double requireDouble(const torch::jit::Module& module, const std::string& what, const std::string& name) {
    torch::IValue value = requireAttribute(module, what, name);
    if (value.isDouble())
        return value.toDouble();
    if (value.isInt())
        return (double) value.toInt();
    throw std::invalid_argument("the " + what + " model's attribute '" + name + "' must be a float");
}

/** The optional contract attribute num_features (bead-feature width F), or -1 if absent. */
int optionalFeatureWidth(const torch::jit::Module& module, const std::string& what) {
    if (!module.hasattr("num_features"))
        return -1;
    torch::IValue value = module.attr("num_features");
    if (!value.isInt() || value.toInt() < 0 || value.toInt() > std::numeric_limits<int>::max())
        throw std::invalid_argument("the " + what + " model's attribute 'num_features' must be an int >= 0");
    return (int) value.toInt();
}

std::string sizesOf(const torch::Tensor& t) {
    std::ostringstream s;
    s << t.sizes();
    return s.str();
}

std::string shapeOf(const torch::Tensor& t) {
    std::ostringstream s;
    s << t.sizes() << " " << t.scalar_type();
    return s.str();
}

void requireTensor(const torch::Tensor& t, const std::vector<int64_t>& shape, const std::string& what,
                   long long stepNumber) {
    // shape entries < 0 accept any size
    bool ok = t.defined() && t.scalar_type() == torch::kFloat32 && t.dim() == (int64_t) shape.size();
    for (size_t i = 0; ok && i < shape.size(); i++)
        ok = shape[i] < 0 || t.size(i) == shape[i];
    if (!ok) {
        std::ostringstream expected;
        expected << "[";
        for (size_t i = 0; i < shape.size(); i++)
            expected << (i ? ", " : "") << (shape[i] < 0 ? std::string("*") : std::to_string(shape[i]));
        expected << "] float32";
        throw OpenMMException("step " + std::to_string(stepNumber) + ": the " + what + " has shape/dtype " +
                              (t.defined() ? shapeOf(t) : std::string("undefined")) + ", expected " + expected.str());
    }
}

void writeTensor(std::ostream& stream, const torch::Tensor& t) {
    torch::Tensor c = t.contiguous();
    int64_t dims = c.dim();
    stream.write((const char*) &dims, sizeof(dims));
    for (int64_t i = 0; i < dims; i++) {
        int64_t size = c.size(i);
        stream.write((const char*) &size, sizeof(size));
    }
    stream.write((const char*) c.data_ptr(), c.nbytes());
}

const std::string corrupt = "CGMLIntegrator checkpoint is corrupt: ";
const std::string truncated = "CGMLIntegrator checkpoint is truncated: ";

/** Bytes left in a seekable stream, or -1 if the stream cannot tell. */
int64_t remainingBytes(std::istream& stream) {
    std::streampos here = stream.tellg();
    if (here == std::streampos(-1))
        return -1;
    stream.seekg(0, std::ios::end);
    std::streampos end = stream.tellg();
    stream.seekg(here);
    if (end == std::streampos(-1) || !stream)
        return -1;
    return (int64_t) (end - here);
}

int64_t readInt64(std::istream& stream, const std::string& what) {
    int64_t value = 0;
    stream.read((char*) &value, sizeof(value));
    if (!stream)
        throw OpenMMException(truncated + "it ends inside " + what);
    return value;
}

/**
 * Read a tensor written by writeTensor whose shape must be `expected` (entries < 0 accept
 * any size). Sizes are checked before anything is allocated, and never more bytes are
 * allocated than the stream has left (read in bounded chunks if the stream cannot tell).
 * `describe(i, size, wanted)` gives the message for a size that does not match.
 */
template <class Describe>
torch::Tensor readTensor(std::istream& stream, torch::ScalarType type, const std::vector<int64_t>& expected,
                         const std::string& what, Describe describe) {
    int64_t dims = readInt64(stream, "the " + what + "'s header");
    if (dims != (int64_t) expected.size())
        throw OpenMMException(corrupt + "the " + what + " has " + std::to_string(dims) + " dimensions, expected " +
                              std::to_string(expected.size()));
    std::vector<int64_t> sizes(dims);
    const int64_t elementSize = (int64_t) c10::elementSize(type);
    const int64_t limit = std::numeric_limits<int64_t>::max() / elementSize;
    int64_t count = 1;
    for (int64_t i = 0; i < dims; i++) {
        sizes[i] = readInt64(stream, "the " + what + "'s sizes");
        if (sizes[i] < 0 || (expected[i] >= 0 && sizes[i] != expected[i]))
            throw OpenMMException(describe(i, sizes[i], expected[i]));
        if (sizes[i] > 0 && count > limit / sizes[i])
            throw OpenMMException(corrupt + "the " + what + "'s sizes overflow");
        count *= sizes[i];
    }
    const int64_t bytes = count * elementSize;
    const int64_t left = remainingBytes(stream);
    if (left >= 0 && bytes > left)
        throw OpenMMException(truncated + "the " + what + " needs " + std::to_string(bytes) + " bytes but only " +
                              std::to_string(left) + " remain");
    std::string data;
    const int64_t chunk = 1 << 20;
    while ((int64_t) data.size() < bytes) {
        size_t start = data.size();
        size_t want = (size_t) std::min(chunk, bytes - (int64_t) start);
        data.resize(start + want);
        stream.read(&data[start], want);
        if (!stream)
            throw OpenMMException(truncated + "it ends inside the " + what);
    }
    torch::Tensor t = torch::empty(sizes, torch::TensorOptions().dtype(type));
    if (bytes > 0)
        std::memcpy(t.data_ptr(), data.data(), bytes);
    return t;
}

const char checkpointMagic[8] = {'C', 'G', 'M', 'L', 'C', 'K', 'P', '1'};

} // namespace

LearnedStep::LearnedStep(const std::string& dynamicsBytes, const std::string& scoreBytes)
    : hasScore(!scoreBytes.empty()), defaultLangevinSteps(0), defaultLangevinStepSize(0.0),
      defaultLangevinSchedule(LangevinSchedule::Constant), expectedFeatures(-1), defaultExclusionDistance(0.0),
      defaultBondLengthLimit(0.0), exclusionCorrections(0), bondLimitCorrections(0),
      generator(at::make_generator<at::CPUGeneratorImpl>(0)) {
    dynamics = loadArchive(dynamicsBytes, "dynamics");
    seqLen = requireInt(dynamics, "dynamics", "seq_len");
    modelStepSize = requireDouble(dynamics, "dynamics", "step_size_ps");
    if (seqLen < 1 || seqLen > maxSequenceLength)
        throw std::invalid_argument("the dynamics model's seq_len must be in [1, " + std::to_string(maxSequenceLength) +
                                    "], got " + std::to_string(seqLen));
    if (!(modelStepSize > 0) || !std::isfinite(modelStepSize)) {
        std::ostringstream msg;
        msg << "the dynamics model's step_size_ps must be positive and finite, got " << modelStepSize;
        throw std::invalid_argument(msg.str());
    }
    expectedFeatures = optionalFeatureWidth(dynamics, "dynamics");
    if (dynamics.hasattr("exclusion_distance")) {  // optional: absent means no excluded-volume correction
        defaultExclusionDistance = requireDouble(dynamics, "dynamics", "exclusion_distance");
        if (!(defaultExclusionDistance >= 0) || !std::isfinite(defaultExclusionDistance))
            throw std::invalid_argument("the dynamics model's attribute 'exclusion_distance' must be >= 0 and finite (nm)");
    }
    if (dynamics.hasattr("bond_length_limit")) {  // optional: absent means no limit
        defaultBondLengthLimit = requireDouble(dynamics, "dynamics", "bond_length_limit");
        if (!(defaultBondLengthLimit >= 0) || !std::isfinite(defaultBondLengthLimit))
            throw std::invalid_argument("the dynamics model's attribute 'bond_length_limit' must be >= 0 and finite (nm)");
    }
    if (!dynamics.find_method("forward"))
        throw std::invalid_argument("the dynamics model has no forward method");
    if (hasScore) {
        score = loadArchive(scoreBytes, "score");
        torch::IValue ladder = requireAttribute(score, "score", "sigmas");
        if (!ladder.isTensor())
            throw std::invalid_argument("the score model's attribute 'sigmas' must be a tensor");
        sigmas = ladder.toTensor().detach().to(torch::kFloat32).contiguous();
        if (sigmas.dim() != 1 || sigmas.numel() == 0 || !(sigmas > 0).all().item<bool>())
            throw std::invalid_argument("the score model's 'sigmas' must be a non-empty 1-D tensor of positive values");
        // the annealing runs largest first, and a shortened ladder keeps the last (smallest) levels
        if (sigmas.numel() > 1 && (sigmas.slice(0, 1) > sigmas.slice(0, 0, -1)).any().item<bool>())
            throw std::invalid_argument("the score model's 'sigmas' must be ordered largest first");
        defaultLangevinSteps = requireInt(score, "score", "langevin_steps");
        defaultLangevinStepSize = requireDouble(score, "score", "langevin_step_size");
        if (score.hasattr("langevin_schedule")) {  // optional: absent means the constant schedule
            torch::IValue schedule = score.attr("langevin_schedule");
            if (!schedule.isString())
                throw std::invalid_argument("the score model's attribute 'langevin_schedule' must be a str "
                                            "(\"constant\" or \"ncsn\")");
            defaultLangevinSchedule = parseLangevinSchedule(schedule.toStringRef(), "the score model's attribute 'langevin_schedule'");
        }
        if (!score.find_method("forward"))
            throw std::invalid_argument("the score model has no forward method");
        int scoreFeatures = optionalFeatureWidth(score, "score");
        if (scoreFeatures >= 0 && expectedFeatures >= 0 && scoreFeatures != expectedFeatures)
            throw std::invalid_argument("the dynamics model expects " + std::to_string(expectedFeatures) +
                                        " bead-feature columns but the score model expects " + std::to_string(scoreFeatures));
        if (expectedFeatures < 0)
            expectedFeatures = scoreFeatures;
    }
    else
        sigmas = torch::empty({0}, torch::kFloat32);
    features = torch::empty({0, 0}, torch::kFloat32);
    bonds = torch::empty({0, 2}, torch::kInt64);
}

LearnedStep::LangevinSchedule LearnedStep::parseLangevinSchedule(const std::string& name, const std::string& what) {
    if (name == "constant")
        return LangevinSchedule::Constant;
    if (name == "ncsn")
        return LangevinSchedule::NCSN;
    std::string shown = name.substr(0, 100);  // a corrupt value may be long or binary
    for (char& c : shown)
        if ((unsigned char) c < 32 || (unsigned char) c > 126)
            c = '?';
    throw std::invalid_argument(what + " must be \"constant\" or \"ncsn\", got \"" + shown +
                                (name.size() > shown.size() ? "..." : "") + "\"");
}

std::string LearnedStep::langevinScheduleName(LangevinSchedule schedule) {
    return schedule == LangevinSchedule::NCSN ? "ncsn" : "constant";
}

std::vector<double> LearnedStep::langevinStepSizes(double eps, LangevinSchedule schedule) const {
    const int64_t levels = sigmas.size(0);
    std::vector<double> steps(levels, eps);
    if (schedule == LangevinSchedule::NCSN && levels > 0) {
        // alpha_i = eps * sigma_i^2 / sigma_L^2 (Song & Ermon 2019), sigma_L the smallest sigma
        torch::Tensor ladder = sigmas.to(torch::kFloat64).contiguous();
        const double* s = ladder.data_ptr<double>();
        const double smallest = *std::min_element(s, s + levels);
        for (int64_t i = 0; i < levels; i++)
            steps[i] = eps * (s[i] / smallest) * (s[i] / smallest);
    }
    return steps;
}

void LearnedStep::seed(uint64_t seed) {
    generator = at::make_generator<at::CPUGeneratorImpl>(seed);
}

void LearnedStep::setHistory(const torch::Tensor& frames) {
    if (frames.dim() != 3 || frames.size(2) != 3)
        throw std::invalid_argument("the history must have shape [frames, beads, 3]");
    if (frames.size(0) < seqLen)
        throw std::invalid_argument("the history has " + std::to_string(frames.size(0)) +
                                    " frames but the dynamics model needs seq_len = " + std::to_string(seqLen));
    if (!torch::isfinite(frames).all().item<bool>())
        throw std::invalid_argument("the history contains NaN or infinite positions");
    history = frames.slice(0, frames.size(0) - seqLen).to(torch::kFloat64).contiguous().clone();
}

bool LearnedStep::matchesHistory(const torch::Tensor& x, const torch::Tensor& v, double dt) const {
    if (!history.defined() || history.size(1) != x.size(0))
        return false;
    // Tolerances well below any physical change, above float32 round-off of user input.
    auto close = [](const torch::Tensor& a, const torch::Tensor& b) {
        return ((a - b).abs() <= 1e-6 * (1 + b.abs())).all().item<bool>();
    };
    if (!close(x, history[seqLen - 1]))
        return false;
    return seqLen < 2 || close(v, historyVelocity(dt));
}

void LearnedStep::rebuildHistory(const torch::Tensor& x, const torch::Tensor& v, double dt) {
    // lag[k] = seqLen-1-k steps back, oldest first
    torch::Tensor lag = torch::arange(seqLen - 1, -1, -1, torch::kFloat64).view({seqLen, 1, 1});
    history = (x.unsqueeze(0) - lag * dt * v.unsqueeze(0)).contiguous();
}

torch::Tensor LearnedStep::historyVelocity(double dt) const {
    if (seqLen < 2)
        return torch::zeros_like(history[0]);
    return (history[seqLen - 1] - history[seqLen - 2]) / dt;
}

torch::Tensor LearnedStep::normal(int64_t numBeads) {
    return torch::randn({numBeads, 3}, generator, torch::TensorOptions().dtype(torch::kFloat64));
}

torch::Tensor LearnedStep::runDynamics(const torch::Tensor& history32, const torch::Tensor& box, long long stepNumber,
                                       torch::Tensor& stdOut, torch::Tensor& latentOut) {
    const int64_t n = history32.size(1);
    torch::IValue output;
    try {
        if (compiledDynamics.loader) {
            std::vector<torch::Tensor> result = runCompiled(compiledDynamics, dynamics, history32[history32.size(0) - 1],
                                                            box, {history32, features}, 3, "dynamics");
            output = c10::ivalue::Tuple::create({result[0], result[1], result[2]});
        }
        else
            output = dynamics.forward({history32, box, features, bonds});
    }
    catch (const std::exception& e) {
        const c10::Error* ce = dynamic_cast<const c10::Error*>(&e);
        throw OpenMMException("step " + std::to_string(stepNumber) + ": the " +
                              (compiledDynamics.loader ? "compiled dynamics network ('" + compiledDynamics.path + "')"
                                                       : std::string("dynamics model")) +
                              " failed (inputs: history " +
                              sizesOf(history32) + ", bead features " + sizesOf(features) + ", bonds " + sizesOf(bonds) +
                              (expectedFeatures >= 0 ? ", the model declares num_features = " + std::to_string(expectedFeatures) : "") +
                              "): " + (ce ? ce->what_without_backtrace() : e.what()));
    }
    if (!output.isTuple() || output.toTupleRef().elements().size() != 3)
        throw OpenMMException("step " + std::to_string(stepNumber) +
                              ": the dynamics model must return a tuple (mean, std, latent)");
    const auto& items = output.toTupleRef().elements();
    for (int i = 0; i < 3; i++)
        if (!items[i].isTensor())
            throw OpenMMException("step " + std::to_string(stepNumber) +
                                  ": the dynamics model must return three tensors (mean, std, latent)");
    torch::Tensor mean = items[0].toTensor();
    stdOut = items[1].toTensor();
    latentOut = items[2].toTensor();
    requireTensor(mean, {n, 3}, "dynamics model's mean", stepNumber);
    requireTensor(stdOut, {n, 3}, "dynamics model's std", stepNumber);
    requireTensor(latentOut, {n, -1}, "dynamics model's latent", stepNumber);
    if ((stdOut < 0).any().item<bool>()) {
        std::ostringstream msg;
        msg << "step " << stepNumber << ": the dynamics model's std is negative (min " << stdOut.min().item<double>()
            << "); the TorchScript contract requires std >= 0; the context keeps its last good state";
        throw OpenMMException(msg.str());
    }
    return mean;
}

LearnedStep::~LearnedStep() = default;

std::string LearnedStep::archiveFingerprint(const std::string& bytes) {
    uint32_t crc = 0xFFFFFFFFu;  // CRC-32 (IEEE, reflected), as zlib.crc32
    for (unsigned char byte : bytes) {
        crc ^= byte;
        for (int bit = 0; bit < 8; bit++)
            crc = (crc >> 1) ^ (0xEDB88320u & (0u - (crc & 1u)));
    }
    char hex[9];
    std::snprintf(hex, sizeof(hex), "%08x", crc ^ 0xFFFFFFFFu);
    return std::to_string(bytes.size()) + ":" + hex;
}

void LearnedStep::loadCompiled(CompiledNetwork& target, const std::string& packagePath, bool hasModel,
                               const torch::jit::Module& archive, const std::string& fingerprint,
                               const std::string& what) {
    if (packagePath.empty()) {
        target = CompiledNetwork();
        return;
    }
    if (!hasModel)
        throw std::invalid_argument("a compiled " + what + " network needs a " + what + " model");
    if (!archive.find_method("build_graph"))
        throw std::invalid_argument("the " + what + " model has no build_graph method (exported before the "
                                    "compiled route existed): export it again with `cgml export`");
    CompiledNetwork loaded;
    try {
        loaded.loader = std::make_shared<torch::inductor::AOTIModelPackageLoader>(packagePath, "model", true);
    }
    catch (const std::exception& e) {
        const c10::Error* ce = dynamic_cast<const c10::Error*>(&e);
        throw std::invalid_argument("cannot load the compiled " + what + " network '" + packagePath +
                                    "': " + (ce ? ce->what_without_backtrace() : e.what()));
    }
    // a package runs only with the archive it was compiled from (its graph, its weights)
    std::unordered_map<std::string, std::string> metadata = loaded.loader->get_metadata();
    auto kind = metadata.find("openmm_cgml_kind");
    auto source = metadata.find("openmm_cgml_archive");
    if (kind == metadata.end() || source == metadata.end())
        throw std::invalid_argument("'" + packagePath + "' was not made by openmm_cgml.compiled (no archive in its "
                                    "metadata)");
    if (kind->second != what)
        throw std::invalid_argument("'" + packagePath + "' is a compiled " + kind->second + " network, not " + what);
    if (source->second != fingerprint)
        throw std::invalid_argument("'" + packagePath + "' was compiled from another " + what + " archive (" +
                                    source->second + ", this one is " + fingerprint + "): compile it again");
    loaded.path = packagePath;
    target = loaded;
}

void LearnedStep::setCompiledDynamics(const std::string& packagePath, const std::string& archiveFingerprint) {
    loadCompiled(compiledDynamics, packagePath, true, dynamics, archiveFingerprint, "dynamics");
}

void LearnedStep::setCompiledScore(const std::string& packagePath, const std::string& archiveFingerprint) {
    loadCompiled(compiledScore, packagePath, hasScore, score, archiveFingerprint, "score");
}

std::vector<torch::Tensor> LearnedStep::runCompiled(const CompiledNetwork& network, const torch::jit::Module& archive,
                                                    const torch::Tensor& x, const torch::Tensor& box,
                                                    std::vector<torch::Tensor> inputs, size_t outputs,
                                                    const std::string& what) {
    // the graph by the archive (it branches on the data), the network by the package
    auto graph = archive.get_method("build_graph")({x, box, bonds}).toTuple();
    for (const auto& item : graph->elements())
        inputs.push_back(item.toTensor());
    std::vector<torch::Tensor> result = network.loader->run(inputs);
    if (result.size() != outputs)
        throw std::runtime_error("the compiled " + what + " network returned " + std::to_string(result.size()) +
                                 " tensors, not " + std::to_string(outputs));
    return result;
}

torch::Tensor LearnedStep::runScore(const torch::Tensor& x, const torch::Tensor& latent, const torch::Tensor& box,
                                    const torch::Tensor& sigma, long long stepNumber) {
    torch::IValue output;
    try {
        if (compiledScore.loader)
            output = runCompiled(compiledScore, score, x.to(torch::kFloat32), box, {latent.contiguous(), features, sigma},
                                 1, "score")[0];
        else
            output = score.forward({x.to(torch::kFloat32), latent, box, features, bonds, sigma});
    }
    catch (const std::exception& e) {
        const c10::Error* ce = dynamic_cast<const c10::Error*>(&e);
        throw OpenMMException("step " + std::to_string(stepNumber) + ": the " +
                              (compiledScore.loader ? "compiled score network ('" + compiledScore.path + "')" : std::string("score model")) +
                              " failed (inputs: x " +
                              sizesOf(x) + ", latent " + sizesOf(latent) + ", bead features " + sizesOf(features) +
                              ", bonds " + sizesOf(bonds) + "): " + (ce ? ce->what_without_backtrace() : e.what()));
    }
    if (!output.isTensor())
        throw OpenMMException("step " + std::to_string(stepNumber) + ": the score model must return a tensor");
    torch::Tensor s = output.toTensor();
    requireTensor(s, {x.size(0), 3}, "score model's output", stepNumber);
    return s;
}

torch::Tensor LearnedStep::predict(const torch::Tensor& box, const Options& options, long long stepNumber) {
    if (!history.defined())
        throw OpenMMException("CGMLIntegrator: no history to step from");
    torch::NoGradGuard noGrad;
    const int64_t n = history.size(1);
    torch::Tensor stdev, latent;
    torch::Tensor mean = runDynamics(history.to(torch::kFloat32), box, stepNumber, stdev, latent);
    torch::Tensor a = mean.to(torch::kFloat64);
    if (!options.deterministic)
        a = a + stdev.to(torch::kFloat64) * normal(n);
    const torch::Tensor xt = history[seqLen - 1];
    const torch::Tensor velocity = seqLen > 1 ? xt - history[seqLen - 2] : torch::zeros_like(xt);
    torch::Tensor x = xt + velocity + a;  // Euler with dt = 1 (docs/method.md step 4)
    if (!torch::isfinite(x).all().item<bool>())
        throw OpenMMException("step " + std::to_string(stepNumber) +
                              ": the dynamics model predicted a non-finite position; the context keeps its last good state");
    if (hasScore && options.langevinSteps > 0) {
        // annealed Langevin dynamics over the sigma ladder (docs/method.md step 5); the step size
        // of each level follows the schedule (constant: eps; NCSN: eps sigma_i^2 / sigma_L^2);
        // a shortened ladder keeps its smallest levels, where the score refines most
        const std::vector<double> stepSizes = langevinStepSizes(options.langevinStepSize, options.langevinSchedule);
        const int64_t levels = sigmas.size(0);
        const int64_t first = options.langevinLevels < 0 ? 0 : levels - std::min<int64_t>(options.langevinLevels, levels);
        for (int64_t level = first; level < levels; level++) {
            torch::Tensor sigma = sigmas[level];
            const double eps = stepSizes[level];
            const double noiseScale = std::sqrt(2 * eps);
            for (int k = 0; k < options.langevinSteps; k++) {
                torch::Tensor s = runScore(x, latent, box, sigma, stepNumber).to(torch::kFloat64);
                x = x + eps * s;
                if (!options.deterministic)
                    x = x + noiseScale * normal(n);
            }
        }
        if (!torch::isfinite(x).all().item<bool>())
            throw OpenMMException("step " + std::to_string(stepNumber) +
                                  ": the score refinement produced a non-finite position; the context keeps its last good state");
    }
    if (options.exclusionDistance > 0 || options.bondLengthLimit > 0)
        enforceDistanceLimits(x, box, options.exclusionDistance, options.bondLengthLimit, options.masses);
    return x;
}

namespace {

/** The shortest periodic image of d under OpenMM's reduced box vectors (rows a, b, c). */
OpenMM::Vec3 minimumImage(OpenMM::Vec3 d, const OpenMM::Vec3* box) {
    d -= box[2] * std::round(d[2] / box[2][2]);
    d -= box[1] * std::round(d[1] / box[1][1]);
    d -= box[0] * std::round(d[0] / box[0][0]);
    return d;
}

} // namespace

int LearnedStep::enforceDistanceLimits(torch::Tensor& x, const torch::Tensor& box, double distance,
                                       double bondLimit, const std::vector<double>* masses) {
    const int64_t n = x.size(0);
    if (n < 2 || !(distance > 0 || bondLimit > 0))
        return 0;
    torch::Tensor boxVectors = box.to(torch::kFloat64).contiguous();
    const double* b = boxVectors.data_ptr<double>();
    OpenMM::Vec3 periodicBox[3];
    for (int i = 0; i < 3; i++)
        periodicBox[i] = OpenMM::Vec3(b[3 * i], b[3 * i + 1], b[3 * i + 2]);
    const bool periodic = periodicBox[0][0] > 0 && periodicBox[1][1] > 0 && periodicBox[2][2] > 0;
    if (periodic && distance > 0 && 2 * distance > std::min(periodicBox[0][0], std::min(periodicBox[1][1], periodicBox[2][2])))
        throw OpenMMException("the exclusion distance (" + std::to_string(distance) +
                              " nm) is more than half the periodic box width");
    if ((int64_t) bondExclusions.size() != n) {
        bondExclusions.assign(n, std::set<int>());
        torch::Tensor pairs = bonds.to(torch::kInt64).contiguous();
        const int64_t* p = pairs.data_ptr<int64_t>();
        for (int64_t e = 0; e < pairs.size(0); e++)
            if (p[2 * e] >= 0 && p[2 * e] < n && p[2 * e + 1] >= 0 && p[2 * e + 1] < n) {
                bondExclusions[p[2 * e]].insert((int) p[2 * e + 1]);
                bondExclusions[p[2 * e + 1]].insert((int) p[2 * e]);
            }
    }
    std::vector<double> inverseMass(n, 1.0);
    if (masses != nullptr && (int64_t) masses->size() == n)
        for (int64_t i = 0; i < n; i++)
            inverseMass[i] = (*masses)[i] > 0 ? 1.0 / (*masses)[i] : 0.0;

    x = x.contiguous();
    double* px = x.data_ptr<double>();
    torch::Tensor bondPairs = bonds.to(torch::kInt64).contiguous();
    const int64_t* bp = bondPairs.data_ptr<int64_t>();
    // move the pair (i, j) so that |x_j - x_i| becomes `target`, along d = x_j - x_i (length r)
    auto setDistance = [&](int64_t i, int64_t j, const OpenMM::Vec3& d, double r, double target) {
        const double wi = inverseMass[i], wj = inverseMass[j];
        if (wi + wj == 0)
            return false;
        // coincident beads: a fixed direction keeps the step deterministic
        const OpenMM::Vec3 unit = r > 1e-12 * target ? d / r : OpenMM::Vec3(1, 0, 0);
        const OpenMM::Vec3 shift = unit * (target - r);
        for (int k = 0; k < 3; k++) {
            px[3 * i + k] -= shift[k] * wi / (wi + wj);
            px[3 * j + k] += shift[k] * wj / (wi + wj);
        }
        return true;
    };
    auto separation = [&](int64_t i, int64_t j) {
        OpenMM::Vec3 d(px[3 * j] - px[3 * i], px[3 * j + 1] - px[3 * i + 1], px[3 * j + 2] - px[3 * i + 2]);
        return periodic ? minimumImage(d, periodicBox) : d;
    };
    // A Verlet list: pairs within distance + skin, rebuilt only after some bead has moved
    // more than skin / 2 since it was built, so that a pair left out can't have come
    // within `distance` (the corrections of one step are small; rebuilding every sweep
    // was ~70 % of a step at 1,000+ beads).
    double skin = 0.5 * distance;
    if (periodic)  // the list's cutoff must stay below half the box
        skin = std::max(0.0, std::min(skin, 0.5 * std::min(periodicBox[0][0], std::min(periodicBox[1][1],
                                                            periodicBox[2][2])) - distance));
    std::vector<OpenMM::Vec3> wrapped(n), listPositions(n);
    OpenMM::NeighborList pairs;
    bool listStale = true;
    int excluded = 0, shortened = 0;
    for (int sweep = 0; sweep < maxExclusionSweeps; sweep++) {
        int moved = 0;
        if (distance > 0) {
            if (listStale) {
                for (int64_t i = 0; i < n; i++) {
                    OpenMM::Vec3 r(px[3 * i], px[3 * i + 1], px[3 * i + 2]);
                    listPositions[i] = r;
                    if (periodic) {  // the voxel hash wants positions inside the box
                        r -= periodicBox[2] * std::floor(r[2] / periodicBox[2][2]);
                        r -= periodicBox[1] * std::floor(r[1] / periodicBox[1][1]);
                        r -= periodicBox[0] * std::floor(r[0] / periodicBox[0][0]);
                    }
                    wrapped[i] = r;
                }
                OpenMM::computeNeighborListVoxelHash(pairs, (int) n, wrapped, bondExclusions, periodicBox, periodic,
                                                     distance + skin);
                listStale = false;
            }
            for (const OpenMM::AtomPair& pair : pairs) {
                const OpenMM::Vec3 d = separation(pair.first, pair.second);
                const double r = std::sqrt(d.dot(d));
                // separated by an earlier correction of this sweep (or round-off from one)
                if (r < distance * (1 - 1e-9) && setDistance(pair.first, pair.second, d, r, distance)) {
                    moved++;
                    excluded++;
                }
            }
        }
        if (bondLimit > 0)
            for (int64_t e = 0; e < bondPairs.size(0); e++) {
                const int64_t i = bp[2 * e], j = bp[2 * e + 1];
                if (i < 0 || i >= n || j < 0 || j >= n || i == j)
                    continue;
                const OpenMM::Vec3 d = separation(i, j);
                const double r = std::sqrt(d.dot(d));
                if (r > bondLimit * (1 + 1e-9) && setDistance(i, j, d, r, bondLimit)) {
                    moved++;
                    shortened++;
                }
            }
        if (moved == 0)
            break;
        if (distance > 0) {
            double largest = 0;
            for (int64_t i = 0; i < n && !listStale; i++) {
                const OpenMM::Vec3 d(px[3 * i] - listPositions[i][0], px[3 * i + 1] - listPositions[i][1],
                                     px[3 * i + 2] - listPositions[i][2]);
                largest = std::max(largest, d.dot(d));
                listStale = 4 * largest > skin * skin;  // moved more than skin / 2
            }
        }
    }
    exclusionCorrections += excluded;
    bondLimitCorrections += shortened;
    return excluded + shortened;
}

void LearnedStep::push(const torch::Tensor& x) {
    if (seqLen > 1)
        history = torch::cat({history.slice(0, 1), x.unsqueeze(0)}, 0);
    else
        history = x.unsqueeze(0).clone();
}

void LearnedStep::writeState(std::ostream& stream) const {
    stream.write(checkpointMagic, sizeof(checkpointMagic));
    char hasHistory = history.defined() ? 1 : 0;
    stream.write(&hasHistory, 1);
    if (hasHistory)
        writeTensor(stream, history);
    writeTensor(stream, generator.get_state());
}

void LearnedStep::readState(std::istream& stream, int64_t numBeads) {
    char magic[sizeof(checkpointMagic)];
    stream.read(magic, sizeof(magic));
    if (!stream || std::string(magic, sizeof(magic)) != std::string(checkpointMagic, sizeof(checkpointMagic)))
        throw OpenMMException("CGMLIntegrator checkpoint is corrupt or from another integrator");
    char hasHistory = 0;
    stream.read(&hasHistory, 1);
    if (!stream)
        throw OpenMMException(truncated + "it ends after the header");
    if (hasHistory != 0 && hasHistory != 1)
        throw OpenMMException(corrupt + "bad history flag " + std::to_string((int) hasHistory));
    torch::Tensor restored;
    if (hasHistory) {
        restored = readTensor(stream, torch::kFloat64, {seqLen, numBeads, 3}, "history",
            [&](int64_t dim, int64_t size, int64_t wanted) -> std::string {
                const std::string got = std::to_string(size);
                if (size < 0)
                    return corrupt + "the history has a negative size " + got;
                if (dim == 0)
                    return "CGMLIntegrator checkpoint: the history has " + got + " frames but the dynamics model's seq_len is " +
                           std::to_string(seqLen) + " (a checkpoint of an integrator with another model?)";
                if (dim == 1)
                    return "CGMLIntegrator checkpoint: the history has " + got + " beads but the System has " +
                           std::to_string(wanted) + " particles";
                return corrupt + "the history frames have " + got + " coordinates per bead, expected 3";
            });
        if (restored.size(1) == 0)
            throw OpenMMException(corrupt + "the history has no beads");
        if (!torch::isfinite(restored).all().item<bool>())
            throw OpenMMException(corrupt + "the history contains NaN or infinite positions");
    }
    const int64_t stateSize = generator.get_state().numel();
    torch::Tensor rngState = readTensor(stream, torch::kUInt8, {stateSize}, "random state",
        [&](int64_t, int64_t size, int64_t) -> std::string {
            return corrupt + "the random state has " + std::to_string(size) + " bytes, expected " + std::to_string(stateSize);
        });
    at::Generator restoredGenerator = at::make_generator<at::CPUGeneratorImpl>(0);
    try {
        restoredGenerator.set_state(rngState);
    }
    catch (const c10::Error& e) {
        throw OpenMMException(corrupt + "invalid random state: " + e.what_without_backtrace());
    }
    // all checks passed: only now does the state change
    history = restored;
    generator = restoredGenerator;
}
