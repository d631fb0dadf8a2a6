// Two hosts of one protected VM and their witness, as `romulus` processes on this machine's
// loopback: what `romulus demo` shows, and what the KVM failover and migration tests run.
// Host a starts as the primary, keeping its guest RAM in a memory file (so that a host killed
// with -9 still holds it), and host b as its mirror. Heartbeats run on two paths (127.0.0.1 and
// 127.0.0.2), promotion needs the witness's lease, and each host serves the ledger on a port of
// its own while it is the primary; a `romulus proxy` may give the clients one address for both.
#ifndef ROMULUS_CLI_LOCAL_HOSTS_H_
#define ROMULUS_CLI_LOCAL_HOSTS_H_

#include <array>
#include <chrono>
#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "cli/load.h"
#include "cli/process.h"
#include "proto/romulus.pb.h"

namespace romulus::cli {

// A port on `address` (IPv4) that was free a moment ago, for SOCK_STREAM or SOCK_DGRAM, chosen
// below the kernel's ephemeral range where there is room, and claimed against every other process
// that picks ports with this function (tests side by side) for as long as this process runs.
absl::StatusOr<uint16_t> FreePort(int type, const char* address = "127.0.0.1");

class LocalHosts {
 public:
  struct Options {
    std::string binary{};  // the romulus executable
    std::string dir{};     // for the key, configs, disks, memory files and sockets
    // Where each host keeps its disk image and memory file, when not in `dir` (the nemesis gives
    // each host a small file system of its own, to fill).
    std::array<std::string, 2> files_dir{};
    uint64_t memory_mib = 64, disk_mib = 8;
    uint64_t working_set_pages = 1024, write_rate = 20000;
    uint32_t epoch_ms = 25;
    std::string compression = "lz4";
    std::string platform{};  // "kvm", "process", "": each host chooses
    // Each line a process prints, prefixed with its name ("a", "b" or "witness").
    Process::LineFn echo = nullptr;
    // For a process to get where it is going (listening, protected).
    std::chrono::milliseconds wait{60000};
    bool metrics = false;       // each host and the witness serve /metrics on a port of their own
    pb::HealthConfig health{};  // host a's health block (none when empty)
    // Both hosts' switchover.heartbeat_timeout_ms (0: the default, 50 ms). A test about
    // something else than detecting a dead peer raises it, so that heartbeats late on a loaded
    // machine do not start a promotion in the middle of what it shows.
    uint32_t heartbeat_timeout_ms = 0;
    // Both hosts' switchover.heartbeat_timeout_max_ms (0: the default, four times the timeout;
    // equal to it: a fixed timeout).
    uint32_t heartbeat_timeout_max_ms = 0;
    // A `romulus proxy` in front of both hosts' ledgers (LoadThroughProxy), holding requests
    // for up to this long (0: no proxy).
    std::chrono::milliseconds proxy_hold{0};
  };
  enum Host { kA = 0, kB = 1 };

  // Starts the witness, host b as the mirror and host a as the primary; returns once a's first
  // synchronisation has committed (protected).
  static absl::StatusOr<std::unique_ptr<LocalHosts>> Start(Options options);
  // Kills whatever still runs.
  ~LocalHosts();

  Process& process(Host h) { return *hosts_[h]; }
  std::string control_socket(Host h) const;
  uint16_t ledger_port(Host h) const { return ledger_[h]; }
  uint16_t replication_port(Host h) const { return replication_[h]; }
  // Host h's heartbeat port on path 0 (127.0.0.1) or 1 (127.0.0.2).
  uint16_t heartbeat_port(Host h, int path) const {
    return path == 0 ? heartbeat_[h] : heartbeat2_[h];
  }
  uint16_t witness_port() const { return witness_; }
  // Where /metrics is served (with Options::metrics), on 127.0.0.1.
  uint16_t metrics_port(Host h) const { return metrics_[h]; }
  uint16_t witness_metrics_port() const { return witness_metrics_; }
  // The host's disk image: the VM's while it is the primary, the replica's while the mirror.
  std::string disk(Host h) const { return HostFile(h, ".img"); }
  // The memory file host h keeps its guest RAM in as the primary (host a's seeds it as mirror).
  std::string memory_file(Host h) const { return HostFile(h, ".mem"); }
  static const char* Name(Host h) { return h == kA ? "a" : "b"; }
  // Ledger clients that start at `primary` and know the other host's address.
  LoadOptions Load(Host primary) const;
  // Ledger clients that know only the proxy's address (with Options::proxy_hold).
  LoadOptions LoadThroughProxy() const;
  uint16_t proxy_port() const { return proxy_; }
  // The proxy's process (with Options::proxy_hold), or nullptr.
  Process* proxy() { return proxy_process_.get(); }
  Process& witness() { return *witness_process_; }

  // Starts host `h` again, after it was killed, as the mirror of the other host: seeded from
  // the memory file and disk it left, so that only what differs is sent. Returns once it
  // listens (its synchronisation runs on).
  absl::Status Rejoin(Host h);
  // Starts host `h` again, after it was killed, as `romulus primary` with the files it has: its
  // disk image and memory file, and its ports (what a service manager's restart of a former
  // primary does; host b gets a primary config of the same shape as host a's).
  absl::Status RestartAsPrimary(Host h);
  // Start the witness (or the proxy) again, after it was killed, on the same address.
  absl::Status RestartWitness();
  absl::Status RestartProxy();
  // SIGTERM to both hosts and the witness; fails unless each exits 0.
  absl::Status Stop();

 private:
  explicit LocalHosts(Options options);
  absl::StatusOr<std::unique_ptr<Process>> Run(const std::string& name,
                                               const std::vector<std::string>& args);
  std::string File(const std::string& name) const { return o_.dir + "/" + name; }
  std::string HostFile(Host h, const char* suffix) const {
    const std::string& dir = o_.files_dir[h].empty() ? o_.dir : o_.files_dir[h];
    return absl::StrCat(dir, "/", Name(h), suffix);
  }
  std::string MirrorConfig(Host h) const;
  std::string PrimaryConfig(Host h) const;
  // The witness's command line: the one place that says how it is started (`first_start`: the
  // cluster's first, as opposed to a restart after it was killed).
  std::vector<std::string> WitnessArgs(bool first_start) const;
  absl::Status StartWitness(bool first_start);
  absl::Status StartProxy();
  pb::SwitchoverConfig SwitchoverOf(Host h) const;

  Options o_;
  uint16_t witness_ = 0, witness_metrics_ = 0, proxy_ = 0;
  std::array<uint16_t, 2> replication_{}, ledger_{}, heartbeat_{}, heartbeat2_{}, metrics_{};
  std::unique_ptr<Process> witness_process_, proxy_process_;
  std::array<std::unique_ptr<Process>, 2> hosts_;
};

}  // namespace romulus::cli

#endif  // ROMULUS_CLI_LOCAL_HOSTS_H_
