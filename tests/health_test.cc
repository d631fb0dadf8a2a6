// The hardware health monitor: its policy on counts, rates and states (time given, not waited
// for), its sources against a sysfs tree the test writes (with the inputs an attacker or a
// broken driver could leave there), and its loop: a refused move keeps the VM and backs off.
#include "switchover/health.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <sys/stat.h>

#include <atomic>
#include <filesystem>
#include <fstream>

#include "tests/test_util.h"

namespace romulus::health_test {
namespace {

using std::chrono::milliseconds;
using std::chrono::seconds;
using switchover::HealthMonitor;
using switchover::HealthPolicy;
using switchover::HealthReading;
using switchover::HealthRule;
using switchover::HealthSignal;
using ::testing::HasSubstr;
using ::testing::Not;
using testing::TempDir;
using Clock = std::chrono::steady_clock;

HealthReading Counters(std::vector<std::pair<std::string, uint64_t>> files,
                       HealthSignal signal = HealthSignal::kCorrectedMemory) {
  HealthReading r;
  for (auto& [name, value] : files) r.counters.push_back({signal, name, value});
  return r;
}

HealthReading Ce(uint64_t value) { return Counters({{"edac mc0 ce_count", value}}); }

TEST(HealthPolicy, CorrectedErrorsMoveOnlyOnceTheirCountIsReached) {
  HealthPolicy policy({{.signal = HealthSignal::kCorrectedMemory, .count = 10, .alone = true}});
  auto t = Clock::now();
  EXPECT_FALSE(policy.Observe(Ce(5), t).move);  // the baseline: errors before the monitor began
  auto v = policy.Observe(Ce(14), t + seconds(1));
  EXPECT_FALSE(v.move) << v.state;
  EXPECT_THAT(v.state, HasSubstr("healthy: corrected_memory 9/10 since the monitor began"));
  v = policy.Observe(Ce(15), t + seconds(2));
  EXPECT_TRUE(v.move) << v.state;
  EXPECT_THAT(v.reason, HasSubstr("health: corrected_memory 10/10 since the monitor began"));
}

TEST(HealthPolicy, ARateCountsOnlyTheEventsWithinItsWindow) {
  HealthPolicy policy({{.signal = HealthSignal::kCorrectedMemory,
                        .count = 3,
                        .window = seconds(60),
                        .alone = true}});
  auto t = Clock::now();
  EXPECT_FALSE(policy.Observe(Ce(0), t).move);
  EXPECT_FALSE(policy.Observe(Ce(2), t + seconds(10)).move);
  // 70 s later those two are out of the window: one event in it.
  auto v = policy.Observe(Ce(3), t + seconds(80));
  EXPECT_FALSE(v.move);
  EXPECT_THAT(v.state, HasSubstr("corrected_memory 1/3 within 60 s"));
  v = policy.Observe(Ce(5), t + seconds(85));
  EXPECT_TRUE(v.move) << v.state;
  EXPECT_THAT(v.reason, HasSubstr("corrected_memory 3/3 within 60 s, acts alone"));
}

TEST(HealthPolicy, CountersFromSeveralFilesAddUpAndAResetCountsFromThere) {
  HealthPolicy policy({{.signal = HealthSignal::kCorrectedMemory, .count = 4, .alone = true}});
  auto t = Clock::now();
  policy.Observe(Counters({{"mc0", 100}, {"mc1", 7}}), t);
  // mc0 was reset (a driver reload): not an event, and it counts from 0 now.
  EXPECT_FALSE(policy.Observe(Counters({{"mc0", 0}, {"mc1", 8}}), t + seconds(1)).move);
  EXPECT_FALSE(policy.Observe(Counters({{"mc0", 1}, {"mc1", 9}}), t + seconds(2)).move);
  EXPECT_TRUE(policy.Observe(Counters({{"mc0", 2}, {"mc1", 9}}), t + seconds(3)).move);
}

// The flapping link of the issue: carrier_changes rising, but never 5 within a minute.
TEST(HealthPolicy, AFlappingLinkBelowItsThresholdMovesNothing) {
  HealthPolicy policy({{.signal = HealthSignal::kCarrierChanges,
                        .count = 5,
                        .window = seconds(60),
                        .alone = true}});
  auto t = Clock::now();
  for (uint64_t i = 0; i < 200; i++) {
    HealthReading r = Counters({{"net rep0 carrier_changes", i}}, HealthSignal::kCarrierChanges);
    auto v = policy.Observe(r, t + seconds(15 * i));  // one change every 15 s: 4 per minute
    ASSERT_FALSE(v.move) << i << ": " << v.state;
  }
  // Faster, it moves.
  auto base = t + seconds(15 * 200);
  bool moved = false;
  for (uint64_t i = 0; i < 6 && !moved; i++) {
    HealthReading r =
        Counters({{"net rep0 carrier_changes", 200 + i}}, HealthSignal::kCarrierChanges);
    moved = policy.Observe(r, base + seconds(i)).move;
  }
  EXPECT_TRUE(moved);
}

TEST(HealthPolicy, AMissingFileIsReportedNotActedOn) {
  HealthPolicy policy({{.signal = HealthSignal::kCorrectedMemory, .count = 1, .alone = true}});
  auto t = Clock::now();
  policy.Observe(Ce(5), t);
  HealthReading missing;
  missing.unreadable.push_back("edac mc0 ce_count unreadable: No such file or directory");
  for (int i = 1; i <= 20; i++) {
    auto v = policy.Observe(missing, t + seconds(i));
    ASSERT_FALSE(v.move) << v.state;
  }
  // What it counted while unreadable shows once it is read again.
  EXPECT_TRUE(policy.Observe(Ce(6), t + seconds(21)).move);

  // Unless a rule says so: unreadable three checks in a row.
  HealthPolicy strict({{.signal = HealthSignal::kUnreadable, .count = 3, .alone = true}});
  EXPECT_FALSE(strict.Observe(missing, t).move);
  EXPECT_FALSE(strict.Observe(missing, t + seconds(1)).move);
  EXPECT_FALSE(strict.Observe(HealthReading{}, t + seconds(2)).move);  // readable: afresh
  EXPECT_FALSE(strict.Observe(missing, t + seconds(3)).move);
  EXPECT_FALSE(strict.Observe(missing, t + seconds(4)).move);
  auto v = strict.Observe(missing, t + seconds(5));
  EXPECT_TRUE(v.move);
  EXPECT_THAT(v.reason, HasSubstr("unreadable 3/3 checks (edac mc0 ce_count unreadable: No such"));
}

TEST(HealthPolicy, RulesThatDoNotActAloneMoveOnlyTogether) {
  HealthPolicy policy({{.signal = HealthSignal::kLinkErrors, .count = 2, .alone = false},
                       {.signal = HealthSignal::kLinkDown, .count = 1, .alone = false}});
  auto t = Clock::now();
  policy.Observe(Counters({{"net rep0 rx_errors", 0}}, HealthSignal::kLinkErrors), t);
  auto v = policy.Observe(Counters({{"net rep0 rx_errors", 5}}, HealthSignal::kLinkErrors),
                          t + seconds(1));
  EXPECT_FALSE(v.move);
  EXPECT_THAT(v.state, HasSubstr("degraded"));
  HealthReading both = Counters({{"net rep0 rx_errors", 5}}, HealthSignal::kLinkErrors);
  both.faults.push_back({HealthSignal::kLinkDown, "net rep0 has no carrier"});
  v = policy.Observe(both, t + seconds(2));
  EXPECT_TRUE(v.move) << v.state;
  EXPECT_THAT(v.reason, HasSubstr("link_down 1/1 checks (net rep0 has no carrier)"));
}

// ---- Sources, against a tree the test writes ----

void Put(const std::string& path, const std::string& text) {
  std::filesystem::create_directories(std::filesystem::path(path).parent_path());
  std::ofstream(path, std::ios::trunc) << text;
}

std::string Joined(const std::vector<std::string>& lines) {
  std::string out;
  for (const std::string& l : lines) out += l + "\n";
  return out;
}

TEST(HealthSources, EdacCountersAndEveryWayAFileCanBeBad) {
  TempDir dir;
  HealthReading none;
  switchover::EdacSource(dir.path())->Read(&none);
  EXPECT_THAT(Joined(none.notes), HasSubstr("edac: no memory controllers under"));
  EXPECT_TRUE(none.unreadable.empty());

  std::string mc = dir.path() + "/devices/system/edac/mc/";
  Put(mc + "mc0/ce_count", "12\n");
  Put(mc + "mc0/ue_count", "0\n");
  Put(mc + "mc1/ce_count", "banana\n");                         // garbage
  Put(mc + "mc1/ue_count", std::string(5000, '1'));             // too large to be a counter
  Put(mc + "mc2/ue_count", "18446744073709551616\n");           // 2^64: does not fit
  ASSERT_EQ(::mkfifo((mc + "mc2/ce_count").c_str(), 0600), 0);  // would block a blind read
  Put(mc + "mcX/ce_count", "99\n");                             // not a controller
  HealthReading r;
  switchover::EdacSource(dir.path())->Read(&r);
  ASSERT_EQ(r.counters.size(), 2u) << Joined(r.unreadable);
  EXPECT_EQ(r.counters[0].name, "edac mc0 ce_count");
  EXPECT_EQ(r.counters[0].value, 12u);
  EXPECT_EQ(r.counters[0].signal, HealthSignal::kCorrectedMemory);
  EXPECT_EQ(r.counters[1].signal, HealthSignal::kUncorrectedMemory);
  std::string bad = Joined(r.unreadable);
  EXPECT_THAT(bad, HasSubstr("edac mc1 ce_count unreadable: 'banana' is not a count"));
  EXPECT_THAT(bad, HasSubstr("edac mc1 ue_count unreadable: larger than 4096 bytes"));
  EXPECT_THAT(bad, HasSubstr("edac mc2 ce_count unreadable: not a regular file"));
  EXPECT_THAT(bad, HasSubstr("edac mc2 ue_count unreadable: '18446744073709551616' is not"));
  EXPECT_EQ(r.unreadable.size(), 4u) << bad;
  std::filesystem::remove(mc + "mc0/ce_count");
  HealthReading gone;
  switchover::EdacSource(dir.path())->Read(&gone);
  EXPECT_THAT(Joined(gone.unreadable),
              HasSubstr("edac mc0 ce_count unreadable: No such file or directory"));
}

TEST(HealthSources, NetReadsCarrierAndCounters) {
  TempDir dir;
  std::string net = dir.path() + "/class/net/rep0/";
  Put(net + "carrier", "0\n");
  Put(net + "carrier_changes", "7\n");
  Put(net + "statistics/rx_errors", "3\n");
  Put(net + "statistics/tx_errors", "4\n");
  HealthReading r;
  switchover::NetSource(dir.path(), "rep0")->Read(&r);
  EXPECT_TRUE(r.unreadable.empty()) << Joined(r.unreadable);
  ASSERT_EQ(r.faults.size(), 1u);
  EXPECT_EQ(r.faults[0].signal, HealthSignal::kLinkDown);
  EXPECT_EQ(r.faults[0].what, "net rep0 has no carrier");
  ASSERT_EQ(r.counters.size(), 3u);
  EXPECT_EQ(r.counters[0].signal, HealthSignal::kCarrierChanges);
  EXPECT_EQ(r.counters[0].value, 7u);
  EXPECT_EQ(r.counters[2].name, "net rep0 tx_errors");

  Put(net + "carrier", "maybe\n");
  HealthReading odd;
  switchover::NetSource(dir.path(), "rep0")->Read(&odd);
  EXPECT_THAT(Joined(odd.unreadable), HasSubstr("net rep0 carrier unreadable: 'maybe' is not 0"));
  HealthReading missing;
  switchover::NetSource(dir.path(), "eth9")->Read(&missing);
  EXPECT_EQ(missing.unreadable.size(), 4u);
  EXPECT_THAT(Joined(missing.unreadable), HasSubstr("net eth9 carrier unreadable: No such file"));
}

// smartctl stands in as a script: its exit status and JSON decide, and a missing smartctl is a
// note, not a fault.
TEST(HealthSources, SmartctlVerdictsAndItsAbsence) {
  TempDir dir;
  HealthReading absent;
  switchover::SmartSource("/dev/sda", dir.File("no-smartctl"), milliseconds(5000))->Read(&absent);
  EXPECT_THAT(Joined(absent.notes), HasSubstr("is not installed (smartmontools)"));
  EXPECT_TRUE(absent.faults.empty());
  EXPECT_TRUE(absent.unreadable.empty());

  auto script = [&](const std::string& body) {
    std::string path = dir.File("smartctl");
    Put(path, "#!/bin/sh\n" + body + "\n");
    ::chmod(path.c_str(), 0700);
    HealthReading r;
    switchover::SmartSource("/dev/sda", path, testing::ScaledMs(10))->Read(&r);
    return r;
  };
  HealthReading good = script(R"(echo '{"smart_status": {"passed": true}}')");
  EXPECT_TRUE(good.faults.empty());
  EXPECT_TRUE(good.unreadable.empty()) << Joined(good.unreadable);
  HealthReading failed = script(R"(echo '{"smart_status": {"passed" : false}}')");
  ASSERT_EQ(failed.faults.size(), 1u);
  EXPECT_EQ(failed.faults[0].signal, HealthSignal::kDiskFailing);
  EXPECT_EQ(script("exit 8").faults.size(), 1u);  // smartctl's "DISK FAILING" bit
  EXPECT_THAT(Joined(script("exit 2").unreadable), HasSubstr("smartctl exit 2"));
  EXPECT_THAT(Joined(script("echo garbage; head -c 200000 /dev/zero").unreadable),
              HasSubstr("no smart_status"));
  // A smartctl that hangs is killed at the timeout.
  HealthReading hung;
  std::string path = dir.File("smartctl");
  Put(path, "#!/bin/sh\nexec sleep 60\n");
  switchover::SmartSource("/dev/sda", path, milliseconds(200))->Read(&hung);
  EXPECT_THAT(Joined(hung.unreadable), HasSubstr("did not finish in 200 ms"));
}

TEST(HealthSources, TheOperatorsCommand) {
  HealthReading ok, bad;
  switchover::CommandSource("true", testing::ScaledMs(10))->Read(&ok);
  EXPECT_TRUE(ok.faults.empty());
  switchover::CommandSource("exit 3", testing::ScaledMs(10))->Read(&bad);
  ASSERT_EQ(bad.faults.size(), 1u);
  EXPECT_EQ(bad.faults[0].signal, HealthSignal::kCommandFailing);
  EXPECT_THAT(bad.faults[0].what, HasSubstr("exit 3"));
}

// ---- The monitor ----

// A source the test sets.
class Fake : public switchover::HealthSource {
 public:
  explicit Fake(HealthReading* r) : r_(r) {}
  void Read(HealthReading* out) override { *out = *r_; }

 private:
  HealthReading* r_;
};

// The mirror refuses (not in sync): the VM stays, the refusal is logged and shown, and the next
// attempts come after 1, 2, 4, ... s (the clock is the test's), not at every check.
TEST(HealthMonitor, ARefusedMoveKeepsTheVmAndBacksOff) {
  HealthReading reading = Counters({{"edac mc0 ue_count", 0}}, HealthSignal::kUncorrectedMemory);
  std::vector<std::string> log, reasons;
  HealthMonitor::Options o;
  o.sources.push_back(std::make_unique<Fake>(&reading));
  o.rules = {{.signal = HealthSignal::kUncorrectedMemory, .count = 1, .alone = true}};
  o.retry = seconds(1);
  bool refuse = true;
  o.migrate = [&](const std::string& reason) {
    reasons.push_back(reason);
    return refuse ? absl::FailedPreconditionError("not protected, so nothing to migrate to")
                  : absl::OkStatus();
  };
  o.log = [&](absl::string_view line) { log.emplace_back(line); };
  auto m = HealthMonitor::Manual(std::move(o));
  auto t = Clock::now();
  m->CheckNow(t);
  reading.counters[0].value = 1;
  // 100 s of checks every 100 ms: attempts at 0, 1, 3, 7, 15, 31 and 63 s.
  for (int i = 1; i <= 1000; i++) m->CheckNow(t + milliseconds(100 * i));
  auto s = m->status();
  EXPECT_EQ(s.checks, 1001u);
  EXPECT_EQ(s.attempts, 7u);
  EXPECT_EQ(s.refusals, 7u);
  ASSERT_FALSE(reasons.empty());
  EXPECT_THAT(reasons[0], HasSubstr("health: uncorrected_memory 1/1"));
  EXPECT_THAT(s.state, HasSubstr("the move was refused: not protected"));
  EXPECT_THAT(s.state, HasSubstr("the VM stays here, next attempt in"));
  EXPECT_EQ(s.last_decision, reasons[0]);
  int refusals_logged = 0;
  for (const std::string& l : log) refusals_logged += l.find("refused") != std::string::npos;
  EXPECT_EQ(refusals_logged, 7);
  // The backoff is capped at 64 retries; once the mirror takes it, the VM moves once, and the
  // counts start afresh (no second move for the same error).
  refuse = false;
  for (int i = 1001; i <= 2000; i++) m->CheckNow(t + milliseconds(100 * i));
  s = m->status();
  EXPECT_EQ(s.attempts, 8u);
  EXPECT_EQ(s.refusals, 7u);
  EXPECT_THAT(s.state, Not(HasSubstr("refused")));
}

TEST(HealthMonitor, AnUnreadableSourceIsLoggedOnceAndNeverMovesByItself) {
  HealthReading reading;
  reading.unreadable.push_back("edac mc0 ce_count unreadable: Permission denied");
  std::vector<std::string> log;
  int moves = 0;
  HealthMonitor::Options o;
  o.sources.push_back(std::make_unique<Fake>(&reading));
  o.rules = {{.signal = HealthSignal::kCorrectedMemory, .count = 1, .alone = true}};
  o.migrate = [&](const std::string&) {
    moves++;
    return absl::OkStatus();
  };
  o.log = [&](absl::string_view line) { log.emplace_back(line); };
  auto m = HealthMonitor::Manual(std::move(o));
  auto t = Clock::now();
  for (int i = 0; i < 50; i++) m->CheckNow(t + seconds(i));
  EXPECT_EQ(moves, 0);
  int said = 0;
  for (const std::string& l : log) {
    said += l == "health: edac mc0 ce_count unreadable: Permission denied";
  }
  EXPECT_EQ(said, 1) << Joined(log);
  auto s = m->status();
  ASSERT_EQ(s.problems.size(), 1u);
  EXPECT_EQ(s.problems[0], "edac mc0 ce_count unreadable: Permission denied");
  reading.unreadable.clear();
  m->CheckNow(t + seconds(51));
  EXPECT_TRUE(m->status().problems.empty());
  EXPECT_EQ(log.back(), "health: every health source is readable again");
}

// On its own thread: it checks at its interval (counted, not timed), and acts only while the
// host is the primary.
TEST(HealthMonitor, ItsThreadChecksAndActsOnlyWhileActive) {
  HealthReading reading = Counters({{"edac mc0 ue_count", 3}}, HealthSignal::kUncorrectedMemory);
  std::atomic<int> moves{0};
  std::atomic<bool> active{false};
  HealthMonitor::Options o;
  o.sources.push_back(std::make_unique<Fake>(&reading));
  o.rules = {{.signal = HealthSignal::kUncorrectedMemory, .count = 1, .alone = true}};
  o.interval = milliseconds(10);
  o.active = [&] { return active.load(); };
  o.migrate = [&](const std::string&) {
    moves++;
    return absl::OkStatus();
  };
  // The reading is not changed while the thread runs: the fake source is read there.
  auto m = HealthMonitor::Start(std::move(o));
  ASSERT_TRUE(m.ok());
  ASSERT_TRUE(testing::WaitUntil([&] { return (*m)->status().checks >= 3; }, 10));
  EXPECT_EQ(moves, 0);  // no new event
  m->reset();
  // A fresh monitor that sees an event while not the primary does not act.
  HealthReading r2 = Counters({{"edac mc0 ue_count", 3}}, HealthSignal::kUncorrectedMemory);
  HealthMonitor::Options o2;
  o2.sources.push_back(std::make_unique<Fake>(&r2));
  o2.rules = {{.signal = HealthSignal::kUncorrectedMemory, .count = 1, .alone = true}};
  o2.active = [&] { return active.load(); };
  o2.migrate = [&](const std::string&) {
    moves++;
    return absl::OkStatus();
  };
  auto manual = HealthMonitor::Manual(std::move(o2));
  auto t = Clock::now();
  manual->CheckNow(t);
  r2.counters[0].value = 4;
  manual->CheckNow(t + seconds(1));
  EXPECT_EQ(moves, 0);
  EXPECT_THAT(manual->status().state, HasSubstr("unhealthy, moving the VM"));
  active = true;
  manual->CheckNow(t + seconds(2));
  EXPECT_EQ(moves, 1);
}

}  // namespace
}  // namespace romulus::health_test
