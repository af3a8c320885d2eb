#include "openmm_cgml/internal/Base64.h"
#include <stdexcept>

namespace {
const char alphabet[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

int decodeChar(char c) {
    if (c >= 'A' && c <= 'Z') return c - 'A';
    if (c >= 'a' && c <= 'z') return c - 'a' + 26;
    if (c >= '0' && c <= '9') return c - '0' + 52;
    if (c == '+') return 62;
    if (c == '/') return 63;
    return -1;
}
} // namespace

std::string CGML::base64Encode(const std::string& bytes) {
    std::string out;
    out.reserve(4 * ((bytes.size() + 2) / 3));
    size_t i = 0;
    for (; i + 2 < bytes.size(); i += 3) {
        unsigned v = ((unsigned char) bytes[i] << 16) | ((unsigned char) bytes[i + 1] << 8) | (unsigned char) bytes[i + 2];
        out += alphabet[(v >> 18) & 63];
        out += alphabet[(v >> 12) & 63];
        out += alphabet[(v >> 6) & 63];
        out += alphabet[v & 63];
    }
    size_t rest = bytes.size() - i;
    if (rest > 0) {
        unsigned v = (unsigned char) bytes[i] << 16;
        if (rest == 2)
            v |= (unsigned char) bytes[i + 1] << 8;
        out += alphabet[(v >> 18) & 63];
        out += alphabet[(v >> 12) & 63];
        out += rest == 2 ? alphabet[(v >> 6) & 63] : '=';
        out += '=';
    }
    return out;
}

std::string CGML::base64Decode(const std::string& text) {
    if (text.size() % 4 != 0)
        throw std::invalid_argument("base64 text length is not a multiple of 4");
    std::string out;
    out.reserve(text.size() / 4 * 3);
    for (size_t i = 0; i < text.size(); i += 4) {
        int pad = 0;
        unsigned v = 0;
        for (int k = 0; k < 4; k++) {
            char c = text[i + k];
            int d;
            if (c == '=' && i + 4 == text.size() && k >= 2) {
                pad++;
                d = 0;
            }
            else {
                d = decodeChar(c);
                if (d < 0 || pad > 0)
                    throw std::invalid_argument("malformed base64 text");
            }
            v = (v << 6) | (unsigned) d;
        }
        out += (char) ((v >> 16) & 255);
        if (pad < 2) out += (char) ((v >> 8) & 255);
        if (pad < 1) out += (char) (v & 255);
    }
    return out;
}
