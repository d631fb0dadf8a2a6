// Migration driven by hardware health, end to end: two `romulus` hosts and a witness on loopback
// (cli::LocalHosts), the primary's health monitor reading a sysfs tree this test writes. Errors
// past the policy's threshold move the VM under load with nothing lost; a flapping link below
// its threshold moves nothing; a mirror that is gone refuses, and the VM stays.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <signal.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <thread>

#include "cli/control.h"
#include "cli/load.h"
#include "cli/local_hosts.h"
#include "tests/test_util.h"

namespace romulus::health_vm_test {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;
using testing::TempDir;
using testing::WaitUntil;
using Host = cli::LocalHosts::Host;

const char kCe[] = "devices/system/edac/mc/mc0/ce_count";
const char kCarrier[] = "class/net/rep0/carrier";
const char kCarrierChanges[] = "class/net/rep0/carrier_changes";

class VmHealth : public testing::PlatformTest {
 protected:
  void SetUp() override {
    PlatformTest::SetUp();
    if (IsSkipped()) return;
    for (const char* file :
         {kCe, "devices/system/edac/mc/mc0/ue_count", kCarrierChanges,
          "class/net/rep0/statistics/rx_errors", "class/net/rep0/statistics/tx_errors"}) {
      Set(file, "0");
    }
    Set(kCarrier, "1");
  }

  // Whole files only: written aside, then renamed over (the monitor never reads half a write).
  void Set(const std::string& file, const std::string& text) {
    std::string path = Sys() + "/" + file;
    std::filesystem::create_directories(std::filesystem::path(path).parent_path());
    std::ofstream(path + ".new", std::ios::trunc) << text << "\n";
    std::filesystem::rename(path + ".new", path);
  }

  std::string Sys() const { return dir_.File("sys"); }

  pb::HealthConfig Config(const std::string& signal, uint64_t count, uint32_t window_s) const {
    pb::HealthConfig h;
    h.set_sysfs_root(Sys());
    h.set_interval_ms(50);
    h.add_interface("rep0");
    h.set_retry_ms(200);
    pb::HealthRule* r = h.add_rule();
    r->set_signal(signal);
    r->set_count(count);
    r->set_window_s(window_s);
    r->set_alone(true);
    return h;
  }

  void Start(pb::HealthConfig health) {
    cli::LocalHosts::Options o{.binary = ROMULUS_BINARY,
                               .dir = dir_.path(),
                               .memory_mib = 64,
                               .disk_mib = 8,
                               .working_set_pages = 1024,
                               .write_rate = 20000};
    o.platform = platform_name();
    o.wait = testing::ScaledMs(60);
    o.health = std::move(health);
    // A spurious "peer dead" at the mirror (heartbeats late by 50 ms on a loaded machine) would
    // start a promotion that races the hand-over; detection speed is not what this shows.
    o.heartbeat_timeout_ms = 1000;
    auto hosts = cli::LocalHosts::Start(std::move(o));
    ASSERT_TRUE(hosts.ok()) << hosts.status();
    hosts_ = std::move(*hosts);
  }

  absl::StatusOr<pb::StatusReply> Status(Host h) {
    return cli::QueryStatus(hosts_->control_socket(h));
  }
  // Checks host a's monitor has done (0 when it does not answer).
  uint64_t Checks() {
    auto s = Status(Host::kA);
    return s.ok() ? s->health().checks() : 0;
  }
  // Until the monitor has read the tree `n` more times: what was written is seen.
  bool MoreChecks(uint64_t n) {
    uint64_t from = Checks();
    return WaitUntil([&] { return Checks() >= from + n; }, 30);
  }

  TempDir dir_;
  std::unique_ptr<cli::LocalHosts> hosts_;
};

// Must show: a corrected-error count raised past the threshold under ledger load moves the VM to
// the mirror (a planned migration) with no acknowledged write lost; the new primary's log and
// status name the health reason, and the downtime is reported as transfer plus restart.
TEST_P(VmHealth, CorrectedErrorsPastTheThresholdMoveTheVmUnderLoadLosingNothing) {
  ASSERT_NO_FATAL_FAILURE(Start(Config("corrected_memory", 10, 60)));
  cli::Process& a = hosts_->process(Host::kA);
  cli::Process& b = hosts_->process(Host::kB);
  cli::LoadOptions o = hosts_->Load(Host::kA);
  o.clients = 8;
  o.duration_s = 3;
  absl::StatusOr<cli::LoadReport> report;
  std::thread load([&] { report = cli::RunLoad(o); });
  // The monitor has its baseline; errors below the threshold move nothing.
  bool baseline = MoreChecks(2);
  Set(kCe, "4");
  bool below = MoreChecks(2);
  auto still = Status(Host::kA);
  Set(kCe, "12");  // 12 corrected errors within the minute: past 10
  auto moving = a.WaitForLine("health: moving the VM to the mirror", testing::ScaledMs(30));
  auto split = a.WaitForLine("= transfer", testing::ScaledMs(30));
  auto resumed = b.WaitForLine("handed over: resumed epoch", testing::ScaledMs(30));
  load.join();
  ASSERT_TRUE(baseline && below) << a.output();
  ASSERT_TRUE(still.ok()) << still.status();
  EXPECT_EQ(still->role(), "primary");
  EXPECT_THAT(still->health().state(), HasSubstr("corrected_memory 4/10 within 60 s"));
  ASSERT_TRUE(moving.ok()) << moving.status() << a.output();
  EXPECT_THAT(*moving, HasSubstr("health: corrected_memory 12/10 within 60 s, acts alone"));
  ASSERT_TRUE(resumed.ok()) << resumed.status() << b.output();
  EXPECT_THAT(*resumed, HasSubstr("the VM moved because: health: corrected_memory 12/10"));
  ASSERT_TRUE(split.ok()) << split.status() << a.output();
  EXPECT_THAT(*split, HasSubstr("this host is now its mirror"));
  double downtime = -1, transfer = -1, restart = -1;
  size_t at = split->find("(downtime ");
  ASSERT_NE(at, std::string::npos) << *split;
  ASSERT_EQ(std::sscanf(split->c_str() + at, "(downtime %lf ms = transfer %lf ms + restart %lf ms",
                        &downtime, &transfer, &restart),
            3)
      << *split;
  EXPECT_GT(transfer, 0);
  EXPECT_GE(restart, 0);
  EXPECT_NEAR(downtime, transfer + restart, 0.2);  // each printed to 0.1 ms

  ASSERT_TRUE(report.ok()) << report.status();
  EXPECT_TRUE(report->ok()) << cli::FormatReport(*report);
  EXPECT_EQ(report->lost_acknowledged, 0u);
  EXPECT_EQ(report->unresolved, 0u);
  auto there = Status(Host::kB);
  ASSERT_TRUE(there.ok()) << there.status();
  EXPECT_EQ(there->role(), "primary");
  EXPECT_THAT(there->handed_over_because(), HasSubstr("health: corrected_memory 12/10"));
  EXPECT_THAT(there->state(), HasSubstr("handed over because: health: corrected_memory"));
  EXPECT_THAT(cli::FormatStatus(*there), HasSubstr("handed over:      because health:"));
  auto here = Status(Host::kA);
  ASSERT_TRUE(here.ok()) << here.status();
  EXPECT_EQ(here->role(), "mirror");
  EXPECT_EQ(here->health().attempts(), 1u);
  EXPECT_EQ(here->health().refusals(), 0u);
  EXPECT_THAT(here->health().last_decision(), HasSubstr("corrected_memory 12/10"));
  std::printf(
      "health migration under load (%s): downtime %.1f ms = transfer %.1f ms + restart %.1f ms; "
      "%lu requests, %lu switched to the new primary, lost acknowledged %lu\n",
      platform_name().c_str(), downtime, transfer, restart,
      static_cast<unsigned long>(report->requests), static_cast<unsigned long>(report->switches),
      static_cast<unsigned long>(report->lost_acknowledged));
  EXPECT_TRUE(hosts_->Stop().ok());
}

// Must show: a link that flaps (carrier down and up, carrier_changes rising) but stays below the
// policy's count moves nothing, over many checks of the monitor (counted, not timed).
TEST_P(VmHealth, AFlappingLinkBelowTheThresholdMovesNothing) {
  ASSERT_NO_FATAL_FAILURE(Start(Config("carrier_changes", 5, 600)));
  ASSERT_TRUE(MoreChecks(2));
  int changes = 0;
  for (int flap = 0; flap < 2; flap++) {
    for (const char* carrier : {"0", "1"}) {
      Set(kCarrier, carrier);
      Set(kCarrierChanges, std::to_string(++changes));
      ASSERT_TRUE(MoreChecks(3));
    }
  }
  ASSERT_TRUE(MoreChecks(10));
  auto s = Status(Host::kA);
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_EQ(s->role(), "primary");
  EXPECT_EQ(s->health().attempts(), 0u);
  EXPECT_THAT(s->health().state(), HasSubstr("healthy: carrier_changes 4/5 within 600 s"));
  EXPECT_THAT(hosts_->process(Host::kA).output(), Not(HasSubstr("moving the VM")));
  auto m = Status(Host::kB);
  ASSERT_TRUE(m.ok()) << m.status();
  EXPECT_EQ(m->role(), "mirror");
  std::printf("flapping link: %d carrier changes over %lu checks, no move\n", changes,
              static_cast<unsigned long>(s->health().checks()));
  EXPECT_TRUE(hosts_->Stop().ok());
}

// The mirror is gone (killed): the policy says move, the existing migrate path refuses (not
// protected); the refusal is logged and shown, the VM stays here, and the retries back off.
TEST_P(VmHealth, WithoutAMirrorInSyncTheMoveIsRefusedAndTheVmStays) {
  ASSERT_NO_FATAL_FAILURE(Start(Config("corrected_memory", 1, 0)));
  ASSERT_TRUE(MoreChecks(2));
  hosts_->process(Host::kB).Signal(SIGKILL);
  ASSERT_TRUE(hosts_->process(Host::kB).Wait(testing::ScaledMs(30)).has_value());
  Set(kCe, "3");
  cli::Process& a = hosts_->process(Host::kA);
  auto refused = a.WaitForLine("health: the move was refused: ", testing::ScaledMs(30));
  ASSERT_TRUE(refused.ok()) << refused.status() << a.output();
  EXPECT_THAT(*refused, HasSubstr("the VM stays here, next attempt in 0.2 s"));
  ASSERT_TRUE(MoreChecks(40));  // two seconds of checks at least
  auto s = Status(Host::kA);
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_EQ(s->role(), "primary");
  EXPECT_GE(s->health().refusals(), 1u);
  EXPECT_EQ(s->health().refusals(), s->health().attempts());
  // Backing off from 200 ms, doubling: far fewer attempts than checks.
  EXPECT_LT(s->health().attempts() * 4, s->health().checks());
  EXPECT_THAT(s->health().state(), HasSubstr("the move was refused"));
  std::printf("mirror gone: %lu moves asked (all refused) over %lu checks; last: %s\n",
              static_cast<unsigned long>(s->health().attempts()),
              static_cast<unsigned long>(s->health().checks()), s->health().state().c_str());
}

ROMULUS_ON_EVERY_PLATFORM(VmHealth);

}  // namespace
}  // namespace romulus::health_vm_test
