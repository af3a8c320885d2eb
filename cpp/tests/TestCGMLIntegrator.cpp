// C++ tests of the plugin's own logic, with no Python: base64, the step recurrence,
// history rebuilding, checkpoints and XML serialization on the Reference/CPU platforms.
#include "CGMLIntegratorProxy.h"
#include "ReferenceCGMLKernels.h"
#include "openmm/Context.h"
#include "openmm/OpenMMException.h"
#include "openmm/Platform.h"
#include "openmm/State.h"
#include "openmm/System.h"
#include "openmm/serialization/XmlSerializer.h"
#include "openmm_cgml/CGMLIntegrator.h"
#include "openmm_cgml/internal/Base64.h"
#include <torch/script.h>
#include <cmath>
#include <iostream>
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

int main() {
    try {
        Platform::loadPluginsFromDirectory(OPENMM_PLUGIN_DIR);
        registerReferenceCGMLKernels();
        registerCGMLSerializationProxies();
        testBase64();
        testRecurrence("Reference");
        testRecurrence("CPU");
        testCheckpointAndSerialization();
        testErrors();
    }
    catch (const std::exception& e) {
        std::cout << "FAIL - ERROR.  Message: " << e.what() << std::endl;
        return 1;
    }
    std::cout << "Done" << std::endl;
    return 0;
}
