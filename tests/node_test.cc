// Two hosts as switchover::Node, running software VMs (no KVM needed): the role changes that
// `romulus primary` and `romulus mirror` make, driven the same way. A planned migration swaps
// the roles and protection goes on without a full copy, there and back; a failed primary that
// returns as the mirror is resynchronised from the memory it left behind.
//
// Each VM emits an output every 50 of its memory writes, numbered by its write count, which
// lives in guest memory and so travels with the VM. Delivered outputs must therefore be a
// strictly increasing sequence whichever host delivers them (a repeat means a host resumed an
// older state after the outside world saw a newer one), and across a planned migration a gapless
// one (nothing produced before the hand-over is lost).
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <chrono>
#include <cstdio>
#include <mutex>
#include <vector>

#include "cli/host.h"
#include "switchover/switchover.h"
#include "tests/soft_vm.h"
#include "tests/test_util.h"

namespace romulus::node_test {
namespace {

using std::chrono::milliseconds;
using switchover::Node;
using testing::SoftVm;
using testing::WaitUntil;
constexpr uint64_t kMemory = 16ull << 20, kDisk = 4ull << 20, kWorkingSet = 512;
constexpr uint64_t kWritesPerMs = testing::WriteRate(20, 2);
constexpr uint64_t kOutputEvery = 50;
const char kKey[] = "0123456789abcdef-node-test-key";

class NodeTest : public ::testing::Test {
 protected:
  struct Host {
    std::string name, disk, memory_file;
    uint16_t port = 0;  // its replication listener, as the mirror
    std::unique_ptr<Node> node;
  };
  bool two_paths_ = false;  // parallel paths: a second one over 127.0.0.2

  NodeTest() {
    a_ = {"a", dir_.File("a.img"), dir_.File("a.mem"), testing::FreePort(), nullptr};
    b_ = {"b", dir_.File("b.img"), dir_.File("b.mem"), testing::FreePort(), nullptr};
  }
  ~NodeTest() override {
    a_.node.reset();
    b_.node.reset();
  }

  SoftVm::Options VmOptions(const Host& h, vmm::OutputGate& gate) {
    SoftVm::Options o;
    o.memory_bytes = kMemory;
    o.disk_bytes = kDisk;
    o.working_set_pages = kWorkingSet;
    o.writes_per_ms = kWritesPerMs;
    o.memory_path = h.memory_file;
    o.output_every = kOutputEvery;
    o.output = [this, &gate, name = h.name](uint64_t writes) {
      {
        std::lock_guard<std::mutex> lock(mu_);
        produced_[name]++;
      }
      gate.Push([this, writes] {
        std::lock_guard<std::mutex> lock(mu_);
        delivered_.push_back(writes);
      });
    };
    return o;
  }

  void RunMigrationsBackAndForth();

  Node::Options NodeOptions(const Host& self, const Host& peer) {
    Node::Options o;
    o.identity = {"soft-vm", kMemory, kDisk};
    o.key = kKey;
    o.listen = "127.0.0.1";
    o.port = self.port;
    o.peer_host = "127.0.0.1";
    o.peer_port = peer.port;
    if (two_paths_) {  // a second path over 127.0.0.2, loopback too
      o.listen_paths = {"127.0.0.2"};
      o.peer_paths = {{"127.0.0.2", peer.port}};
    }
    o.epoch = milliseconds(10);
    o.disk_path = self.disk;
    o.adopt = [this, &self](
                  checkpoint::ReplicaStore::Committed c,
                  vmm::OutputGate& gate) -> absl::StatusOr<std::unique_ptr<switchover::NodeVm>> {
      auto vm = SoftVm::Adopt(std::move(c.memory), c.disk_path, VmOptions(self, gate));
      if (vm == nullptr) return absl::InternalError("cannot adopt the replica");
      return vm;
    };
    o.log = [this, who = self.name](absl::string_view line) {
      std::lock_guard<std::mutex> lock(mu_);
      log_ += who + ": " + std::string(line) + "\n";
    };
    return o;
  }

  // `h` boots a VM whose memory outside the working set is random bytes, so that every page
  // that travels costs its size.
  void StartPrimary(Host& h, const Host& peer) {
    auto gate = std::make_unique<vmm::OutputGate>();
    auto vm = SoftVm::Create(h.disk, VmOptions(h, *gate));
    ASSERT_NE(vm, nullptr);
    vm->FillWithNoise();
    auto node = Node::StartPrimary(std::move(gate), std::move(vm), NodeOptions(h, peer));
    ASSERT_TRUE(node.ok()) << node.status();
    h.node = std::move(*node);
  }

  void StartMirror(Host& h, const Host& peer, std::unique_ptr<checkpoint::ReplicaStore> replica) {
    auto node = Node::StartMirror(std::move(replica), NodeOptions(h, peer));
    ASSERT_TRUE(node.ok()) << node.status();
    h.node = std::move(*node);
  }

  // The primary `h` replicates to its peer and has 20 checkpoints acknowledged on that
  // connection; returns its synchronisation.
  replicator::Primary::SyncProgress WaitProtected(Host& h) {
    EXPECT_TRUE(WaitUntil(
        [&] {
          auto s = h.node->status();
          return s.primary && s.primary->connected && s.primary->acked >= 20;
        },
        60))
        << Logs();
    auto s = h.node->status();
    if (!s.primary) return {};
    // `romulus status` (and the demo) report the synchronisation that completed.
    pb::StatusReply reply = cli::NodeStatusReply("node-test", s);
    EXPECT_FALSE(reply.has_sync());
    EXPECT_EQ(reply.last_sync().wire_bytes(), s.primary->sync.wire_bytes);
    EXPECT_EQ(reply.last_sync().done_bytes(), s.primary->sync.done_bytes);
    EXPECT_EQ(reply.last_sync().unchanged_bytes(), s.primary->sync.unchanged_bytes);
    EXPECT_GT(reply.last_sync().seconds(), 0);
    return s.primary->sync;
  }

  // Only what the VM wrote since it resumed travelled (once per pre-copy round), plus hashes.
  void ExpectOnlyTheDifferenceSent(const replicator::Primary::SyncProgress& sync,
                                   const char* what) {
    EXPECT_GE(sync.unchanged_bytes, kMemory - (kWorkingSet + 3) * 4096) << Logs();
    EXPECT_LT(sync.wire_bytes, sync.done_bytes - sync.unchanged_bytes + (1 << 20)) << Logs();
    EXPECT_LT(sync.wire_bytes, kMemory) << Logs();  // below one full copy, also under TSan
    std::printf(
        "%s: %.1f MiB on the wire for %.1f MiB of memory and disk (%.1f MiB already there)\n", what,
        static_cast<double>(sync.wire_bytes) / (1 << 20),
        static_cast<double>(kMemory + kDisk) / (1 << 20),
        static_cast<double>(sync.unchanged_bytes) / (1 << 20));
  }

  // Migrates from `from` to `to`: the roles swap, and the VM goes on producing there.
  void MigrateAndCheck(Host& from, Host& to) {
    uint64_t produced_there = Produced(to.name);
    auto report = from.node->Migrate(std::chrono::seconds(20), "a test");
    ASSERT_TRUE(report.ok()) << report.status() << Logs();
    EXPECT_GE(report->downtime_ms, report->commit_ms);
    std::printf(
        "migration %s -> %s: epoch %lu, %lu pages in the last checkpoint, downtime %.1f ms\n",
        from.name.c_str(), to.name.c_str(), static_cast<unsigned long>(report->epoch),
        static_cast<unsigned long>(report->final_pages), report->downtime_ms);
    auto there = to.node->status();
    EXPECT_EQ(there.role, Node::Role::kPrimary);
    EXPECT_EQ(there.resumed_epoch, static_cast<int64_t>(report->epoch));
    EXPECT_EQ(there.handed_over_because, "a test");  // the reason travelled with the VM
    auto here = from.node->status();
    EXPECT_EQ(here.role, Node::Role::kMirror);
    EXPECT_EQ(here.port, from.port);
    uint64_t produced_here = Produced(from.name);
    EXPECT_TRUE(WaitUntil([&] { return Produced(to.name) >= produced_there + 10; }, 30)) << Logs();
    EXPECT_EQ(Produced(from.name), produced_here);  // its VM is gone
    auto migrated = from.node->Migrate(milliseconds(100), "a test");
    EXPECT_EQ(migrated.status().code(), absl::StatusCode::kFailedPrecondition);
  }

  uint64_t Produced(const std::string& name) {
    std::lock_guard<std::mutex> lock(mu_);
    return produced_[name];
  }
  std::vector<uint64_t> Delivered() {
    std::lock_guard<std::mutex> lock(mu_);
    return delivered_;
  }
  std::string Logs() {
    std::lock_guard<std::mutex> lock(mu_);
    return log_;
  }

  testing::TempDir dir_;
  std::mutex mu_;
  std::map<std::string, uint64_t> produced_;
  std::vector<uint64_t> delivered_;
  std::string log_;
  Host a_, b_;
};

TEST_F(NodeTest, MigrationSwapsTheRolesAndBackWithoutAFullResync) { RunMigrationsBackAndForth(); }

// The same over two parallel paths: both carry the replication, and the roles swap with them.
TEST_F(NodeTest, MigrationOverTwoPathsSwapsTheRolesAndBack) {
  two_paths_ = true;
  RunMigrationsBackAndForth();
  // Both ends report both paths up and carrying data. Waited for: on a loaded machine the
  // connection may have been renewed just now, and a new one reports its paths once it runs.
  for (Host* h : {&a_, &b_}) {
    pb::StatusReply reply;
    auto both_carry = [&] {
      reply = cli::NodeStatusReply("node-test", h->node->status());
      if (reply.replication_paths_size() != 2) return false;
      for (const pb::ReplicationPathState& p : reply.replication_paths()) {
        if (!p.up() || p.bytes_sent() + p.bytes_received() == 0) return false;
      }
      return true;
    };
    EXPECT_TRUE(WaitUntil(both_carry, 30))
        << h->name << " reports " << reply.replication_paths_size()
        << " replication paths: " << reply.ShortDebugString() << Logs();
  }
}

void NodeTest::RunMigrationsBackAndForth() {
  StartPrimary(a_, b_);
  auto replica = checkpoint::ReplicaStore::Create(kMemory, b_.disk, kDisk);
  ASSERT_TRUE(replica.ok()) << replica.status();
  StartMirror(b_, a_, std::move(*replica));
  auto first = WaitProtected(a_);
  EXPECT_GE(first.wire_bytes, kMemory / 2);  // the first synchronisation copies the noise

  MigrateAndCheck(a_, b_);
  ExpectOnlyTheDifferenceSent(WaitProtected(b_), "re-protection after a -> b");
  MigrateAndCheck(b_, a_);
  ExpectOnlyTheDifferenceSent(WaitProtected(a_), "re-protection after b -> a");

  std::vector<uint64_t> delivered = Delivered();
  ASSERT_GT(delivered.size(), 20u);
  for (size_t i = 0; i < delivered.size(); i++) {
    ASSERT_EQ(delivered[i], (i + 1) * kOutputEvery) << "output " << i << " of " << delivered.size();
  }
}

// A mirror whose own health says move refuses a planned migration and says why; the VM runs on
// where it was, still protected.
TEST_F(NodeTest, AnUnhealthyMirrorRefusesTheVm) {
  StartPrimary(a_, b_);
  auto replica = checkpoint::ReplicaStore::Create(kMemory, b_.disk, kDisk);
  ASSERT_TRUE(replica.ok()) << replica.status();
  Node::Options o = NodeOptions(b_, a_);
  o.healthy = [] { return absl::UnavailableError("corrected_memory 12/10 within 60 s"); };
  auto node = Node::StartMirror(std::move(*replica), o);
  ASSERT_TRUE(node.ok()) << node.status();
  b_.node = std::move(*node);
  WaitProtected(a_);
  auto report = a_.node->Migrate(std::chrono::seconds(20), "a test");
  ASSERT_EQ(report.status().code(), absl::StatusCode::kAborted) << report.status();
  EXPECT_THAT(std::string(report.status().message()),
              ::testing::HasSubstr("the mirror refused: this host is unhealthy: corrected_memory "
                                   "12/10 within 60 s"));
  EXPECT_EQ(a_.node->status().role, Node::Role::kPrimary);
  EXPECT_EQ(b_.node->status().role, Node::Role::kMirror);
  uint64_t acked = a_.node->status().primary->acked;
  EXPECT_TRUE(WaitUntil([&] { return a_.node->status().primary->acked >= acked + 10; }, 30))
      << Logs();
}

TEST_F(NodeTest, AFailedPrimaryReturnsAsTheMirrorOfItsPromotedPeerAndTakesTheVmBack) {
  StartPrimary(a_, b_);
  auto replica = checkpoint::ReplicaStore::Create(kMemory, b_.disk, kDisk);
  ASSERT_TRUE(replica.ok()) << replica.status();
  StartMirror(b_, a_, std::move(*replica));
  WaitProtected(a_);
  // Without a witness or a fencing command only an operator may promote.
  auto refused = b_.node->Promote(false, "test");
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(b_.node->status().role, Node::Role::kMirror);

  a_.node.reset();  // a fails: what it held in its gate never leaves
  auto promoted = b_.node->Promote(true, "test");
  ASSERT_TRUE(promoted.ok()) << promoted.status() << Logs();
  EXPECT_NE(promoted->find("replicating to 127.0.0.1:"), std::string::npos) << *promoted;
  // Unprotected until a returns, b releases its outputs: they do not wait for a mirror.
  size_t delivered_at_promotion = Delivered().size();
  EXPECT_TRUE(WaitUntil([&] { return Delivered().size() >= delivered_at_promotion + 10; }, 30))
      << Logs();

  // a returns as the mirror, seeded with the memory and disk it left behind.
  auto memory = vmm::GuestMemory::MapFileShared(a_.memory_file, kMemory, /*fresh=*/false);
  ASSERT_TRUE(memory.ok()) << memory.status();
  auto seeded = checkpoint::ReplicaStore::Adopt(std::move(*memory), a_.disk);
  ASSERT_TRUE(seeded.ok()) << seeded.status();
  StartMirror(a_, b_, std::move(*seeded));
  ExpectOnlyTheDifferenceSent(WaitProtected(b_), "re-protection of the failed primary");

  MigrateAndCheck(b_, a_);
  WaitProtected(a_);

  std::vector<uint64_t> delivered = Delivered();
  ASSERT_GT(delivered.size(), 20u);
  for (size_t i = 1; i < delivered.size(); i++) {
    ASSERT_LT(delivered[i - 1], delivered[i]) << "output " << i << " of " << delivered.size();
  }
}

}  // namespace
}  // namespace romulus::node_test
