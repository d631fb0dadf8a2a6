// What `romulus primary` and `romulus mirror` share: errors and log lines, the --config-only
// command line, the control socket, and the switchover pieces that run beside replication
// (heartbeats on every path, the witness lease) with their part of `romulus status`.
#ifndef ROMULUS_CLI_HOST_H_
#define ROMULUS_CLI_HOST_H_

#include <functional>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "cli/control.h"
#include "proto/romulus.pb.h"
#include "replicator/replicator.h"
#include "switchover/switchover.h"

namespace romulus::cli {

// Prints "romulus WHO: message" on stderr; returns the exit code 1.
int Fail(const char* who, const absl::Status& s);
// Log lines "romulus WHO: line" on stdout.
replicator::LogFn Logger(const char* who);
// Parses `--config FILE` (and --help). Returns an exit code, or -1 to go on with `config` set.
int ConfigOnly(const char* who, const char* usage, const char* summary, int argc, char** argv,
               std::string* config);
// Starts the control socket when the config names one (else nullptr).
absl::StatusOr<std::unique_ptr<ControlServer>> MaybeControl(const std::string& path,
                                                            ControlHandlers handlers);

// Heartbeats to the peer and the witness lease, as the config's `switchover` asks (each absent
// when not configured).
struct Switchover {
  std::unique_ptr<switchover::Heartbeat> heartbeat;
  std::unique_ptr<switchover::LeaseClient> lease;
  std::string witness;
  // Adds paths, peer liveness and the lease to a status reply.
  void AddStatus(pb::StatusReply* r) const;
  // For replication's on_traffic: the peer is alive.
  std::function<void()> TrafficHook();
};
struct SwitchoverHooks {
  std::function<void()> on_peer_dead = nullptr, on_peer_back = nullptr;
  std::function<void()> on_lease_gained = nullptr, on_lease_lost = nullptr;
};
absl::StatusOr<Switchover> StartSwitchover(const pb::SwitchoverConfig& c, const std::string& vm_id,
                                           const std::string& role, const std::string& key,
                                           SwitchoverHooks hooks, replicator::LogFn log);

}  // namespace romulus::cli

#endif  // ROMULUS_CLI_HOST_H_
