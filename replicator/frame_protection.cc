#include "replicator/frame_protection.h"

#include <openssl/evp.h>
#include <openssl/kdf.h>

#include <climits>
#include <cstring>

#include "absl/strings/str_cat.h"

namespace romulus::replicator {
namespace {

constexpr size_t kKeyBytes = 32;
constexpr size_t kTagBytes = 16;
constexpr size_t kIvBytes = 12;

bool AddLengthPrefixed(EVP_MD_CTX* sha, absl::string_view s) {
  uint8_t n[8];
  for (int i = 0; i < 8; i++)
    n[i] = static_cast<uint8_t>(static_cast<uint64_t>(s.size()) >> (8 * i));
  return EVP_DigestUpdate(sha, n, sizeof(n)) > 0 && EVP_DigestUpdate(sha, s.data(), s.size()) > 0;
}

std::string Hkdf(absl::string_view psk, absl::string_view salt, absl::string_view info) {
  std::string out(kKeyBytes, '\0');
  EVP_PKEY_CTX* ctx = EVP_PKEY_CTX_new_id(EVP_PKEY_HKDF, nullptr);
  size_t len = out.size();
  bool ok = ctx && EVP_PKEY_derive_init(ctx) > 0 &&
            EVP_PKEY_CTX_set_hkdf_md(ctx, EVP_sha256()) > 0 &&
            EVP_PKEY_CTX_set1_hkdf_salt(ctx, reinterpret_cast<const unsigned char*>(salt.data()),
                                        static_cast<int>(salt.size())) > 0 &&
            EVP_PKEY_CTX_set1_hkdf_key(ctx, reinterpret_cast<const unsigned char*>(psk.data()),
                                       static_cast<int>(psk.size())) > 0 &&
            EVP_PKEY_CTX_add1_hkdf_info(ctx, reinterpret_cast<const unsigned char*>(info.data()),
                                        static_cast<int>(info.size())) > 0 &&
            EVP_PKEY_derive(ctx, reinterpret_cast<unsigned char*>(out.data()), &len) > 0 &&
            len == out.size();
  EVP_PKEY_CTX_free(ctx);
  // HKDF over SHA-256 cannot fail for these sizes: a failure is a broken OpenSSL.
  if (!ok) std::abort();
  return out;
}

}  // namespace

std::string HandshakeTranscript(absl::string_view primary_hello, absl::string_view mirror_hello) {
  std::string digest(32, '\0');
  EVP_MD_CTX* sha = EVP_MD_CTX_new();
  unsigned int len = 0;
  bool ok = sha && EVP_DigestInit_ex(sha, EVP_sha256(), nullptr) > 0 &&
            AddLengthPrefixed(sha, "romulus replication handshake") &&
            AddLengthPrefixed(sha, primary_hello) && AddLengthPrefixed(sha, mirror_hello) &&
            EVP_DigestFinal_ex(sha, reinterpret_cast<unsigned char*>(digest.data()), &len) > 0 &&
            len == digest.size();
  EVP_MD_CTX_free(sha);
  if (!ok) std::abort();  // SHA-256 of a few hundred bytes cannot fail but in a broken OpenSSL
  return digest;
}

SessionKeys DeriveSessionKeys(absl::string_view psk, absl::string_view transcript) {
  return {Hkdf(psk, transcript, "romulus frames primary to mirror"),
          Hkdf(psk, transcript, "romulus frames mirror to primary")};
}

pb::FrameCipher CheapestCipher() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("aes") && __builtin_cpu_supports("pclmul") ? pb::AES_256_GCM
                                                                           : pb::CHACHA20_POLY1305;
}

absl::string_view CipherName(pb::FrameCipher cipher) {
  switch (cipher) {
    case pb::AES_256_GCM:
      return "aes-256-gcm";
    case pb::CHACHA20_POLY1305:
      return "chacha20-poly1305";
    case pb::FRAME_CIPHER_NONE:
      return "none";
    default:
      return "unknown";
  }
}

absl::StatusOr<Protection> ParseEncryption(absl::string_view name) {
  if (name.empty() || name == "auto") return Protection{};
  if (name == "aes-256-gcm") return Protection{.cipher = pb::AES_256_GCM};
  if (name == "chacha20-poly1305") return Protection{.cipher = pb::CHACHA20_POLY1305};
  if (name == "off") return Protection{.encrypt = false};
  return absl::InvalidArgumentError(
      absl::StrCat("unknown encryption '", name.substr(0, 32),
                   "' (auto, aes-256-gcm, chacha20-poly1305 or off)"));
}

absl::StatusOr<std::unique_ptr<FrameSealer>> FrameSealer::Create(pb::FrameCipher cipher,
                                                                 bool encrypt,
                                                                 absl::string_view key) {
  std::unique_ptr<FrameSealer> s(new FrameSealer());
  s->encrypt_ = encrypt;
  if (cipher == pb::FRAME_CIPHER_NONE) return s;
  const EVP_CIPHER* evp = cipher == pb::AES_256_GCM         ? EVP_aes_256_gcm()
                          : cipher == pb::CHACHA20_POLY1305 ? EVP_chacha20_poly1305()
                                                            : nullptr;
  if (evp == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat("unknown frame cipher ", cipher));
  }
  if (key.size() != kKeyBytes) return absl::InternalError("frame key of the wrong size");
  EVP_CIPHER_CTX* ctx = EVP_CIPHER_CTX_new();
  s->ctx_ = ctx;
  if (ctx == nullptr ||
      EVP_CipherInit_ex(ctx, evp, nullptr, reinterpret_cast<const unsigned char*>(key.data()),
                        nullptr, 1) <= 0 ||
      EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_AEAD_SET_IVLEN, kIvBytes, nullptr) <= 0) {
    return absl::InternalError(absl::StrCat("OpenSSL cannot set up ", CipherName(cipher)));
  }
  s->tag_bytes_ = kTagBytes;
  return s;
}

FrameSealer::~FrameSealer() { EVP_CIPHER_CTX_free(static_cast<EVP_CIPHER_CTX*>(ctx_)); }

absl::Status FrameSealer::Seal(absl::string_view header, uint8_t* body, size_t n, uint8_t* tag) {
  return Run(true, header, body, n, tag);
}

absl::Status FrameSealer::Open(absl::string_view header, uint8_t* body, size_t n,
                               const uint8_t* tag) {
  return Run(false, header, body, n, const_cast<uint8_t*>(tag));
}

absl::Status FrameSealer::Run(bool seal, absl::string_view header, uint8_t* body, size_t n,
                              uint8_t* tag) {
  if (ctx_ == nullptr) return absl::OkStatus();  // FRAME_CIPHER_NONE
  if (n > INT_MAX || header.size() > INT_MAX) return absl::InternalError("frame too large");
  auto* ctx = static_cast<EVP_CIPHER_CTX*>(ctx_);
  // The nonce is the frame's number in this direction, never sent: a frame replayed, dropped or
  // moved is opened under another nonce and fails. Each direction has its own key.
  unsigned char iv[kIvBytes] = {};
  for (int i = 0; i < 8; i++)
    iv[kIvBytes - 1 - i] = static_cast<unsigned char>(sequence_ >> (8 * i));
  int len = 0;
  bool ok =
      EVP_CipherInit_ex(ctx, nullptr, nullptr, nullptr, iv, seal ? 1 : 0) > 0 &&
      EVP_CipherUpdate(ctx, nullptr, &len, reinterpret_cast<const unsigned char*>(header.data()),
                       static_cast<int>(header.size())) > 0;
  // In clear, the body is authenticated as associated data; encrypted, it is transformed in place.
  if (ok && n > 0) {
    ok = EVP_CipherUpdate(ctx, encrypt_ ? body : nullptr, &len, body, static_cast<int>(n)) > 0;
  }
  if (ok && !seal) ok = EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_AEAD_SET_TAG, kTagBytes, tag) > 0;
  unsigned char rest[32];
  ok = ok && EVP_CipherFinal_ex(ctx, rest, &len) > 0;
  if (ok && seal) ok = EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_AEAD_GET_TAG, kTagBytes, tag) > 0;
  if (!ok) {
    return seal ? absl::InternalError("sealing a frame failed")
                : absl::DataLossError(absl::StrCat(
                      "frame ", sequence_,
                      " failed its integrity check (altered, replayed, reordered or from "
                      "another connection)"));
  }
  sequence_++;
  return absl::OkStatus();
}

}  // namespace romulus::replicator
