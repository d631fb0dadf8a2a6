// The health sources, the policy and the monitor's loop. Sysfs files and command output are
// read with bounds (a few KiB), a file that is not a regular file is refused (a FIFO planted in
// the tree must not block the monitor), and what cannot be read becomes one line of state.
#include "switchover/health.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <map>
#include <mutex>
#include <set>
#include <thread>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "switchover/switchover.h"

namespace romulus::switchover {
namespace {

using Clock = std::chrono::steady_clock;

constexpr size_t kMaxSysfsBytes = 4096;         // a counter or a flag is a few bytes
constexpr size_t kMaxCommandOutput = 64 << 10;  // smartctl's JSON for one disk
constexpr size_t kMaxControllers = 64;          // EDAC memory controllers read
constexpr size_t kMaxEventsPerRule = 100'000;   // remembered for a window, per rule
constexpr size_t kMaxLine = 200;                // of anything quoted from an input

// Printable ASCII only, at most kMaxLine bytes: what an input may put in a log line.
std::string Printable(absl::string_view s) {
  std::string out;
  for (char c : s.substr(0, kMaxLine)) out += absl::ascii_isprint(c) ? c : '?';
  if (s.size() > kMaxLine) out += "...";
  return out;
}

absl::StatusOr<std::string> ReadSmallFile(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK | O_NOCTTY);
  if (fd < 0) return absl::UnavailableError(std::strerror(errno));
  struct stat st;
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    return absl::UnavailableError("not a regular file");
  }
  std::string out(kMaxSysfsBytes + 1, '\0');
  size_t got = 0;
  while (got < out.size()) {
    ssize_t n = ::read(fd, out.data() + got, out.size() - got);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      int e = errno;
      ::close(fd);
      return absl::UnavailableError(std::strerror(e));
    }
    if (n == 0) break;
    got += static_cast<size_t>(n);
  }
  ::close(fd);
  if (got > kMaxSysfsBytes) {
    return absl::UnavailableError(absl::StrCat("larger than ", kMaxSysfsBytes, " bytes"));
  }
  out.resize(got);
  return out;
}

absl::StatusOr<uint64_t> ParseCounter(absl::string_view text) {
  text = absl::StripAsciiWhitespace(text);
  uint64_t v = 0;
  auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), v);
  if (text.empty() || ec != std::errc() || end != text.data() + text.size()) {
    return absl::InvalidArgumentError(
        absl::StrCat("'", Printable(text), "' is not a count (0 to 2^64-1)"));
  }
  return v;
}

// Reads the counter at `path` into `out` as `name`, or says why not.
void ReadCounter(const std::string& path, HealthSignal signal, const std::string& name,
                 HealthReading* out) {
  auto text = ReadSmallFile(path);
  if (!text.ok()) {
    out->unreadable.push_back(absl::StrCat(name, " unreadable: ", text.status().message()));
    return;
  }
  auto v = ParseCounter(*text);
  if (!v.ok()) {
    out->unreadable.push_back(absl::StrCat(name, " unreadable: ", v.status().message()));
    return;
  }
  out->counters.push_back({signal, name, *v});
}

class Edac : public HealthSource {
 public:
  explicit Edac(std::string root) : dir_(root + "/devices/system/edac/mc") {}

  void Read(HealthReading* out) override {
    DIR* d = ::opendir(dir_.c_str());
    if (d == nullptr) {
      int e = errno;
      if (e == ENOENT) {
        out->notes.push_back(absl::StrCat("edac: no memory controllers under ", dir_,
                                          " (memory errors not watched)"));
      } else {
        out->unreadable.push_back(absl::StrCat("edac: cannot list ", dir_, ": ", std::strerror(e)));
      }
      return;
    }
    std::set<unsigned> controllers;
    bool more = false;
    while (dirent* e = ::readdir(d)) {
      absl::string_view name = e->d_name;
      if (name.size() < 3 || name.size() > 6 || name.substr(0, 2) != "mc") continue;
      unsigned n = 0;
      auto [end, ec] = std::from_chars(name.data() + 2, name.data() + name.size(), n);
      if (ec != std::errc() || end != name.data() + name.size()) continue;
      if (controllers.size() >= kMaxControllers) {
        more = true;
        continue;
      }
      controllers.insert(n);
    }
    ::closedir(d);
    if (more) {
      out->notes.push_back(absl::StrCat("edac: only the first ", kMaxControllers,
                                        " memory controllers found are read"));
    }
    for (unsigned n : controllers) {
      std::string mc = absl::StrCat(dir_, "/mc", n, "/");
      ReadCounter(mc + "ce_count", HealthSignal::kCorrectedMemory,
                  absl::StrCat("edac mc", n, " ce_count"), out);
      ReadCounter(mc + "ue_count", HealthSignal::kUncorrectedMemory,
                  absl::StrCat("edac mc", n, " ue_count"), out);
    }
    if (controllers.empty()) {
      out->notes.push_back(
          absl::StrCat("edac: no memory controllers under ", dir_, " (memory errors not watched)"));
    }
  }

 private:
  std::string dir_;
};

class Net : public HealthSource {
 public:
  Net(std::string root, std::string iface)
      : dir_(absl::StrCat(root, "/class/net/", iface, "/")), iface_(std::move(iface)) {}

  void Read(HealthReading* out) override {
    std::string name = absl::StrCat("net ", iface_);
    auto carrier = ReadSmallFile(dir_ + "carrier");
    absl::string_view flag = carrier.ok() ? absl::StripAsciiWhitespace(*carrier) : "";
    if (!carrier.ok()) {
      out->unreadable.push_back(
          absl::StrCat(name, " carrier unreadable: ", carrier.status().message()));
    } else if (flag == "0") {
      out->faults.push_back({HealthSignal::kLinkDown, absl::StrCat(name, " has no carrier")});
    } else if (flag != "1") {
      out->unreadable.push_back(
          absl::StrCat(name, " carrier unreadable: '", Printable(flag), "' is not 0 or 1"));
    }
    ReadCounter(dir_ + "carrier_changes", HealthSignal::kCarrierChanges,
                absl::StrCat(name, " carrier_changes"), out);
    for (const char* counter : {"rx_errors", "tx_errors"}) {
      ReadCounter(absl::StrCat(dir_, "statistics/", counter), HealthSignal::kLinkErrors,
                  absl::StrCat(name, " ", counter), out);
    }
  }

 private:
  std::string dir_, iface_;
};

// `name` as a path, or found in PATH or the sbin directories (smartctl lives in /usr/sbin,
// often not in a service's PATH); "" when none is executable.
std::string FindProgram(const std::string& name) {
  if (name.find('/') != std::string::npos) return ::access(name.c_str(), X_OK) == 0 ? name : "";
  const char* path = std::getenv("PATH");
  std::vector<std::string> dirs =
      absl::StrSplit(path ? path : "/usr/bin:/bin", ':', absl::SkipEmpty());
  for (const char* d : {"/usr/sbin", "/sbin", "/usr/local/sbin"}) dirs.push_back(d);
  for (const std::string& d : dirs) {
    std::string candidate = absl::StrCat(d, "/", name);
    if (::access(candidate.c_str(), X_OK) == 0) return candidate;
  }
  return "";
}

class Smart : public HealthSource {
 public:
  Smart(std::string device, std::string smartctl, std::chrono::milliseconds timeout)
      : device_(std::move(device)), smartctl_(std::move(smartctl)), timeout_(timeout) {}

  void Read(HealthReading* out) override {
    std::string name = absl::StrCat("smart ", device_);
    std::string program = FindProgram(smartctl_);
    if (program.empty()) {
      out->notes.push_back(absl::StrCat(name, ": ", smartctl_,
                                        " is not installed (smartmontools): the disk is not "
                                        "checked"));
      return;
    }
    auto ran = RunProgram({program, "-H", "--json", device_}, timeout_, kMaxCommandOutput);
    if (!ran.ok()) {
      out->unreadable.push_back(absl::StrCat(name, " unreadable: ", ran.status().message()));
      return;
    }
    if (ran->exit_code < 0) {
      out->unreadable.push_back(
          absl::StrCat(name, " unreadable: smartctl ",
                       ran->timed_out ? absl::StrCat("did not finish in ", timeout_.count(), " ms")
                                      : std::string("was killed by a signal")));
      return;
    }
    // smartctl's exit status is a bit mask: bits 0-2, it could not ask the disk; bit 3, the
    // disk says it is failing.
    if (ran->exit_code & 8) {
      out->faults.push_back(
          {HealthSignal::kDiskFailing, absl::StrCat(name, ": SMART says the disk is failing")});
      return;
    }
    if (ran->exit_code & 7) {
      out->unreadable.push_back(absl::StrCat(name, " unreadable: smartctl exit ", ran->exit_code));
      return;
    }
    absl::string_view json = ran->output;
    size_t at = json.find("\"smart_status\"");
    size_t passed = at == absl::string_view::npos ? at : json.find("\"passed\"", at);
    if (passed == absl::string_view::npos || passed - at > 200) {
      out->unreadable.push_back(
          absl::StrCat(name, " unreadable: no smart_status in smartctl's answer"));
      return;
    }
    absl::string_view rest = json.substr(passed + 8);
    rest = absl::StripLeadingAsciiWhitespace(rest);
    if (!rest.empty() && rest.front() == ':')
      rest = absl::StripLeadingAsciiWhitespace(rest.substr(1));
    if (absl::StartsWith(rest, "false")) {
      out->faults.push_back(
          {HealthSignal::kDiskFailing, absl::StrCat(name, ": SMART overall health check failed")});
    } else if (!absl::StartsWith(rest, "true")) {
      out->unreadable.push_back(
          absl::StrCat(name, " unreadable: smart_status.passed is neither true nor false"));
    }
  }

 private:
  std::string device_, smartctl_;
  std::chrono::milliseconds timeout_;
};

class Command : public HealthSource {
 public:
  Command(std::string command, std::chrono::milliseconds timeout)
      : command_(std::move(command)), timeout_(timeout) {}
  void Read(HealthReading* out) override {
    if (auto s = RunCommand("health command", command_, timeout_); !s.ok()) {
      out->faults.push_back({HealthSignal::kCommandFailing, Printable(s.message())});
    }
  }

 private:
  std::string command_;
  std::chrono::milliseconds timeout_;
};

constexpr std::pair<HealthSignal, const char*> kSignalNames[] = {
    {HealthSignal::kCorrectedMemory, "corrected_memory"},
    {HealthSignal::kUncorrectedMemory, "uncorrected_memory"},
    {HealthSignal::kLinkErrors, "link_errors"},
    {HealthSignal::kCarrierChanges, "carrier_changes"},
    {HealthSignal::kLinkDown, "link_down"},
    {HealthSignal::kDiskFailing, "disk_failing"},
    {HealthSignal::kCommandFailing, "command_failing"},
    {HealthSignal::kUnreadable, "unreadable"},
};

}  // namespace

absl::StatusOr<HealthSignal> ParseHealthSignal(absl::string_view name) {
  for (auto [signal, n] : kSignalNames) {
    if (name == n) return signal;
  }
  std::vector<std::string> names;
  for (auto [signal, n] : kSignalNames) names.push_back(n);
  return absl::InvalidArgumentError(
      absl::StrCat("'", Printable(name), "' is not one of ", absl::StrJoin(names, ", ")));
}

absl::string_view HealthSignalName(HealthSignal s) {
  for (auto [signal, n] : kSignalNames) {
    if (signal == s) return n;
  }
  return "?";
}

bool IsCounter(HealthSignal s) {
  return s == HealthSignal::kCorrectedMemory || s == HealthSignal::kUncorrectedMemory ||
         s == HealthSignal::kLinkErrors || s == HealthSignal::kCarrierChanges;
}

std::unique_ptr<HealthSource> EdacSource(std::string sysfs_root) {
  return std::make_unique<Edac>(std::move(sysfs_root));
}
std::unique_ptr<HealthSource> NetSource(std::string sysfs_root, std::string iface) {
  return std::make_unique<Net>(std::move(sysfs_root), std::move(iface));
}
std::unique_ptr<HealthSource> SmartSource(std::string device, std::string smartctl,
                                          std::chrono::milliseconds timeout) {
  return std::make_unique<Smart>(std::move(device), std::move(smartctl), timeout);
}
std::unique_ptr<HealthSource> CommandSource(std::string command,
                                            std::chrono::milliseconds timeout) {
  return std::make_unique<Command>(std::move(command), timeout);
}

// ---- The policy ----

class HealthPolicy::Impl {
 public:
  explicit Impl(std::vector<HealthRule> rules)
      : rules_(std::move(rules)), tracked_(rules_.size()) {}

  Verdict Observe(const HealthReading& reading, Clock::time_point now) {
    // New events per counter signal: increases of each file since its last reading. A file
    // read for the first time is the baseline; one that went down was reset (counts from
    // there); one unreadable now keeps its last value, so that what it counted meanwhile shows
    // when it is read again.
    std::map<HealthSignal, uint64_t> events;
    for (const HealthReading::Counter& c : reading.counters) {
      auto [it, fresh] = last_.try_emplace(c.name, c.value);
      if (!fresh && c.value > it->second) {
        uint64_t& e = events[c.signal];
        e += std::min(c.value - it->second, UINT64_MAX - e);
      }
      it->second = c.value;
    }
    std::map<HealthSignal, std::string> present;  // states now: the first line of each
    for (const HealthReading::Fault& f : reading.faults) present.try_emplace(f.signal, f.what);
    if (!reading.unreadable.empty()) {
      present.try_emplace(HealthSignal::kUnreadable,
                          reading.unreadable.size() == 1
                              ? reading.unreadable[0]
                              : absl::StrCat(reading.unreadable[0], " (and ",
                                             reading.unreadable.size() - 1, " more)"));
    }
    Verdict v;
    std::vector<std::string> holds, figures, names;
    bool alone = false;
    for (size_t i = 0; i < rules_.size(); i++) {
      const HealthRule& r = rules_[i];
      Tracked& t = tracked_[i];
      uint64_t value;
      std::string figure;
      if (IsCounter(r.signal)) {
        uint64_t e = events.count(r.signal) ? events[r.signal] : 0;
        t.total += std::min(e, UINT64_MAX - t.total);
        if (r.window.count() == 0) {
          value = t.total;
          figure = absl::StrFormat("%s %d/%d since the monitor began", HealthSignalName(r.signal),
                                   value, r.count);
        } else {
          if (e > 0) {
            t.events.emplace_back(now, e);
            if (t.events.size() > kMaxEventsPerRule) t.events.pop_front();
          }
          while (!t.events.empty() && t.events.front().first <= now - r.window) {
            t.events.pop_front();
          }
          value = 0;
          for (const auto& [when, n] : t.events) value += std::min(n, UINT64_MAX - value);
          figure = absl::StrFormat("%s %d/%d within %d s", HealthSignalName(r.signal), value,
                                   r.count, r.window.count());
        }
      } else {
        auto it = present.find(r.signal);
        t.consecutive = it == present.end() ? 0 : t.consecutive + 1;
        value = t.consecutive;
        figure = absl::StrFormat("%s %d/%d checks", HealthSignalName(r.signal), value, r.count);
        if (it != present.end()) absl::StrAppend(&figure, " (", it->second, ")");
      }
      figures.push_back(figure);
      if (value >= r.count) {
        holds.push_back(absl::StrCat(figure, r.alone ? ", acts alone" : ""));
        names.push_back(std::string(HealthSignalName(r.signal)));
        alone = alone || r.alone;
      }
    }
    v.move = alone || holds.size() >= 2;
    v.holding = absl::StrJoin(names, ",");
    if (v.move) {
      v.reason = absl::StrCat("health: ", absl::StrJoin(holds, "; "));
      v.state = absl::StrCat("unhealthy, moving the VM: ", absl::StrJoin(holds, "; "));
    } else if (!holds.empty()) {
      v.state = absl::StrCat("degraded (a rule that does not act alone holds): ",
                             absl::StrJoin(figures, "; "));
    } else {
      v.state = figures.empty() ? "healthy (no rules: only reporting)"
                                : absl::StrCat("healthy: ", absl::StrJoin(figures, "; "));
    }
    return v;
  }

 private:
  struct Tracked {
    std::deque<std::pair<Clock::time_point, uint64_t>> events;  // within the window, nonzero
    uint64_t total = 0;
    uint64_t consecutive = 0;
  };
  std::vector<HealthRule> rules_;
  std::vector<Tracked> tracked_;
  std::map<std::string, uint64_t> last_;  // per counter file
};

HealthPolicy::HealthPolicy(std::vector<HealthRule> rules)
    : impl_(std::make_shared<Impl>(std::move(rules))) {}

HealthPolicy::Verdict HealthPolicy::Observe(const HealthReading& reading, Clock::time_point now) {
  return impl_->Observe(reading, now);
}

// ---- The monitor ----

namespace {

class Monitor : public HealthMonitor {
 public:
  explicit Monitor(Options o) : o_(std::move(o)), policy_(o_.rules) {}

  ~Monitor() override {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    if (thread_.joinable()) thread_.join();
  }

  void Run() {
    thread_ = std::thread([this] {
      std::unique_lock<std::mutex> lock(mu_);
      while (!stop_) {
        lock.unlock();
        CheckNow(Clock::now());
        lock.lock();
        cv_.wait_for(lock, o_.interval, [this] { return stop_; });
      }
    });
  }

  void CheckNow(Clock::time_point now) override {
    HealthReading r;
    for (const auto& s : o_.sources) s->Read(&r);
    HealthPolicy::Verdict v = policy_.Observe(r, now);
    std::vector<std::string> problems = r.unreadable;
    problems.insert(problems.end(), r.notes.begin(), r.notes.end());
    // What changed is logged, not every check: a flapping file must not flood the log.
    for (const std::string& p : problems) {
      if (std::find(problems_.begin(), problems_.end(), p) == problems_.end()) Log(p);
    }
    if (!problems_.empty() && r.unreadable.empty() && problems.size() < problems_.size()) {
      Log("every health source is readable again");
    }
    problems_ = problems;
    if (v.holding != holding_) {
      Log(v.state);
      holding_ = v.holding;
    }
    bool act = v.move && (!o_.active || o_.active()) && o_.migrate && now >= next_attempt_;
    std::string refusal;
    if (act) {
      {
        std::lock_guard<std::mutex> lock(mu_);
        status_.attempts++;
        status_.last_decision = v.reason;
      }
      Log(absl::StrCat("moving the VM to the mirror (planned migration): ", v.reason));
      absl::Status s = o_.migrate(v.reason);
      if (s.ok()) {
        backoff_ = std::chrono::milliseconds(0);
        next_attempt_ = Clock::time_point();
        // What held here moved the VM once: the counts start afresh, so that a VM that comes
        // back is not sent away again for the same events.
        policy_ = HealthPolicy(o_.rules);
        holding_.clear();
      } else {
        backoff_ = backoff_.count() == 0 ? o_.retry : std::min(backoff_ * 2, o_.retry * 64);
        next_attempt_ = now + backoff_;
        refusal = absl::StrFormat(
            "the move was refused: %s; the VM stays here, next attempt in %.1f s",
            Printable(s.message()), std::chrono::duration<double>(backoff_).count());
        Log(refusal);
      }
    }
    std::lock_guard<std::mutex> lock(mu_);
    status_.unhealthy = v.move && !act;  // a move that succeeded leaves the counts afresh
    status_.state = v.state;
    if (!refusal.empty()) {
      status_.refusals++;
      last_refusal_ = refusal;
    }
    if (v.move && now < next_attempt_ && !last_refusal_.empty()) {
      absl::StrAppend(&status_.state, "; ", last_refusal_);
    }
    status_.problems = problems_;
    status_.checks++;
  }

  Status status() const override {
    std::lock_guard<std::mutex> lock(mu_);
    return status_;
  }

 private:
  void Log(absl::string_view line) {
    if (o_.log) o_.log(absl::StrCat("health: ", line));
  }

  Options o_;
  // Only the checking thread (or the caller of CheckNow) touches these.
  HealthPolicy policy_;
  std::vector<std::string> problems_;
  std::string holding_;
  std::chrono::milliseconds backoff_{0};
  Clock::time_point next_attempt_{};

  mutable std::mutex mu_;
  std::condition_variable cv_;
  bool stop_ = false;
  Status status_;
  std::string last_refusal_;
  std::thread thread_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<HealthMonitor>> HealthMonitor::Start(Options options) {
  if (options.interval.count() <= 0) {
    return absl::InvalidArgumentError("the health check interval must be positive");
  }
  auto m = std::make_unique<Monitor>(std::move(options));
  m->Run();
  return std::unique_ptr<HealthMonitor>(std::move(m));
}

std::unique_ptr<HealthMonitor> HealthMonitor::Manual(Options options) {
  return std::make_unique<Monitor>(std::move(options));
}

HealthMonitor::Options HealthOptions(const pb::HealthConfig& c) {
  HealthMonitor::Options o;
  std::string root = c.sysfs_root().empty() ? "/sys" : c.sysfs_root();
  auto timeout = std::chrono::milliseconds(c.command_timeout_ms() ? c.command_timeout_ms() : 5000);
  o.sources.push_back(EdacSource(root));
  for (const std::string& iface : c.interface()) o.sources.push_back(NetSource(root, iface));
  if (!c.smart_device().empty()) {
    o.sources.push_back(
        SmartSource(c.smart_device(), c.smartctl().empty() ? "smartctl" : c.smartctl(), timeout));
  }
  if (!c.command().empty()) o.sources.push_back(CommandSource(c.command(), timeout));
  for (const pb::HealthRule& r : c.rule()) {
    auto signal = ParseHealthSignal(r.signal());
    if (!signal.ok()) continue;  // the config loader refuses it first
    o.rules.push_back({.signal = *signal,
                       .count = r.count() ? r.count() : 1,
                       .window = std::chrono::seconds(r.window_s()),
                       .alone = r.alone()});
  }
  if (c.rule_size() == 0) {
    // An uncorrected memory error is one the hardware could not hide: it acts alone.
    o.rules.push_back({.signal = HealthSignal::kUncorrectedMemory, .count = 1, .alone = true});
  }
  o.interval = std::chrono::milliseconds(c.interval_ms() ? c.interval_ms() : 1000);
  o.retry = std::chrono::milliseconds(c.retry_ms() ? c.retry_ms() : 5000);
  return o;
}

}  // namespace romulus::switchover
