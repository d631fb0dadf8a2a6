// Parallel paths on loopback: a Bond (replicator/bond.h) over several authenticated TCP
// connections delivers one ordered stream; frames that arrive out of order are put back in
// order; a path that fails mid-stream costs a resend on the others, never a lost, repeated or
// reordered frame; a repeated frame that is not a resend and one far beyond the window are
// refused.
#include "replicator/bond.h"

#include <gtest/gtest.h>

#include <atomic>
#include <cstdio>
#include <thread>

#include "absl/strings/str_cat.h"
#include "replicator/channel.h"
#include "tests/test_util.h"

namespace romulus::bond_test {
namespace {

namespace asio = boost::asio;
using asio::ip::tcp;
using replicator::Channel;
using std::chrono::milliseconds;

const char kKey[] = "0123456789abcdef-bond-key";

// `n` authenticated loopback connections: the primary's ends (as paths 0..n-1 of one bond when
// `bond`) and the mirror's.
struct Pairs {
  std::vector<std::unique_ptr<Channel>> primary, mirror;
};

Pairs Connect(size_t n, bool bond = true) {
  Pairs out;
  // The channels' sockets belong to it: it outlives them all.
  static auto* const io_context = new asio::io_context;
  asio::io_context& io = *io_context;
  tcp::acceptor acceptor(io, tcp::endpoint(asio::ip::make_address("127.0.0.1"), 0));
  uint16_t port = acceptor.local_endpoint().port();
  replicator::Identity id{"bond-vm", 1 << 20, 0, pb::PLATFORM_UNSPECIFIED};
  for (size_t i = 0; i < n; i++) {
    std::unique_ptr<Channel> accepted;
    std::thread server([&] {
      tcp::socket s(io);
      acceptor.accept(s);
      uint64_t session = 0;
      auto ch = Channel::Accept(std::move(s), {id, kKey}, testing::ScaledMs(5), &session);
      EXPECT_TRUE(ch.ok()) << ch.status();
      if (ch.ok()) accepted = std::move(*ch);
    });
    Channel::Terms terms{id, kKey};
    if (bond) {
      terms.bond = 77;
      terms.path_index = static_cast<uint32_t>(i);
      terms.path_count = static_cast<uint32_t>(n);
    }
    auto ch = Channel::Connect(io, "127.0.0.1", port, terms, 1, testing::ScaledMs(5));
    server.join();
    EXPECT_TRUE(ch.ok()) << ch.status();
    if (!ch.ok() || !accepted) return {};
    out.primary.push_back(std::move(*ch));
    out.mirror.push_back(std::move(accepted));
  }
  return out;
}

// Frame i of a stream: its number, and a body of a size that varies with it.
pb::Frame Numbered(uint64_t i) {
  pb::Frame f;
  f.mutable_sync_disk()->set_offset(i);
  f.mutable_sync_disk()->set_data(std::string(1 + (i * 7919) % 50000, static_cast<char>(i)));
  return f;
}

bool IsNumbered(const pb::Frame& f, uint64_t i) {
  return f.has_sync_disk() && f.sync_disk().offset() == i &&
         f.sync_disk().data() == std::string(1 + (i * 7919) % 50000, static_cast<char>(i)) &&
         f.seq() == 0 && f.acked() == 0 && !f.resent();
}

// Sends frames 1..n on `to` from a thread of its own.
std::thread SendNumbered(Channel& to, uint64_t n, std::atomic<uint64_t>* sent = nullptr) {
  return std::thread([&to, n, sent] {
    pb::Frame keepalive;
    keepalive.set_keepalive(true);
    for (uint64_t i = 1; i <= n; i++) {
      if (!to.Send(Numbered(i)).ok()) return;
      // A session's keepalives among them are no part of the stream.
      if (i % 50 == 0 && !to.Send(keepalive).ok()) return;
      if (sent) *sent = i;
    }
  });
}

TEST(Bond, TwoPathsCarryOneOrderedStreamBothWays) {
  Pairs p = Connect(2);
  ASSERT_EQ(p.primary.size(), 2u);
  auto a = replicator::MakeBond(std::move(p.primary), nullptr);
  auto b = replicator::MakeBond(std::move(p.mirror), nullptr);
  constexpr uint64_t kFrames = 2000;
  std::thread ab = SendNumbered(*a, kFrames), ba = SendNumbered(*b, kFrames / 4);
  for (uint64_t i = 1; i <= kFrames; i++) {
    auto f = b->Receive();
    ASSERT_TRUE(f.ok()) << f.status();
    ASSERT_TRUE(IsNumbered(*f, i)) << "frame " << i << " came as " << f->sync_disk().offset();
  }
  for (uint64_t i = 1; i <= kFrames / 4; i++) {
    auto f = a->Receive();
    ASSERT_TRUE(f.ok()) << f.status();
    ASSERT_TRUE(IsNumbered(*f, i));
  }
  ab.join();
  ba.join();
  // Both paths carried a real share of the stream.
  auto paths = a->paths();
  ASSERT_EQ(paths.size(), 2u);
  for (const auto& path : paths) {
    EXPECT_TRUE(path.up);
    EXPECT_GT(path.bytes_sent, a->bytes_sent() / 10) << path.peer;
  }
}

TEST(Bond, FramesArrivingOutOfOrderAreHandedOnInOrder) {
  Pairs p = Connect(2);
  ASSERT_EQ(p.primary.size(), 2u);
  // The mirror's side is a bond; the primary's paths are driven by hand.
  auto b = replicator::MakeBond(std::move(p.mirror), nullptr);
  // Frames 2 to 4 on path 1 (on one path they go in order), and once they are there, frame 1 on
  // path 0.
  for (uint64_t seq : {2, 3, 4}) {
    pb::Frame f = Numbered(seq);
    f.set_seq(seq);
    ASSERT_TRUE(p.primary[1]->Send(f).ok());
  }
  uint64_t sent = p.primary[1]->bytes_sent();
  ASSERT_TRUE(testing::WaitUntil([&] { return b->paths()[1].bytes_received >= sent; }, 10));
  pb::Frame first = Numbered(1);
  first.set_seq(1);
  ASSERT_TRUE(p.primary[0]->Send(first).ok());
  for (uint64_t i = 1; i <= 4; i++) {
    auto f = b->Receive();
    ASSERT_TRUE(f.ok()) << f.status();
    EXPECT_TRUE(IsNumbered(*f, i)) << f->sync_disk().offset();
  }
}

TEST(Bond, AResendIsDroppedButARepeatedFrameIsRefused) {
  Pairs p = Connect(2);
  ASSERT_EQ(p.primary.size(), 2u);
  auto b = replicator::MakeBond(std::move(p.mirror), nullptr);
  pb::Frame f1 = Numbered(1);
  f1.set_seq(1);
  ASSERT_TRUE(p.primary[0]->Send(f1).ok());
  auto got = b->Receive();
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_TRUE(IsNumbered(*got, 1));
  // Sent again after a path failed: this side has it, and drops it.
  f1.set_resent(true);
  ASSERT_TRUE(p.primary[1]->Send(f1).ok());
  pb::Frame f2 = Numbered(2);
  f2.set_seq(2);
  ASSERT_TRUE(p.primary[1]->Send(f2).ok());
  got = b->Receive();
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_TRUE(IsNumbered(*got, 2));
  // The same frame again on the same path, not marked as a resend: the connection ends.
  ASSERT_TRUE(p.primary[1]->Send(f2).ok());
  got = b->Receive();
  ASSERT_FALSE(got.ok());
  EXPECT_NE(got.status().message().find("repeated"), std::string::npos) << got.status();
}

TEST(Bond, AFrameRepeatedOnAnotherPathWithoutAnyResendIsRefused) {
  Pairs p = Connect(2);
  ASSERT_EQ(p.primary.size(), 2u);
  auto b = replicator::MakeBond(std::move(p.mirror), nullptr);
  pb::Frame f1 = Numbered(1);
  f1.set_seq(1);
  ASSERT_TRUE(p.primary[0]->Send(f1).ok());
  auto got = b->Receive();
  ASSERT_TRUE(got.ok()) << got.status();
  ASSERT_TRUE(p.primary[1]->Send(f1).ok());
  got = b->Receive();
  ASSERT_FALSE(got.ok());
  EXPECT_NE(got.status().message().find("not a resend"), std::string::npos) << got.status();
}

TEST(Bond, AFrameFarBeyondTheWindowIsRefused) {
  Pairs p = Connect(2);
  ASSERT_EQ(p.primary.size(), 2u);
  auto b = replicator::MakeBond(std::move(p.mirror), nullptr);
  pb::Frame f = Numbered(1);
  f.set_seq(1 + replicator::kWindowFrames);
  ASSERT_TRUE(p.primary[1]->Send(f).ok());
  auto got = b->Receive();
  ASSERT_FALSE(got.ok());
  EXPECT_NE(got.status().message().find("beyond the window"), std::string::npos) << got.status();
}

TEST(Bond, AFrameWithoutSequenceNumberIsRefused) {
  Pairs p = Connect(2);
  ASSERT_EQ(p.primary.size(), 2u);
  auto b = replicator::MakeBond(std::move(p.mirror), nullptr);
  ASSERT_TRUE(p.primary[0]->Send(Numbered(1)).ok());
  auto got = b->Receive();
  ASSERT_FALSE(got.ok());
  EXPECT_NE(got.status().message().find("without a sequence number"), std::string::npos)
      << got.status();
}

// Path 1 is shut mid-stream (as a cut path ends, once its timeout passes): every frame arrives
// once, in order, the rest on path 0; frames path 1 had taken and not had confirmed went again.
TEST(Bond, APathKilledMidStreamCostsOnlyAResend) {
  for (int round = 0; round < 3; round++) {
    SCOPED_TRACE(round);
    Pairs p = Connect(3);
    ASSERT_EQ(p.primary.size(), 3u);
    Channel* doomed = round % 2 == 0 ? p.mirror[1].get() : p.primary[2].get();
    auto a = replicator::MakeBond(std::move(p.primary), nullptr);
    auto b = replicator::MakeBond(std::move(p.mirror), nullptr);
    constexpr uint64_t kFrames = 3000;
    std::thread sender = SendNumbered(*a, kFrames);
    std::string wrong;  // the first frame that did not come as it should
    for (uint64_t i = 1; i <= kFrames && wrong.empty(); i++) {
      if (i == 400 + 300 * static_cast<uint64_t>(round)) doomed->Shutdown();
      auto f = b->Receive();
      if (!f.ok()) {
        wrong = absl::StrCat("frame ", i, ": ", f.status().ToString());
      } else if (!IsNumbered(*f, i)) {
        wrong = absl::StrCat("frame ", i, " came as ", f->sync_disk().offset());
      }
    }
    if (!wrong.empty()) a->Shutdown();  // the sender stops
    sender.join();
    ASSERT_EQ(wrong, "");
    // Both ends saw the path go, and the others are up.
    ASSERT_TRUE(testing::WaitUntil(
        [&] {
          int down = 0;
          for (auto* bond : {a.get(), b.get()}) {
            for (const auto& path : bond->paths()) down += path.up ? 0 : 1;
          }
          return down == 2;
        },
        10));
    uint64_t resent = 0;
    for (const auto& path : a->paths()) resent += path.resent;
    std::printf("round %d: %llu frames sent again after the path failed\n", round,
                static_cast<unsigned long long>(resent));
    // The stream goes on over the rest.
    ASSERT_TRUE(a->Send(Numbered(kFrames + 1)).ok());
    auto f = b->Receive();
    ASSERT_TRUE(f.ok()) << f.status();
    EXPECT_TRUE(IsNumbered(*f, kFrames + 1));
  }
}

TEST(Bond, TheConnectionFailsOnlyWhenEveryPathHas) {
  Pairs p = Connect(2);
  ASSERT_EQ(p.primary.size(), 2u);
  Channel* first = p.mirror[0].get();
  Channel* second = p.mirror[1].get();
  auto a = replicator::MakeBond(std::move(p.primary), nullptr);
  auto b = replicator::MakeBond(std::move(p.mirror), nullptr);
  first->Shutdown();
  ASSERT_TRUE(a->Send(Numbered(1)).ok());
  auto f = b->Receive();
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_TRUE(IsNumbered(*f, 1));
  second->Shutdown();
  f = b->Receive();
  ASSERT_FALSE(f.ok());
  EXPECT_NE(f.status().message().find("all 2 paths failed"), std::string::npos) << f.status();
  // The sender learns it too, once its paths see the ends go.
  ASSERT_TRUE(testing::WaitUntil(
      [&] {
        for (const auto& path : a->paths()) {
          if (path.up) return false;
        }
        return true;
      },
      10));
  EXPECT_FALSE(a->Send(Numbered(2)).ok());
}

}  // namespace
}  // namespace romulus::bond_test
