// The primary's side of the epoch protocol, without the connection: the Primary's connection
// manager (replicator.cc) connects, reconnects and backs off, and hands each connection to this
// class; the Channel below only moves frames. It reads beside the mirror's side, MirrorSession
// (mirror_session.h):
//
//   primary (PrimarySession)                        mirror (MirrorSession)
//   Synchronise: tree queries, pre-copy  ─────────▶ answers them, stages the pre-copy stream
//   epoch clock: cut checkpoint k (EpochEngine)
//   Stream: send checkpoint k            ─────────▶ verifies, commits (ReplicaStore)
//   ack reader: release k's outputs      ◀───────── ack k
//   HandOver: notice, last checkpoint,
//             hand-over                  ─────────▶ resumes the VM there, replies
//
// Threads: the epoch clock (rml-epoch, started here) cuts a checkpoint every epoch while a
// connection streams; the connection manager's thread (rml-send) runs Open, Synchronise, Stream
// (which sends) and Close; Stream's ack reader (rml-acks) reads the mirror's frames; HandOver runs
// on its caller's thread. They meet under one mutex, over the explicit state below (Link,
// Migration). Internal to the replicator.
#ifndef ROMULUS_REPLICATOR_PRIMARY_SESSION_H_
#define ROMULUS_REPLICATOR_PRIMARY_SESSION_H_

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>

#include "absl/status/statusor.h"
#include "checkpoint/checkpoint.h"
#include "replicator/channel.h"
#include "replicator/replicator.h"

namespace romulus::replicator {

// A Refusal frame from the mirror: Aborted, with its reason bounded and printable.
absl::Status MirrorRefused(const pb::Refusal& refusal);

class PrimarySession {
 public:
  // What a connection achieved: what the connection manager's reconnect policy goes by.
  struct Outcome {
    bool committed = false;               // the mirror acknowledged a checkpoint on it
    uint64_t mirror_held = 0;             // pages and chunks the mirror held when it synchronised
    bool handed_over = false;             // the VM runs at the mirror now: no reconnecting
    std::optional<absl::Status> refused;  // the mirror said why it ended the connection
  };

  // `options` must outlive the session.
  PrimarySession(checkpoint::EpochEngine& engine, vmm::OutputGate& gate,
                 const Primary::Options& options);
  ~PrimarySession();  // Stop()
  PrimarySession(const PrimarySession&) = delete;
  PrimarySession& operator=(const PrimarySession&) = delete;

  void StartEpochClock();
  // Makes every wait return and shuts the current connection (its calls then fail); ends the
  // epoch clock.
  void Stop();
  bool stopping() const;

  // One connection, on the connection manager's thread, in this order: Open; Synchronise; if
  // that succeeded, Stream; always Close. Synchronise sends the pre-copy stream in batches of
  // `batch_pages`; the full checkpoint the epoch clock then cuts completes it. Stream sends
  // checkpoints until the connection fails (or Stop: Cancelled).
  void Open(std::unique_ptr<Channel> channel, const pb::ReplicaRoots& mirror_roots);
  absl::Status Synchronise(size_t batch_pages);
  absl::Status Stream();
  Outcome Close();

  // The connection manager's view of the pair: a one-line state (logged when it changes); a
  // connection that failed (waits `wait`, or until Stop); the mirror lost (unprotected from now).
  void SetState(std::string state);
  // A connection dropped for a bad frame from the mirror.
  void Rejected();
  void BackOff(std::chrono::milliseconds wait);
  void Unprotected();

  Primary::Stats stats() const;
  absl::StatusOr<Primary::HandoverReport> HandOver(std::chrono::milliseconds timeout,
                                                   const std::function<absl::Status()>& committed,
                                                   const std::string& reason,
                                                   const std::function<absl::Status()>& unanswered);

 private:
  // Where the connection is. Checkpoints are cut only while it streams.
  enum class Link { kNone, kSynchronising, kStreaming };
  // A planned migration's steps, one migration at a time.
  enum class Migration {
    kNone,
    kDraining,        // checkpoints in flight are being acknowledged before the pause
    kLastCheckpoint,  // the epoch clock cuts no more: HandOver takes the last one, VM paused
    kHandedOver,      // the mirror resumed the VM: replication ends
  };

  void EpochClock();
  void Enqueue(std::shared_ptr<const checkpoint::Checkpoint> cp);  // with mu_ held
  absl::StatusOr<MirrorHoldings> CompareWithMirror();
  absl::Status Precopy();  // Synchronise's pre-copy policy
  absl::Status SendLoop();
  void StartAckReader();  // once the primary expects nothing but acks (and a refusal)
  void AckLoop();

  checkpoint::EpochEngine& engine_;
  vmm::OutputGate& gate_;
  const Primary::Options& options_;

  mutable std::mutex mu_;
  std::condition_variable cv_;
  bool stop_ = false;
  Link link_ = Link::kNone;
  Migration migration_ = Migration::kNone;
  bool taking_ = false;       // the epoch clock is cutting a checkpoint
  uint64_t connection_ = 0;   // counts connections
  int64_t acked_epoch_ = -1;  // the last acknowledgement on this connection
  // Requests to the send loop: a hand-over notice (due by notice_until_, or withdrawn when that
  // has passed) and the hand-over itself (once the queue is empty).
  bool send_notice_ = false, send_handover_ = false;
  std::chrono::steady_clock::time_point notice_until_;
  uint64_t handover_epoch_ = 0;
  std::string handover_reason_;
  std::optional<pb::HandoverReply> handover_reply_;
  std::optional<absl::Status> ack_error_;  // the ack reader failed: the connection ends
  std::optional<absl::Status> refused_;    // the mirror's Refusal on this connection
  bool ack_reader_ = false;                // started on this connection
  std::deque<std::shared_ptr<const checkpoint::Checkpoint>> queue_;  // cut, not yet sent
  std::deque<uint64_t> unacked_;  // epochs sent on this connection and not yet acknowledged
  checkpoint::Histogram dirty_pages_per_epoch_ = checkpoint::Histogram::Pages();
  // Protection: whether some mirror commits now, and since when none has.
  bool protected_ = false;
  std::chrono::steady_clock::time_point unprotected_since_ = std::chrono::steady_clock::now();
  bool committed_on_connection_ = false;  // the mirror acknowledged something on this connection
  uint64_t mirror_held_ = 0;              // pages and chunks it held at this synchronisation
  size_t batch_pages_ = kPagesPerBatch;   // the connecting thread's own
  std::unique_ptr<Channel> channel_;      // set and reset by the connecting thread, under mu_
  pb::ReplicaRoots mirror_roots_;         // of the connected mirror's replica
  std::unique_ptr<Dedup> dedup_;          // what the connected mirror holds; the sending thread's
  Primary::Stats stats_;
  std::chrono::steady_clock::time_point sync_start_;
  std::thread epoch_thread_, acks_;
  // When the epoch clock last made a pass (steady clock, ns): the daemon's watchdog proves
  // progress with it. Atomic, so that reading it never waits on a loop that is stuck.
  std::atomic<int64_t> epoch_loop_ns_{std::chrono::steady_clock::now().time_since_epoch().count()};
};

}  // namespace romulus::replicator

#endif  // ROMULUS_REPLICATOR_PRIMARY_SESSION_H_
