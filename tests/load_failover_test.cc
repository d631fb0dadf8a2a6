// `romulus load` given two addresses (no KVM needed): the ledger at the first dies mid-run, with
// a request applied but its answer never sent, and the same ledger state comes up at the second
// (what a failover does). Clients switch over, resend the same request ids, and every invariant
// holds: nothing acknowledged is lost and nothing is applied twice.
#include <gtest/gtest.h>

#include "cli/load.h"
#include "tests/test_util.h"
#include "tests/two_host_ledger.h"

namespace romulus::load_failover_test {
namespace {

using testing::TwoHostLedger;

TEST(LoadFailover, ClientsGivenBothAddressesSwitchOverAndLoseOrRepeatNothing) {
  TwoHostLedger ledger(/*die_after=*/600);
  cli::LoadOptions o;
  o.port = ledger.port(0);
  o.standby_host = "127.0.0.1";
  o.standby_port = ledger.port(1);
  o.clients = 4;
  o.duration_s = 1.0;
  o.accounts = 8;
  o.seed = 7;
  auto report = cli::RunLoad(o);
  ASSERT_TRUE(report.ok()) << report.status();
  EXPECT_TRUE(ledger.died()) << "the first host served fewer than 600 requests";
  EXPECT_TRUE(report->ok()) << cli::FormatReport(*report);
  EXPECT_EQ(report->unresolved, 0u);
  EXPECT_GE(report->switches, o.clients) << cli::FormatReport(*report);
  EXPECT_GT(ledger.answered(1), 0u);
  EXPECT_GT(report->retries_checked, 0u);
  EXPECT_EQ(report->final_total, report->expected_total);
  EXPECT_EQ(report->lost_acknowledged, 0u);
  // The failover's first response came from the second host, after the first one died.
  ASSERT_TRUE(report->first_standby_answer.has_value());
  EXPECT_GE(*report->first_standby_answer, ledger.died_at());
}

}  // namespace
}  // namespace romulus::load_failover_test
