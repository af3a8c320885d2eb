#ifndef OPENMM_CGML_INTEGRATOR_PROXY_H_
#define OPENMM_CGML_INTEGRATOR_PROXY_H_

#include "openmm/serialization/SerializationProxy.h"

namespace CGML {

/**
 * XmlSerializer support. The XML is self-contained: it carries the model archives'
 * bytes (base64), the configuration, and the dynamic state (history, random state),
 * so a deserialized integrator continues the same trajectory.
 */
class CGMLIntegratorProxy : public OpenMM::SerializationProxy {
public:
    CGMLIntegratorProxy();
    void serialize(const void* object, OpenMM::SerializationNode& node) const override;
    void* deserialize(const OpenMM::SerializationNode& node) const override;
};

/** Register the proxy with OpenMM's global registry (idempotent). */
void registerCGMLSerializationProxies();

} // namespace CGML

#endif
