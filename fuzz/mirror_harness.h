// The mirror target's world, shared with the corpus generator (which runs it to check that its
// seeds commit): a small replica behind a MirrorSession, one connection at a time, as the
// Mirror runs it. Input: a mode byte (MirrorMode), then records, each an op byte (Op) and, for
// kOpFrame, a serialized pb::Frame from the primary.
#ifndef ROMULUS_FUZZ_MIRROR_HARNESS_H_
#define ROMULUS_FUZZ_MIRROR_HARNESS_H_

#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "checkpoint/checkpoint.h"
#include "fuzz/fuzz_util.h"
#include "fuzz/replication_geometry.h"
#include "replicator/mirror_session.h"
#include "vmm/block_device.h"

namespace romulus::fuzz {

// What the first byte of an input makes the host do when the primary hands the VM over.
enum HandoverMode : uint8_t { kNoHandovers = 0, kHandoverResumes = 1, kHandoverFails = 2 };
// The first byte: the hand-over mode, and whether the replica starts out empty (a new mirror:
// a synchronisation sends every page) or seeded with zeros (a restarted mirror or an adopted VM:
// it is compared with the VM first, and mostly claimed as the same, which keeps inputs cheap).
inline std::string MirrorMode(HandoverMode handover, bool seeded) {
  return std::string(1, static_cast<char>(handover + (seeded ? 3 : 0)));
}
inline HandoverMode HandoverOf(uint8_t mode) { return static_cast<HandoverMode>(mode % 3); }
inline bool SeededOf(uint8_t mode) { return mode / 3 % 2 == 1; }

// What a record does (its first byte).
enum Op : uint8_t {
  kOpFrame = 0,       // the rest is a frame from the primary
  kOpReconnect = 1,   // the connection drops; the same primary session connects again
  kOpNewSession = 2,  // the connection drops; a primary of another session connects
};

inline std::string OpRecord(Op op, const pb::Frame* frame = nullptr) {
  return Record(std::string(1, static_cast<char>(op)) +
                (frame ? frame->SerializeAsString() : std::string()));
}

// Where the replica's disk image lives (created, renamed and removed on every input): in memory
// (/dev/shm) where there is one, else in the scratch directory. Removed at exit.
inline const std::string& MemoryDir() {
  static const std::string* dir = [] {
    std::string d = "/dev/shm/romulus-fuzz-XXXXXX";
    if (::mkdtemp(d.data()) == nullptr) return new std::string(ScratchDir());
    auto* kept = new std::string(d);
    std::atexit([] {
      std::error_code ec;
      std::filesystem::remove_all(MemoryDir(), ec);
    });
    return kept;
  }();
  return *dir;
}

class MirrorHarness {
 public:
  // A fresh replica of zeroed memory and disk (the image at a path of this process's own,
  // truncated again each time): inputs are independent.
  MirrorHarness(HandoverMode mode, bool seeded) {
    static const std::string* disk = new std::string(MemoryDir() + "/replica.img");
    disk_path_ = *disk;
    absl::StatusOr<std::unique_ptr<checkpoint::ReplicaStore>> replica;
    if (seeded) {
      // The memory of a stopped VM, mapped shared from a file (as `memory_file` keeps it): one
      // memfd for the process, reopened through /proc for each input and zeroed again. A fresh
      // memfd each time would do, but the first look at all of its pages (the trees a connection
      // starts with) allocates 16 MiB and costs most of a run.
      static const std::string* path = [] {
        int fd = ::memfd_create("romulus-fuzz-replica", MFD_CLOEXEC);  // open until exit
        if (fd < 0 || ::ftruncate(fd, static_cast<off_t>(kFuzzReplicaMemoryBytes)) != 0) {
          std::abort();
        }
        return new std::string("/proc/self/fd/" + std::to_string(fd));
      }();
      auto memory = vmm::GuestMemory::MapFileShared(*path, kFuzzReplicaMemoryBytes, false);
      if (memory.ok()) std::memset((*memory)->data(), 0, kFuzzReplicaMemoryBytes);
      absl::Status s =
          memory.ok() ? vmm::BlockDevice::CreateImage(*disk, kFuzzDiskBytes) : memory.status();
      replica = s.ok() ? checkpoint::ReplicaStore::Adopt(std::move(*memory), *disk) : s;
    } else {
      replica = checkpoint::ReplicaStore::Create(kFuzzReplicaMemoryBytes, *disk, kFuzzDiskBytes);
    }
    if (!replica.ok()) {  // the host, not the input
      std::fprintf(stderr, "mirror harness: %s\n", std::string(replica.status().message()).c_str());
      std::abort();
    }
    replica_ = std::move(*replica);
    if (mode == kHandoverResumes || mode == kHandoverFails) {
      options_.on_handover = [this, mode](uint64_t epoch, const std::string&) -> absl::Status {
        handovers_.push_back(epoch);
        if (mode == kHandoverFails) return absl::InternalError("the host cannot resume it");
        return absl::OkStatus();
      };
    }
  }

  // A primary connects (as the Mirror does once the handshake is done): the roots it is sent.
  absl::StatusOr<pb::Frame> Connect(bool new_session) {
    session_.emplace(replicator::MirrorState{*replica_, replica_mu_, stats_, stats_mu_, options_},
                     "fuzz");
    return session_->Start(new_session);
  }
  // A frame on the current connection. An error drops it (Disconnect).
  absl::StatusOr<std::vector<pb::Frame>> Receive(pb::Frame f) {
    auto replies = session_->Receive(std::move(f));
    if (!replies.ok()) Disconnect();
    return replies;
  }
  void Disconnect() {
    if (session_) session_->End();
    session_.reset();
  }
  bool connected() const { return session_.has_value(); }
  bool handed_over() const { return session_ && session_->handed_over(); }

  checkpoint::ReplicaStore& replica() { return *replica_; }
  const std::string& disk_path() const { return disk_path_; }
  const replicator::Mirror::Stats& stats() const { return stats_; }
  const std::vector<uint64_t>& handovers() const { return handovers_; }

 private:
  std::unique_ptr<checkpoint::ReplicaStore> replica_;
  std::string disk_path_;
  std::mutex replica_mu_, stats_mu_;
  replicator::Mirror::Stats stats_;
  replicator::Mirror::Options options_;
  std::vector<uint64_t> handovers_;  // epochs on_handover was called with
  std::optional<replicator::MirrorSession> session_;
};

}  // namespace romulus::fuzz

#endif  // ROMULUS_FUZZ_MIRROR_HARNESS_H_
