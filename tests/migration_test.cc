// Planned migration at the replication level, with software VMs (no KVM needed): the primary
// pauses its VM for good, the mirror commits the last checkpoint and resumes the VM from it; and
// every way it can fail before that leaves the VM running where it was. (The role swap that
// follows a migration is tested on switchover::Node, in node_test.cc.)
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <mutex>

#include "replicator/replicator.h"
#include "tests/soft_vm.h"
#include "tests/test_util.h"

namespace romulus::migration_test {
namespace {

using std::chrono::milliseconds;
using testing::SoftVm;
using testing::TempDir;
using testing::WaitUntil;
constexpr uint64_t kMemory = 32ull << 20, kDisk = 4ull << 20, kWorkingSet = 1024;
constexpr uint64_t kWritesPerMs = testing::WriteRate(20, 2);
const char kKey[] = "0123456789abcdef-migration-key";
const replicator::Identity kIdentity{"soft-vm", kMemory, kDisk};

// One host: a VM when it is the primary, a replica when it is the mirror.
struct Host {
  std::string name, disk;
  vmm::OutputGate gate;
  std::unique_ptr<SoftVm> vm;
  std::unique_ptr<checkpoint::EpochEngine> engine;
  std::unique_ptr<replicator::Primary> primary;
  std::unique_ptr<checkpoint::ReplicaStore> replica;
  std::unique_ptr<replicator::Mirror> mirror;
  testing::PauseDigests pauses;
  std::mutex mu;  // guards what the mirror's thread sets at a hand-over
  uint64_t resumed_digest = 0;
  std::atomic<uint64_t> produced{0}, delivered{0};  // outputs
};

class Migration : public ::testing::Test {
 protected:
  Migration() {
    a_.name = "a";
    b_.name = "b";
    a_.disk = dir_.File("a.img");
    b_.disk = dir_.File("b.img");
  }
  ~Migration() override {
    for (Host* h : {&a_, &b_}) {
      h->primary.reset();
      h->mirror.reset();
      h->engine.reset();
      h->vm.reset();
    }
  }

  SoftVm::Options VmOptions(Host& h) {
    SoftVm::Options o;
    o.memory_bytes = kMemory;
    o.disk_bytes = kDisk;
    o.working_set_pages = kWorkingSet;
    o.writes_per_ms = kWritesPerMs;
    o.output_every = 50;
    o.output = [&h](uint64_t) {
      h.produced++;
      h.gate.Push([&h] { h.delivered++; });
    };
    return o;
  }

  // Host a boots a VM whose memory outside the working set is random bytes (so that every page
  // that travels costs its size), and b is its empty mirror.
  void BootOnA() {
    a_.vm = SoftVm::Create(a_.disk, VmOptions(a_));
    ASSERT_NE(a_.vm, nullptr);
    a_.vm->FillWithNoise();
    ASSERT_TRUE(a_.vm->Start().ok());
    auto r = checkpoint::ReplicaStore::Create(kMemory, b_.disk, kDisk);
    ASSERT_TRUE(r.ok()) << r.status();
    b_.replica = std::move(*r);
  }

  // `to` listens as the mirror of `from`, which replicates to it; both wait for protection.
  void Protect(Host& from, Host& to, bool takes_handovers = true) {
    std::function<absl::Status(uint64_t, const std::string&)> on_handover = nullptr;
    if (takes_handovers)
      on_handover = [this, &to](uint64_t, const std::string&) { return Resume(to); };
    auto m = replicator::Mirror::Start(*to.replica, {.identity = kIdentity,
                                                     .key = kKey,
                                                     .on_handover = on_handover,
                                                     .log = Logger(to.name + " mirror")});
    ASSERT_TRUE(m.ok()) << m.status();
    to.mirror = std::move(*m);
    from.engine = std::make_unique<checkpoint::EpochEngine>(*from.vm, from.gate,
                                                            checkpoint::EpochEngine::Options{});
    from.pauses.Watch(*from.engine, *from.vm, kDisk);
    auto p = replicator::Primary::Start(*from.engine, from.gate,
                                        {.identity = kIdentity,
                                         .key = kKey,
                                         .mirror_port = to.mirror->port(),
                                         .epoch = milliseconds(10),
                                         .log = Logger(from.name + " primary")});
    ASSERT_TRUE(p.ok()) << p.status();
    from.primary = std::move(*p);
    ASSERT_TRUE(WaitUntil([&] { return from.primary->stats().acked >= 20; }, 60)) << Logs();
    from.pauses.ExpectReplicaMatches(*to.mirror);
  }

  // What the mirror's host does when handed the VM: the committed replica becomes a running VM.
  absl::Status Resume(Host& h) {
    absl::StatusOr<checkpoint::ReplicaStore::Committed> c;
    h.mirror->WithReplica([&](checkpoint::ReplicaStore& r) { c = r.TakeCommitted(); });
    if (!c.ok()) return c.status();
    uint64_t digest = c->memory->Digest();
    auto vm = SoftVm::Adopt(std::move(c->memory), c->disk_path, VmOptions(h));
    if (vm == nullptr) return absl::InternalError("cannot adopt the replica");
    // No engine yet: its outputs leave at once (unprotected until re-protected).
    if (auto s = vm->Start(); !s.ok()) return s;
    std::lock_guard<std::mutex> lock(h.mu);
    h.resumed_digest = digest;
    h.vm = std::move(vm);
    return absl::OkStatus();
  }

  // Migrates the VM from `from` to `to` and checks what the issue asks of it.
  void MigrateAndCheck(Host& from, Host& to) {
    uint64_t acked = from.primary->stats().acked;
    // When the lease would be handed over, the last checkpoint is committed and its outputs
    // have left.
    int64_t held_at_commit = -1;
    auto report = from.primary->HandOver(
        std::chrono::seconds(20),
        [&] {
          held_at_commit = static_cast<int64_t>(from.gate.held());
          return absl::OkStatus();
        },
        "a test");
    ASSERT_TRUE(report.ok()) << report.status() << Logs();
    EXPECT_EQ(held_at_commit, 0);
    EXPECT_GT(from.primary->stats().acked, acked);
    EXPECT_GE(report->downtime_ms, report->commit_ms);
    EXPECT_TRUE(to.mirror->stats().handed_over);
    EXPECT_FALSE(to.mirror->stats().handover_expected_until) << "answered, so no longer expected";
    EXPECT_NE(from.primary->stats().state.find("handed over"), std::string::npos);
    std::printf(
        "migration %s -> %s: epoch %lu, %lu pages in the last checkpoint, commit %.1f ms, "
        "downtime %.1f ms\n",
        from.name.c_str(), to.name.c_str(), static_cast<unsigned long>(report->epoch),
        static_cast<unsigned long>(report->final_pages), report->commit_ms, report->downtime_ms);

    // The VM resumed there from exactly the memory it was paused with here.
    SoftVm* resumed = nullptr;
    uint64_t resumed_digest = 0;
    {
      std::lock_guard<std::mutex> lock(to.mu);
      resumed = to.vm.get();
      resumed_digest = to.resumed_digest;
    }
    ASSERT_NE(resumed, nullptr);
    EXPECT_EQ(resumed_digest, from.vm->memory().Digest());
    // It runs there and stays paused here; every output it produced here has left.
    uint64_t paused_at = from.vm->writes();
    EXPECT_TRUE(WaitUntil([&] { return resumed->writes() >= paused_at + 200; }, 30));
    EXPECT_EQ(from.vm->writes(), paused_at);
    EXPECT_EQ(from.gate.held(), 0u);
    EXPECT_EQ(from.delivered.load(), from.produced.load());
    EXPECT_GT(from.produced, 0u);
  }

  replicator::LogFn Logger(std::string who) {
    return [this, who](absl::string_view line) {
      std::lock_guard<std::mutex> lock(log_mu_);
      log_ += who + ": " + std::string(line) + "\n";
    };
  }
  std::string Logs() {
    std::lock_guard<std::mutex> lock(log_mu_);
    return log_;
  }

  TempDir dir_;
  std::mutex log_mu_;
  std::string log_;
  Host a_, b_;
};

TEST_F(Migration, ARefusedHandOverLeavesTheVmRunningAndProtectedWhereItWas) {
  BootOnA();
  Protect(a_, b_, /*takes_handovers=*/false);
  auto report = a_.primary->HandOver(std::chrono::seconds(20), nullptr, "");
  ASSERT_EQ(report.status().code(), absl::StatusCode::kAborted) << report.status();
  EXPECT_NE(report.status().message().find("takes no hand-overs"), std::string::npos)
      << report.status();
  EXPECT_NE(report.status().message().find("the VM runs here again"), std::string::npos);
  EXPECT_FALSE(b_.mirror->stats().handed_over);
  uint64_t writes = a_.vm->writes(), acked = a_.primary->stats().acked;
  EXPECT_TRUE(WaitUntil([&] { return a_.vm->writes() >= writes + 200; }, 30));
  EXPECT_TRUE(WaitUntil([&] { return a_.primary->stats().acked >= acked + 20; }, 30)) << Logs();
  a_.pauses.ExpectReplicaMatches(*b_.mirror);
}

TEST_F(Migration, AnErrorBeforeTheHandOverLeavesTheVmHere) {
  BootOnA();
  Protect(a_, b_);
  // The mirror heard the hand-over announced before the last checkpoint, which it committed:
  // until it comes (or is withdrawn) the primary's silence is no reason to promote.
  bool announced = false;
  auto report = a_.primary->HandOver(
      std::chrono::seconds(20),
      [&] {
        auto expected = b_.mirror->stats().handover_expected_until;
        announced = expected && *expected > std::chrono::steady_clock::now() &&
                    *expected <= std::chrono::steady_clock::now() + std::chrono::seconds(20);
        return absl::UnavailableError("no lease to give");
      },
      "");
  ASSERT_EQ(report.status().code(), absl::StatusCode::kAborted) << report.status();
  EXPECT_NE(report.status().message().find("no lease to give"), std::string::npos);
  EXPECT_TRUE(announced);
  EXPECT_TRUE(WaitUntil([&] { return !b_.mirror->stats().handover_expected_until; }, 30))
      << "the withdrawn hand-over is still expected";
  EXPECT_FALSE(b_.mirror->stats().handed_over);
  uint64_t writes = a_.vm->writes(), acked = a_.primary->stats().acked;
  EXPECT_TRUE(WaitUntil([&] { return a_.vm->writes() >= writes + 200; }, 30));
  EXPECT_TRUE(WaitUntil([&] { return a_.primary->stats().acked >= acked + 20; }, 30)) << Logs();
  // And the next attempt goes through.
  MigrateAndCheck(a_, b_);
}

TEST_F(Migration, WithoutAMirrorThereIsNothingToMigrateTo) {
  BootOnA();
  a_.engine = std::make_unique<checkpoint::EpochEngine>(*a_.vm, a_.gate,
                                                        checkpoint::EpochEngine::Options{});
  auto p = replicator::Primary::Start(*a_.engine, a_.gate,
                                      {.identity = kIdentity,
                                       .key = kKey,
                                       .mirror_port = testing::FreePort(),
                                       .log = Logger("a primary")});
  ASSERT_TRUE(p.ok());
  a_.primary = std::move(*p);
  auto report = a_.primary->HandOver(std::chrono::seconds(5), nullptr, "");
  ASSERT_EQ(report.status().code(), absl::StatusCode::kFailedPrecondition) << report.status();
  uint64_t writes = a_.vm->writes();
  EXPECT_TRUE(WaitUntil([&] { return a_.vm->writes() >= writes + 200; }, 30));
}

}  // namespace
}  // namespace romulus::migration_test
