// Replication over TCP: the primary streams each epoch's checkpoint to the mirror, which
// verifies and commits it and acknowledges it; the acknowledgement releases the epoch's outputs.
// Both sides prove knowledge of a pre-shared key (HMAC challenge both ways) before anything else
// is accepted; every frame from the peer is bounded and checked.
#ifndef ROMULUS_REPLICATOR_REPLICATOR_H_
#define ROMULUS_REPLICATOR_REPLICATOR_H_

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "checkpoint/checkpoint.h"
#include "proto/romulus.pb.h"

namespace romulus::replicator {

inline constexpr uint32_t kProtocolVersion = 1;
inline constexpr uint32_t kMaxFrameBytes = 4u << 20;
inline constexpr size_t kPagesPerBatch = 256;  // 1 MiB of pages per frame

// What both ends must agree on before replicating.
struct Identity {
  std::string vm_id;
  uint64_t memory_bytes = 0;
  uint64_t disk_bytes = 0;
};

using LogFn = std::function<void(absl::string_view line)>;

// Reads a pre-shared key: a file of 16 to 4096 bytes (trailing newlines are not part of it).
absl::StatusOr<std::string> ReadKeyFile(const std::string& path);

// The frames that carry one checkpoint: page batches, disk-write batches, then the trailer.
std::vector<pb::Frame> CheckpointFrames(const checkpoint::Checkpoint& c);

// Collects the frames of one checkpoint from an untrusted peer, checking every count and size
// against the replica's geometry. Page contents and the digest are checked by ReplicaStore.
class CheckpointAssembler {
 public:
  CheckpointAssembler(uint64_t memory_bytes, uint64_t disk_bytes)
      : memory_pages_(memory_bytes / 4096), disk_bytes_(disk_bytes) {}
  // Returns the checkpoint once its trailer arrives, nullopt before; an error for a bad frame.
  absl::StatusOr<std::optional<checkpoint::Checkpoint>> Add(pb::Frame frame);

 private:
  uint64_t memory_pages_, disk_bytes_;
  bool started_ = false;
  uint64_t disk_bytes_received_ = 0;
  checkpoint::Checkpoint cp_;
};

class Mirror {
 public:
  struct Options {
    Identity identity;
    std::string key;
    std::string listen = "127.0.0.1";
    uint16_t port = 0;  // 0: any free port
    std::chrono::milliseconds peer_timeout{5000};
    LogFn log;
  };
  struct Stats {
    uint64_t connections = 0;
    uint64_t checkpoints = 0;
    uint64_t bytes = 0;
    uint64_t rejected = 0;  // connections dropped for a bad frame, key or checkpoint
    int64_t committed_epoch = -1;
    bool connected = false;
  };
  static absl::StatusOr<std::unique_ptr<Mirror>> Start(checkpoint::ReplicaStore& replica,
                                                       Options options);
  virtual ~Mirror() = default;
  virtual uint16_t port() const = 0;
  virtual Stats stats() const = 0;
  // Runs `fn` while no checkpoint is being applied (to save a snapshot of the replica).
  virtual void WithReplica(const std::function<void(checkpoint::ReplicaStore&)>& fn) = 0;
};

class Primary {
 public:
  struct Options {
    Identity identity;
    std::string key;
    std::string mirror_host = "127.0.0.1";
    uint16_t mirror_port = 0;
    std::chrono::milliseconds epoch{25};
    std::chrono::milliseconds peer_timeout{5000};
    bool run_unprotected = false;  // release outputs while no mirror is connected
    LogFn log;
  };
  struct Stats {
    bool connected = false;
    uint64_t checkpoints = 0;
    uint64_t acked = 0;
    uint64_t bytes_sent = 0;
    uint64_t resyncs = 0;
    uint64_t dirty_pages = 0;  // in checkpoints sent, full copies excluded
    uint64_t held_outputs = 0;
    uint64_t lag_epochs = 0;       // checkpoints taken but not yet acknowledged
    std::vector<double> pause_ms;  // recent pauses
    std::string state;             // one line: what the primary is doing or waiting for
  };
  // The VM must be running. Starts the epoch clock and the connection to the mirror.
  static absl::StatusOr<std::unique_ptr<Primary>> Start(checkpoint::EpochEngine& engine,
                                                        vmm::OutputGate& gate, Options options);
  virtual ~Primary() = default;
  virtual Stats stats() const = 0;
};

}  // namespace romulus::replicator

#endif  // ROMULUS_REPLICATOR_REPLICATOR_H_
