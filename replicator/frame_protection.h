// What protects the frames of a replication connection once its handshake is done: an AEAD per
// direction (OpenSSL's AES-256-GCM or ChaCha20-Poly1305), keyed by HKDF from the pre-shared key
// and a hash of both Hello frames, with each frame's number in its direction as the nonce. A
// frame that was altered, comes from another connection, or is replayed, dropped or reordered
// fails to open. Internal to the replicator.
#ifndef ROMULUS_REPLICATOR_FRAME_PROTECTION_H_
#define ROMULUS_REPLICATOR_FRAME_PROTECTION_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "proto/romulus.pb.h"
#include "replicator/replicator.h"

namespace romulus::replicator {

// SHA-256 over both Hello frames exactly as they crossed the wire: what the proofs and the keys
// are bound to, so that a Hello altered on the way makes the handshake fail.
std::string HandshakeTranscript(absl::string_view primary_hello, absl::string_view mirror_hello);

struct SessionKeys {
  std::string primary_to_mirror, mirror_to_primary;  // 32 bytes each
};
SessionKeys DeriveSessionKeys(absl::string_view psk, absl::string_view transcript);

// AES-256-GCM where the CPU has AES and carry-less multiply instructions, else ChaCha20-Poly1305.
pb::FrameCipher CheapestCipher();
absl::string_view CipherName(pb::FrameCipher cipher);

// One direction of one connection. Not thread-safe: the channel serialises its sends, and one
// thread receives.
class FrameSealer {
 public:
  // `encrypt` false: frames are authenticated but travel in clear. FRAME_CIPHER_NONE: neither.
  static absl::StatusOr<std::unique_ptr<FrameSealer>> Create(pb::FrameCipher cipher, bool encrypt,
                                                             absl::string_view key);
  ~FrameSealer();
  FrameSealer(const FrameSealer&) = delete;
  FrameSealer& operator=(const FrameSealer&) = delete;

  size_t tag_bytes() const { return tag_bytes_; }
  // Protects `n` bytes at `body` in place and writes the tag (tag_bytes()) at `tag`; `header`
  // (the frame's length prefix) is authenticated with it.
  absl::Status Seal(absl::string_view header, uint8_t* body, size_t n, uint8_t* tag);
  // Checks the tag at `tag` over `header` and the `n` bytes at `body`, and decrypts them in place.
  // The frame must be the next one this direction sent.
  absl::Status Open(absl::string_view header, uint8_t* body, size_t n, const uint8_t* tag);

 private:
  FrameSealer() = default;
  absl::Status Run(bool seal, absl::string_view header, uint8_t* body, size_t n, uint8_t* tag);
  void* ctx_ = nullptr;  // EVP_CIPHER_CTX, kept out of this header
  bool encrypt_ = true;
  size_t tag_bytes_ = 0;
  uint64_t sequence_ = 0;  // the number of the next frame in this direction
};

}  // namespace romulus::replicator

#endif  // ROMULUS_REPLICATOR_FRAME_PROTECTION_H_
