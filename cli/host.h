// What `romulus primary` and `romulus mirror` share: errors and log lines, the --config-only
// command line, the control socket, the switchover pieces that run beside replication
// (heartbeats on every path, the witness lease) with their part of `romulus status`, the KVM VM
// as a node runs it, and the node's main loop. The two commands differ only in what the node
// starts as: the primary with a freshly booted VM, the mirror with an empty (or seeded) replica.
#ifndef ROMULUS_CLI_HOST_H_
#define ROMULUS_CLI_HOST_H_

#include <signal.h>

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "cli/control.h"
#include "proto/romulus.pb.h"
#include "replicator/replicator.h"
#include "switchover/health.h"
#include "switchover/switchover.h"
#include "vmm/ledger_endpoint.h"
#include "vmm/vmm.h"

namespace romulus::cli {

// Prints "romulus WHO: message" on stderr; returns the exit code 1.
int Fail(const char* who, const absl::Status& s);
// Log lines "romulus WHO: line" on stdout.
replicator::LogFn Logger(const char* who);
// Parses `--config FILE` (and --help); with `unprotected_command`, also
// `--unprotected-command CMD`, which overrides the config's switchover.unprotected_command (the
// OCF agent passes the command that withdraws the other hosts' promotion scores: it knows the
// cluster, the operator's config need not). Returns an exit code, or -1 to go on.
int ConfigOnly(const char* usage, const char* summary, int argc, char** argv, std::string* config,
               std::string* unprotected_command = nullptr);
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
};
struct SwitchoverHooks {
  std::function<void()> on_peer_dead = nullptr, on_peer_back = nullptr;
  std::function<void()> on_lease_gained = nullptr, on_lease_lost = nullptr;
  std::function<void(const std::string& why)> on_superseded = nullptr;
};
absl::StatusOr<Switchover> StartSwitchover(const pb::SwitchoverConfig& c, const std::string& vm_id,
                                           const std::string& role, const std::string& key,
                                           SwitchoverHooks hooks, replicator::LogFn log);

// Guest console lines as "romulus WHO: guest: line" on stdout.
std::function<void(absl::string_view)> GuestConsole(const char* who);

// The KVM VM with its ledger: the endpoint opens at this host's service address when the VM
// starts, and closes when the VM is given up (clients then go to the other host at once).
class LedgerVm : public switchover::NodeVm {
 public:
  LedgerVm(std::unique_ptr<vmm::Vm> vm, vmm::OutputGate& gate, std::string listen, uint16_t port,
           const char* who)
      : vm_(std::move(vm)), gate_(gate), listen_(std::move(listen)), port_(port), who_(who) {}
  ~LedgerVm() override;
  absl::Status Start() override;
  std::unique_ptr<vmm::GuestMemory> TakeMemory() override;
  absl::Status exit_status() override { return vm_->exited() ? vm_->Wait() : absl::OkStatus(); }
  absl::Status Pause() override { return vm_->Pause(); }
  absl::Status Resume() override { return vm_->Resume(); }
  absl::StatusOr<vmm::DirtyBitmap> HarvestDirty() override { return vm_->HarvestDirty(); }
  absl::StatusOr<pb::VmSnapshot> SaveState() override { return vm_->SaveState(); }
  vmm::GuestMemory& memory() override { return vm_->memory(); }
  vmm::BlockDevice& disk() override { return vm_->disk(); }
  vmm::MissingPages* missing_pages() override { return vm_->missing_pages(); }

 private:
  std::unique_ptr<vmm::Vm> vm_;
  vmm::OutputGate& gate_;
  std::string listen_;
  uint16_t port_;
  const char* who_;
  std::unique_ptr<vmm::LedgerEndpoint> endpoint_;
};

// What `romulus status` answers for a node.
pb::StatusReply NodeStatusReply(const std::string& vm_id, const switchover::Node::Status& s);

// What a node needs besides what it starts with.
struct HostSettings {
  std::string vm_id{};
  pb::SwitchoverConfig switchover{};
  std::string control_socket{};
  std::string snapshot_dir{};  // as the mirror: SIGUSR1 and stopping save the replica there
  std::string ledger_listen{};
  uint16_t ledger_port = 0;
  pb::Platform platform = pb::PLATFORM_UNSPECIFIED;  // what runs (or would run) the VM here
  std::string metrics_listen{};                      // ADDR:PORT for Prometheus metrics ("" none)
  // As the primary: the hardware health monitor and its policy (empty: none), which moves the
  // VM to the mirror when the policy says so.
  pb::HealthConfig health{};
  pb::MigrationConfig migration{};  // how `romulus migrate` moves the VM when it does not say
  // Filled in by the command (identity, key, replication); RunHost adds the switchover pieces
  // and how this host runs a VM.
  switchover::Node::Options node{};
};
// Starts heartbeats and the lease, then the node (`start` makes it from the completed options),
// the control socket, and runs until SIGINT or SIGTERM, or until the VM stops on its own. As
// the mirror it promotes when the peer is silent on every path. Returns the exit code.
using StartNode = std::function<absl::StatusOr<std::unique_ptr<switchover::Node>>(
    const switchover::Node::Options& options)>;
int RunHost(const char* who, HostSettings settings, const sigset_t& signals, StartNode start);

}  // namespace romulus::cli

#endif  // ROMULUS_CLI_HOST_H_
