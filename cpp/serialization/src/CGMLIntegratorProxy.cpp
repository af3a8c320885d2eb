#include "CGMLIntegratorProxy.h"
#include "openmm_cgml/CGMLIntegrator.h"
#include "openmm_cgml/internal/Base64.h"
#include "openmm_cgml/internal/LearnedStep.h"
#include "openmm/OpenMMException.h"
#include "openmm/serialization/SerializationNode.h"
#include <mutex>
#include <sstream>

using namespace CGML;
using namespace OpenMM;

static const int formatVersion = 1;

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

void* CGMLIntegratorProxy::deserialize(const SerializationNode& node) const {
    int version = node.getIntProperty("version");
    if (version != formatVersion)
        throw OpenMMException("Unsupported version number for CGMLIntegrator: " + std::to_string(version));
    std::string score;
    for (const SerializationNode& child : node.getChildren())
        if (child.getName() == "ScoreModel")
            score = base64Decode(child.getStringProperty("base64"));
    CGMLIntegrator* integrator = new CGMLIntegrator(base64Decode(node.getChildNode("DynamicsModel").getStringProperty("base64")),
                                                    score, node.getDoubleProperty("stepSize"),
                                                    node.getBoolProperty("allowStepSizeOverride"));
    try {
        integrator->setRandomNumberSeed(node.getIntProperty("randomSeed"));
        integrator->setDeterministic(node.getBoolProperty("deterministic"));
        integrator->setLangevinSteps(node.getIntProperty("langevinSteps"));
        if (integrator->hasScoreModel())
            integrator->setLangevinStepSize(node.getDoubleProperty("langevinStepSize"));
        integrator->setPeriodicMode(node.getIntProperty("periodicMode"));
        integrator->setIntegrationForceGroups(node.getIntProperty("integrationForceGroups"));
        const SerializationNode& featureNode = node.getChildNode("BeadFeatures");
        std::string featureBytes = base64Decode(featureNode.getStringProperty("base64"));
        std::vector<float> features(featureBytes.size() / sizeof(float));
        std::copy(featureBytes.begin(), featureBytes.end(), (char*) features.data());
        integrator->setBeadFeatures(features, featureNode.getIntProperty("rows"), featureNode.getIntProperty("columns"));
        std::string bondBytes = base64Decode(node.getChildNode("Bonds").getStringProperty("base64"));
        std::vector<long long> bonds(bondBytes.size() / sizeof(long long));
        std::copy(bondBytes.begin(), bondBytes.end(), (char*) bonds.data());
        integrator->setBonds(bonds);
        std::istringstream state(base64Decode(node.getChildNode("State").getStringProperty("base64")));
        integrator->restoreState(state);
    }
    catch (...) {
        delete integrator;
        throw;
    }
    return integrator;
}

void CGML::registerCGMLSerializationProxies() {
    static std::once_flag once;
    std::call_once(once, [] { SerializationProxy::registerProxy(typeid(CGMLIntegrator), new CGMLIntegratorProxy()); });
}
