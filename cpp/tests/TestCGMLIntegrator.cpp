// C++ tests of the plugin's own logic, with no Python: base64, the step recurrence,
// history rebuilding, checkpoints and XML serialization on the Reference/CPU platforms.
#include "CGMLIntegratorProxy.h"
#include "ReferenceCGMLKernels.h"
#include "openmm/Context.h"
#include "openmm/OpenMMException.h"
#include "openmm/Platform.h"
#include "openmm/State.h"
#include "openmm/System.h"
#include "openmm/VirtualSite.h"
#include "openmm/serialization/SerializationProxy.h"
#include "openmm/serialization/XmlSerializer.h"
#include "openmm_cgml/CGMLIntegrator.h"
#include "openmm_cgml/internal/Base64.h"
#include "openmm_cgml/internal/LearnedStep.h"
#include <torch/script.h>
#include <cmath>
#include <cstring>
#include <iostream>
#include <memory>
#include <random>
#include <sstream>

using namespace CGML;
using namespace OpenMM;

#define ASSERT(cond) do { if (!(cond)) throw std::runtime_error(std::string("assertion failed: ") + #cond + " at line " + std::to_string(__LINE__)); } while (0)
#define ASSERT_NEAR(a, b, tol) do { if (!(std::abs((a) - (b)) <= (tol))) { std::ostringstream s; s << "expected " << (b) << " got " << (a) << " at line " << __LINE__; throw std::runtime_error(s.str()); } } while (0)

static std::string harmonicModel(double k, double stdev, int seqLen) {
    torch::jit::Module module("Harmonic");
    module.register_attribute("seq_len", c10::IntType::get(), seqLen);
    module.register_attribute("step_size_ps", c10::FloatType::get(), 0.5);
    std::ostringstream code;
    code << "def forward(self, history: Tensor, box: Tensor, features: Tensor, bonds: Tensor) -> Tuple[Tensor, Tensor, Tensor]:\n"
         << "    x = history[-1]\n"
         << "    return " << -k << " * x, torch.full_like(x, " << stdev << "), torch.zeros([x.size(0), 2])\n";
    module.define(code.str());
    std::ostringstream bytes;
    module.save(bytes);
    return bytes.str();
}

/** A dynamics module from TorchScript source; extra attributes: numFeatures >= 0 declares num_features. */
static std::string customModel(const std::string& body, int seqLen = 2, double stepSizePs = 0.5, int numFeatures = -1) {
    torch::jit::Module module("Custom");
    module.register_attribute("seq_len", c10::IntType::get(), seqLen);
    module.register_attribute("step_size_ps", c10::FloatType::get(), stepSizePs);
    if (numFeatures >= 0)
        module.register_attribute("num_features", c10::IntType::get(), numFeatures);
    module.define("def forward(self, history: Tensor, box: Tensor, features: Tensor, bonds: Tensor) -> Tuple[Tensor, Tensor, Tensor]:\n"
                  "    x = history[-1]\n" + body);
    std::ostringstream bytes;
    module.save(bytes);
    return bytes.str();
}

template <class E, class F>
static std::string expectThrow(F f, const std::string& contains, int line) {
    try {
        f();
    }
    catch (const E& e) {
        std::string what = e.what();
        if (what.find(contains) == std::string::npos)
            throw std::runtime_error("line " + std::to_string(line) + ": message '" + what + "' lacks '" + contains + "'");
        return what;
    }
    throw std::runtime_error("line " + std::to_string(line) + ": expected an exception containing '" + contains + "'");
}
#define EXPECT_THROW(E, code, contains) expectThrow<E>([&]() { code; }, contains, __LINE__)

static std::string gaussianScore() {
    torch::jit::Module module("Score");
    module.register_attribute("sigmas", c10::TensorType::get(), torch::tensor({0.1f, 0.01f}));
    module.register_attribute("langevin_steps", c10::IntType::get(), 2);
    module.register_attribute("langevin_step_size", c10::FloatType::get(), 1e-4);
    module.define("def forward(self, x: Tensor, latent: Tensor, box: Tensor, features: Tensor, bonds: Tensor, sigma: Tensor) -> Tensor:\n"
                  "    return -x\n");
    std::ostringstream bytes;
    module.save(bytes);
    return bytes.str();
}

/** Score -x / sigma^2 on the ladder (0.4, 0.2, 0.1), K = 2, eps = 1e-3; schedule: the optional attribute. */
static std::string sigmaScore(const std::string& schedule = "", bool scheduleIsInt = false) {
    torch::jit::Module module("SigmaScore");
    module.register_attribute("sigmas", c10::TensorType::get(), torch::tensor({0.4f, 0.2f, 0.1f}));
    module.register_attribute("langevin_steps", c10::IntType::get(), 2);
    module.register_attribute("langevin_step_size", c10::FloatType::get(), 1e-3);
    if (scheduleIsInt)
        module.register_attribute("langevin_schedule", c10::IntType::get(), 3);
    else if (!schedule.empty())
        module.register_attribute("langevin_schedule", c10::StringType::get(), schedule);
    module.define("def forward(self, x: Tensor, latent: Tensor, box: Tensor, features: Tensor, bonds: Tensor, sigma: Tensor) -> Tensor:\n"
                  "    return -x / (sigma * sigma)\n");
    std::ostringstream bytes;
    module.save(bytes);
    return bytes.str();
}

static System makeSystem(int n) {
    System system;
    for (int i = 0; i < n; i++)
        system.addParticle(1.0);
    return system;
}

static std::vector<Vec3> randomPositions(int n, int seed) {
    std::mt19937 rng(seed);
    std::uniform_real_distribution<double> u(-1, 1);
    std::vector<Vec3> x(n);
    for (auto& p : x)
        p = Vec3(u(rng), u(rng), u(rng));
    return x;
}

static void testBase64() {
    std::mt19937 rng(1);
    for (int length = 0; length < 200; length++) {
        std::string bytes(length, '\0');
        for (char& c : bytes)
            c = (char) (rng() & 255);
        ASSERT(base64Decode(base64Encode(bytes)) == bytes);
    }
    ASSERT(base64Encode("Man") == "TWFu" && base64Encode("Ma") == "TWE=" && base64Encode("M") == "TQ==");
    for (const char* bad : {"TWF", "TW=u", "T!Fu", "====", "TQ==TWFu"}) {
        bool threw = false;
        try { base64Decode(bad); } catch (const std::invalid_argument&) { threw = true; }
        ASSERT(threw);
    }
}

static void testRecurrence(const std::string& platformName) {
    const int n = 5, steps = 100;
    const double k = 0.2, dt = 0.5;
    System system = makeSystem(n);
    CGMLIntegrator integrator(harmonicModel(k, 0.0, 3));
    integrator.setDeterministic(true);
    Context context(system, integrator, Platform::getPlatformByName(platformName));
    std::vector<Vec3> x0 = randomPositions(n, 3), v0(n, Vec3(0.1, -0.2, 0.05));
    context.setPositions(x0);
    context.setVelocities(v0);
    integrator.step(steps);
    State state = context.getState(State::Positions | State::Velocities);
    ASSERT(state.getStepCount() == steps);
    ASSERT_NEAR(state.getTime(), steps * dt, 1e-12);
    for (int i = 0; i < n; i++)
        for (int d = 0; d < 3; d++) {
            std::vector<double> h = {x0[i][d] - 2 * dt * v0[i][d], x0[i][d] - dt * v0[i][d], x0[i][d]};
            for (int s = 0; s < steps; s++) {
                double xt = h[h.size() - 1], xp = h[h.size() - 2];
                h.push_back(xt + (xt - xp) + (double) ((float) -k * (float) xt));
            }
            ASSERT_NEAR(state.getPositions()[i][d], h.back(), 1e-5);
            ASSERT_NEAR(state.getVelocities()[i][d], (h.back() - h[h.size() - 2]) / dt, 1e-5);
        }
    // new positions from the user: the history is rebuilt (seq_len frames at rest)
    context.setPositions(std::vector<Vec3>(n, Vec3(1, 1, 1)));
    context.setVelocities(std::vector<Vec3>(n, Vec3()));
    integrator.step(1);
    std::vector<double> history = integrator.getHistory();
    ASSERT(history.size() == 3 * n * 3);
    ASSERT_NEAR(history[0], 1.0, 1e-12);
    ASSERT_NEAR(history[2 * n * 3], 1.0 + (double) ((float) -k * 1.0f), 1e-7);
}

static std::vector<Vec3> positionsAfter(Context& context, Integrator& integrator, int steps) {
    integrator.step(steps);
    return context.getState(State::Positions).getPositions();
}

static void testCheckpointAndSerialization() {
    const int n = 6;
    System system = makeSystem(n);
    CGMLIntegrator integrator(harmonicModel(0.05, 0.01, 3), gaussianScore());
    integrator.setRandomNumberSeed(17);
    Context context(system, integrator, Platform::getPlatformByName("Reference"));
    context.setPositions(randomPositions(n, 4));
    integrator.step(3);
    std::stringstream checkpoint;
    context.createCheckpoint(checkpoint);
    std::stringstream xml;
    XmlSerializer::serialize<Integrator>(&integrator, "Integrator", xml);
    State state = context.getState(State::Positions | State::Velocities);
    std::vector<Vec3> reference = positionsAfter(context, integrator, 4);

    context.loadCheckpoint(checkpoint);
    std::vector<Vec3> again = positionsAfter(context, integrator, 4);
    for (int i = 0; i < n; i++)
        ASSERT(again[i] == reference[i]);  // bit-identical

    Integrator* restored = XmlSerializer::deserialize<Integrator>(xml);
    ASSERT(dynamic_cast<CGMLIntegrator*>(restored) != NULL);
    {
        Context other(system, *restored, Platform::getPlatformByName("Reference"));
        other.setState(state);
        std::vector<Vec3> continued = positionsAfter(other, *restored, 4);
        for (int i = 0; i < n; i++)
            ASSERT(continued[i] == reference[i]);
    }
    delete restored;
}

static void testErrors() {
    bool threw = false;
    try { CGMLIntegrator integrator("not a model"); } catch (const std::invalid_argument&) { threw = true; }
    ASSERT(threw);
    threw = false;
    try { CGMLIntegrator integrator(harmonicModel(0.1, 0, 2), "", 2.0); } catch (const std::invalid_argument&) { threw = true; }
    ASSERT(threw);
    CGMLIntegrator integrator(harmonicModel(0.1, 0, 2));
    integrator.setBonds({0, 9});
    System system = makeSystem(3);
    threw = false;
    try { Context context(system, integrator, Platform::getPlatformByName("Reference")); } catch (const OpenMMException&) { threw = true; }
    ASSERT(threw);
}

static std::string int64Bytes(std::initializer_list<int64_t> values) {
    std::string out;
    for (int64_t v : values)
        out.append((const char*) &v, sizeof(v));
    return out;
}

// Restoring a state validates everything first and changes nothing on failure (issue 10).
static void testRestoreValidation() {
    const int n = 4;
    System system = makeSystem(n);
    CGMLIntegrator integrator(harmonicModel(0.1, 0.01, 3));
    integrator.setRandomNumberSeed(3);
    Context context(system, integrator, Platform::getPlatformByName("Reference"));
    context.setPositions(randomPositions(n, 5));
    integrator.step(2);
    std::ostringstream good;
    integrator.getLearnedStep().writeState(good);
    const std::string state = good.str();
    const std::vector<double> before = integrator.getHistory();
    auto restore = [&](const std::string& bytes) {
        std::istringstream stream(bytes);
        integrator.restoreState(stream);
    };
    auto unchanged = [&]() {
        ASSERT(integrator.getHistory() == before);
        ASSERT(integrator.getHistoryFrames() == 3 && integrator.getHistoryBeads() == n);
    };
    // every truncation is refused
    for (size_t cut = 0; cut < state.size(); cut += (cut < 200 ? 1 : 97)) {
        EXPECT_THROW(OpenMMException, restore(state.substr(0, cut)), "CGMLIntegrator checkpoint");
        unchanged();
    }
    // another seq_len, either way
    for (int other : {2, 5}) {
        CGMLIntegrator writer(harmonicModel(0.1, 0, other));
        System system2 = makeSystem(n);
        Context context2(system2, writer, Platform::getPlatformByName("Reference"));
        writer.step(1);
        std::ostringstream stream;
        writer.getLearnedStep().writeState(stream);
        EXPECT_THROW(OpenMMException, restore(stream.str()),
                     "history has " + std::to_string(other) + " frames but the dynamics model's seq_len is 3");
        unchanged();
    }
    // sizes: another bead count, absurd sizes (never allocated), wrong dims, bad RNG size
    const std::string magic = state.substr(0, 9);  // magic + has-history flag
    const std::string rest = state.substr(9 + 8 * 4 + 3 * n * 3 * 8);  // the RNG part
    EXPECT_THROW(OpenMMException, restore(magic + int64Bytes({3, 3, 5, 3}) + std::string(3 * 5 * 3 * 8, '\0') + rest),
                 "history has 5 beads but the System has 4 particles");
    EXPECT_THROW(OpenMMException, restore(magic + int64Bytes({3, 3, 1LL << 40, 3}) + rest), "1099511627776 beads");
    EXPECT_THROW(OpenMMException, restore(magic + int64Bytes({2, 3, 4})), "2 dimensions, expected 3");
    EXPECT_THROW(OpenMMException, restore(magic + int64Bytes({3, 3, 4, -1})), "negative size");
    std::string badFlag = state;
    badFlag[8] = 7;
    EXPECT_THROW(OpenMMException, restore(badFlag), "bad history flag");
    std::string shortRng = state.substr(0, 9 + 8 * 4 + 3 * n * 3 * 8) + int64Bytes({1, 16}) + std::string(16, '\0');
    EXPECT_THROW(OpenMMException, restore(shortRng), "random state has 16 bytes");
    std::string nan = state;
    double value = std::nan("");
    std::memcpy(&nan[9 + 8 * 4], &value, sizeof(value));
    EXPECT_THROW(OpenMMException, restore(nan), "NaN");
    unchanged();
    // unbound: the bead count is free, but no size may claim more bytes than remain
    CGMLIntegrator unbound(harmonicModel(0.1, 0, 3));
    std::istringstream huge(magic + int64Bytes({3, 3, 1LL << 40, 3}) + rest);
    EXPECT_THROW(OpenMMException, unbound.restoreState(huge), "only");
    ASSERT(!unbound.hasHistory());
    std::istringstream overflow(magic + int64Bytes({3, 3, 1LL << 61, 3}) + rest);
    EXPECT_THROW(OpenMMException, unbound.restoreState(overflow), "overflow");
    // after all that, a real checkpoint still continues bit-identically
    std::stringstream checkpoint;
    context.createCheckpoint(checkpoint);
    std::vector<Vec3> reference = positionsAfter(context, integrator, 3);
    context.loadCheckpoint(checkpoint);
    ASSERT(integrator.getHistory() == before);
    std::vector<Vec3> again = positionsAfter(context, integrator, 3);
    for (int i = 0; i < n; i++)
        ASSERT(again[i] == reference[i]);
}

static void testXmlValidation() {
    const int n = 3;
    CGMLIntegrator integrator(harmonicModel(0.1, 0, 2));
    integrator.setBeadFeatures(std::vector<float>(n * 2, 1.0f), n, 2);
    integrator.setBonds({0, 1, 1, 2});
    std::stringstream stream;
    XmlSerializer::serialize<Integrator>(&integrator, "Integrator", stream);
    const std::string xml = stream.str();
    auto replaceBase64 = [&](const std::string& element, const std::string& bytes) {
        size_t at = xml.find("<" + element + " ");
        size_t start = xml.find("base64=\"", at) + 8, end = xml.find('"', start);
        return xml.substr(0, start) + base64Encode(bytes) + xml.substr(end);
    };
    auto load = [](const std::string& text) {
        std::stringstream in(text);
        delete XmlSerializer::deserialize<Integrator>(in);
    };
    load(xml);
    EXPECT_THROW(OpenMMException, load(replaceBase64("BeadFeatures", "abc")), "BeadFeatures holds 3 bytes");
    EXPECT_THROW(OpenMMException, load(replaceBase64("BeadFeatures", std::string(28, '\0'))), "rows x columns = 3 x 2");
    EXPECT_THROW(OpenMMException, load(replaceBase64("Bonds", "1234567")), "Bonds holds 7 bytes");
    EXPECT_THROW(OpenMMException, load(replaceBase64("Bonds", std::string(40, '\0'))), "Bonds holds 40 bytes");
    size_t state = xml.find("<State base64=\"") + 15;
    EXPECT_THROW(OpenMMException, load(xml.substr(0, state) + "!!!!" + xml.substr(state)), "base64 of <State> is invalid");
    size_t step = xml.find("stepSize=\"") + 10;
    for (const char* bad : {"-0.5", "0", "inf", "nan"})
        EXPECT_THROW(OpenMMException, load(xml.substr(0, step) + bad + xml.substr(xml.find('"', step))),
                     "stepSize must be positive and finite");
}

static void testSystemAndModelChecks() {
    auto bind = [](System& system, CGMLIntegrator& integrator) {
        Context context(system, integrator, Platform::getPlatformByName("Reference"));
    };
    {
        System system = makeSystem(3);
        system.addConstraint(0, 1, 0.1);
        CGMLIntegrator integrator(harmonicModel(0.1, 0, 2));
        EXPECT_THROW(OpenMMException, bind(system, integrator), "1 constraint");
    }
    {
        System system = makeSystem(3);
        system.setParticleMass(2, 0.0);
        CGMLIntegrator integrator(harmonicModel(0.1, 0, 2));
        EXPECT_THROW(OpenMMException, bind(system, integrator), "particle 2 has zero mass");
        system.setVirtualSite(2, new TwoParticleAverageSite(0, 1, 0.5, 0.5));
        EXPECT_THROW(OpenMMException, bind(system, integrator), "particle 2 is a virtual site");
    }
    {
        System system = makeSystem(3);
        CGMLIntegrator integrator(harmonicModel(0.1, 0, 2));
        integrator.setPeriodicMode(1);
        EXPECT_THROW(OpenMMException, bind(system, integrator), "no periodic box of its own");
        system.setDefaultPeriodicBoxVectors(Vec3(2.5, 0, 0), Vec3(0, 2.5, 0), Vec3(0, 0, 2.5));
        bind(system, integrator);  // a box that was set: fine
    }
    // model attributes
    EXPECT_THROW(std::invalid_argument, CGMLIntegrator(harmonicModel(0.1, 0, 0)), "seq_len must be in [1, 10000]");
    EXPECT_THROW(std::invalid_argument, CGMLIntegrator(harmonicModel(0.1, 0, 10001)), "seq_len must be in [1, 10000]");
    const std::string zeros = "    return torch.zeros_like(x), torch.zeros_like(x), torch.zeros([x.size(0), 1])\n";
    EXPECT_THROW(std::invalid_argument, CGMLIntegrator(customModel(zeros, 2, INFINITY)), "step_size_ps must be positive and finite");
    EXPECT_THROW(std::invalid_argument, CGMLIntegrator(customModel(zeros, 2, NAN)), "step_size_ps must be positive and finite");
    CGMLIntegrator overridden(harmonicModel(0.1, 0, 2), "", 0.0, true);
    EXPECT_THROW(std::invalid_argument, overridden.setStepSize(INFINITY), "positive and finite");
    // declared feature width
    CGMLIntegrator wide(customModel(zeros, 2, 0.5, 7));
    EXPECT_THROW(std::invalid_argument, wide.setBeadFeatures(std::vector<float>(15), 3, 5),
                 "bead features have 5 columns, the dynamics model expects 7");
    {
        System system = makeSystem(3);
        EXPECT_THROW(OpenMMException, bind(system, wide), "expects 7 feature columns per bead");
        wide.setBeadFeatures(std::vector<float>(21), 3, 7);
        bind(system, wide);
    }
    // std < 0
    {
        System system = makeSystem(3);
        CGMLIntegrator negative(customModel("    return torch.zeros_like(x), -torch.ones_like(x), torch.zeros([x.size(0), 1])\n"));
        Context context(system, negative, Platform::getPlatformByName("Reference"));
        context.setPositions(randomPositions(3, 1));
        EXPECT_THROW(OpenMMException, negative.step(1), "std is negative");
        ASSERT(context.getState(State::Positions).getStepCount() == 0);
    }
}

// The NCSN step-size schedule: alpha_i = eps sigma_i^2 / sigma_L^2 (Song & Ermon 2019).
static void testLangevinSchedule() {
    const int n = 4, K = 2;
    const double eps = 1e-3;
    const std::vector<double> sigmas = {(double) 0.4f, (double) 0.2f, (double) 0.1f};
    // default: the model's attribute, else constant
    ASSERT(CGMLIntegrator(harmonicModel(0, 0, 2), sigmaScore()).getLangevinSchedule() == "constant");
    ASSERT(CGMLIntegrator(harmonicModel(0, 0, 2), sigmaScore("constant")).getLangevinSchedule() == "constant");
    ASSERT(CGMLIntegrator(harmonicModel(0, 0, 2), sigmaScore("ncsn")).getLangevinSchedule() == "ncsn");
    EXPECT_THROW(std::invalid_argument, CGMLIntegrator(harmonicModel(0, 0, 2), sigmaScore("cosine")),
                 "the score model's attribute 'langevin_schedule' must be \"constant\" or \"ncsn\", got \"cosine\"");
    EXPECT_THROW(std::invalid_argument, CGMLIntegrator(harmonicModel(0, 0, 2), sigmaScore("", true)),
                 "'langevin_schedule' must be a str");
    CGMLIntegrator integrator(harmonicModel(0, 0, 2), sigmaScore());
    for (const char* bad : {"NCSN", "", "linear"})
        EXPECT_THROW(std::invalid_argument, integrator.setLangevinSchedule(bad), "must be \"constant\" or \"ncsn\"");
    ASSERT(integrator.getLangevinSchedule() == "constant");
    // per-level step sizes: eps * sigma_i^2 / sigma_L^2
    std::vector<double> alphas = integrator.getLangevinStepSizes();
    ASSERT(alphas.size() == 3);
    for (int i = 0; i < 3; i++)
        ASSERT_NEAR(alphas[i], eps, 1e-18);
    integrator.setLangevinSchedule("ncsn");
    alphas = integrator.getLangevinStepSizes();
    for (int i = 0; i < 3; i++)
        ASSERT_NEAR(alphas[i], eps * sigmas[i] * sigmas[i] / (sigmas[2] * sigmas[2]), 1e-15);
    ASSERT_NEAR(alphas[0], 16 * eps, 1e-15);
    ASSERT_NEAR(alphas[2], eps, 1e-18);

    // deterministic step with the score -x / sigma_i^2: each Langevin step multiplies x by
    // 1 - alpha_i / sigma_i^2 = 1 - eps / sigma_L^2 under NCSN, by 1 - eps / sigma_i^2 under constant
    auto finalFactor = [&](const std::string& schedule, int levels = 3) {
        System system = makeSystem(n);
        CGMLIntegrator stepper(harmonicModel(0, 0, 2), sigmaScore());
        stepper.setLangevinSchedule(schedule);
        stepper.setLangevinLevels(levels);
        stepper.setDeterministic(true);
        Context context(system, stepper, Platform::getPlatformByName("Reference"));
        std::vector<Vec3> x0 = randomPositions(n, 8);
        for (auto& p : x0)
            p = p * 0.5 + Vec3(0.75, 0.75, 0.75);  // in [0.25, 1.25]: far from 0
        context.setPositions(x0);
        stepper.step(1);
        std::vector<Vec3> x = context.getState(State::Positions).getPositions();
        double worst = 0;
        double first = x[0][0] / x0[0][0];
        for (int i = 0; i < n; i++)
            for (int d = 0; d < 3; d++)
                worst = std::max(worst, std::abs(x[i][d] / x0[i][d] - first));
        ASSERT(worst < 1e-6);  // the same factor for every coordinate
        return first;
    };
    double ncsn = std::pow(1 - eps / (sigmas[2] * sigmas[2]), K * 3), constant = 1;
    for (double s : sigmas)
        constant *= std::pow(1 - eps / (s * s), K);
    ASSERT_NEAR(finalFactor("ncsn"), ncsn, 1e-5);
    ASSERT_NEAR(finalFactor("constant"), constant, 1e-5);
    ASSERT(std::abs(ncsn - constant) > 0.1);
    // a shortened ladder keeps the smallest sigmas, with their usual step sizes
    ASSERT_NEAR(finalFactor("constant", 1), std::pow(1 - eps / (sigmas[2] * sigmas[2]), K), 1e-5);
    ASSERT_NEAR(finalFactor("ncsn", 2), std::pow(1 - eps / (sigmas[2] * sigmas[2]), K * 2), 1e-5);
    ASSERT(integrator.getNumNoiseLevels() == 3 && integrator.getLangevinLevels() == 3);
    for (int bad : {0, 4})
        EXPECT_THROW(std::invalid_argument, integrator.setLangevinLevels(bad), "Langevin levels must be in [1, 3]");
    EXPECT_THROW(std::invalid_argument, CGMLIntegrator(harmonicModel(0, 0, 2)).setLangevinLevels(1), "no score model");

    // XML keeps it (a version 2 field); version 1 XML, which has none, loads as constant
    std::stringstream stream;
    XmlSerializer::serialize<Integrator>(&integrator, "Integrator", stream);
    const std::string xml = stream.str();
    ASSERT(xml.find("langevinSchedule=\"ncsn\"") != std::string::npos);
    auto load = [](const std::string& text) {
        std::stringstream in(text);
        std::unique_ptr<Integrator> loaded(XmlSerializer::deserialize<Integrator>(in));
        return dynamic_cast<CGMLIntegrator&>(*loaded).getLangevinSchedule();
    };
    ASSERT(load(xml) == "ncsn");
    integrator.setLangevinSchedule("constant");
    std::stringstream constantStream;
    XmlSerializer::serialize<Integrator>(&integrator, "Integrator", constantStream);
    ASSERT(load(constantStream.str()) == "constant");
    const std::string field = " langevinSchedule=\"ncsn\"";
    const size_t at = xml.find(field);
    std::string withoutField = xml.substr(0, at) + xml.substr(at + field.size());
    EXPECT_THROW(OpenMMException, load(withoutField), "langevinSchedule");  // versions >= 2 must carry it
    const size_t version = withoutField.find("version=\"4\"");
    ASSERT(version != std::string::npos);
    std::string versionOne = withoutField;
    versionOne[version + 9] = '1';
    ASSERT(load(versionOne) == "constant");
    std::string bad = xml;
    bad.replace(at, field.size(), " langevinSchedule=\"cosine\"");
    EXPECT_THROW(OpenMMException, load(bad), "CGMLIntegrator XML: the Langevin schedule must be \"constant\" or \"ncsn\"");
}

/**
 * No explicit registration: loading the kernel library as an OpenMM plugin registers the
 * kernel factory (its registerKernelFactories entry point), and the serialization proxy is
 * registered when the API library is loaded. Every later test relies on both.
 */
/** LearnedStep::resolveOverlaps: mass-weighted, bonded pairs exempt, minimum image. */
static void testExcludedVolume() {
    LearnedStep step(harmonicModel(0.0, 0.0, 2), "");
    torch::Tensor noBox = torch::zeros({3, 3}, torch::kFloat32);
    torch::Tensor x = torch::tensor({0.0, 0.0, 0.0, 0.4, 0.0, 0.0, 0.0, 0.3, 0.0}, torch::kFloat64).view({3, 3});
    std::vector<double> masses = {3.0, 1.0, 1.0};
    step.setBonds(torch::tensor({0, 2}, torch::kInt64).view({1, 2}));  // 0-2 bonded: exempt
    ASSERT(step.resolveOverlaps(x, noBox, 1.0, &masses) >= 2);
    // 0-1: overlap 0.6 shared 1:3 (the heavy bead moves a quarter); then 1-2 is resolved too
    const double com = (3.0 * x[0][0].item<double>() + x[1][0].item<double>() + x[2][0].item<double>());
    ASSERT_NEAR(com, 0.4, 1e-12);  // mass-weighted x sum (centre of mass) fixed: 3*0 + 0.4 + 0
    ASSERT(torch::norm(x[1] - x[0]).item<double>() >= 1.0 - 1e-9);
    ASSERT(torch::norm(x[1] - x[2]).item<double>() >= 1.0 - 1e-9);
    ASSERT(torch::norm(x[2] - x[0]).item<double>() < 1.0);  // bonded pair left closer
    // periodic: 0.2 nm apart through the boundary of a 4 nm box, separated through it
    torch::Tensor box = (4.0 * torch::eye(3)).to(torch::kFloat32);
    torch::Tensor y = torch::tensor({0.1, 1.0, 1.0, 3.9, 1.0, 1.0}, torch::kFloat64).view({2, 3});
    step.setBonds(torch::empty({0, 2}, torch::kInt64));
    ASSERT(step.resolveOverlaps(y, box, 0.5, nullptr) == 1);
    ASSERT_NEAR(y[0][0].item<double>(), 0.25, 1e-12);
    ASSERT_NEAR(y[1][0].item<double>(), 3.75, 1e-12);
    EXPECT_THROW(OpenMMException, step.resolveOverlaps(y, box, 2.5, nullptr), "more than half the periodic box");
}

// The compiled route's refusals (the packages themselves are made and run from Python:
// tests/test_compiled.py). A refused package leaves the route in use unchanged.
static void testCompiledRouteRefusals() {
    // the fingerprint a package must carry: CRC-32 as zlib computes it (check value of "123456789")
    ASSERT(LearnedStep::archiveFingerprint("123456789") == "9:cbf43926");
    ASSERT(LearnedStep::archiveFingerprint("") == "0:00000000");
    CGMLIntegrator bare(harmonicModel(0.1, 0, 2));
    ASSERT(bare.getCompiledDynamicsModel().empty() && bare.getCompiledScoreModel().empty());
    EXPECT_THROW(std::invalid_argument, bare.setCompiledScoreModel("score.pt2"), "needs a score model");
    EXPECT_THROW(std::invalid_argument, bare.setCompiledDynamicsModel("dynamics.pt2"), "no build_graph method");
    bare.setCompiledDynamicsModel("");  // back to the archive: always allowed
    ASSERT(bare.getCompiledDynamicsModel().empty());

    torch::jit::Module module("WithGraph");
    module.register_attribute("seq_len", c10::IntType::get(), 2);
    module.register_attribute("step_size_ps", c10::FloatType::get(), 0.5);
    module.define("def forward(self, history: Tensor, box: Tensor, features: Tensor, bonds: Tensor) -> Tuple[Tensor, Tensor, Tensor]:\n"
                  "    x = history[-1]\n"
                  "    return -x, torch.zeros_like(x), torch.zeros([x.size(0), 2])\n"
                  "def build_graph(self, x: Tensor, box: Tensor, bonds: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:\n"
                  "    i = torch.arange(x.size(0))\n"
                  "    return i, i, torch.zeros_like(x), torch.full_like(i, 2)\n");
    std::ostringstream bytes;
    module.save(bytes);
    CGMLIntegrator integrator(bytes.str(), gaussianScore());
    EXPECT_THROW(std::invalid_argument, integrator.setCompiledDynamicsModel("/nonexistent/dynamics.pt2"),
                 "cannot load the compiled dynamics network");
    EXPECT_THROW(std::invalid_argument, integrator.setCompiledScoreModel("/nonexistent/score.pt2"),
                 "no build_graph method");
    ASSERT(integrator.getCompiledDynamicsModel().empty() && integrator.getCompiledScoreModel().empty());
}

void testPluginLoading() {
    const std::vector<std::string> kernel = {IntegrateCGMLStepKernel::Name()};
    ASSERT(!Platform::getPlatformByName("Reference").supportsKernels(kernel));
    Platform::loadPluginLibrary(CGML_REFERENCE_PLUGIN);  // throws if it cannot be loaded
    ASSERT(Platform::getPlatformByName("Reference").supportsKernels(kernel));
    ASSERT(Platform::getPlatformByName("CPU").supportsKernels(kernel));
    ASSERT(SerializationProxy::getProxy(typeid(CGMLIntegrator)).getTypeName() == "CGMLIntegrator");
}

int main() {
    try {
        Platform::loadPluginsFromDirectory(OPENMM_PLUGIN_DIR);
        testPluginLoading();
        testBase64();
        testRecurrence("Reference");
        testRecurrence("CPU");
        testCheckpointAndSerialization();
        testErrors();
        testRestoreValidation();
        testXmlValidation();
        testSystemAndModelChecks();
        testLangevinSchedule();
        testExcludedVolume();
        testCompiledRouteRefusals();
    }
    catch (const std::exception& e) {
        std::cout << "FAIL - ERROR.  Message: " << e.what() << std::endl;
        return 1;
    }
    std::cout << "Done" << std::endl;
    return 0;
}
