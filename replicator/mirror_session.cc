#include "replicator/mirror_session.h"

#include <utility>

#include "absl/strings/str_cat.h"

namespace romulus::replicator {

MirrorSession::MirrorSession(MirrorState state, std::string peer, uint64_t term)
    : state_(state),
      peer_(std::move(peer)),
      term_(term),
      assembler_(state.replica.memory_bytes(), state.replica.disk_bytes()) {}

// Tells the primary what the replica holds, as the roots of its hash trees; it then asks about
// the nodes below until it is done, and sends only what differs.
absl::StatusOr<pb::Frame> MirrorSession::Start(bool new_session) {
  std::lock_guard<std::mutex> lock(state_.replica_mu);
  if (!state_.replica.unusable().empty()) {
    return absl::FailedPreconditionError(
        absl::StrCat("the replica is unusable: ", state_.replica.unusable()));
  }
  if (new_session) state_.replica.ExpectFullCheckpoint();
  // The primary's record of what this host holds starts afresh with each connection.
  state_.replica.ResetContentIndex();
  state_.replica.SetBaseImage(state_.options.base_image);
  pb::Frame roots;
  const checkpoint::ReplicaTrees* trees = nullptr;
  auto t = state_.replica.HoldingsTrees();
  if (t.ok()) {
    trees = *t;
    tree_budget_ = TreeQueryBudget(*trees);
  } else if (t.status().code() != absl::StatusCode::kFailedPrecondition) {
    return t.status();  // holds something, but reading it failed
  }
  *roots.mutable_replica_roots() = RootsOf(trees);
  if (const checkpoint::BaseImage* base = state_.replica.base_image()) {
    roots.mutable_replica_roots()->set_base_digest(base->digest());
  }
  return roots;
}

absl::StatusOr<std::vector<pb::Frame>> MirrorSession::Receive(pb::Frame f) {
  if (comparing_) {
    if (!f.has_tree_query()) return absl::DataLossError("expected the primary's tree queries");
    if (f.tree_query().done()) {
      comparing_ = false;
      return std::vector<pb::Frame>{};
    }
    auto answer = AnswerTreeQuery(f.tree_query());
    if (!answer.ok()) return answer.status();
    return std::vector<pb::Frame>{std::move(*answer)};
  }
  {
    std::lock_guard<std::mutex> lock(state_.stats_mu);
    state_.stats.bytes += static_cast<uint64_t>(f.ByteSizeLong()) + 4;
  }
  if (f.has_handover_notice()) {
    auto within = std::chrono::milliseconds(
        std::min<uint64_t>(f.handover_notice().within_ms(), kMaxHandoverNoticeMs));
    std::lock_guard<std::mutex> lock(state_.stats_mu);
    if (within.count() == 0) {
      state_.stats.handover_expected_until.reset();  // withdrawn
    } else {
      state_.stats.handover_expected_until = std::chrono::steady_clock::now() + within;
    }
    return std::vector<pb::Frame>{};
  }
  if (f.has_handover()) {
    pb::Frame reply = AnswerHandover(f.handover().epoch(), f.handover().reason());
    std::lock_guard<std::mutex> lock(state_.stats_mu);
    state_.stats.handover_expected_until.reset();  // answered: no longer expected
    return std::vector<pb::Frame>{std::move(reply)};
  }
  if (f.has_sync_disk() || f.has_same_pages() || (f.has_pages() && f.pages().sync())) {
    if (auto s = StageSync(f); !s.ok()) return Reject(s);
    return std::vector<pb::Frame>{};
  }
  auto cp = assembler_.Add(std::move(f));
  if (!cp.ok()) return Reject(cp.status());
  if (!cp->has_value()) return std::vector<pb::Frame>{};
  absl::Status applied;
  int64_t committed;
  std::string unusable;
  {
    std::lock_guard<std::mutex> lock(state_.replica_mu);
    applied = state_.replica.Apply(**cp);
    committed = state_.replica.committed_epoch();
    unusable = state_.replica.unusable();
  }
  if (!applied.ok()) {
    {
      // A disk that failed mid-commit may have cost the replica its commit (see Apply).
      std::lock_guard<std::mutex> lock(state_.stats_mu);
      state_.stats.committed_epoch = committed;
      state_.stats.unusable = unusable;
    }
    return Reject(applied);
  }
  {
    std::lock_guard<std::mutex> lock(state_.stats_mu);
    state_.stats.checkpoints++;
    state_.stats.committed_epoch = static_cast<int64_t>((*cp)->epoch);
    state_.stats.term = std::max(state_.stats.term, term_);
    if ((*cp)->full) state_.stats.syncing = false;
  }
  if ((*cp)->full) {
    synchronised_ = true;
    Log(state_.options.log,
        absl::StrCat("synchronised: replica replaced by full checkpoint ", (*cp)->epoch));
  }
  pb::Frame ack;
  ack.mutable_ack()->set_epoch((*cp)->epoch);
  ack.mutable_ack()->set_term(term_);
  return std::vector<pb::Frame>{std::move(ack)};
}

void MirrorSession::End() {
  std::lock_guard<std::mutex> lock(state_.replica_mu);
  state_.replica.SuspendSync();
}

absl::StatusOr<pb::Frame> MirrorSession::AnswerTreeQuery(const pb::TreeQuery& query) {
  absl::StatusOr<pb::TreeAnswer> answer;
  {
    std::lock_guard<std::mutex> lock(state_.replica_mu);
    auto trees = state_.replica.HoldingsTrees();
    answer = trees.ok() ? replicator::AnswerTreeQuery(**trees, query, tree_budget_)
                        : absl::DataLossError("a tree query, but this replica holds nothing");
  }
  if (!answer.ok()) return Reject(answer.status());
  pb::Frame reply;
  *reply.mutable_tree_answer() = std::move(*answer);
  return reply;
}

// A pre-copy frame: decoded, checked and written to the replica's staging copy. Pages and chunks
// the primary says are the same come from the committed replica, checked by hash.
absl::Status MirrorSession::StageSync(const pb::Frame& f) {
  {
    std::lock_guard<std::mutex> lock(state_.stats_mu);
    state_.stats.syncing = true;
  }
  checkpoint::ReplicaStore& replica = state_.replica;
  std::lock_guard<std::mutex> lock(state_.replica_mu);
  if (f.has_pages()) {
    auto run = DecodePageBatch(f.pages(), replica.memory_bytes() / vmm::kPageSize);
    if (!run.ok()) return run.status();
    return replica.StageSyncPages(*run);
  }
  if (f.has_same_pages()) {
    const pb::SamePages& same = f.same_pages();
    if (same.nodes_size() != same.hashes_size()) {
      return absl::DataLossError("same-pages frame with inconsistent counts");
    }
    for (int i = 0; i < same.nodes_size(); i++) {
      if (auto s = replica.StageSamePages(same.level(), same.nodes(i), same.hashes(i)); !s.ok()) {
        return s;
      }
    }
    return absl::OkStatus();
  }
  const pb::SyncDisk& d = f.sync_disk();
  auto data = SyncDiskData(d);
  if (!data.ok()) return data.status();
  if (d.same()) return replica.StageSameDisk(d.offset(), d.length(), d.hash());
  return replica.StageSyncDisk(d.offset(), d.length(), data->has_value() ? &**data : nullptr,
                               d.hash());
}

// The primary asks this host to resume the VM from `epoch`. It must be what this connection
// committed last; the host resumes it (on_handover) and the answer says whether it runs here.
pb::Frame MirrorSession::AnswerHandover(uint64_t epoch, const std::string& reason) {
  const Mirror::Options& options = state_.options;
  std::string why_moved = PeerText(reason);
  absl::Status why;
  int64_t committed;
  {
    std::lock_guard<std::mutex> lock(state_.replica_mu);
    committed = state_.replica.committed_epoch();
  }
  if (!options.on_handover) {
    why = absl::FailedPreconditionError("this mirror takes no hand-overs");
  } else if (!synchronised_ || committed != static_cast<int64_t>(epoch)) {
    why = absl::FailedPreconditionError(
        absl::StrCat("asked to resume epoch ", epoch, " but the replica's last commit on this ",
                     "connection is ", synchronised_ ? absl::StrCat(committed) : "none"));
  } else {
    Log(options.log, absl::StrCat("primary hands the VM over at epoch ", epoch,
                                  why_moved.empty() ? "" : absl::StrCat(" (", why_moved, ")")));
    why = options.on_handover(epoch, why_moved);
  }
  handed_over_ = why.ok();
  if (handed_over_) {
    std::lock_guard<std::mutex> lock(state_.stats_mu);
    state_.stats.handed_over = true;
  } else {
    Log(options.log, absl::StrCat("hand-over refused: ", why.message()));
  }
  pb::Frame reply;
  reply.mutable_handover_reply()->set_epoch(epoch);
  reply.mutable_handover_reply()->set_resumed(handed_over_);
  if (!handed_over_) reply.mutable_handover_reply()->set_error(std::string(why.message()));
  return reply;
}

absl::Status MirrorSession::Reject(absl::Status why) {
  {
    std::lock_guard<std::mutex> lock(state_.stats_mu);
    state_.stats.rejected++;
  }
  Log(state_.options.log, absl::StrCat("dropping primary ", peer_, ": ", why.message()));
  return why;
}

}  // namespace romulus::replicator
