#include "replicator/primary_session.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "replicator/mirror_session.h"  // Log
#include "vmm/sys.h"

namespace romulus::replicator {
namespace {

// The send loop sends a keepalive frame when it has sent nothing for this long.
constexpr std::chrono::milliseconds kKeepalive{10};

using checkpoint::Checkpoint;

}  // namespace

absl::Status MirrorRefused(const pb::Refusal& refusal) {
  return absl::AbortedError(absl::StrCat("mirror refused: ", PeerText(refusal.reason())));
}

PrimarySession::PrimarySession(checkpoint::EpochEngine& engine, vmm::OutputGate& gate,
                               const Primary::Options& options)
    : engine_(engine), gate_(gate), options_(options) {}

PrimarySession::~PrimarySession() { Stop(); }

void PrimarySession::StartEpochClock() {
  epoch_thread_ = std::thread([this] {
    vmm::NameThread("rml-epoch");
    EpochClock();
  });
}

void PrimarySession::Stop() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
    if (channel_) channel_->Shutdown();
  }
  cv_.notify_all();
  if (epoch_thread_.joinable()) epoch_thread_.join();
}

bool PrimarySession::stopping() const {
  std::lock_guard<std::mutex> lock(mu_);
  return stop_;
}

void PrimarySession::SetState(std::string state) {
  std::lock_guard<std::mutex> lock(mu_);
  if (state != stats_.state) {
    stats_.state = state;
    Log(options_.log, state);
  }
}

void PrimarySession::Rejected() {
  std::lock_guard<std::mutex> lock(mu_);
  stats_.rejected++;
}

void PrimarySession::BackOff(std::chrono::milliseconds wait) {
  std::unique_lock<std::mutex> lock(mu_);
  stats_.failed_connections++;
  cv_.wait_for(lock, wait, [this] { return stop_; });
}

void PrimarySession::Unprotected() {
  std::lock_guard<std::mutex> lock(mu_);
  if (protected_) {
    protected_ = false;
    unprotected_since_ = std::chrono::steady_clock::now();
    stats_.failed_connections = 0;
  }
}

Primary::Stats PrimarySession::stats() const {
  std::lock_guard<std::mutex> lock(mu_);
  Primary::Stats s = stats_;
  s.connected = link_ == Link::kStreaming;
  if (s.sync.active) {
    s.sync.seconds =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - sync_start_).count();
  }
  if (!protected_) {
    s.unprotected_seconds =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - unprotected_since_)
            .count();
  }
  if (channel_) s.paths = channel_->paths();
  s.held_outputs = gate_.held();
  s.epoch_loop_at = std::chrono::steady_clock::time_point(
      std::chrono::steady_clock::duration(epoch_loop_ns_.load()));
  s.pause_seconds = engine_.pause_seconds();
  s.commit_seconds = engine_.commit_seconds();
  s.dirty_pages_per_epoch = dirty_pages_per_epoch_.snapshot();
  auto e = engine_.stats();
  s.lag_epochs = e.epochs > e.acknowledged ? e.epochs - e.acknowledged : 0;
  return s;
}

void PrimarySession::Open(std::unique_ptr<Channel> channel, const pb::ReplicaRoots& mirror_roots) {
  mirror_roots_ = mirror_roots;
  dedup_ = std::make_unique<Dedup>(options_.identity.memory_bytes / vmm::kPageSize);
  if (options_.base_image && mirror_roots.base_digest() == options_.base_image->digest()) {
    dedup_->base = options_.base_image.get();
  }
  engine_.Restart();  // the first checkpoint on a connection is full
  {
    std::lock_guard<std::mutex> lock(mu_);
    channel_ = std::move(channel);
    link_ = Link::kSynchronising;
    queue_.clear();
    unacked_.clear();
    committed_on_connection_ = false;
    mirror_held_ = 0;
    ack_error_.reset();  // a failure of the previous connection's ack reader is history
    refused_.reset();
    ack_reader_ = false;
    acked_epoch_ = -1;
    connection_++;
    stats_.resyncs++;
    stats_.peer = channel_->peer();
    stats_.protection = channel_->protection();
  }
  SetState(absl::StrCat("synchronising with ", channel_->peer(),
                        options_.run_unprotected ? ": running UNPROTECTED until it commits"
                                                 : ": outputs held until it commits"));
}

absl::Status PrimarySession::Synchronise(size_t batch_pages) {
  batch_pages_ = batch_pages;
  uint64_t before_sync = channel_->bytes_sent();
  absl::Status why = Precopy();
  std::lock_guard<std::mutex> lock(mu_);  // also what a synchronisation that failed sent
  stats_.wire.resync += channel_->bytes_sent() - before_sync;
  return why;
}

absl::Status PrimarySession::Stream() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    link_ = Link::kStreaming;
    cv_.notify_all();
  }
  StartAckReader();
  return SendLoop();
}

// From the end of the tree comparison on, the mirror sends only acks, or a refusal: read at
// once, also while the pre-copy stream is still being sent, so that a mirror that refuses it
// (say, its disk is full) is heard rather than found gone by a send that fails.
void PrimarySession::StartAckReader() {
  std::lock_guard<std::mutex> lock(mu_);
  if (ack_reader_) return;
  ack_reader_ = true;
  acks_ = std::thread([this] {
    vmm::NameThread("rml-acks");
    AckLoop();
  });
}

PrimarySession::Outcome PrimarySession::Close() {
  channel_->Shutdown();
  if (acks_.joinable()) acks_.join();
  {
    std::lock_guard<std::mutex> lock(mu_);
    link_ = Link::kNone;
    stats_.sync.active = false;
    queue_.clear();
    channel_.reset();
  }
  engine_.Restart();
  std::lock_guard<std::mutex> lock(mu_);
  return {.committed = committed_on_connection_,
          .mirror_held = mirror_held_,
          .handed_over = migration_ == Migration::kHandedOver,
          .refused = refused_};
}

// Cuts a checkpoint every epoch while a connection streams and queues it for the send loop.
void PrimarySession::EpochClock() {
  auto next = std::chrono::steady_clock::now();
  std::unique_lock<std::mutex> lock(mu_);
  while (!stop_) {
    next += options_.epoch;
    auto now = std::chrono::steady_clock::now();
    if (next < now) next = now;  // a stretched epoch: start the next one now
    cv_.wait_until(lock, next, [this] { return stop_; });
    epoch_loop_ns_ = std::chrono::steady_clock::now().time_since_epoch().count();
    if (stop_ || link_ != Link::kStreaming || migration_ >= Migration::kLastCheckpoint) continue;
    taking_ = true;
    lock.unlock();
    auto cp = engine_.TakeCheckpoint(std::chrono::milliseconds(1000));
    lock.lock();
    taking_ = false;
    cv_.notify_all();
    if (!cp.ok()) continue;  // budget spent (mirror slow) or connection restarted: retry
    Enqueue(std::move(*cp));
  }
}

// A checkpoint just taken: counted, and queued for the send loop.
void PrimarySession::Enqueue(std::shared_ptr<const Checkpoint> cp) {
  stats_.checkpoints++;
  if (!cp->full) {
    stats_.dirty_pages += cp->gfns.size();
    dirty_pages_per_epoch_.Observe(static_cast<double>(cp->gfns.size()));
  }
  stats_.pause_ms.push_back(engine_.stats().last_pause_ms);
  if (stats_.pause_ms.size() > 2000)
    stats_.pause_ms.erase(stats_.pause_ms.begin(), stats_.pause_ms.begin() + 1000);
  queue_.push_back(std::move(cp));
  cv_.notify_all();
}

// Finds out what the mirror's replica holds, comparing its hash trees with the VM's (hashed
// now, after BeginSync), and sends the pages it holds as such: they are not sent again.
absl::StatusOr<MirrorHoldings> PrimarySession::CompareWithMirror() {
  auto own = engine_.SyncTrees();
  if (!own.ok()) return own.status();
  auto ask = [this](const pb::TreeQuery& q) -> absl::StatusOr<pb::TreeAnswer> {
    pb::Frame f;
    *f.mutable_tree_query() = q;
    if (auto s = channel_->Send(f); !s.ok()) return s;
    auto reply = channel_->Receive();
    if (!reply.ok()) return reply.status();
    if (reply->has_refusal()) return MirrorRefused(reply->refusal());
    if (!reply->has_tree_answer()) return absl::DataLossError("expected a tree answer");
    return std::move(*reply->mutable_tree_answer());
  };
  auto holdings = CompareTrees(*own, mirror_roots_, ask);
  if (!holdings.ok()) return holdings.status();
  pb::Frame done;
  done.mutable_tree_query()->set_done(true);
  if (auto s = channel_->Send(done); !s.ok()) return s;
  for (const pb::Frame& f : SamePagesFrames(own->pages, *holdings)) {
    for (uint64_t node : f.same_pages().nodes()) {
      engine_.SkipSyncPages(own->pages, f.same_pages().level(), node);
    }
    if (auto s = channel_->Send(f); !s.ok()) return s;
  }
  return holdings;
}

// Sends memory and disk while the VM runs: first everything, then rounds of the pages written
// meanwhile, until what is left fits an epoch. The full checkpoint that the epoch clock cuts
// next carries the rest and commits the whole synchronisation at the mirror.
absl::Status PrimarySession::Precopy() {
  auto t0 = std::chrono::steady_clock::now();
  uint64_t wire0 = channel_->bytes_sent();
  auto update = [&](uint64_t done, uint64_t total, uint32_t round) {
    std::lock_guard<std::mutex> lock(mu_);
    stats_.sync.done_bytes = done;
    stats_.sync.total_bytes = total;
    stats_.sync.round = round;
    stats_.sync.wire_bytes = channel_->bytes_sent() - wire0;
    if (stop_) return absl::CancelledError("stopping");
    if (ack_error_) return *std::exchange(ack_error_, std::nullopt);
    return absl::OkStatus();
  };
  {
    std::lock_guard<std::mutex> lock(mu_);
    stats_.sync = Primary::SyncProgress{.active = true};
    sync_start_ = t0;
  }
  if (auto s = engine_.BeginSync(); !s.ok()) return s;
  auto holdings = CompareWithMirror();
  if (!holdings.ok()) return holdings.status();
  StartAckReader();
  uint64_t total = options_.identity.memory_bytes + options_.identity.disk_bytes;
  uint64_t unchanged = holdings->same_page_count * vmm::kPageSize;  // already at the mirror
  {
    std::lock_guard<std::mutex> lock(mu_);
    mirror_held_ = holdings->same_page_count + holdings->same_chunk_count;
  }
  uint64_t done = unchanged;
  for (;;) {
    auto chunk = engine_.NextSyncDisk();
    if (!chunk.ok()) return chunk.status();
    if (!chunk->has_value()) break;
    pb::Frame f = SyncDiskFrame(**chunk, &holdings->chunks, options_.compression);
    if (auto s = channel_->Send(f); !s.ok()) return s;
    done += (*chunk)->data.size();
    if (f.sync_disk().same()) unchanged += (*chunk)->data.size();
    if (auto s = update(done, total, 0); !s.ok()) return s;
  }
  uint64_t pending = options_.identity.memory_bytes / vmm::kPageSize, previous = ~0ull;
  uint32_t round = 0;
  for (;; round++) {
    for (;;) {
      checkpoint::PageRun run = engine_.NextSyncPages(batch_pages_);
      if (run.gfns.empty()) break;
      pb::Frame f =
          PageBatchFrame(0, true, run, 0, run.gfns.size(), options_.compression, dedup_.get());
      if (auto s = channel_->Send(f); !s.ok()) return s;
      done += run.gfns.size() * vmm::kPageSize;
      {
        std::lock_guard<std::mutex> lock(mu_);
        stats_.sync.deduplicated_pages = dedup_->deduplicated;
        stats_.sync.base_pages = dedup_->from_base;
      }
      if (auto s = update(done, total, round); !s.ok()) return s;
    }
    previous = pending;
    auto left = engine_.RefreshSync();
    if (!left.ok()) return left.status();
    pending = *left;
    double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    double per_epoch = static_cast<double>(done) / std::max(elapsed, 1e-3) *
                       std::chrono::duration<double>(options_.epoch).count();
    if (static_cast<double>(pending * vmm::kPageSize) <= per_epoch || pending >= previous ||
        round + 1 >= options_.max_sync_rounds) {
      break;
    }
    total += pending * vmm::kPageSize;
  }
  uint64_t wire = channel_->bytes_sent() - wire0;
  double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  {
    std::lock_guard<std::mutex> lock(mu_);
    stats_.sync.final_pages = pending;
    stats_.sync.unchanged_bytes = unchanged;
  }
  Log(options_.log,
      absl::StrFormat("pre-copy done in %.2f s: %.1f MiB of memory and disk in %u rounds "
                      "(%.1f MiB already at the mirror; %u pages as references to pages it "
                      "held, %u to its base image), %.1f MiB on the wire; %u pages left for the "
                      "full checkpoint",
                      elapsed, static_cast<double>(done) / (1 << 20), round + 1,
                      static_cast<double>(unchanged) / (1 << 20), dedup_->deduplicated,
                      dedup_->from_base, static_cast<double>(wire) / (1 << 20), pending));
  return absl::OkStatus();
}

absl::Status PrimarySession::SendLoop() {
  for (;;) {
    std::shared_ptr<const Checkpoint> cp;
    {
      std::unique_lock<std::mutex> lock(mu_);
      bool ready = cv_.wait_for(lock, kKeepalive, [this] {
        return stop_ || !queue_.empty() || ack_error_ || send_handover_ || send_notice_;
      });
      if (stop_) return absl::CancelledError("stopping");
      if (ack_error_) return *std::exchange(ack_error_, std::nullopt);
      if (send_notice_) {
        send_notice_ = false;
        auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
            notice_until_ - std::chrono::steady_clock::now());
        pb::Frame f;
        f.mutable_handover_notice()->set_within_ms(
            static_cast<uint32_t>(std::clamp<int64_t>(left.count(), 0, UINT32_MAX)));
        lock.unlock();
        if (auto s = channel_->Send(f); !s.ok()) return s;
        continue;
      }
      if (send_handover_ && queue_.empty()) {
        send_handover_ = false;
        pb::Frame f;
        f.mutable_handover()->set_epoch(handover_epoch_);
        f.mutable_handover()->set_reason(handover_reason_);
        lock.unlock();
        if (auto s = channel_->Send(f); !s.ok()) return s;
        continue;
      }
      if (!ready) {
        // Nothing to send (a long epoch): the mirror still hears from this primary, so that
        // its heartbeats can count the replication stream as a sign of life.
        lock.unlock();
        pb::Frame f;
        f.set_keepalive(true);
        if (auto s = channel_->Send(f); !s.ok()) return s;
        continue;
      }
      cp = queue_.front();
      queue_.pop_front();
      unacked_.push_back(cp->epoch);  // before its frames go: the ack may come at once
    }
    Primary::Stats::Wire sent;
    uint64_t deduplicated = dedup_->deduplicated, from_base = dedup_->from_base;
    for (const pb::Frame& f : CheckpointFrames(*cp, options_.compression, dedup_.get())) {
      if (auto s = channel_->Send(f); !s.ok()) return s;
      if (f.has_pages()) {
        (f.pages().compression() == pb::LZ4 ? sent.compressed : sent.pages) +=
            f.pages().data().size();
        sent.zero_flags += f.pages().zero().size();
        sent.references += f.pages().ref().size() + f.pages().ref_hashes().size();
      }
      for (const std::string& d : f.disk().data()) sent.disk += d.size();
    }
    std::lock_guard<std::mutex> lock(mu_);
    stats_.wire.pages += sent.pages;
    stats_.wire.compressed += sent.compressed;
    stats_.wire.zero_flags += sent.zero_flags;
    stats_.wire.disk += sent.disk;
    stats_.wire.references += sent.references;
    stats_.wire.deduplicated_pages += dedup_->deduplicated - deduplicated;
    stats_.wire.base_pages += dedup_->from_base - from_base;
    if (cp->full) {
      stats_.sync.deduplicated_pages = dedup_->deduplicated;
      stats_.sync.base_pages = dedup_->from_base;
    }
    stats_.bytes_sent = channel_->bytes_sent();
  }
}

void PrimarySession::AckLoop() {
  for (;;) {
    auto f = channel_->Receive();
    if (f.ok() && f->has_handover_reply()) {
      std::lock_guard<std::mutex> lock(mu_);
      handover_reply_ = f->handover_reply();
      // Set here, before the mirror's close is read: the connection manager must not reconnect.
      if (migration_ == Migration::kLastCheckpoint && handover_reply_->resumed() &&
          handover_reply_->epoch() == handover_epoch_) {
        migration_ = Migration::kHandedOver;
      }
      cv_.notify_all();
      continue;
    }
    absl::Status bad;
    if (!f.ok()) {
      bad = f.status();
    } else if (f->has_refusal()) {
      bad = MirrorRefused(f->refusal());
      std::lock_guard<std::mutex> lock(mu_);
      refused_ = bad;
    } else if (!f->has_ack()) {
      bad = absl::DataLossError("mirror sent something other than an ack");
    } else {
      // The mirror commits checkpoints in the order they were sent and acknowledges each:
      // anything but the oldest one not yet acknowledged would release outputs of epochs it
      // may not hold.
      std::lock_guard<std::mutex> lock(mu_);
      if (uint64_t term = options_.term ? options_.term() : 0; f->ack().term() != term) {
        // Only a mirror of this primary's term may release its outputs.
        bad = absl::FailedPreconditionError(absl::StrCat(
            "mirror acknowledged in term ", f->ack().term(), ", this primary runs in term ", term));
      } else if (unacked_.empty() || unacked_.front() != f->ack().epoch()) {
        bad = absl::DataLossError(
            absl::StrCat("mirror acknowledged epoch ", f->ack().epoch(), " but ",
                         unacked_.empty() ? "none is awaiting acknowledgement"
                                          : absl::StrCat("epoch ", unacked_.front(), " is next")));
      } else {
        unacked_.pop_front();
      }
    }
    if (!bad.ok()) {
      std::lock_guard<std::mutex> lock(mu_);
      ack_error_ = bad;
      cv_.notify_all();
      return;
    }
    engine_.Acknowledge(f->ack().epoch());
    bool first = false;
    {
      std::lock_guard<std::mutex> lock(mu_);
      stats_.acked++;
      acked_epoch_ = static_cast<int64_t>(f->ack().epoch());
      cv_.notify_all();
      first = stats_.sync.active;
      stats_.sync.active = false;
      if (!committed_on_connection_) {
        committed_on_connection_ = true;
        protected_ = true;
      }
      if (first) {
        stats_.sync.seconds =
            std::chrono::duration<double>(std::chrono::steady_clock::now() - sync_start_).count();
      }
    }
    if (first) SetState(absl::StrCat("protected: replicating to ", channel_->peer()));
  }
}

absl::StatusOr<Primary::HandoverReport> PrimarySession::HandOver(
    std::chrono::milliseconds timeout, const std::function<absl::Status()>& committed,
    const std::string& reason, const std::function<absl::Status()>& unanswered) {
  using Clock = std::chrono::steady_clock;
  auto deadline = Clock::now() + timeout;
  std::unique_lock<std::mutex> lock(mu_);
  if (migration_ != Migration::kNone) {
    return absl::FailedPreconditionError("a migration is already under way");
  }
  if (link_ != Link::kStreaming || stats_.sync.active) {
    return absl::FailedPreconditionError(
        absl::StrCat("not protected, so nothing to migrate to: ", stats_.state));
  }
  // Checkpoints in flight would be waited for with the VM paused: let them drain first
  // (within half the time allowed; a mirror slower than the VM's writes never catches up).
  migration_ = Migration::kDraining;
  cv_.wait_until(lock, Clock::now() + timeout / 2, [this] {
    auto e = engine_.stats();
    return stop_ || link_ != Link::kStreaming || e.epochs <= e.acknowledged + 1;
  });
  migration_ = Migration::kLastCheckpoint;  // the epoch clock cuts no more checkpoints
  send_notice_ = true;                      // before the last checkpoint's frames
  notice_until_ = deadline;
  cv_.notify_all();
  cv_.wait(lock, [this] { return !taking_; });
  uint64_t connection = connection_;
  std::string peer = stats_.peer;
  lock.unlock();
  SetState(absl::StrCat("migrating to ", peer, ": VM paused for the last checkpoint"));

  // Until the mirror is told to resume, a failure leaves the VM with this host.
  auto abort = [&](absl::string_view why) {
    absl::Status resumed = engine_.HoldPaused(false);
    {
      std::lock_guard<std::mutex> l(mu_);
      migration_ = Migration::kNone;
      send_notice_ = true;  // withdrawn: no hand-over is coming
      notice_until_ = Clock::now();
      cv_.notify_all();
    }
    std::string line = absl::StrCat("migration to ", peer, " did not happen: ", why,
                                    resumed.ok() ? "; the VM runs here again" : "");
    bool streaming;
    {
      std::lock_guard<std::mutex> l(mu_);
      streaming = !stop_ && link_ == Link::kStreaming && connection_ == connection;
    }
    // "protected" only while a mirror can commit: otherwise outputs wait for the next one.
    SetState(std::string(!resumed.ok() ? "VM paused: "
                         : streaming   ? "protected: "
                                       : "no mirror, outputs held until one commits: ") +
             line);
    return resumed.ok() ? absl::AbortedError(line)
                        : absl::InternalError(absl::StrCat(
                              line, "; resuming the VM here failed: ", resumed.message()));
  };
  auto lost = [&] { return stop_ || link_ != Link::kStreaming || connection_ != connection; };
  auto t0 = Clock::now();
  if (auto s = engine_.HoldPaused(true); !s.ok()) return abort(s.message());
  auto wait = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
  auto cp = engine_.TakeCheckpoint(std::max(wait, std::chrono::milliseconds(1)));
  if (!cp.ok()) return abort(cp.status().message());
  Primary::HandoverReport report{.epoch = (*cp)->epoch, .final_pages = (*cp)->gfns.size()};
  lock.lock();
  if (lost()) {
    lock.unlock();
    return abort("the mirror connection ended");
  }
  Enqueue(*cp);
  bool acked = cv_.wait_until(
      lock, deadline, [&] { return lost() || acked_epoch_ >= static_cast<int64_t>(report.epoch); });
  if (!acked || lost()) {
    lock.unlock();
    return abort(acked ? "the mirror connection ended"
                       : "the last checkpoint was not committed in time");
  }
  auto t_commit = Clock::now();
  lock.unlock();
  if (committed) {
    if (auto s = committed(); !s.ok()) return abort(s.message());
  }
  lock.lock();
  handover_reply_.reset();
  handover_epoch_ = report.epoch;
  handover_reason_ = reason;
  send_handover_ = true;
  cv_.notify_all();
  bool answered = cv_.wait_until(lock, deadline, [&] {
    return handover_reply_.has_value() || stop_ || connection_ != connection;
  });
  auto t_reply = Clock::now();
  std::optional<pb::HandoverReply> reply = std::move(handover_reply_);
  bool handed_over = migration_ == Migration::kHandedOver;
  lock.unlock();
  if (!answered || !reply) {
    if (unanswered) {
      if (absl::Status s = unanswered(); s.ok()) {
        return abort(absl::StrCat("the mirror was told to resume epoch ", report.epoch,
                                  " but did not answer, and the witness gave this host a newer "
                                  "term than the one handed over (the mirror cannot run it)"));
      }
    }
    std::string line =
        absl::StrCat("migration to ", peer, ": the mirror was told to resume epoch ", report.epoch,
                     " but did not answer; the VM is left paused here (check which host runs it)");
    SetState(line);
    return absl::UnavailableError(line);
  }
  if (!handed_over) {
    return abort(absl::StrCat("the mirror refused: ", reply->epoch() == report.epoch
                                                          ? reply->error()
                                                          : "answer for another epoch"));
  }
  report.commit_ms = std::chrono::duration<double, std::milli>(t_commit - t0).count();
  report.downtime_ms = std::chrono::duration<double, std::milli>(t_reply - t0).count();
  SetState(absl::StrFormat("handed over to %s at epoch %u: the VM runs there (downtime %.1f ms)",
                           peer, report.epoch, report.downtime_ms));
  return report;
}

}  // namespace romulus::replicator
