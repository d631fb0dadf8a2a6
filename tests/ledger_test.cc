// The ledger under concurrent clients keeps its invariants; a retried request applies once.
#include <gtest/gtest.h>

#include <chrono>
#include <thread>

#include "cli/ledger_client.h"
#include "cli/load.h"
#include "tests/test_util.h"
#include "vmm/ledger_endpoint.h"
#include "vmm/ledger_protocol.h"
#include "vmm/vmm.h"

namespace romulus::ledger_test {
namespace {

using testing::TempDir;

class VmLedger : public testing::PlatformTest {
 protected:
  void SetUp() override {
    PlatformTest::SetUp();
    if (IsSkipped()) return;
    vm_ = testing::BootTestVm(platform(), dir_, {.working_set_pages = 512, .write_rate = 5000});
    ASSERT_NE(vm_, nullptr);
    auto ep = vmm::LedgerEndpoint::Start(vm_->ledger(), gate_, "127.0.0.1", 0, nullptr);
    ASSERT_TRUE(ep.ok()) << ep.status();
    endpoint_ = std::move(*ep);
    ASSERT_TRUE(vm_->Start().ok());
  }
  void TearDown() override {
    endpoint_.reset();
    if (vm_) {
      EXPECT_TRUE(vm_->Stop().ok());
    }
  }
  cli::LedgerClient Connect() {
    auto c = cli::LedgerClient::Connect("127.0.0.1", endpoint_->port(), 5000);
    EXPECT_TRUE(c.ok()) << c.status();
    return std::move(*c);
  }

  TempDir dir_;
  vmm::OutputGate gate_;
  std::unique_ptr<vmm::Vm> vm_;
  std::unique_ptr<vmm::LedgerEndpoint> endpoint_;
};

TEST_P(VmLedger, ConcurrentRandomTransfersKeepInvariants) {
  cli::LoadOptions o;
  o.port = endpoint_->port();
  o.clients = 8;
  o.duration_s = 2;
  o.accounts = 24;
  o.transfer_pct = 80;
  o.deposit_pct = 10;
  o.read_pct = 10;
  o.retry_pct = 10;
  o.seed = 42;
  auto report = cli::RunLoad(o);
  ASSERT_TRUE(report.ok()) << report.status();
  EXPECT_TRUE(report->ok()) << cli::FormatReport(*report);
  EXPECT_GT(report->requests, 0u);
  EXPECT_GT(report->retries_checked, 0u);
  EXPECT_EQ(report->final_total, report->expected_total);
  // The journal on disk holds every applied transaction.
  EXPECT_EQ(vm_->guest_status().journal_records, vm_->guest_status().ledger_seq);
}

TEST_P(VmLedger, RetriedRequestAppliesOnceAndOlderIdsAreRefused) {
  auto c = Connect();
  auto open = c.Call(testing::LedgerRequest(99, 1, pb::OPEN));
  ASSERT_TRUE(open.ok()) << open.status();
  ASSERT_EQ(open->status(), RML_OK);
  uint32_t account = open->account();
  auto first = c.Call(testing::LedgerRequest(99, 2, pb::DEPOSIT, account, 50));
  ASSERT_TRUE(first.ok());
  ASSERT_EQ(first->status(), RML_OK);
  EXPECT_EQ(first->balance(), 50);
  // The same request again, even on a new connection, returns the stored answer.
  auto c2 = Connect();
  auto retry = c2.Call(testing::LedgerRequest(99, 2, pb::DEPOSIT, account, 50));
  ASSERT_TRUE(retry.ok());
  EXPECT_EQ(retry->status(), RML_OK);
  EXPECT_EQ(retry->seq(), first->seq());
  EXPECT_EQ(retry->balance(), 50);
  auto read = c2.Call(testing::LedgerRequest(99, 3, pb::READ, account));
  ASSERT_TRUE(read.ok());
  EXPECT_EQ(read->balance(), 50);  // applied once
  // An id older than the client's last is never applied.
  auto stale = c2.Call(testing::LedgerRequest(99, 2 - 1, pb::DEPOSIT, account, 50));
  ASSERT_TRUE(stale.ok());
  EXPECT_EQ(stale->status(), RML_ERR_STALE_REQUEST);
  auto read2 = c2.Call(testing::LedgerRequest(99, 4, pb::READ, account));
  ASSERT_TRUE(read2.ok());
  EXPECT_EQ(read2->balance(), 50);
}

TEST_P(VmLedger, HeldResponsesWaitForTheGateAndLeaveInOrder) {
  gate_.SetHolding(true);
  auto c = Connect();
  ASSERT_TRUE(c.SendBytes(vmm::EncodeFrame(testing::LedgerRequest(5, 1, pb::OPEN))).ok());
  ASSERT_TRUE(c.SendBytes(vmm::EncodeFrame(testing::LedgerRequest(5, 2, pb::READ, 0))).ok());
  auto deadline = std::chrono::steady_clock::now() + testing::Scaled(10);
  while (gate_.held() < 2 && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(2));  // polling the gate
  }
  ASSERT_EQ(gate_.held(), 2u);
  gate_.SetHolding(false);
  auto r1 = c.Receive();
  auto r2 = c.Receive();
  ASSERT_TRUE(r1.ok() && r2.ok());
  EXPECT_EQ(r1->request_id(), 1u);
  EXPECT_EQ(r2->request_id(), 2u);
}

ROMULUS_ON_EVERY_PLATFORM(VmLedger);

}  // namespace
}  // namespace romulus::ledger_test
