// False failovers on a busy machine: the hosts of `romulus demo` (cli::LocalHosts: a witness,
// host a as `romulus primary`, host b as `romulus mirror`, heartbeats on two loopback paths,
// nothing killed) run beside `stress-ng --cpu N` for a while with the heartbeat timeout fixed
// (heartbeat_timeout_max_ms = heartbeat_timeout_ms: as before the failure detector adapted) and
// for as long with it adaptive (the default ceiling); --binary and --modes configured run a
// romulus from before the adaptive timeout. Every "peer dead" a host says and every
// promotion is false: nothing failed. A pair whose mirror promoted is started afresh, and only
// the time a pair ran protected counts.
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "cli/args.h"
#include "cli/local_hosts.h"
#include "cli/process.h"

#ifndef ROMULUS_BINARY
#error "ROMULUS_BINARY must name the romulus executable (bench/CMakeLists.txt defines it)"
#endif

namespace {

using romulus::cli::LocalHosts;
using Clock = std::chrono::steady_clock;
namespace cli = romulus::cli;

struct Settings {
  std::string binary = ROMULUS_BINARY;
  std::string stress = "/usr/bin/stress-ng";
  uint64_t seconds = 300;  // per mode
  uint64_t cpus = 2;       // stress-ng --cpu
  uint64_t timeout_ms = 50;
  std::string platform;
  std::string modes = "fixed,adaptive";
  bool verbose = false;
};

struct Counts {
  std::atomic<bool> live{false};  // not while the pair starts or is stopped (a peer dies then)
  std::atomic<uint64_t> dead{0}, promoted{0};
};

struct Result {
  double seconds = 0;
  uint64_t dead = 0, promoted = 0, pairs = 0;
};

// One mode: pairs of hosts, each until its mirror promoted or the time is up.
absl::StatusOr<Result> Run(const Settings& st, uint32_t timeout_max_ms) {
  Result r;
  auto end = Clock::now() + std::chrono::seconds(st.seconds);
  while (Clock::now() < end) {
    char tmpl[] = "/tmp/romulus-false-failover-XXXXXX";
    if (::mkdtemp(tmpl) == nullptr) return absl::InternalError("cannot create a scratch dir");
    std::string dir = tmpl;
    Counts counts;
    absl::Status status;
    {
      LocalHosts::Options o;
      o.binary = st.binary;
      o.dir = dir;
      o.platform = st.platform;
      o.heartbeat_timeout_ms = static_cast<uint32_t>(st.timeout_ms);
      o.heartbeat_timeout_max_ms = timeout_max_ms;
      o.wait = std::chrono::milliseconds(120000);
      o.echo = [&counts, &st](absl::string_view line) {
        bool dead = absl::StrContains(line, "peer dead");
        bool promoted = absl::StrContains(line, "promoted (");
        if (!counts.live) {
          if (st.verbose) std::printf("    (not counted) %s\n", std::string(line).c_str());
          return;
        }
        counts.dead += dead;
        counts.promoted += promoted;
        if (st.verbose || dead || promoted) {
          std::printf("    %s\n", std::string(line).c_str());
          std::fflush(stdout);
        }
      };
      auto hosts = LocalHosts::Start(std::move(o));
      if (!hosts.ok()) {
        status = hosts.status();
      } else {
        r.pairs++;
        auto start = Clock::now();
        counts.live = true;
        // Only heartbeats and the lease are watched: a promotion ends the pair's run.
        while (Clock::now() < end && counts.promoted == 0) {
          std::this_thread::sleep_for(std::chrono::milliseconds(100));  // polling a counter
        }
        counts.live = false;
        r.seconds += std::chrono::duration<double>(Clock::now() - start).count();
        r.dead += counts.dead;
        r.promoted += counts.promoted;
      }
    }
    std::filesystem::remove_all(dir);
    if (!status.ok()) return status;
  }
  return r;
}

}  // namespace

int main(int argc, char** argv) {
  Settings st;
  cli::Args args("romulus_false_failover_bench [options]",
                 "False failovers of two idle-but-busy romulus hosts on loopback beside\n"
                 "stress-ng --cpu N: heartbeat timeout fixed, then adaptive.");
  args.Uint("seconds", &st.seconds, "how long each mode runs");
  args.Uint("cpus", &st.cpus, "stress-ng --cpu workers (0: no stress-ng)");
  args.Uint("timeout-ms", &st.timeout_ms, "heartbeat_timeout_ms (the adaptive mode's floor)");
  args.String("platform", &st.platform, "kvm or process (default: the hosts choose)");
  args.String("binary", &st.binary, "the romulus executable");
  args.String("stress", &st.stress, "the stress-ng executable");
  args.String("modes", &st.modes,
              "fixed (heartbeat_timeout_max_ms = the timeout), adaptive (its default), or "
              "configured (the field unset: for a romulus binary from before it existed)");
  args.Bool("verbose", &st.verbose, "show every host's lines");
  if (auto s = args.Parse(argc - 1, argv + 1); !s.ok()) {
    std::fprintf(stderr, "romulus_false_failover_bench: %s\n%s", std::string(s.message()).c_str(),
                 args.Help().c_str());
    return 2;
  }
  if (args.help()) {
    std::fputs(args.Help().c_str(), stdout);
    return 0;
  }
  std::unique_ptr<cli::Process> stress;
  if (st.cpus > 0) {
    if (::access(st.stress.c_str(), X_OK) != 0) {
      std::fprintf(stderr,
                   "romulus_false_failover_bench: cannot run %s (apt-get install stress-ng)\n",
                   st.stress.c_str());
      return 1;
    }
    // Bounded by itself too, should this process die without killing it.
    auto p = cli::Process::Start(st.stress, {"--cpu", std::to_string(st.cpus), "--timeout",
                                             absl::StrCat(2 * st.seconds + 600, "s"), "--quiet"});
    if (!p.ok()) {
      std::fprintf(stderr, "romulus_false_failover_bench: %s\n",
                   std::string(p.status().message()).c_str());
      return 1;
    }
    stress = std::move(*p);
  }
  std::printf("stress-ng --cpu %llu; heartbeat_timeout_ms %llu; %llu s per mode\n",
              static_cast<unsigned long long>(st.cpus),
              static_cast<unsigned long long>(st.timeout_ms),
              static_cast<unsigned long long>(st.seconds));
  std::fflush(stdout);
  struct Mode {
    const char* name;
    uint32_t max_ms;
  };
  std::vector<Mode> modes;
  for (absl::string_view name : absl::StrSplit(st.modes, ',')) {
    if (name == "fixed") {
      modes.push_back({"fixed", static_cast<uint32_t>(st.timeout_ms)});
    } else if (name == "adaptive" || name == "configured") {
      modes.push_back({name == "adaptive" ? "adaptive" : "configured", 0});
    } else {
      std::fprintf(stderr, "romulus_false_failover_bench: unknown mode '%s'\n",
                   std::string(name).c_str());
      return 2;
    }
  }
  std::vector<Result> results;
  for (const Mode& m : modes) {
    std::printf("%s timeout:\n", m.name);
    std::fflush(stdout);
    auto r = Run(st, m.max_ms);
    if (!r.ok()) {
      std::fprintf(stderr, "romulus_false_failover_bench: %s\n",
                   std::string(r.status().message()).c_str());
      return 1;
    }
    results.push_back(*r);
  }
  std::printf("\n%-9s %9s %6s %10s %11s %12s %14s\n", "timeout", "protected", "pairs", "peer dead",
              "promotions", "dead/hour", "promotions/h");
  for (size_t i = 0; i < modes.size(); i++) {
    const Result& r = results[i];
    double hours = r.seconds / 3600;
    std::printf("%-9s %8.0fs %6llu %10llu %11llu %12.0f %14.0f\n", modes[i].name, r.seconds,
                static_cast<unsigned long long>(r.pairs), static_cast<unsigned long long>(r.dead),
                static_cast<unsigned long long>(r.promoted), hours > 0 ? r.dead / hours : 0,
                hours > 0 ? r.promoted / hours : 0);
  }
  return 0;
}
