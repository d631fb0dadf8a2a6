// Parallel paths between two test hosts (network namespaces p and m, joined by two veth links,
// each capped by a token bucket filter): a path cut in the middle of the pre-copy stream, or in
// the middle of a checkpoint while the VM dirties memory, costs a resend on the other path. The
// replica stays exact, the connection does not fail (no resynchronisation), and the mirror's
// failure detector, which counts the replication stream as a sign of life, never declares the
// primary dead. Every wait is bounded; the lab goes away with the fixture.
#include <gtest/gtest.h>

#include <atomic>
#include <mutex>

#include "absl/strings/str_cat.h"
#include "replicator/replicator.h"
#include "switchover/switchover.h"
#include "tests/netns.h"
#include "tests/soft_vm.h"
#include "tests/test_util.h"

namespace romulus::netns_paths_test {
namespace {

using std::chrono::milliseconds;
using testing::SoftVm;
using testing::WaitUntil;

constexpr uint64_t kMemory = 32ull << 20, kDisk = 4ull << 20;
constexpr uint16_t kPort = 7400;
const char kKey[] = "netns-paths-key-0123456789abcdef";
const char* const kMirrorAddress[] = {"10.202.1.2", "10.202.2.2"};

class ParallelPathsNetns : public ::testing::Test {
 protected:
  void SetUp() override {
    ROMULUS_REQUIRE_NETNS();
    for (const char* h : {"p", "m"}) ASSERT_TRUE(lab_.AddHost(h).ok());
    for (int i = 0; i < 2; i++) {
      auto l = lab_.Link("p", absl::StrCat("10.202.", i + 1, ".1"), "m", kMirrorAddress[i]);
      ASSERT_TRUE(l.ok()) << l.status();
      link_[i] = *l;
      // The primary's direction carries the checkpoints: 100 Mbit/s each, so that a pre-copy of
      // 32 MiB lasts over a second and a checkpoint of the dirtying VM a good part of one.
      ASSERT_TRUE(lab_.Limit("p", lab_.Interface(*l, "p"), "100mbit").ok());
    }
  }

  void TearDown() override {
    primary_.reset();
    mirror_.reset();
    heartbeat_.reset();
    engine_.reset();
    vm_.reset();
  }

  void StartVm(uint64_t working_set_pages, uint64_t writes_per_ms) {
    SoftVm::Options o;
    o.memory_bytes = kMemory;
    o.disk_bytes = kDisk;
    o.working_set_pages = working_set_pages;
    o.writes_per_ms = writes_per_ms;
    vm_ = SoftVm::Create(dir_.File("disk.img"), o);
    ASSERT_NE(vm_, nullptr);
    vm_->FillWithNoise();  // every page costs its size on the wire
    engine_ =
        std::make_unique<checkpoint::EpochEngine>(*vm_, gate_, checkpoint::EpochEngine::Options{});
    pauses_.Watch(*engine_, *vm_, kDisk);
    ASSERT_TRUE(vm_->Start().ok());
  }

  // The mirror on m, listening on both paths, and its failure detector: a heartbeat whose only
  // UDP path leads nowhere, so that the replication stream is its only sign of the primary.
  void StartMirror() {
    auto r = checkpoint::ReplicaStore::Create(kMemory, dir_.File("replica.img"), kDisk);
    ASSERT_TRUE(r.ok()) << r.status();
    replica_ = std::move(*r);
    lab_.RunIn("m", [&] {
      switchover::Heartbeat::Options h;
      h.vm_id = "soft-vm";
      h.node = "m";
      h.role = "mirror";
      h.key = kKey;
      h.paths = {{{"127.0.0.1", 7101}, {"127.0.0.1", 7102}}};
      h.timeout = kPeerTimeout;
      h.on_peer_dead = [this] { deaths_++; };
      auto hb = switchover::Heartbeat::Start(h);
      ASSERT_TRUE(hb.ok()) << hb.status();
      heartbeat_ = std::move(*hb);
      replicator::Mirror::Options o;
      o.identity = {"soft-vm", kMemory, kDisk};
      o.key = kKey;
      o.listen = kMirrorAddress[0];
      o.listen_paths = {kMirrorAddress[1]};
      o.port = kPort;
      o.peer_timeout = kPeerTimeout;
      o.on_traffic = [hb = heartbeat_.get()] { hb->NoteTrafficFromPeer(); };
      o.log = [this](absl::string_view l) { Note("mirror: ", l); };
      auto m = replicator::Mirror::Start(*replica_, o);
      ASSERT_TRUE(m.ok()) << m.status();
      mirror_ = std::move(*m);
    });
  }

  void StartPrimary() {
    lab_.RunIn("p", [&] {
      replicator::Primary::Options o;
      o.identity = {"soft-vm", kMemory, kDisk};
      o.key = kKey;
      o.mirror_paths = {{kMirrorAddress[0], kPort}, {kMirrorAddress[1], kPort}};
      o.peer_timeout = kPeerTimeout;
      o.log = [this](absl::string_view l) { Note("primary: ", l); };
      auto p = replicator::Primary::Start(*engine_, gate_, o);
      ASSERT_TRUE(p.ok()) << p.status();
      primary_ = std::move(*p);
    });
  }

  void Note(absl::string_view who, absl::string_view line) {
    std::lock_guard<std::mutex> lock(mu_);
    log_ += absl::StrCat(who, line, "\n");
  }
  // The log, and where both sides stand.
  std::string Logs() {
    std::string out;
    {
      std::lock_guard<std::mutex> lock(mu_);
      out = log_;
    }
    auto ps = primary_->stats();
    auto ms = mirror_->stats();
    absl::StrAppend(&out, "primary: ", ps.state, "; acked ", ps.acked, ", lag ", ps.lag_epochs,
                    ", sync done ", ps.sync.done_bytes, " of ", ps.sync.total_bytes, "\n");
    absl::StrAppend(&out, "mirror: committed ", ms.committed_epoch, ", syncing ", ms.syncing,
                    ", connections ", ms.connections, "\n");
    for (const auto* paths : {&ps.paths, &ms.paths}) {
      for (const auto& p : *paths) {
        absl::StrAppend(&out, "  path ", p.peer, (p.up ? " up" : " down"), ", sent ", p.bytes_sent,
                        ", received ", p.bytes_received, ", resent ", p.resent, "\n");
      }
    }
    return out;
  }
  bool Protected() { return primary_->stats().state.find("protected") != std::string::npos; }

  // Path `i` is cut at the primary, both ways: its packets vanish, as on a failed link.
  void Cut(int i) { ASSERT_TRUE(lab_.Cut("p", {lab_.Interface(link_[i], "p")}).ok()); }

  // After the cut of path `cut`: the connection goes on over the other, checkpoints commit, and
  // the replica equals the primary at a committed pause.
  void ExpectExactOverTheOtherPath(int cut) {
    ASSERT_TRUE(WaitUntil(
        [&] {
          auto p = primary_->stats().paths;
          return p.size() == 2 && !p[cut].up;
        },
        30))
        << Logs();
    ASSERT_TRUE(WaitUntil([&] { return Protected(); }, 60)) << Logs();
    uint64_t acked = primary_->stats().acked;
    ASSERT_TRUE(WaitUntil([&] { return primary_->stats().acked >= acked + 5; }, 60)) << Logs();
    pauses_.ExpectReplicaMatches(*mirror_);
    auto ps = primary_->stats();
    auto ms = mirror_->stats();
    // One connection all along: no resynchronisation, nothing refused.
    EXPECT_EQ(ps.resyncs, 1u) << Logs();
    EXPECT_EQ(ms.connections, 1u) << Logs();
    EXPECT_EQ(ms.rejected, 0u) << Logs();
    EXPECT_TRUE(ms.connected);
    ASSERT_EQ(ps.paths.size(), 2u);
    EXPECT_TRUE(ps.paths[1 - cut].up);
    EXPECT_FALSE(ps.paths[cut].up);
    uint64_t resent = ps.paths[1 - cut].resent;
    ASSERT_EQ(ms.paths.size(), 2u);
    EXPECT_FALSE(ms.paths[cut].up);
    // No false failover: the mirror heard the primary all along.
    EXPECT_EQ(deaths_.load(), 0) << Logs();
    EXPECT_TRUE(heartbeat_->peer_alive());
    std::printf("path %d cut: %llu frames sent again on path %d; %s\n", cut,
                static_cast<unsigned long long>(resent), 1 - cut, ps.paths[cut].error.c_str());
  }

  const milliseconds kPeerTimeout = testing::ScaledMs(1.0);
  testing::NetnsLab lab_;
  int link_[2] = {-1, -1};
  testing::TempDir dir_;
  vmm::OutputGate gate_;
  std::unique_ptr<SoftVm> vm_;
  std::unique_ptr<checkpoint::EpochEngine> engine_;
  std::unique_ptr<checkpoint::ReplicaStore> replica_;
  std::unique_ptr<switchover::Heartbeat> heartbeat_;
  std::unique_ptr<replicator::Mirror> mirror_;
  std::unique_ptr<replicator::Primary> primary_;
  testing::PauseDigests pauses_;
  std::atomic<int> deaths_{0};
  std::mutex mu_;
  std::string log_;
};

TEST_F(ParallelPathsNetns, APathCutMidPrecopyCostsOnlyAResend) {
  StartVm(/*working_set_pages=*/512, /*writes_per_ms=*/10);
  StartMirror();
  StartPrimary();
  ASSERT_TRUE(primary_ && mirror_);
  // A third of the memory on the wire (progress observed, not a sleep), the mirror holding no
  // commit yet: the pre-copy stream is under way.
  ASSERT_TRUE(WaitUntil(
      [&] {
        auto s = primary_->stats();
        uint64_t wire = 0;
        for (const auto& path : s.paths) wire += path.bytes_sent;
        return s.sync.active && wire >= kMemory / 3;
      },
      30))
      << Logs();
  Cut(1);
  EXPECT_LT(mirror_->stats().committed_epoch, 0) << "the pre-copy ended before the cut";
  ExpectExactOverTheOtherPath(1);
}

TEST_F(ParallelPathsNetns, APathCutMidCheckpointUnderLoadCostsOnlyAResend) {
  // About 800 distinct pages (3 MiB) dirtied per 25 ms, more as epochs stretch: each checkpoint
  // takes a good part of a second on the two paths, so one is on its way at any moment.
  StartVm(/*working_set_pages=*/2048, /*writes_per_ms=*/40);
  StartMirror();
  StartPrimary();
  ASSERT_TRUE(primary_ && mirror_);
  ASSERT_TRUE(WaitUntil(
      [&] { return Protected() && primary_->stats().acked >= 3 && mirror_->stats().connected; },
      60))
      << Logs();
  // A checkpoint is on its way: taken, not yet acknowledged.
  ASSERT_TRUE(WaitUntil([&] { return primary_->stats().lag_epochs > 0; }, 30)) << Logs();
  Cut(0);
  ExpectExactOverTheOtherPath(0);
}

// A path that is down when the primary connects is left out: the connection goes over the other
// (a plain one), the mirror drops the unfinished bond, and the replica is exact.
TEST_F(ParallelPathsNetns, APathDownAtConnectionTimeIsLeftOut) {
  StartVm(/*working_set_pages=*/512, /*writes_per_ms=*/10);
  Cut(1);
  StartMirror();
  StartPrimary();
  ASSERT_TRUE(primary_ && mirror_);
  ASSERT_TRUE(WaitUntil([&] { return Protected() && primary_->stats().acked >= 5; }, 60)) << Logs();
  pauses_.ExpectReplicaMatches(*mirror_);
  EXPECT_TRUE(primary_->stats().paths.size() == 1) << Logs();
  EXPECT_EQ(primary_->stats().paths[0].peer, absl::StrCat(kMirrorAddress[0], ":", kPort));
  EXPECT_NE(Logs().find("connecting over 1 of 2 paths"), std::string::npos) << Logs();
  EXPECT_EQ(deaths_.load(), 0) << Logs();
}

}  // namespace
}  // namespace romulus::netns_paths_test
