// Hardware health: a monitor in the primary reads memory-error counters (EDAC), the carrier and
// error counters of network interfaces, a disk's SMART verdict and an operator's command at an
// interval, and a policy of rules decides when the host is degrading enough to move its VM to
// the mirror (a planned migration) before it fails. Every input is untrusted: reads are bounded,
// and a source that cannot be read is reported on one line, never by itself a reason to move
// (unless a rule says so).
#ifndef ROMULUS_SWITCHOVER_HEALTH_H_
#define ROMULUS_SWITCHOVER_HEALTH_H_

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "proto/romulus.pb.h"

namespace romulus::switchover {

enum class HealthSignal {
  kCorrectedMemory,    // counter: corrected memory errors (EDAC ce_count)
  kUncorrectedMemory,  // counter: uncorrected memory errors (EDAC ue_count)
  kLinkErrors,         // counter: rx_errors + tx_errors of the watched interfaces
  kCarrierChanges,     // counter: carrier_changes (a flapping link)
  kLinkDown,           // state: a watched interface has no carrier
  kDiskFailing,        // state: smartctl's verdict is "failed"
  kCommandFailing,     // state: the operator's command exited non-zero
  kUnreadable,         // state: some source could not be read
};
// "corrected_memory", "link_down", ...: the names the config uses.
absl::StatusOr<HealthSignal> ParseHealthSignal(absl::string_view name);
absl::string_view HealthSignalName(HealthSignal s);
bool IsCounter(HealthSignal s);

// What one check read from every source.
struct HealthReading {
  struct Counter {
    HealthSignal signal;
    std::string name;  // the file it came from: "edac mc0 ce_count"
    uint64_t value;
  };
  struct Fault {
    HealthSignal signal;  // a state signal
    std::string what;     // one line: "net eth1 has no carrier"
  };
  std::vector<Counter> counters;
  std::vector<Fault> faults;
  // One line per source that could not be read now ("edac mc0 ce_count unreadable: ...").
  std::vector<std::string> unreadable;
  // One line per source not checked at all, and why (smartctl not installed, no EDAC).
  std::vector<std::string> notes;
};

class HealthSource {
 public:
  virtual ~HealthSource() = default;
  virtual void Read(HealthReading* out) = 0;
};
// Under `sysfs_root`/devices/system/edac/mc: every mcN's ce_count and ue_count.
std::unique_ptr<HealthSource> EdacSource(std::string sysfs_root);
// Under `sysfs_root`/class/net/`iface`: carrier, carrier_changes, statistics/{rx,tx}_errors.
std::unique_ptr<HealthSource> NetSource(std::string sysfs_root, std::string iface);
// `smartctl -H --json device` when `smartctl` (a path, or a name found in PATH and the sbin
// directories) is installed; otherwise a note, once per check.
std::unique_ptr<HealthSource> SmartSource(std::string device, std::string smartctl,
                                          std::chrono::milliseconds timeout);
// `command` through /bin/sh: any exit but 0 (or no exit within `timeout`) is a fault.
std::unique_ptr<HealthSource> CommandSource(std::string command, std::chrono::milliseconds timeout);

// One rule: `signal` at or over `count` holds. Counters count new events (increases; a counter
// that goes down was reset and counts from there) within the last `window` (zero: since the
// policy began); states count consecutive checks. A rule that acts `alone` moves the VM by
// itself; the others only when at least two rules hold together.
struct HealthRule {
  HealthSignal signal = HealthSignal::kUncorrectedMemory;
  uint64_t count = 1;
  std::chrono::seconds window{0};
  bool alone = true;
};

class HealthPolicy {
 public:
  using Clock = std::chrono::steady_clock;
  struct Verdict {
    bool move = false;
    std::string reason;   // why it moves: the rules that hold, each with its figures
    std::string state;    // one line for `romulus status`
    std::string holding;  // the names of the rules that hold ("" none)
  };
  explicit HealthPolicy(std::vector<HealthRule> rules);
  // Takes the reading of a check made at `now` (not earlier than the last one's).
  Verdict Observe(const HealthReading& reading, Clock::time_point now);

 private:
  class Impl;
  std::shared_ptr<Impl> impl_;
};

class HealthMonitor {
 public:
  using Clock = std::chrono::steady_clock;
  struct Options {
    std::vector<std::unique_ptr<HealthSource>> sources{};
    std::vector<HealthRule> rules{};
    std::chrono::milliseconds interval{1000};
    // Whether this host runs the VM now: the policy's decision is acted on only then.
    std::function<bool()> active = nullptr;
    // Starts the planned migration; an error (the mirror is not in sync, refused) keeps the VM
    // here, and the move is tried again after `retry`, doubling up to 64 times it.
    std::function<absl::Status(const std::string& reason)> migrate = nullptr;
    std::chrono::milliseconds retry{5000};
    std::function<void(absl::string_view)> log = nullptr;
  };
  struct Status {
    uint64_t checks = 0;
    bool unhealthy = false;             // the policy says move (whether or not this host can)
    std::string state;                  // the policy's line, or the last refusal
    std::string last_decision;          // the last reason a move was asked for ("" none)
    std::vector<std::string> problems;  // sources unreadable now, and notes
    uint64_t attempts = 0, refusals = 0;
  };
  // Runs the checks on a thread of its own until destroyed.
  static absl::StatusOr<std::unique_ptr<HealthMonitor>> Start(Options options);
  // Without a thread: the caller runs each check (tests).
  static std::unique_ptr<HealthMonitor> Manual(Options options);
  virtual ~HealthMonitor() = default;
  // One check, as the thread runs each interval.
  virtual void CheckNow(Clock::time_point now) = 0;
  virtual Status status() const = 0;
};

// The sources and rules a config's health block asks for (checked by the config loader).
HealthMonitor::Options HealthOptions(const pb::HealthConfig& c);

}  // namespace romulus::switchover

#endif  // ROMULUS_SWITCHOVER_HEALTH_H_
