// Authority with real `romulus` processes (cli::LocalHosts: a witness, host a as the primary,
// host b as its mirror): the findings of issue 26 that a frozen or restarted host caused, each
// as it happened, under ledger load.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <signal.h>

#include <cstdio>
#include <thread>

#include "cli/control.h"
#include "cli/ledger_client.h"
#include "cli/load.h"
#include "cli/local_hosts.h"
#include "cli/process.h"
#include "tests/test_util.h"

namespace romulus::authority_hosts_test {
namespace {

using ::testing::HasSubstr;
using testing::TempDir;
using Host = cli::LocalHosts::Host;

class VmAuthority : public testing::PlatformTest {
 protected:
  void Start() {
    cli::LocalHosts::Options o{.binary = ROMULUS_BINARY,
                               .dir = dir_.path(),
                               .memory_mib = 64,
                               .disk_mib = 8,
                               .working_set_pages = 1024,
                               .write_rate = testing::WriteRate(20000, 2000)};
    o.platform = platform_name();
    o.wait = testing::ScaledMs(60);
    auto hosts = cli::LocalHosts::Start(std::move(o));
    ASSERT_TRUE(hosts.ok()) << hosts.status();
    hosts_ = std::move(*hosts);
  }

  absl::StatusOr<pb::StatusReply> Status(Host h) {
    return cli::QueryStatus(hosts_->control_socket(h));
  }

  TempDir dir_;
  std::unique_ptr<cli::LocalHosts> hosts_;
};

// Finding 1: the primary freezes (SIGSTOP) past the heartbeat timeout and its lease; the mirror
// promotes in a new term; the frozen host comes back. It used to win the lease back at the new
// primary's first renewal gap and stall or diverge the VM. Now the witness tells it a newer term
// superseded it: it stops its VM for good, says so, and the clients lose nothing.
TEST_P(VmAuthority, AFrozenPrimaryThatComesBackIsSupersededAndNeverSpeaksAgain) {
  ASSERT_NO_FATAL_FAILURE(Start());
  cli::Process& a = hosts_->process(Host::kA);
  cli::Process& b = hosts_->process(Host::kB);
  auto before = Status(Host::kA);
  ASSERT_TRUE(before.ok()) << before.status();
  EXPECT_GT(before->term(), 0u);
  cli::LoadOptions o = hosts_->Load(Host::kA);
  o.clients = 4;
  o.duration_s = 4;
  absl::StatusOr<cli::LoadReport> report;
  std::thread load([&] { report = cli::RunLoad(o); });
  a.Signal(SIGSTOP);
  auto promoted = b.WaitForLine("promoted (", testing::ScaledMs(30));
  a.Signal(SIGCONT);
  auto superseded =
      a.WaitForLine("superseded, the VM stopped here for good", testing::ScaledMs(30));
  load.join();
  ASSERT_TRUE(promoted.ok()) << promoted.status() << b.output();
  ASSERT_TRUE(superseded.ok()) << superseded.status() << a.output();
  auto old_primary = Status(Host::kA);
  auto new_primary = Status(Host::kB);
  ASSERT_TRUE(old_primary.ok() && new_primary.ok());
  EXPECT_THAT(old_primary->superseded(), HasSubstr("superseded"));
  EXPECT_THAT(old_primary->state(), HasSubstr("restart this host as the mirror"));
  EXPECT_EQ(new_primary->role(), "primary");
  EXPECT_GT(new_primary->term(), before->term());
  ASSERT_TRUE(report.ok()) << report.status();
  EXPECT_TRUE(report->ok()) << cli::FormatReport(*report);
  EXPECT_EQ(report->lost_acknowledged, 0u);
  EXPECT_EQ(report->unresolved, 0u);
  // Nothing lets the superseded host back in: it never holds the lease again.
  auto later = Status(Host::kA);
  ASSERT_TRUE(later.ok());
  EXPECT_FALSE(later->lease_held());
}

// Finding 4: after a failover the old primary is started again as `romulus primary` over its
// old disk. It used to boot a fresh VM there and fence the real one. Now it refuses to boot: the
// VM ran (in a term its fresh VM holds nothing of).
TEST_P(VmAuthority, ARestartedOldPrimaryRefusesToBootOverItsSupersededDisk) {
  ASSERT_NO_FATAL_FAILURE(Start());
  cli::Process& a = hosts_->process(Host::kA);
  cli::Process& b = hosts_->process(Host::kB);
  a.Signal(SIGKILL);
  ASSERT_TRUE(b.WaitForLine("promoted (", testing::ScaledMs(30)).ok()) << b.output();
  testing::Child again({"primary", "--config", dir_.File("a.conf")});
  EXPECT_EQ(again.Wait(testing::ScaledMs(30).count() / 1000.0), 1) << again.output();
  EXPECT_THAT(again.output(), HasSubstr("not booting the VM afresh over"));
  EXPECT_THAT(again.output(), HasSubstr("it ran in term 1"));
  EXPECT_THAT(again.output(), HasSubstr("Start this host as the mirror"));
  auto s = Status(Host::kB);
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_EQ(s->role(), "primary");
  EXPECT_TRUE(s->lease_held());
  // Rejoining as the mirror works, and the VM is protected again.
  ASSERT_TRUE(hosts_->Rejoin(Host::kA).ok());
}

// Found by the nemesis (kvm, seed 20261207, round 46): the primary killed, its mirror promoted
// (running without a mirror), then that host killed too and started again as the primary over
// its own files, in its own term. It booted a VM afresh, with an empty ledger, and the witness
// let it (the term was its own): the clients saw "sequence went back from 78077 to 0". Now no
// host boots a VM afresh over files that ran in a term: what the VM acknowledged went with both
// processes, and no host may answer as if it had not.
TEST_P(VmAuthority, APromotedPrimaryKilledWhileAloneCannotBootAnEmptyVmInItsOwnTerm) {
  ASSERT_NO_FATAL_FAILURE(Start());
  cli::Process& b = hosts_->process(Host::kB);
  hosts_->process(Host::kA).Signal(SIGKILL);
  ASSERT_TRUE(b.WaitForLine("promoted (", testing::ScaledMs(30)).ok()) << b.output();
  b.Signal(SIGKILL);
  ASSERT_TRUE(b.Wait(testing::ScaledMs(30)).has_value());
  ASSERT_TRUE(hosts_->RestartAsPrimary(Host::kB).ok());
  cli::Process& again = hosts_->process(Host::kB);
  auto code = again.Wait(testing::ScaledMs(30));
  ASSERT_TRUE(code.has_value()) << again.output();
  EXPECT_EQ(*code, 1) << again.output();
  EXPECT_THAT(again.output(), HasSubstr("not booting the VM afresh over"));
  EXPECT_THAT(again.output(), HasSubstr("it ran in term 2"));
  // Nothing answers on its ledger address.
  EXPECT_FALSE(cli::LedgerClient::Connect("127.0.0.1", hosts_->ledger_port(Host::kB), 500).ok());
}

// Found by the nemesis (process, seed 1209, round 60): the mirror stopped committing (its disk
// was full; here it is frozen), so its primary, running without a mirror since a failover,
// released without it; then that primary was killed. Its lease lapsed, and the mirror promoted
// its replica, of the same term, which lacked 1212 writes the clients had seen. Now releasing
// without a mirror is a new term at the witness: the replica of the older one is superseded.
TEST_P(VmAuthority, AMirrorLeftBehindWhileItsPrimaryRanAloneIsNeverPromoted) {
  ASSERT_NO_FATAL_FAILURE(Start());
  cli::Process& b = hosts_->process(Host::kB);
  hosts_->process(Host::kA).Signal(SIGKILL);
  ASSERT_TRUE(b.WaitForLine("promoted (", testing::ScaledMs(30)).ok()) << b.output();
  ASSERT_TRUE(hosts_->Rejoin(Host::kA).ok());
  cli::Process& a = hosts_->process(Host::kA);
  ASSERT_TRUE(a.WaitForLine("synchronised:", testing::ScaledMs(60)).ok()) << a.output();
  ASSERT_TRUE(b.WaitForLine("protected |", testing::ScaledMs(30)).ok()) << b.output();
  auto protected_term = Status(Host::kB);
  ASSERT_TRUE(protected_term.ok()) << protected_term.status();
  cli::LoadOptions o = hosts_->Load(Host::kB);
  o.clients = 2;
  o.duration_s = 3;
  absl::StatusOr<cli::LoadReport> report;
  std::thread load([&] { report = cli::RunLoad(o); });
  a.Signal(SIGSTOP);
  // b runs without its mirror, and answers.
  auto alone = b.WaitForLine("running UNPROTECTED", testing::ScaledMs(30));
  auto alone_term = Status(Host::kB);
  b.Signal(SIGKILL);
  a.Signal(SIGCONT);
  load.join();
  ASSERT_TRUE(alone.ok()) << alone.status() << b.output();
  auto refused = a.WaitForLine("not promoting", testing::ScaledMs(30));
  ASSERT_TRUE(refused.ok()) << refused.status() << a.output();
  EXPECT_THAT(*refused, HasSubstr("superseded")) << a.output();
  ASSERT_TRUE(alone_term.ok()) << alone_term.status();
  EXPECT_GT(alone_term->term(), protected_term->term());
  EXPECT_THAT(a.output(), ::testing::Not(HasSubstr("promoted ("))) << a.output();
}

// Finding 6: a planned migration used to leave a window with no replica: the new primary ran
// unprotected at once, and the old host, seeded with its memory but not promotable until the
// new primary's synchronisation committed, could not take over if the new primary died in that
// window. Now the old host holds the hand-over's state committed (in its own term), and the new
// primary releases nothing until that host commits a checkpoint of its: the new primary killed
// as soon as it resumed leaves the VM with the old host, losing nothing. Killed before its answer
// reached the old host, the migration used to leave the VM paused there for an operator ("check
// which host runs it"); now the witness settles it: the new primary never confirmed its term, so
// the old host takes the VM back in a newer one once that lease lapsed.
TEST_P(VmAuthority, ANewPrimaryKilledRightAfterAHandOverLeavesTheVmWithTheOldHost) {
  ASSERT_NO_FATAL_FAILURE(Start());
  cli::Process& a = hosts_->process(Host::kA);
  cli::Process& b = hosts_->process(Host::kB);
  cli::LoadOptions o = hosts_->Load(Host::kA);
  o.clients = 4;
  o.duration_s = 4;
  absl::StatusOr<cli::LoadReport> report;
  std::thread load([&] { report = cli::RunLoad(o); });
  testing::Child migrate({"migrate", "--socket", hosts_->control_socket(Host::kA)});
  auto resumed = b.WaitForLine("handed over: resumed epoch", testing::ScaledMs(30));
  b.Signal(SIGKILL);
  int rc = migrate.Wait(testing::ScaledMs(60).count() / 1000.0);
  // Either the answer came (the command succeeded and host a, now the mirror, promotes) or it
  // did not (host a takes the VM back): either way host a runs it, and b rejoins as its mirror.
  bool runs = testing::WaitUntil(
      [&] {
        auto s = Status(Host::kA);
        return s.ok() && s->role() == "primary" && s->state().find("paused") == std::string::npos;
      },
      testing::ScaledMs(30).count() / 1000.0);
  absl::Status rejoined = runs ? hosts_->Rejoin(Host::kB) : absl::UnknownError("a does not run");
  load.join();
  ASSERT_TRUE(resumed.ok()) << resumed.status() << b.output();
  ASSERT_TRUE(runs) << a.output() << migrate.output();
  EXPECT_TRUE(rc == 0 || migrate.output().find("the VM runs here again") != std::string::npos)
      << migrate.output();
  EXPECT_TRUE(rejoined.ok()) << rejoined;
  std::printf("new primary killed right after it resumed (%s): %s\n", platform_name().c_str(),
              rc == 0 ? "the migration had been answered; the old host promoted"
                      : "the migration was not answered; the old host took the VM back");
  ASSERT_TRUE(report.ok()) << report.status();
  EXPECT_TRUE(report->ok()) << cli::FormatReport(*report);
  EXPECT_EQ(report->lost_acknowledged, 0u);
  EXPECT_EQ(report->unresolved, 0u);
}

ROMULUS_ON_EVERY_PLATFORM(VmAuthority);

}  // namespace
}  // namespace romulus::authority_hosts_test
