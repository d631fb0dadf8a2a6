// The mirror's side of one replication connection, without the connection: it takes the
// primary's frames one at a time and says what to send back. The Mirror pumps frames between a
// Channel and a MirrorSession; the fuzz target (fuzz/mirror_fuzz.cc) drives one directly against
// a small replica. Internal to the replicator.
#ifndef ROMULUS_REPLICATOR_MIRROR_SESSION_H_
#define ROMULUS_REPLICATOR_MIRROR_SESSION_H_

#include <mutex>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "checkpoint/checkpoint.h"
#include "replicator/replicator.h"

namespace romulus::replicator {

// The longest a primary's HandoverNotice holds off this host's promotion (a primary that dies in
// a hand-over delays its failover by at most this).
inline constexpr uint64_t kMaxHandoverNoticeMs = 60'000;

// A line to the host's log, when it has one.
inline void Log(const LogFn& log, const std::string& line) {
  if (log) log(line);
}

// Text from the peer, for a log line or a status: printable ASCII, at most kMaxPeerText bytes.
inline constexpr size_t kMaxPeerText = 512;
inline std::string PeerText(absl::string_view text) {
  std::string out;
  for (char c : text.substr(0, kMaxPeerText)) out += (c >= 0x20 && c < 0x7f) ? c : '?';
  return out;
}

// What outlives a connection, owned by the Mirror and shared with each of its sessions.
struct MirrorState {
  checkpoint::ReplicaStore& replica;
  // Held while the replica is read or changed, so that Mirror::WithReplica never sees a
  // checkpoint half applied.
  std::mutex& replica_mu;
  Mirror::Stats& stats;
  std::mutex& stats_mu;
  const Mirror::Options& options;  // on_handover and log
};

class MirrorSession {
 public:
  // `peer` names the primary in log lines.
  MirrorSession(MirrorState state, std::string peer, uint64_t term = 0);

  // The connection's first frame to the primary: the roots of the replica's hash trees. A
  // primary of another session than the last numbers its epochs afresh (`new_session`): the
  // replica then accepts only a full checkpoint next. An error ends the connection (a replica
  // that is unusable refuses every connection).
  absl::StatusOr<pb::Frame> Start(bool new_session);

  // One frame from the primary, and what to send back in order (none, a tree answer, an ack, a
  // hand-over reply). An error drops the connection (a bad frame is counted as rejected); the
  // replica is then as it was before the frame.
  absl::StatusOr<std::vector<pb::Frame>> Receive(pb::Frame frame);

  // The primary's hand-over was accepted: this host runs the VM now. Once the reply is sent the
  // connection ends, and replication with it.
  bool handed_over() const { return handed_over_; }

  // The connection is gone. A synchronisation it did not finish commits nothing, but what of it
  // verified is kept for the next one.
  void End();

 private:
  absl::StatusOr<pb::Frame> AnswerTreeQuery(const pb::TreeQuery& query);
  absl::Status StageSync(const pb::Frame& f);
  pb::Frame AnswerHandover(uint64_t epoch, const std::string& reason);
  // Counts the connection as rejected and logs why.
  absl::Status Reject(absl::Status why);

  MirrorState state_;
  std::string peer_;
  const uint64_t term_;        // the primary's, as its Hello said
  bool comparing_ = true;      // answering tree queries until the primary is done
  uint64_t tree_budget_ = 0;   // hashes still answered on this connection
  bool synchronised_ = false;  // this connection's full checkpoint is committed
  bool handed_over_ = false;
  CheckpointAssembler assembler_;
};

}  // namespace romulus::replicator

#endif  // ROMULUS_REPLICATOR_MIRROR_SESSION_H_
