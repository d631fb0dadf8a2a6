// Must show 1: snapshot in process A, restore in a fresh process B; the guest continues where
// it was (workload counters, ledger balances, sequence numbers), the memory digest at restore
// equals the one at capture, and the disk journal agrees with the ledger in memory.
#include <gtest/gtest.h>
#include <signal.h>

#include <map>

#include "cli/ledger_client.h"
#include "cli/load.h"
#include "tests/test_util.h"
#include "vmm/journal.h"

namespace romulus::snapshot_process_test {
namespace {

using testing::Child;
using testing::Field;
using testing::TempDir;
using testing::UintField;

std::map<uint32_t, int64_t> ReadBalances(uint16_t port, uint64_t client, uint32_t accounts,
                                         uint64_t* seq) {
  std::map<uint32_t, int64_t> out;
  auto c = cli::LedgerClient::Connect("127.0.0.1", port, 5000);
  EXPECT_TRUE(c.ok()) << c.status();
  if (!c.ok()) return out;
  for (uint32_t a = 0; a < accounts; a++) {
    pb::LedgerRequest q;
    q.set_client_id(client);
    q.set_request_id(a + 1);
    q.set_op(pb::READ);
    q.set_account(a);
    auto r = c->Call(q);
    EXPECT_TRUE(r.ok() && r->status() == RML_OK);
    if (r.ok()) {
      out[a] = r->balance();
      *seq = r->seq();
    }
  }
  return out;
}

class VmSnapshotProcess : public testing::PlatformTest {};

TEST_P(VmSnapshotProcess, RestoredInAFreshProcessTheGuestContinues) {
  TempDir dir;
  std::string snap = dir.File("snap");
  std::vector<std::string> common = {
      "vm",          "--platform", platform_name(), "--memory", "64M",
      "--disk-size", "8M",         "--ledger-port", "0",        "--progress-ms",
      "0",           "--quiet"};

  // Process A: boot, serve a load, snapshot on SIGUSR1.
  auto args_a = common;
  args_a.insert(args_a.end(), {"--disk", dir.File("a.img"), "--working-set", "2048", "--write-rate",
                               "20000", "--snapshot-to", snap});
  Child a(args_a);
  std::string line = a.WaitForLine("romulus vm: platform " + platform_name(), 30);
  ASSERT_FALSE(line.empty());
  line = a.WaitForLine("ledger listening on 127.0.0.1:", 30);
  ASSERT_FALSE(line.empty());
  uint16_t port_a = testing::ListeningPort(line);
  cli::LoadOptions o;
  o.port = port_a;
  o.clients = 4;
  o.duration_s = 1.5;
  o.accounts = 12;
  o.seed = 7;
  auto report = cli::RunLoad(o);
  ASSERT_TRUE(report.ok()) << report.status();
  ASSERT_TRUE(report->ok()) << cli::FormatReport(*report);
  uint64_t seq_a = 0;
  auto balances_a = ReadBalances(port_a, 555, 12, &seq_a);
  a.Signal(SIGUSR1);
  line = a.WaitForLine("romulus vm: snapshot ", 60);
  ASSERT_FALSE(line.empty());
  std::string digest_a = Field(line, "memory_xxh3");
  ASSERT_EQ(digest_a.size(), 16u) << line;
  uint64_t pages_a = UintField(line, "workload_pages"),
           ledger_seq_a = UintField(line, "ledger_seq");
  EXPECT_EQ(UintField(line, "journal_records"), ledger_seq_a);  // journal complete at the snapshot
  EXPECT_EQ(ledger_seq_a, seq_a);
  EXPECT_GT(pages_a, 0u);
  ASSERT_EQ(a.Wait(30), 0) << a.output();

  // Process B: restore; it starts exactly where A stopped.
  auto args_b = common;
  args_b.insert(args_b.end(), {"--disk", dir.File("b.img"), "--restore-from", snap});
  Child b(args_b);
  // It runs on the platform that wrote the snapshot.
  line = testing::WaitForRestore(b, platform_name(), 60);
  ASSERT_FALSE(line.empty());
  EXPECT_EQ(Field(line, "memory_xxh3"), digest_a);
  EXPECT_EQ(UintField(line, "workload_pages"), pages_a);
  EXPECT_EQ(UintField(line, "ledger_seq"), ledger_seq_a);
  line = b.WaitForLine("ledger listening on 127.0.0.1:", 30);
  ASSERT_FALSE(line.empty());
  uint16_t port_b = testing::ListeningPort(line);

  // Balances and sequence numbers continue.
  uint64_t seq_b = 0;
  EXPECT_EQ(ReadBalances(port_b, 556, 12, &seq_b), balances_a);
  EXPECT_EQ(seq_b, ledger_seq_a);
  auto c = cli::LedgerClient::Connect("127.0.0.1", port_b, 5000);
  ASSERT_TRUE(c.ok());
  pb::LedgerRequest dep;
  dep.set_client_id(557);
  dep.set_request_id(1);
  dep.set_op(pb::DEPOSIT);
  dep.set_account(3);
  dep.set_amount(10);
  auto r = c->Call(dep);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->status(), RML_OK);
  EXPECT_EQ(r->seq(), ledger_seq_a + 1);
  EXPECT_EQ(r->balance(), balances_a[3] + 10);
  // Retrying a request A answered before the snapshot gives A's answer, not a second effect.
  pb::LedgerRequest reread;
  reread.set_client_id(555);
  reread.set_request_id(12);
  reread.set_op(pb::READ);
  reread.set_account(11);
  auto rr = c->Call(reread);
  ASSERT_TRUE(rr.ok());
  EXPECT_EQ(rr->seq(), seq_a);

  // The workload continues from its counter, and the journal agrees with memory.
  b.Signal(SIGTERM);
  line = b.WaitForLine("romulus vm: stopped: ", 30);
  ASSERT_FALSE(line.empty());
  EXPECT_GT(UintField(line, "workload_pages"), pages_a);
  uint64_t final_seq = UintField(line, "ledger_seq");
  EXPECT_EQ(final_seq, ledger_seq_a + 1);
  EXPECT_EQ(b.Wait(30), 0) << b.output();
  auto journal = vmm::ReplayJournal(dir.File("b.img"));
  ASSERT_TRUE(journal.ok()) << journal.status();
  EXPECT_EQ(journal->last_seq, final_seq);
  EXPECT_EQ(journal->records, final_seq);
  ASSERT_GE(journal->balances.size(), 12u);
  for (auto [account, balance] : balances_a) {
    EXPECT_EQ(journal->balances[account], balance + (account == 3 ? 10 : 0))
        << "account " << account;
  }
}

ROMULUS_ON_EVERY_PLATFORM(VmSnapshotProcess);

}  // namespace
}  // namespace romulus::snapshot_process_test
