// Framing of the ledger protocol: a 4-byte little-endian length, then a protobuf message.
#ifndef ROMULUS_VMM_LEDGER_PROTOCOL_H_
#define ROMULUS_VMM_LEDGER_PROTOCOL_H_

#include <cstdint>
#include <string>

#include "google/protobuf/message_lite.h"

namespace romulus::vmm {

inline constexpr uint32_t kMaxLedgerFrame = 4096;

inline std::string EncodeFrame(const google::protobuf::MessageLite& message) {
  std::string body = message.SerializeAsString();
  uint32_t n = static_cast<uint32_t>(body.size());
  std::string out(4, '\0');
  for (int i = 0; i < 4; i++) out[i] = static_cast<char>((n >> (8 * i)) & 0xff);
  return out + body;
}

inline uint32_t DecodeFrameLength(const uint8_t header[4]) {
  return header[0] | (header[1] << 8) | (header[2] << 16) |
         (static_cast<uint32_t>(header[3]) << 24);
}

}  // namespace romulus::vmm

#endif  // ROMULUS_VMM_LEDGER_PROTOCOL_H_
