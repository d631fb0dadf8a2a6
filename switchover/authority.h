// Authority over a VM: terms and leases, as pure logic. Internal to the switchover library. No
// sockets, threads or clock of its own: the witness (witness.cc) and a node's lease client
// (lease_client.cc) drive it with the messages they receive and the time they read, and the
// tests drive it with messages and a clock of their own, in every interleaving they choose.
//
// The rules:
//  - Every grant of authority over a VM that is not a renewal (a first start, a promotion, a
//    hand-over, a post-copy adoption, a lease taken back, a holder starting to release without a
//    mirror that may hold a replica of its term) is a new term. The witness numbers
//    them, each goes to one node once, and each is made durable before it is answered.
//  - A term "ran" once its holder confirmed it (asked for the lease in it). A new term is granted
//    only to a node whose state (its VM's, or its replica's) is of a term at least as new as the
//    newest that ran: the state of a superseded primary, or a replica fed by one, never runs
//    again. Such a node is told it was superseded.
//  - A lease lasts `lease` from the witness's grant; its holder counts it from when it sent the
//    request, less a margin for the clocks' drift, so it always believes the lease gone first.
//    While one node's lease is live, no other node gets a term, with one exception: a takeover.
//  - A takeover is the promotion of the holder's mirror (its replica of the holder's term) when
//    the holder looks dead. The mirror stopped acknowledging and resumes exactly what it
//    committed, so a holder that releases only what its mirror acknowledged can release nothing
//    the promoted VM lacks: the takeover is granted at once. If the newest request the holder
//    sent in its term said that it releases without a mirror (or said nothing: an older build),
//    its lease ends only when it lapses. A holder releases without a mirror only after the
//    grant of a request that said so, sent after any that said otherwise; a witness that granted
//    a takeover refuses it. (Decide sees each node's requests in the order it sent them: the
//    witness's challenges chain them, and one sent before the last it took is refused.)
#ifndef ROMULUS_SWITCHOVER_AUTHORITY_H_
#define ROMULUS_SWITCHOVER_AUTHORITY_H_

#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "proto/romulus.pb.h"

namespace romulus::switchover {

// The witness's side: every VM's terms and lease.
class TermTable {
 public:
  using Clock = std::chrono::steady_clock;
  struct Record {
    uint64_t term = 0;       // the newest term granted
    uint64_t confirmed = 0;  // the newest term that ran
    std::string holder;      // who holds `term`
    // When `term` was given to its holder because it began releasing without a mirror: the
    // term its VM ran in until then (0 otherwise). Its VM is the newest; its requests of that
    // older term (the reply with the new one lost) count as of `term`.
    uint64_t ran_from = 0;
    bool operator==(const Record&) const = default;
  };
  using Records = std::map<std::string, Record>;  // by VM id
  // Makes `records` durable. A change it fails to record is not made, and not granted.
  using PersistFn = std::function<absl::Status(const Records&)>;
  struct Holder {
    std::string vm_id, node;
    uint64_t term = 0;
    std::chrono::milliseconds remaining{0};
  };

  // `records` as the state file had them; no lease is live, and none is granted for one lease
  // period after `started` (a lease granted before a restart has lapsed by then).
  TermTable(std::chrono::milliseconds lease, size_t max_vms, Records records, PersistFn persist,
            Clock::time_point started);

  // The reply to `request` (ACQUIRE, RELEASE or TRANSFER), and a line for the log ("" none).
  pb::LeaseReply Decide(const pb::LeaseRequest& request, Clock::time_point now, std::string* log);

  std::vector<Holder> holders(Clock::time_point now) const;
  const Records& records() const { return records_; }

 private:
  pb::LeaseReply Acquire(const pb::LeaseRequest& r, Clock::time_point now, std::string* log);
  // Records `next` for `vm` durably, then in memory.
  absl::Status Commit(const std::string& vm, const Record& next);
  bool Live(const std::string& vm, Clock::time_point now) const;

  // Whether `vm`'s holder promised, in its term, to release only what its mirror acknowledged.
  bool HolderReleasesOnlyAcknowledged(const std::string& vm, uint64_t term) const;

  const std::chrono::milliseconds lease_;
  const size_t max_vms_;
  Records records_;
  std::map<std::string, Clock::time_point> expiry_;  // of each VM's live lease
  // Per VM, what the newest request granted to its holder said: (term, releases only what its
  // mirror acknowledged). In memory only: a restarted witness grants nothing for a lease period,
  // and the holder says it in every request.
  std::map<std::string, std::pair<uint64_t, bool>> releases_;
  PersistFn persist_;
  const Clock::time_point started_;
};

// A node's side: what the witness's replies mean for this node. Not thread-safe: the lease
// client calls it under its lock.
class LeaseState {
 public:
  using Clock = std::chrono::steady_clock;
  struct Event {
    bool gained = false;      // the lease is held now and was not before
    bool superseded = false;  // the witness says this node's state was superseded
  };

  // The term of the state this node would run (a mirror's replica's); requests carry the newer
  // of it and the term of this node's own lease.
  void SetStateTerm(uint64_t term) { state_term_ = std::max(state_term_, term); }
  uint64_t request_term() const { return std::max(state_term_, term_); }
  // This node's mirror may have committed checkpoints of `term` (LeaseRequest.mirror_term).
  void SetMirrorTerm(uint64_t term) { mirror_term_ = std::max(mirror_term_, term); }
  uint64_t mirror_term() const { return mirror_term_; }

  // Request `id` (ids grow) was sent, saying whether this node releases without a mirror.
  void Sent(uint64_t id, bool unprotected) {
    if (!unprotected) last_protected_id_ = std::max(last_protected_id_, id);
  }

  // The witness's reply to this node's `op`, sent at `sent_at` saying `unprotected`, while the
  // node `wants` the lease.
  Event OnReply(const pb::LeaseReply& reply, pb::LeaseOp op, bool unprotected, bool wants,
                Clock::time_point sent_at, Clock::time_point now);
  // Released or handed over: not held from `now` on.
  void Drop(Clock::time_point now) { held_until_ = std::min(held_until_, now); }

  // The lease of term() is held.
  bool Held(Clock::time_point now) const { return now < held_until_; }
  // May release outputs without a mirror: the lease of term() is held, and the witness granted a
  // request of that term that said so, sent after the last that said otherwise (the witness
  // grants no takeover while the newest request it took from the holder said so).
  // And in a term newer than any its mirror may hold a replica of: the witness gives a holder
  // whose requests say both a new term.
  bool MayReleaseUnprotected(Clock::time_point now) const {
    return Held(now) && term_ != 0 && term_ > mirror_term_ && unprotected_term_ == term_ &&
           unprotected_id_ > last_protected_id_;
  }
  uint64_t term() const { return term_; }  // of the lease this node holds or last held
  Clock::time_point held_since() const { return held_since_; }
  Clock::time_point held_until() const { return held_until_; }

 private:
  uint64_t term_ = 0, state_term_ = 0, mirror_term_ = 0;
  // The last grant of a request that said it releases without a mirror: its term and id; and
  // the newest request sent that said otherwise.
  uint64_t unprotected_term_ = 0, unprotected_id_ = 0, last_protected_id_ = 0;
  Clock::time_point held_since_{}, held_until_{};
};

// Writes `bytes` to `path` so that a crash leaves either the old file or the new one, whole:
// into a temporary file, fsynced, renamed into place, the directory fsynced.
absl::Status WriteFileDurably(const std::string& path, const std::string& bytes);

}  // namespace romulus::switchover

#endif  // ROMULUS_SWITCHOVER_AUTHORITY_H_
