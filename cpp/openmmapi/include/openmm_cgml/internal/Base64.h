#ifndef OPENMM_CGML_BASE64_H_
#define OPENMM_CGML_BASE64_H_

#include <string>

namespace CGML {

/** RFC 4648 base64 (with padding): model archives and state travel inside XML this way. */
std::string base64Encode(const std::string& bytes);
/** Inverse of base64Encode; throws std::invalid_argument on malformed input. */
std::string base64Decode(const std::string& text);

} // namespace CGML

#endif
