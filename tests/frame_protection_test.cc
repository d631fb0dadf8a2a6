// The sealing of replication frames: what an attacker on the path could do to a sealed frame
// (alter it, replay it, reorder frames, bring one from another connection) makes it fail to open.
#include "replicator/frame_protection.h"

#include <gtest/gtest.h>

#include <string>
#include <vector>

namespace romulus::replicator::frame_protection_test {
namespace {

const char kKey[] = "0123456789abcdef-frame-key";

struct Sealed {
  std::string header, body, tag;
};

Sealed Seal(FrameSealer& s, std::string body) {
  Sealed f{std::string("\x10\0\0\0", 4), std::move(body), std::string(s.tag_bytes(), '\0')};
  EXPECT_TRUE(s.Seal(f.header, reinterpret_cast<uint8_t*>(f.body.data()), f.body.size(),
                     reinterpret_cast<uint8_t*>(f.tag.data()))
                  .ok());
  return f;
}

absl::Status Open(FrameSealer& s, Sealed f, std::string* plain = nullptr) {
  absl::Status st = s.Open(f.header, reinterpret_cast<uint8_t*>(f.body.data()), f.body.size(),
                           reinterpret_cast<const uint8_t*>(f.tag.data()));
  if (plain) *plain = f.body;
  return st;
}

class FrameProtection : public ::testing::TestWithParam<std::pair<pb::FrameCipher, bool>> {
 protected:
  std::unique_ptr<FrameSealer> Make(const std::string& key) {
    auto s = FrameSealer::Create(GetParam().first, GetParam().second, key);
    EXPECT_TRUE(s.ok()) << s.status();
    return std::move(*s);
  }
  SessionKeys keys_ = DeriveSessionKeys(kKey, HandshakeTranscript("hello-p", "hello-m"));
};

TEST_P(FrameProtection, FramesOpenInOrderAndEncryptedOnesHideTheirBytes) {
  auto sealer = Make(keys_.primary_to_mirror), opener = Make(keys_.primary_to_mirror);
  EXPECT_EQ(sealer->tag_bytes(), 16u);
  for (int i = 0; i < 3; i++) {
    std::string plain = "page bytes of frame " + std::to_string(i);
    Sealed f = Seal(*sealer, plain);
    EXPECT_EQ(f.body == plain, !GetParam().second) << "encrypt=" << GetParam().second;
    std::string opened;
    ASSERT_TRUE(Open(*opener, f, &opened).ok()) << i;
    EXPECT_EQ(opened, plain);
  }
}

TEST_P(FrameProtection, AlteredReplayedReorderedOrForeignFramesFailToOpen) {
  auto sealer = Make(keys_.primary_to_mirror);
  std::vector<Sealed> frames;
  for (int i = 0; i < 3; i++) frames.push_back(Seal(*sealer, std::string(100, 'a' + i)));

  struct Case {
    const char* what;
    std::function<absl::Status(FrameSealer&)> open;
  };
  const std::vector<Case> cases = {
      {"a bit flipped in the body",
       [&](FrameSealer& o) {
         Sealed f = frames[0];
         f.body[50] ^= 1;
         return Open(o, f);
       }},
      {"a bit flipped in the length",
       [&](FrameSealer& o) {
         Sealed f = frames[0];
         f.header[0] ^= 1;
         return Open(o, f);
       }},
      {"a bit flipped in the tag",
       [&](FrameSealer& o) {
         Sealed f = frames[0];
         f.tag[3] ^= 0x80;
         return Open(o, f);
       }},
      {"the second frame first", [&](FrameSealer& o) { return Open(o, frames[1]); }},
      {"the first frame twice",
       [&](FrameSealer& o) {
         EXPECT_TRUE(Open(o, frames[0]).ok());
         return Open(o, frames[0]);
       }},
      {"a frame of the other direction",
       [&](FrameSealer&) {
         auto other = Make(keys_.mirror_to_primary);
         return Open(*other, frames[0]);
       }},
      {"a frame of another connection (other nonces, so another transcript)",
       [&](FrameSealer&) {
         SessionKeys later = DeriveSessionKeys(kKey, HandshakeTranscript("hello-p2", "hello-m"));
         auto other = Make(later.primary_to_mirror);
         return Open(*other, frames[0]);
       }},
  };
  for (const Case& c : cases) {
    auto opener = Make(keys_.primary_to_mirror);
    absl::Status s = c.open(*opener);
    EXPECT_EQ(s.code(), absl::StatusCode::kDataLoss) << c.what << ": " << s;
    EXPECT_NE(s.message().find("failed its integrity check"), std::string::npos) << c.what;
  }
}

INSTANTIATE_TEST_SUITE_P(
    Ciphers, FrameProtection,
    ::testing::Values(std::make_pair(pb::AES_256_GCM, true), std::make_pair(pb::AES_256_GCM, false),
                      std::make_pair(pb::CHACHA20_POLY1305, true),
                      std::make_pair(pb::CHACHA20_POLY1305, false)),
    [](const auto& info) {
      return std::string(info.param.first == pb::AES_256_GCM ? "Aes256Gcm" : "ChaCha20Poly1305") +
             (info.param.second ? "Encrypted" : "InClear");
    });

TEST(FrameProtectionNames, EncryptionSettingsAreChecked) {
  EXPECT_TRUE(ParseEncryption("").ok());
  EXPECT_EQ(ParseEncryption("auto")->cipher, pb::FRAME_CIPHER_UNSPECIFIED);
  EXPECT_EQ(ParseEncryption("chacha20-poly1305")->cipher, pb::CHACHA20_POLY1305);
  EXPECT_FALSE(ParseEncryption("off")->encrypt);
  EXPECT_FALSE(ParseEncryption("none").ok()) << "no setting turns integrity off";
  EXPECT_FALSE(ParseEncryption("rot13").ok());
}

}  // namespace
}  // namespace romulus::replicator::frame_protection_test
