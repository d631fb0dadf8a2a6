// romulus primary and romulus mirror: one host of a protected VM each, differing only in what
// the host starts as. Roles swap from there: a migration makes the primary the mirror of the
// new one, a promotion or a hand-over makes the mirror the primary.
#include <sys/stat.h>

#include <cstdio>
#include <filesystem>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "checkpoint/checkpoint.h"
#include "cli/commands.h"
#include "cli/config.h"
#include "cli/host.h"
#include "cli/ledger_client.h"
#include "cli/signals.h"
#include "vmm/vmm.h"

namespace romulus::cli {
namespace {

rml_pattern PatternOf(const std::string& p) {
  if (p == "sequential") return RML_PATTERN_SEQUENTIAL;
  if (p == "hotcold") return RML_PATTERN_HOTCOLD;
  return RML_PATTERN_UNIFORM;
}

// "HOST:PORT", checked by the config loader.
void SplitHostPort(const std::string& s, std::string* host, uint16_t* port) {
  ParseHostPort(s, host, port).IgnoreError();
}

// A failed primary returning as the mirror: the guest memory its monitor left in its
// memory_file and its disk image (replica_disk) become the replica, uncommitted (not
// promotable) until the new primary's synchronisation, which sends only what differs, commits.
// nullptr: nothing to seed from (or it does not fit; it says why).
absl::StatusOr<std::unique_ptr<checkpoint::ReplicaStore>> SeedFromMemoryFile(
    const pb::MirrorConfig& c) {
  if (c.seed_memory_file().empty() || !std::filesystem::exists(c.seed_memory_file())) {
    return nullptr;
  }
  auto no = [&](absl::string_view why) {
    std::printf("romulus mirror: not seeding from %s: %.*s\n", c.seed_memory_file().c_str(),
                static_cast<int>(why.size()), why.data());
    return nullptr;
  };
  std::error_code ec;
  if (std::filesystem::file_size(c.replica_disk(), ec) != c.disk_mib() << 20 || ec) {
    return no(absl::StrCat("replica_disk ", c.replica_disk(), " is not a disk image of ",
                           c.disk_mib(), " MiB"));
  }
  auto memory = vmm::GuestMemory::MapFileShared(c.seed_memory_file(), c.memory_mib() << 20,
                                                /*fresh=*/false);
  if (!memory.ok()) return no(memory.status().message());
  auto replica = checkpoint::ReplicaStore::Adopt(std::move(*memory), c.replica_disk());
  if (!replica.ok()) return no(replica.status().message());
  std::printf(
      "romulus mirror: replica seeded from the memory file %s and disk %s; the next "
      "synchronisation sends only what differs\n",
      c.seed_memory_file().c_str(), c.replica_disk().c_str());
  return replica;
}

// The replica a mirror starts with: seeded from a failed primary's memory file, or from the
// snapshot this mirror saved when it last stopped, or empty.
absl::StatusOr<std::unique_ptr<checkpoint::ReplicaStore>> MirrorReplica(const pb::MirrorConfig& c) {
  auto replica = SeedFromMemoryFile(c);
  if (replica.ok() && *replica != nullptr) return replica;
  replica =
      checkpoint::ReplicaStore::Create(c.memory_mib() << 20, c.replica_disk(), c.disk_mib() << 20);
  if (!replica.ok() || c.snapshot_dir().empty() || !std::filesystem::exists(c.snapshot_dir())) {
    return replica;
  }
  // The primary's resynchronisation then sends only what differs. The replica is not
  // promotable until that synchronisation commits.
  if (auto s = (*replica)->Seed(c.snapshot_dir()); s.ok()) {
    std::printf(
        "romulus mirror: replica seeded from %s; the next synchronisation sends only what "
        "differs\n",
        c.snapshot_dir().c_str());
  } else {
    std::printf("romulus mirror: not seeding from %s: %s\n", c.snapshot_dir().c_str(),
                std::string(s.message()).c_str());
  }
  return replica;
}

}  // namespace

int PrimaryCommand(int argc, char** argv) {
  std::string path, unprotected_command;
  if (int rc = ConfigOnly(
          "romulus primary --config FILE",
          "Runs the reference guest and replicates it, every epoch, to the mirror named in "
          "FILE.\nLedger answers leave only once the mirror has committed their epoch (unless\n"
          "run_unprotected is set and no mirror is connected). With a `switchover` block it "
          "sends\nheartbeats on every path; with a witness it starts the VM only once it holds "
          "the\nlease, and pauses the VM and holds every output whenever the lease lapses.\n"
          "`romulus migrate` hands the VM to the mirror; with replication_port set, this host\n"
          "then becomes the mirror of the new primary, seeded with its own memory and disk.",
          argc, argv, &path, &unprotected_command);
      rc >= 0) {
    return rc;
  }
  auto c = LoadPrimaryConfig(path);
  if (!c.ok()) return Fail("primary", c.status());
  if (!unprotected_command.empty()) {
    c->mutable_switchover()->set_unprotected_command(unprotected_command);
  }
  auto key = replicator::ReadKeyFile(c->psk_file());
  if (!key.ok()) return Fail("primary", key.status());
  auto platform = vmm::ChoosePlatform(*vmm::ParsePlatform(c->platform()));
  if (!platform.ok()) return Fail("primary", platform.status());
  std::printf("romulus primary: platform %s\n", std::string(vmm::PlatformName(*platform)).c_str());
  std::fflush(stdout);
  sigset_t signals = TakeSignals();
  vmm::VmConfig vc;
  vc.platform = *platform;
  vc.memory_bytes = c->memory_mib() << 20;
  vc.disk_path = c->disk();
  vc.memory_path = c->memory_file();
  vc.guest_image_path = c->guest_image();
  vc.workload.working_set_pages = c->workload().working_set_pages();
  vc.workload.write_rate = c->workload().write_rate();
  vc.workload.pattern = PatternOf(c->workload().pattern());
  vc.progress_ms = 0;
  vc.console = GuestConsole("primary");
  if (auto s = vmm::ValidateVmConfig(vc); !s.ok()) return Fail("primary", s);
  struct stat st;
  if (::stat(vc.disk_path.c_str(), &st) != 0) {
    if (auto s = vmm::BlockDevice::CreateImage(vc.disk_path, c->disk_mib() << 20); !s.ok())
      return Fail("primary", s);
  }
  HostSettings h{.vm_id = c->vm_id(),
                 .switchover = c->switchover(),
                 .control_socket = c->control_socket(),
                 .ledger_listen = c->ledger_listen(),
                 .ledger_port = static_cast<uint16_t>(c->ledger_port()),
                 .platform = *platform};
  switchover::Node::Options& o = h.node;
  h.metrics_listen = c->metrics_listen();
  h.health = c->health();
  h.migration = c->migration();
  o.identity = {c->vm_id(), vc.memory_bytes, c->disk_mib() << 20, *platform};
  o.key = *key;
  o.listen = c->replication_listen();
  o.port = static_cast<uint16_t>(c->replication_port());
  SplitHostPort(c->mirror(), &o.peer_host, &o.peer_port);
  for (const std::string& path : c->mirror_path()) {
    SplitHostPort(path, &o.peer_paths.emplace_back().host, &o.peer_paths.back().port);
  }
  o.listen_paths = {c->replication_listen_path().begin(), c->replication_listen_path().end()};
  o.epoch = std::chrono::milliseconds(c->epoch_ms());
  o.compression = *replicator::ParseCompression(c->compression());
  o.protection = *replicator::ParseEncryption(c->encryption());
  o.max_in_flight_bytes = c->max_in_flight_mib() << 20;
  o.run_unprotected = c->run_unprotected();
  o.disk_path = c->disk();
  if (!c->base_image().empty()) {
    auto base = checkpoint::BaseImage::Open(c->base_image(), vc.memory_bytes);
    if (!base.ok()) return Fail("primary", base.status());
    o.base_image = std::move(*base);
  }
  return RunHost(
      "primary", std::move(h), signals,
      [&](const switchover::Node::Options& o) -> absl::StatusOr<std::unique_ptr<switchover::Node>> {
        // With a witness this host runs the VM only while it holds the lease, and only from
        // files no newer term superseded (the term they belong to is recorded beside the disk).
        // And never afresh over files that ran in a term: the VM's memory went with the process
        // that ran it, so a VM booted again over its disk would not hold what it acknowledged,
        // even in this host's own term (the nemesis found it: a promoted primary killed while
        // its mirror was down came back with an empty ledger).
        if (o.lease) {
          uint64_t files_term = switchover::ReadTermFile(c->disk());
          if (files_term != 0) {
            return absl::FailedPreconditionError(absl::StrCat(
                "not booting the VM afresh over ", c->disk(), ": it ran in term ", files_term,
                ", and what it acknowledged went with the process that ran it. Start this host "
                "as the mirror (romulus mirror) of the host that runs the VM to rejoin; to start "
                "the VM from nothing, remove ",
                c->disk(), ".term"));
          }
          if (auto s = o.lease->AcquireWithin(std::chrono::milliseconds(3000)); !s.ok()) {
            if (absl::StrContains(s.message(), "superseded")) {
              return absl::FailedPreconditionError(absl::StrCat(
                  "not booting the VM afresh: it has run (", s.message(),
                  "). Start this host as the mirror (romulus mirror) of the host that runs the VM "
                  "to rejoin"));
            }
            return absl::FailedPreconditionError(
                absl::StrCat("not starting the VM without the lease: ", s.message()));
          }
        }
        // Ledger answers and console lines leave through the gate.
        auto gate = std::make_unique<vmm::OutputGate>();
        vc.output_gate = gate.get();
        auto vm = vmm::Vm::Boot(vc);
        if (!vm.ok()) return vm.status();
        auto ledger = std::make_unique<LedgerVm>(std::move(*vm), *gate, c->ledger_listen(),
                                                 c->ledger_port(), "primary");
        auto node = switchover::Node::StartPrimary(std::move(gate), std::move(ledger), o);
        if (node.ok()) {
          std::printf("romulus primary: VM '%s' replicating to %s every %u ms\n",
                      c->vm_id().c_str(), c->mirror().c_str(), c->epoch_ms());
          std::fflush(stdout);
        }
        return node;
      });
}

int MirrorCommand(int argc, char** argv) {
  std::string path, unprotected_command;
  if (int rc = ConfigOnly(
          "romulus mirror --config FILE",
          "Holds the replica of the primary's VM: receives each checkpoint, verifies it and "
          "commits it.\nSIGUSR1 (and stopping) saves the committed replica to snapshot_dir, "
          "which\n`romulus vm --restore-from` resumes. With `switchover` heartbeat paths it "
          "watches\nthe primary and, when every path has been silent past the timeout, resumes "
          "the\nreplica as the primary, once the witness's lease (or the fencing command) "
          "allows.\nAs the primary (promoted, or handed the VM) it replicates to replicate_to, "
          "where\nthe other host returns as the mirror.",
          argc, argv, &path, &unprotected_command);
      rc >= 0) {
    return rc;
  }
  auto c = LoadMirrorConfig(path);
  if (!c.ok()) return Fail("mirror", c.status());
  if (!unprotected_command.empty()) {
    c->mutable_switchover()->set_unprotected_command(unprotected_command);
  }
  auto key = replicator::ReadKeyFile(c->psk_file());
  if (!key.ok()) return Fail("mirror", key.status());
  // The platform a promotion would run the VM on; a primary on another platform is refused when
  // it connects. None here at all: the mirror still holds the replica, and says it cannot resume.
  auto requested = *vmm::ParsePlatform(c->platform());
  auto chosen = vmm::ChoosePlatform(requested);
  pb::Platform platform = chosen.ok()                             ? *chosen
                          : requested != pb::PLATFORM_UNSPECIFIED ? requested
                                                                  : pb::PROCESS;
  std::printf(
      "romulus mirror: platform %s%s\n", std::string(vmm::PlatformName(platform)).c_str(),
      chosen.ok()
          ? ""
          : absl::StrCat(" (cannot run VMs here: ", chosen.status().message(), ")").c_str());
  std::fflush(stdout);
  sigset_t signals = TakeSignals();
  auto replica = MirrorReplica(*c);
  if (!replica.ok()) return Fail("mirror", replica.status());
  HostSettings h{.vm_id = c->vm_id(),
                 .switchover = c->switchover(),
                 .control_socket = c->control_socket(),
                 .snapshot_dir = c->snapshot_dir(),
                 .ledger_listen = c->ledger_listen(),
                 .ledger_port = static_cast<uint16_t>(c->ledger_port()),
                 .platform = platform};
  switchover::Node::Options& o = h.node;
  h.metrics_listen = c->metrics_listen();
  h.health = c->health();
  h.migration = c->migration();
  o.identity = {c->vm_id(), c->memory_mib() << 20, c->disk_mib() << 20, platform};
  o.key = *key;
  o.listen = c->listen();
  o.port = static_cast<uint16_t>(c->port());
  if (!c->replicate_to().empty()) SplitHostPort(c->replicate_to(), &o.peer_host, &o.peer_port);
  for (const std::string& path : c->replicate_to_path()) {
    SplitHostPort(path, &o.peer_paths.emplace_back().host, &o.peer_paths.back().port);
  }
  o.listen_paths = {c->listen_path().begin(), c->listen_path().end()};
  o.epoch = std::chrono::milliseconds(c->epoch_ms());
  o.compression = *replicator::ParseCompression(c->compression());
  o.protection = *replicator::ParseEncryption(c->encryption());
  if (!c->base_image().empty()) {
    auto base = checkpoint::BaseImage::Open(c->base_image(), c->memory_mib() << 20);
    if (!base.ok()) return Fail("mirror", base.status());
    o.base_image = std::move(*base);
  }
  return RunHost(
      "mirror", std::move(h), signals,
      [&](const switchover::Node::Options& o) -> absl::StatusOr<std::unique_ptr<switchover::Node>> {
        auto node = switchover::Node::StartMirror(std::move(*replica), o);
        if (node.ok()) {
          std::printf("romulus mirror: waiting for the primary of '%s' on %s:%d\n",
                      c->vm_id().c_str(), c->listen().c_str(), (*node)->status().port);
          std::fflush(stdout);
        }
        return node;
      });
}

}  // namespace romulus::cli
