// The epoch pipeline in one process: the replica equals the primary at every commit; a bad
// checkpoint never touches the replica; outputs wait for their epoch's acknowledgement; a
// stalled mirror bounds the primary's memory.
#include "checkpoint/checkpoint.h"

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <thread>

#include "cli/ledger_client.h"
#include "tests/test_util.h"
#include "vmm/journal.h"
#include "vmm/ledger_endpoint.h"
#include "vmm/ledger_protocol.h"

namespace romulus::checkpoint_test {
namespace {

using checkpoint::Checkpoint;
using checkpoint::EpochEngine;
using checkpoint::ReplicaStore;
using testing::TempDir;

constexpr uint64_t kMemory = 64ull << 20, kDisk = 8ull << 20;

// Keeps the ledger busy (so the guest writes its journal) until stopped.
class LedgerTraffic {
 public:
  explicit LedgerTraffic(vmm::Vm& vm)
      : thread_([this, &vm] {
          uint64_t id = 0;
          while (!stop_) {
            rml_request r{};
            r.client_id = 1;
            r.request_id = ++id;
            r.op = id % 4 == 1 ? RML_OP_OPEN : RML_OP_DEPOSIT;
            r.account = static_cast<uint32_t>(id % 8);
            r.amount = 1;
            if (!vm.ledger().Submit(r).ok()) std::this_thread::yield();
            std::this_thread::sleep_for(std::chrono::microseconds(200));  // offered load, not sync
          }
        }) {}
  ~LedgerTraffic() {
    stop_ = true;
    thread_.join();
  }

 private:
  std::atomic<bool> stop_{false};
  std::thread thread_;
};

class VmCheckpoint : public testing::PlatformTest {};

TEST_P(VmCheckpoint, ReplicaEqualsThePrimaryAtEveryCommit) {
  TempDir dir;
  auto vm = testing::BootTestVm(platform(), dir, {.working_set_pages = 4096, .write_rate = 400000});
  ASSERT_NE(vm, nullptr);
  vmm::OutputGate gate;
  EpochEngine engine(*vm, gate, {});
  uint64_t primary_memory = 0, primary_disk = 0;
  engine.SetPauseHook([&](const Checkpoint&) {
    primary_memory = vm->memory().Digest();
    primary_disk = *vmm::FileDigest(vm->disk().fd(), kDisk);
  });
  auto replica = ReplicaStore::Create(kMemory, dir.File("replica.img"), kDisk);
  ASSERT_TRUE(replica.ok()) << replica.status();
  ASSERT_TRUE(vm->Start().ok());
  LedgerTraffic traffic(*vm);
  uint64_t pages = 0, disk_writes = 0;
  const int kEpochs = LongRunHere(1500);
  for (int epoch = 0; epoch < kEpochs; epoch++) {
    auto cp = engine.TakeCheckpoint();
    ASSERT_TRUE(cp.ok()) << cp.status();
    ASSERT_TRUE((*replica)->Apply(**cp).ok());
    ASSERT_EQ((*replica)->MemoryDigest(), primary_memory) << "epoch " << epoch;
    ASSERT_EQ(*(*replica)->DiskDigest(), primary_disk) << "epoch " << epoch;
    engine.Acknowledge((*cp)->epoch);
    if (epoch > 0) {
      pages += (*cp)->gfns.size();
      disk_writes += (*cp)->disk_writes.size();
    }
  }
  EXPECT_EQ((*replica)->committed_epoch(), kEpochs - 1);
  EXPECT_GT(pages, (kEpochs - 1) * 10u);  // the workload dirtied memory in every epoch
  EXPECT_GT(disk_writes, kEpochs / 15u);  // and the ledger wrote its journal
  EXPECT_EQ(engine.stats().in_flight_bytes, 0u);
  EXPECT_TRUE(vm->Stop().ok());
}

TEST_P(VmCheckpoint, AtMostTheConfiguredNumberOfCheckpointsWaitForAcks) {
  TempDir dir;
  auto vm = testing::BootTestVm(platform(), dir, {.working_set_pages = 64, .write_rate = 1000});
  ASSERT_NE(vm, nullptr);
  vmm::OutputGate gate;
  EpochEngine engine(*vm, gate, {.max_in_flight_checkpoints = 3});
  ASSERT_TRUE(vm->Start().ok());
  for (int i = 0; i < 3; i++) ASSERT_TRUE(engine.TakeCheckpoint().ok());
  auto fourth = engine.TakeCheckpoint(std::chrono::milliseconds(100));
  EXPECT_EQ(fourth.status().code(), absl::StatusCode::kDeadlineExceeded) << fourth.status();
  engine.Acknowledge(0);
  EXPECT_TRUE(engine.TakeCheckpoint(std::chrono::milliseconds(100)).ok());
  EXPECT_TRUE(vm->Stop().ok());
}

TEST_P(VmCheckpoint, ASavedReplicaResumesWithEveryAcknowledgedTransaction) {
  TempDir dir;
  auto vm = testing::BootTestVm(platform(), dir, {.working_set_pages = 1024, .write_rate = 100000});
  ASSERT_NE(vm, nullptr);
  vmm::OutputGate gate;
  EpochEngine engine(*vm, gate, {});
  rml_status at_pause{};
  engine.SetPauseHook([&](const Checkpoint&) { at_pause = vm->guest_status(); });
  auto replica = ReplicaStore::Create(kMemory, dir.File("replica.img"), kDisk);
  ASSERT_TRUE(replica.ok());
  ASSERT_TRUE(vm->Start().ok());
  {
    LedgerTraffic traffic(*vm);
    for (int epoch = 0; epoch < 200; epoch++) {
      auto cp = engine.TakeCheckpoint();
      ASSERT_TRUE(cp.ok());
      ASSERT_TRUE((*replica)->Apply(**cp).ok());
      engine.Acknowledge((*cp)->epoch);
    }
  }
  ASSERT_GT(at_pause.ledger_seq, 10u);
  auto info = (*replica)->SaveSnapshot(dir.File("replica-snap"));
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->guest.ledger_seq, at_pause.ledger_seq);
  EXPECT_TRUE(vm->Stop().ok());

  auto resumed = vmm::Vm::Restore(dir.File("replica-snap"), dir.File("resumed.img"), nullptr);
  ASSERT_TRUE(resumed.ok()) << resumed.status();
  EXPECT_EQ((*resumed)->guest_status().ledger_seq, at_pause.ledger_seq);
  auto journal = vmm::ReplayJournal(dir.File("resumed.img"));
  ASSERT_TRUE(journal.ok()) << journal.status();
  // Every transaction whose journal write completed is on the resumed disk. The guest counts a
  // journal write after it returns, and applies a batch before journaling it, so:
  EXPECT_GE(journal->last_seq, at_pause.journal_records);
  EXPECT_LE(journal->last_seq, at_pause.ledger_seq);
  // The resumed ledger serves and continues the sequence.
  vmm::OutputGate open_gate;
  auto ep = vmm::LedgerEndpoint::Start((*resumed)->ledger(), open_gate, "127.0.0.1", 0, nullptr);
  ASSERT_TRUE(ep.ok());
  ASSERT_TRUE((*resumed)->Start().ok());
  auto client = cli::LedgerClient::Connect("127.0.0.1", (*ep)->port(), 5000);
  ASSERT_TRUE(client.ok());
  // A deposit to the first account (the traffic opened it), not an OPEN: how many accounts the
  // traffic opened, up to the ledger's limit, depends on how fast this machine ran it.
  pb::LedgerRequest q;
  q.set_client_id(9999);
  q.set_request_id(1);
  q.set_op(pb::DEPOSIT);
  q.set_account(0);
  q.set_amount(1);
  auto r = client->Call(q);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->status(), RML_OK);
  // Requests that were in the ring at the checkpoint are part of the VM: the resumed guest
  // applies them first, so the new one comes after them.
  EXPECT_GT(r->seq(), at_pause.ledger_seq);
  ep->reset();
  EXPECT_TRUE((*resumed)->Stop().ok());
}

class VmCheckpointFaults : public testing::PlatformTest {
 protected:
  void SetUp() override {
    PlatformTest::SetUp();
    if (IsSkipped()) return;
    vm_ = testing::BootTestVm(platform(), dir_, {.working_set_pages = 1024, .write_rate = 200000});
    ASSERT_NE(vm_, nullptr);
    engine_ = std::make_unique<EpochEngine>(*vm_, gate_, EpochEngine::Options{});
    auto r = ReplicaStore::Create(kMemory, dir_.File("replica.img"), kDisk);
    ASSERT_TRUE(r.ok());
    replica_ = std::move(*r);
    ASSERT_TRUE(vm_->Start().ok());
    for (int i = 0; i < 4; i++) {
      // Let the guest dirty memory first: back-to-back checkpoints could find nothing new.
      uint64_t before = vm_->guest_status().workload_pages;
      auto deadline = std::chrono::steady_clock::now() + testing::Scaled(20);
      while (vm_->guest_status().workload_pages < before + 200 &&
             std::chrono::steady_clock::now() < deadline) {
        std::this_thread::sleep_for(std::chrono::milliseconds(1));  // polling the guest's counter
      }
      auto cp = engine_->TakeCheckpoint();
      ASSERT_TRUE(cp.ok());
      cps_.push_back(*cp);
    }
    ASSERT_TRUE(replica_->Apply(*cps_[0]).ok());
    ASSERT_TRUE(replica_->Apply(*cps_[1]).ok());
    memory_ = replica_->MemoryDigest();
    disk_ = *replica_->DiskDigest();
  }
  void TearDown() override {
    engine_.reset();
    if (vm_) {
      EXPECT_TRUE(vm_->Stop().ok());
    }
  }
  // `c` is refused and the replica still equals checkpoint 1.
  void ExpectRejected(const Checkpoint& c) {
    absl::Status s = replica_->Apply(c);
    EXPECT_FALSE(s.ok());
    EXPECT_EQ(std::string(s.message()).find('\n'), std::string::npos);
    EXPECT_EQ(replica_->committed_epoch(), 1);
    EXPECT_EQ(replica_->MemoryDigest(), memory_);
    EXPECT_EQ(*replica_->DiskDigest(), disk_);
  }
  Checkpoint Next() const { return *cps_[2]; }

  TempDir dir_;
  vmm::OutputGate gate_;
  std::unique_ptr<vmm::Vm> vm_;
  std::unique_ptr<EpochEngine> engine_;
  std::unique_ptr<ReplicaStore> replica_;
  std::vector<std::shared_ptr<const Checkpoint>> cps_;
  uint64_t memory_ = 0, disk_ = 0;
};

TEST_P(VmCheckpointFaults, CorruptedPageIsRejected) {
  Checkpoint c = Next();
  ASSERT_FALSE(c.pages.empty());
  c.pages[c.pages.size() / 2] ^= 1;
  ExpectRejected(c);
}

TEST_P(VmCheckpointFaults, TruncatedCheckpointIsRejected) {
  Checkpoint c = Next();
  c.pages.resize(c.pages.size() - vmm::kPageSize);
  ExpectRejected(c);
  Checkpoint d = Next();
  d.gfns.pop_back();
  d.hashes.pop_back();
  d.pages.resize(d.pages.size() - vmm::kPageSize);  // consistent but not what was digested
  ExpectRejected(d);
}

TEST_P(VmCheckpointFaults, ReplayedAndReorderedCheckpointsAreRejected) {
  ExpectRejected(*cps_[1]);
  ExpectRejected(*cps_[0]);
  ExpectRejected(*cps_[3]);
}

TEST_P(VmCheckpointFaults, ForgedContentsAreRejected) {
  Checkpoint c = Next();
  pb::VcpuState* vcpu = c.state.mutable_vcpus(0);  // anything the digest covers
  if (platform() == pb::KVM) {
    ASSERT_TRUE(vcpu->has_kvm());
    vcpu->mutable_kvm()->set_mp_state(77);
  } else {
    ASSERT_TRUE(vcpu->has_process());
    ASSERT_FALSE(vcpu->process().regs().empty());
    (*vcpu->mutable_process()->mutable_regs())[0] ^= 1;
  }
  ExpectRejected(c);
  Checkpoint d = Next();
  d.disk_writes.push_back({kDisk / 512 - 1, std::string(1024, 'x')});  // past the end
  d.digest = checkpoint::CheckpointDigest(d);
  ExpectRejected(d);
  Checkpoint e = Next();
  e.gfns[0] = kMemory / vmm::kPageSize + 5;  // outside guest memory
  e.digest = checkpoint::CheckpointDigest(e);
  ExpectRejected(e);
}

// Epochs come from the peer: one past kMaxEpoch, even in a full checkpoint that is otherwise
// genuine, is refused, so counting on from the committed epoch cannot overflow (a full
// checkpoint at INT64_MAX was committed, and the next checkpoint's check overflowed).
TEST_P(VmCheckpointFaults, EpochsBeyondTheBoundAreRefused) {
  for (uint64_t epoch : {checkpoint::kMaxEpoch + 1, uint64_t{INT64_MAX}, ~uint64_t{0}}) {
    Checkpoint c = *cps_[0];
    ASSERT_TRUE(c.full);
    c.epoch = epoch;
    c.digest = checkpoint::CheckpointDigest(c);
    ExpectRejected(c);
    c.full = false;
    c.digest = checkpoint::CheckpointDigest(c);
    ExpectRejected(c);
  }
  ASSERT_TRUE(replica_->Apply(*cps_[2]).ok());
  EXPECT_EQ(replica_->committed_epoch(), 2);
}

TEST_P(VmCheckpointFaults, TheGenuineCheckpointStillApplies) {
  ASSERT_TRUE(replica_->Apply(*cps_[2]).ok());
  ASSERT_TRUE(replica_->Apply(*cps_[3]).ok());
  EXPECT_EQ(replica_->committed_epoch(), 3);
}

ROMULUS_ON_EVERY_PLATFORM(VmCheckpointFaults);

TEST_P(VmCheckpoint, OutputsLeaveOnlyWhenTheirEpochIsAcknowledged) {
  TempDir dir;
  auto vm = testing::BootTestVm(platform(), dir, {.working_set_pages = 256, .write_rate = 1000});
  ASSERT_NE(vm, nullptr);
  vmm::OutputGate gate;
  EpochEngine engine(*vm, gate, {});
  auto ep = vmm::LedgerEndpoint::Start(vm->ledger(), gate, "127.0.0.1", 0, nullptr);
  ASSERT_TRUE(ep.ok());
  ASSERT_TRUE(vm->Start().ok());
  auto first = engine.TakeCheckpoint();
  ASSERT_TRUE(first.ok());
  engine.Acknowledge((*first)->epoch);

  auto client = cli::LedgerClient::Connect("127.0.0.1", (*ep)->port(), 5000);
  ASSERT_TRUE(client.ok()) << client.status();
  auto send = [&](uint64_t id) {
    pb::LedgerRequest q;
    q.set_client_id(11);
    q.set_request_id(id);
    q.set_op(pb::OPEN);
    ASSERT_TRUE(client->SendBytes(vmm::EncodeFrame(q)).ok());
  };
  auto wait_held = [&](size_t n) {
    auto deadline = std::chrono::steady_clock::now() + testing::Scaled(10);
    while (gate.held() < n && std::chrono::steady_clock::now() < deadline) {
      std::this_thread::sleep_for(std::chrono::milliseconds(1));  // polling the gate
    }
    ASSERT_EQ(gate.held(), n);
  };
  send(1);
  wait_held(1);                      // answered by the guest, held by the gate
  auto k = engine.TakeCheckpoint();  // the answer belongs to epoch k
  ASSERT_TRUE(k.ok());
  send(2);
  wait_held(2);  // answered after k's pause: belongs to k+1
  engine.Acknowledge((*k)->epoch);
  EXPECT_EQ(gate.held(), 1u);  // only epoch k's output left
  auto r1 = client->Receive();
  ASSERT_TRUE(r1.ok());
  EXPECT_EQ(r1->request_id(), 1u);
  auto k1 = engine.TakeCheckpoint();
  ASSERT_TRUE(k1.ok());
  EXPECT_EQ(gate.held(), 1u);
  engine.Acknowledge((*k1)->epoch);
  EXPECT_EQ(gate.held(), 0u);
  auto r2 = client->Receive();
  ASSERT_TRUE(r2.ok());
  EXPECT_EQ(r2->request_id(), 2u);
  ep->reset();
  EXPECT_TRUE(vm->Stop().ok());
}

TEST_P(VmCheckpoint, AStalledMirrorBoundsThePrimarysMemory) {
  TempDir dir;
  constexpr uint64_t kWs = 2048;
  auto vm = testing::BootTestVm(platform(), dir, {.working_set_pages = kWs, .write_rate = 0});
  ASSERT_NE(vm, nullptr);
  vmm::OutputGate gate;
  constexpr uint64_t kBudget = 1ull << 20;
  EpochEngine engine(*vm, gate,
                     {.max_in_flight_bytes = kBudget, .max_in_flight_checkpoints = 1000000});
  ASSERT_TRUE(vm->Start().ok());
  auto full = engine.TakeCheckpoint();
  ASSERT_TRUE(full.ok());
  engine.Acknowledge((*full)->epoch);
  // No more acknowledgements: checkpoints stop once the budget is spent.
  // Admission needs the in-flight bytes under the budget, so they never exceed it by more than
  // the one checkpoint admitted last.
  uint64_t largest = 0, peak = 0;
  absl::Status last;
  for (int i = 0; i < 1000 && last.ok(); i++) {
    auto cp = engine.TakeCheckpoint(std::chrono::milliseconds(200));
    last = cp.status();
    if (cp.ok()) largest = std::max(largest, (*cp)->bytes());
    peak = std::max(peak, engine.stats().in_flight_bytes);
  }
  EXPECT_EQ(last.code(), absl::StatusCode::kDeadlineExceeded) << last;
  EXPECT_GT(largest, 0u);
  EXPECT_GE(peak, kBudget);
  EXPECT_LE(peak, kBudget + largest);
  EXPECT_FALSE(vm->exited());  // the VM keeps running, throttled by the checkpoint rate
  uint64_t acked_to = engine.stats().epochs - 1;
  engine.Acknowledge(acked_to);
  EXPECT_EQ(engine.stats().in_flight_bytes, 0u);
  EXPECT_TRUE(engine.TakeCheckpoint(std::chrono::milliseconds(200)).ok());
  EXPECT_TRUE(vm->Stop().ok());
}

ROMULUS_ON_EVERY_PLATFORM(VmCheckpoint);

}  // namespace
}  // namespace romulus::checkpoint_test
