// clang-format off
// Boost 1.74 uses std::exchange without including <utility>: include it first.
#include <utility>
#include <boost/asio.hpp>
// clang-format on
#include "replicator/replicator.h"

#include <sys/random.h>
#include <sys/socket.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <deque>
#include <fstream>
#include <mutex>
#include <random>
#include <sstream>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "replicator/channel.h"
#include "replicator/mirror_session.h"
#include "vmm/sys.h"

namespace romulus::replicator {
namespace {

// Reconnecting waits this long at first, doubling while connections get nowhere, up to the max.
constexpr std::chrono::milliseconds kBackOffFirst{25}, kBackOffMax{1000};
// The primary's epoch loop sends a keepalive frame when it has sent nothing for this long.
constexpr std::chrono::milliseconds kKeepalive{10};
// Either side's channel sends one when it has sent nothing for this long, also while its own
// thread is busy (a mirror committing a large checkpoint, a primary hashing its memory): the
// peer's receive timeout then measures this host's life, not the length of its work.
constexpr std::chrono::milliseconds kChannelKeepalive{100};
// Frames a mirror receives and opens ahead of the one it stages (at most 4 x 4 MiB held).
constexpr size_t kFramesReadAhead = 4;

namespace asio = boost::asio;
using asio::ip::tcp;
using checkpoint::Checkpoint;

}  // namespace

absl::StatusOr<std::string> ReadKeyFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot read key file ", path));
  // Read no further than a key and its line end may reach: a huge file is refused unread.
  constexpr size_t kMaxKey = 4096, kMaxFile = kMaxKey + 2;
  std::string key(kMaxFile + 1, '\0');
  in.read(key.data(), static_cast<std::streamsize>(key.size()));
  key.resize(static_cast<size_t>(in.gcount()));
  if (key.size() > kMaxFile) {
    return absl::InvalidArgumentError(
        absl::StrCat("key file ", path, " holds over ", kMaxFile, " bytes; 16 to 4096 needed"));
  }
  while (!key.empty() && (key.back() == '\n' || key.back() == '\r')) key.pop_back();
  if (key.size() < 16 || key.size() > kMaxKey) {
    return absl::InvalidArgumentError(
        absl::StrCat("key file ", path, " holds ", key.size(), " bytes; 16 to 4096 needed"));
  }
  return key;
}

namespace {

class MirrorImpl : public Mirror {
 public:
  MirrorImpl(checkpoint::ReplicaStore& replica, Options options)
      : replica_(replica), options_(std::move(options)), acceptor_(io_) {}

  ~MirrorImpl() override {
    stop_ = true;
    ::shutdown(acceptor_.native_handle(), SHUT_RDWR);
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (channel_) channel_->Shutdown();
    }
    if (thread_.joinable()) thread_.join();
  }

  absl::Status Listen() {
    boost::system::error_code ec;
    auto addr = asio::ip::make_address(options_.listen, ec);
    if (ec)
      return absl::InvalidArgumentError(absl::StrCat("bad listen address '", options_.listen, "'"));
    tcp::endpoint ep(addr, options_.port);
    acceptor_.open(ep.protocol(), ec);
    if (!ec) acceptor_.set_option(tcp::acceptor::reuse_address(true), ec);
    if (!ec) acceptor_.bind(ep, ec);
    if (!ec) acceptor_.listen(4, ec);
    if (ec) {
      return absl::UnavailableError(absl::StrCat("mirror cannot listen on ", options_.listen, ":",
                                                 options_.port, ": ", ec.message()));
    }
    port_ = acceptor_.local_endpoint().port();
    thread_ = std::thread([this] {
      vmm::NameThread("rml-mirror");
      Serve();
    });
    return absl::OkStatus();
  }

  uint16_t port() const override { return port_; }

  Stats stats() const override {
    std::lock_guard<std::mutex> lock(mu_);
    return stats_;
  }

  void WithReplica(const std::function<void(checkpoint::ReplicaStore&)>& fn) override {
    std::lock_guard<std::mutex> lock(apply_mu_);
    fn(replica_);
  }

 private:
  void Serve() {
    uint64_t accept_failures = 0;  // in a row: the first is logged, and the recovery
    while (!stop_) {
      tcp::socket socket(io_);
      boost::system::error_code ec;
      acceptor_.accept(socket, ec);
      if (stop_) return;
      if (ec) {  // say, out of descriptors: a primary's connection waits in the backlog
        if (accept_failures++ == 0) {
          Log(options_.log, absl::StrCat("accepting a primary failed: ", ec.message(),
                                         "; retrying until it works"));
        }
        if (!vmm::AcceptFailedForThatConnection(ec.value())) {
          std::this_thread::sleep_for(vmm::kAcceptRetryPause);
        }
        continue;
      }
      if (accept_failures > 0) {
        Log(options_.log,
            absl::StrCat("accepting primaries again after ", accept_failures, " failed accepts"));
        accept_failures = 0;
      }
      uint64_t session = 0;
      auto ch =
          Channel::Accept(std::move(socket), {options_.identity, options_.key, options_.protection},
                          options_.peer_timeout, &session);
      if (!ch.ok()) {
        Reject(absl::StrCat("refused a primary: ", ch.status().message()));
        continue;
      }
      (*ch)->set_on_frame(options_.on_traffic);
      (*ch)->KeepAlive(kChannelKeepalive);  // a long commit here is no silence
      {
        std::lock_guard<std::mutex> lock(mu_);
        if (stop_) return;  // stopped during the handshake: the channel was not there to shut
        channel_ = std::move(*ch);
        stats_.connections++;
        stats_.connected = true;
        stats_.peer = channel_->peer();
      }
      Log(options_.log, absl::StrCat("primary ", channel_->peer(), " connected"));
      bool new_session = session != session_;
      session_ = session;
      MirrorSession conversation({replica_, apply_mu_, stats_, mu_, options_}, channel_->peer());
      absl::Status why = Converse(*channel_, conversation, new_session);
      conversation.End();  // keeps what an unfinished synchronisation verified
      {
        std::lock_guard<std::mutex> lock(mu_);
        stats_.connected = false;
        stats_.syncing = false;
        stats_.handover_expected_until.reset();
        channel_->Shutdown();
      }
      bool handed_over;
      {
        std::lock_guard<std::mutex> lock(mu_);
        channel_.reset();
        handed_over = stats_.handed_over;
      }
      if (handed_over) {  // this host runs the VM now: no primary may connect
        ::shutdown(acceptor_.native_handle(), SHUT_RDWR);
        return;
      }
      if (!stop_) Log(options_.log, absl::StrCat("primary disconnected: ", why.message()));
    }
  }

  void Reject(const std::string& line) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stats_.rejected++;
    }
    Log(options_.log, line);
  }

  // Pumps frames between the primary and the session until the connection fails, the peer
  // sends something bad, the VM is handed over to this host, or the mirror stops.
  absl::Status Converse(Channel& ch, MirrorSession& conversation, bool new_session) {
    auto roots = conversation.Start(new_session);
    if (!roots.ok()) return roots.status();
    if (auto s = ch.Send(*roots); !s.ok()) return s;
    FrameReadAhead frames(ch, kFramesReadAhead);
    while (!stop_) {
      auto f = frames.Next();
      if (!f.ok()) return f.status();
      auto replies = conversation.Receive(std::move(*f));
      if (!replies.ok()) return replies.status();
      for (const pb::Frame& reply : *replies) {
        if (auto s = ch.Send(reply); !s.ok()) return s;
      }
      if (conversation.handed_over()) {
        return absl::CancelledError("the VM was handed over to this host");
      }
    }
    return absl::CancelledError("stopping");
  }

  checkpoint::ReplicaStore& replica_;
  Options options_;
  asio::io_context io_;
  tcp::acceptor acceptor_;
  std::thread thread_;
  std::atomic<bool> stop_{false};
  uint16_t port_ = 0;
  uint64_t session_ = 0;
  std::mutex apply_mu_;    // held while the replica is read or changed
  mutable std::mutex mu_;  // stats and the current channel
  std::unique_ptr<Channel> channel_;
  Stats stats_;
};

class PrimaryImpl : public Primary {
 public:
  PrimaryImpl(checkpoint::EpochEngine& engine, vmm::OutputGate& gate, Options options)
      : engine_(engine), gate_(gate), options_(std::move(options)) {
    if (::getrandom(&session_, sizeof(session_), 0) != sizeof(session_)) std::abort();
    session_ |= 1;
    if (!options_.run_unprotected) {
      SetState("no mirror yet: outputs held until one commits");
    } else if (!options_.before_unprotected) {
      GoUnprotected("no mirror: ");
    } else {
      // The hook may take a while: it runs on the connecting thread, first thing.
      SetState("no mirror yet: outputs held until before_unprotected has run");
    }
  }

  ~PrimaryImpl() override {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
      if (channel_) channel_->Shutdown();
    }
    cv_.notify_all();
    if (epoch_thread_.joinable()) epoch_thread_.join();
    if (connect_thread_.joinable()) connect_thread_.join();
  }

  void Start() {
    epoch_thread_ = std::thread([this] {
      vmm::NameThread("rml-epoch");
      EpochLoop();
    });
    connect_thread_ = std::thread([this] {
      vmm::NameThread("rml-send");
      ConnectLoop();
    });
  }

  Stats stats() const override {
    std::lock_guard<std::mutex> lock(mu_);
    Stats s = stats_;
    s.connected = connected_;
    if (s.sync.active) {
      s.sync.seconds =
          std::chrono::duration<double>(std::chrono::steady_clock::now() - sync_start_).count();
    }
    if (!protected_) {
      s.unprotected_seconds =
          std::chrono::duration<double>(std::chrono::steady_clock::now() - unprotected_since_)
              .count();
    }
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

 private:
  void SetState(std::string state) {
    std::lock_guard<std::mutex> lock(mu_);
    if (state != stats_.state) {
      stats_.state = state;
      Log(options_.log, state);
    }
  }

  // With run_unprotected, while no mirror is connected: outputs leave without one, once
  // before_unprotected (if set) succeeded; until then they stay held, and the next connection
  // attempt tries again. On the connecting thread (or the constructor, without a hook).
  void GoUnprotected(absl::string_view why) {
    if (!options_.run_unprotected) return;
    if (!released_unprotected_ && options_.before_unprotected) {
      if (absl::Status s = options_.before_unprotected(); !s.ok()) {
        SetState(absl::StrCat(why,
                              "outputs held (not running unprotected until "
                              "before_unprotected succeeds): ",
                              s.message()));
        return;
      }
    }
    released_unprotected_ = true;
    gate_.SetHolding(false);
    SetState(absl::StrCat(why, "running UNPROTECTED, outputs released"));
  }

  // Takes a checkpoint every epoch while a mirror is connected and queues it for sending.
  void EpochLoop() {
    auto next = std::chrono::steady_clock::now();
    std::unique_lock<std::mutex> lock(mu_);
    while (!stop_) {
      next += options_.epoch;
      auto now = std::chrono::steady_clock::now();
      if (next < now) next = now;  // a stretched epoch: start the next one now
      cv_.wait_until(lock, next, [this] { return stop_; });
      epoch_loop_ns_ = std::chrono::steady_clock::now().time_since_epoch().count();
      if (stop_ || !connected_ || handing_over_) continue;
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

  // A checkpoint just taken: counted, and queued for the send loop. With mu_ held.
  void Enqueue(std::shared_ptr<const Checkpoint> cp) {
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

  // Before connecting again: a wait that doubles with each connection in a row that got
  // nowhere (the mirror held no more of the VM than the time before, and none committed), with
  // jitter, so that a mirror that refuses or a link that corrupts is not hammered.
  void BackOff(std::mt19937_64& rng) {
    using std::chrono::milliseconds;
    auto wait = std::min(kBackOffFirst * (1u << std::min<uint32_t>(no_progress_, 10)), kBackOffMax);
    double jitter = std::uniform_real_distribution<double>(0.5, 1.5)(rng);
    std::unique_lock<std::mutex> lock(mu_);
    stats_.failed_connections++;
    cv_.wait_for(lock, std::chrono::duration_cast<milliseconds>(wait * jitter),
                 [this] { return stop_; });
  }

  void ConnectLoop() {
    asio::io_context io;
    std::string last_error;
    std::mt19937_64 rng(session_);
    while (true) {
      {
        std::unique_lock<std::mutex> lock(mu_);
        if (stop_) return;
      }
      if (!released_unprotected_) GoUnprotected(unprotected_why_);
      auto ch = Channel::Connect(io, options_.mirror_host, options_.mirror_port,
                                 {options_.identity, options_.key, options_.protection}, session_,
                                 options_.peer_timeout);
      if (!ch.ok()) {
        std::string err(ch.status().message());
        if (err != last_error) Log(options_.log, absl::StrCat("mirror unreachable: ", err));
        last_error = err;
        no_progress_++;
        BackOff(rng);
        continue;
      }
      last_error.clear();
      (*ch)->set_on_frame(options_.on_traffic);
      (*ch)->KeepAlive(kChannelKeepalive);  // hashing a large memory here is no silence
      auto roots = (*ch)->Receive();
      if (roots.ok() && !roots->has_replica_roots()) {
        roots = absl::DataLossError("expected the replica's tree roots");
      }
      if (!roots.ok()) {
        Log(options_.log, absl::StrCat("mirror refused: ", roots.status().message()));
        no_progress_++;
        BackOff(rng);
        continue;
      }
      mirror_roots_ = roots->replica_roots();
      engine_.Restart();  // the first checkpoint on a connection is full
      {
        std::lock_guard<std::mutex> lock(mu_);
        channel_ = std::move(*ch);
        queue_.clear();
        unacked_.clear();
        committed_on_connection_ = false;
        mirror_held_ = 0;
        ack_failed_ = false;  // a failure of the previous connection's ack reader is history
        acked_epoch_ = -1;
        connection_++;
        stats_.resyncs++;
        stats_.peer = channel_->peer();
        stats_.protection = channel_->protection();
      }
      SetState(absl::StrCat("synchronising with ", channel_->peer(),
                            options_.run_unprotected ? ": running UNPROTECTED until it commits"
                                                     : ": outputs held until it commits"));
      uint64_t before_sync = channel_->bytes_sent();
      absl::Status why = Synchronize();
      {
        std::lock_guard<std::mutex> lock(mu_);  // also what a synchronisation that failed sent
        stats_.wire.resync += channel_->bytes_sent() - before_sync;
      }
      std::thread acks;
      if (why.ok()) {
        // From the full checkpoint on, outputs wait for the mirror (they were released so far
        // only when running unprotected; the full checkpoint covers everything before it).
        if (options_.run_unprotected) gate_.SetHolding(true);
        released_unprotected_ = false;
        std::lock_guard<std::mutex> lock(mu_);
        connected_ = true;
        cv_.notify_all();
        acks = std::thread([this] {
          vmm::NameThread("rml-acks");
          AckLoop();
        });
      }
      if (why.ok()) why = SendLoop();
      channel_->Shutdown();
      if (acks.joinable()) acks.join();
      {
        std::lock_guard<std::mutex> lock(mu_);
        connected_ = false;
        stats_.sync.active = false;
        queue_.clear();
        channel_.reset();
      }
      engine_.Restart();
      if (why.code() == absl::StatusCode::kCancelled) return;  // stopping, not a lost mirror
      {
        std::lock_guard<std::mutex> lock(mu_);
        if (handed_over_) return;  // the VM runs at the mirror now
      }
      if (options_.run_unprotected) {
        unprotected_why_ = absl::StrCat("mirror lost (", why.message(), "): ");
        GoUnprotected(unprotected_why_);
      } else {
        SetState(absl::StrCat("mirror lost, outputs held: ", why.message()));
      }
      bool progress;
      {
        std::lock_guard<std::mutex> lock(mu_);
        if (protected_) {
          protected_ = false;
          unprotected_since_ = std::chrono::steady_clock::now();
          stats_.failed_connections = 0;
        }
        // Progress: a commit on this connection, or a synchronisation that found more of the VM
        // at the mirror than the last one (what verified there is kept across connections).
        progress = committed_on_connection_ || mirror_held_ > last_mirror_held_;
        last_mirror_held_ = committed_on_connection_ ? 0 : mirror_held_;
      }
      no_progress_ = progress ? 0 : no_progress_ + 1;
      // A synchronisation that did not finish shrinks the next one's page batches, so that on a
      // link that fails every so many bytes each connection still lands whole frames.
      if (!committed_on_connection_) sync_batch_pages_ = std::max<size_t>(sync_batch_pages_ / 2, 4);
      BackOff(rng);
    }
  }

  absl::StatusOr<HandoverReport> HandOver(std::chrono::milliseconds timeout,
                                          const std::function<absl::Status()>& committed,
                                          const std::string& reason) override {
    using Clock = std::chrono::steady_clock;
    auto deadline = Clock::now() + timeout;
    std::unique_lock<std::mutex> lock(mu_);
    if (migrating_) return absl::FailedPreconditionError("a migration is already under way");
    if (!connected_ || stats_.sync.active) {
      return absl::FailedPreconditionError(
          absl::StrCat("not protected, so nothing to migrate to: ", stats_.state));
    }
    // Checkpoints in flight would be waited for with the VM paused: let them drain first
    // (within half the time allowed; a mirror slower than the VM's writes never catches up).
    migrating_ = true;
    cv_.wait_until(lock, Clock::now() + timeout / 2, [this] {
      auto e = engine_.stats();
      return stop_ || !connected_ || e.epochs <= e.acknowledged + 1;
    });
    handing_over_ = true;  // the epoch loop takes no more checkpoints
    send_notice_ = true;   // before the last checkpoint's frames
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
        handing_over_ = migrating_ = false;
        send_notice_ = true;  // withdrawn: no hand-over is coming
        notice_until_ = Clock::now();
        cv_.notify_all();
      }
      std::string line = absl::StrCat("migration to ", peer, " did not happen: ", why,
                                      resumed.ok() ? "; the VM runs here again" : "");
      SetState(std::string(resumed.ok() ? "protected: " : "VM paused: ") + line);
      return resumed.ok() ? absl::AbortedError(line)
                          : absl::InternalError(absl::StrCat(
                                line, "; resuming the VM here failed: ", resumed.message()));
    };
    auto lost = [&] { return stop_ || !connected_ || connection_ != connection; };
    auto t0 = Clock::now();
    if (auto s = engine_.HoldPaused(true); !s.ok()) return abort(s.message());
    auto wait = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
    auto cp = engine_.TakeCheckpoint(std::max(wait, std::chrono::milliseconds(1)));
    if (!cp.ok()) return abort(cp.status().message());
    HandoverReport report{.epoch = (*cp)->epoch, .final_pages = (*cp)->gfns.size()};
    lock.lock();
    if (lost()) {
      lock.unlock();
      return abort("the mirror connection ended");
    }
    Enqueue(*cp);
    bool acked = cv_.wait_until(lock, deadline, [&] {
      return lost() || acked_epoch_ >= static_cast<int64_t>(report.epoch);
    });
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
    bool handed_over = handed_over_;
    lock.unlock();
    if (!answered || !reply) {
      std::string line = absl::StrCat(
          "migration to ", peer, ": the mirror was told to resume epoch ", report.epoch,
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

  // Finds out what the mirror's replica holds, comparing its hash trees with the VM's (hashed
  // now, after BeginSync), and sends the pages it holds as such: they are not sent again.
  absl::StatusOr<MirrorHoldings> CompareWithMirror() {
    auto own = engine_.SyncTrees();
    if (!own.ok()) return own.status();
    auto ask = [this](const pb::TreeQuery& q) -> absl::StatusOr<pb::TreeAnswer> {
      pb::Frame f;
      *f.mutable_tree_query() = q;
      if (auto s = channel_->Send(f); !s.ok()) return s;
      auto reply = channel_->Receive();
      if (!reply.ok()) return reply.status();
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
  // meanwhile, until what is left fits an epoch. The full checkpoint that the epoch loop takes
  // next carries the rest and commits the whole synchronisation at the mirror.
  absl::Status Synchronize() {
    auto t0 = std::chrono::steady_clock::now();
    uint64_t wire0 = channel_->bytes_sent();
    auto update = [&](uint64_t done, uint64_t total, uint32_t round) {
      std::lock_guard<std::mutex> lock(mu_);
      stats_.sync.done_bytes = done;
      stats_.sync.total_bytes = total;
      stats_.sync.round = round;
      stats_.sync.wire_bytes = channel_->bytes_sent() - wire0;
      if (stop_) return absl::CancelledError("stopping");
      return absl::OkStatus();
    };
    {
      std::lock_guard<std::mutex> lock(mu_);
      stats_.sync = SyncProgress{.active = true};
      sync_start_ = t0;
    }
    if (auto s = engine_.BeginSync(); !s.ok()) return s;
    auto holdings = CompareWithMirror();
    if (!holdings.ok()) return holdings.status();
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
        checkpoint::PageRun run = engine_.NextSyncPages(sync_batch_pages_);
        if (run.gfns.empty()) break;
        pb::Frame f = PageBatchFrame(0, true, run, 0, run.gfns.size(), options_.compression);
        if (auto s = channel_->Send(f); !s.ok()) return s;
        done += run.gfns.size() * vmm::kPageSize;
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
                        "(%.1f MiB already at the mirror), %.1f MiB on the wire; %u pages left "
                        "for the full checkpoint",
                        elapsed, static_cast<double>(done) / (1 << 20), round + 1,
                        static_cast<double>(unchanged) / (1 << 20),
                        static_cast<double>(wire) / (1 << 20), pending));
    return absl::OkStatus();
  }

  absl::Status SendLoop() {
    for (;;) {
      std::shared_ptr<const Checkpoint> cp;
      {
        std::unique_lock<std::mutex> lock(mu_);
        bool ready = cv_.wait_for(lock, kKeepalive, [this] {
          return stop_ || !queue_.empty() || ack_failed_ || send_handover_ || send_notice_;
        });
        if (stop_) return absl::CancelledError("stopping");
        if (ack_failed_) {
          ack_failed_ = false;
          return ack_error_;
        }
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
      Stats::Wire sent;
      for (const pb::Frame& f : CheckpointFrames(*cp, options_.compression)) {
        if (auto s = channel_->Send(f); !s.ok()) return s;
        if (f.has_pages()) {
          (f.pages().compression() == pb::LZ4 ? sent.compressed : sent.pages) +=
              f.pages().data().size();
          sent.zero_flags += f.pages().zero().size();
        }
        for (const std::string& d : f.disk().data()) sent.disk += d.size();
      }
      std::lock_guard<std::mutex> lock(mu_);
      stats_.wire.pages += sent.pages;
      stats_.wire.compressed += sent.compressed;
      stats_.wire.zero_flags += sent.zero_flags;
      stats_.wire.disk += sent.disk;
      stats_.bytes_sent = channel_->bytes_sent();
    }
  }

  void AckLoop() {
    for (;;) {
      auto f = channel_->Receive();
      if (f.ok() && f->has_handover_reply()) {
        std::lock_guard<std::mutex> lock(mu_);
        handover_reply_ = f->handover_reply();
        // Set here, before the mirror's close is read: the connect loop must not reconnect.
        if (handover_reply_->resumed() && handover_reply_->epoch() == handover_epoch_) {
          handed_over_ = true;
        }
        cv_.notify_all();
        continue;
      }
      absl::Status bad;
      if (!f.ok()) {
        bad = f.status();
      } else if (!f->has_ack()) {
        bad = absl::DataLossError("mirror sent something other than an ack");
      } else {
        // The mirror commits checkpoints in the order they were sent and acknowledges each:
        // anything but the oldest one not yet acknowledged would release outputs of epochs it
        // may not hold.
        std::lock_guard<std::mutex> lock(mu_);
        if (unacked_.empty() || unacked_.front() != f->ack().epoch()) {
          bad = absl::DataLossError(absl::StrCat(
              "mirror acknowledged epoch ", f->ack().epoch(), " but ",
              unacked_.empty() ? "none is awaiting acknowledgement"
                               : absl::StrCat("epoch ", unacked_.front(), " is next")));
        } else {
          unacked_.pop_front();
        }
      }
      if (!bad.ok()) {
        std::lock_guard<std::mutex> lock(mu_);
        ack_failed_ = true;
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
          no_progress_ = 0;
          sync_batch_pages_ = kPagesPerBatch;
        }
        if (first) {
          stats_.sync.seconds =
              std::chrono::duration<double>(std::chrono::steady_clock::now() - sync_start_).count();
        }
      }
      if (first) SetState(absl::StrCat("protected: replicating to ", channel_->peer()));
    }
  }

  checkpoint::EpochEngine& engine_;
  vmm::OutputGate& gate_;
  Options options_;
  uint64_t session_ = 0;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  bool stop_ = false, connected_ = false, ack_failed_ = false;
  bool taking_ = false;       // the epoch loop is taking a checkpoint
  int64_t acked_epoch_ = -1;  // the last acknowledgement on this connection
  uint64_t connection_ = 0;   // counts connections
  // Planned migration: one at a time; no more checkpoints from the epoch loop; a hand-over frame
  // to send; the mirror's answer; the VM runs at the mirror now.
  bool migrating_ = false, handing_over_ = false, send_handover_ = false, handed_over_ = false;
  bool send_notice_ = false;
  std::chrono::steady_clock::time_point notice_until_;
  uint64_t handover_epoch_ = 0;
  std::string handover_reason_;
  std::optional<pb::HandoverReply> handover_reply_;
  absl::Status ack_error_;
  std::deque<std::shared_ptr<const Checkpoint>> queue_;
  checkpoint::Histogram dirty_pages_per_epoch_ = checkpoint::Histogram::Pages();
  std::deque<uint64_t> unacked_;  // epochs sent on this connection and not yet acknowledged
  // Protection: whether some mirror commits now, and since when none has.
  bool protected_ = false;
  std::chrono::steady_clock::time_point unprotected_since_ = std::chrono::steady_clock::now();
  bool committed_on_connection_ = false;  // the mirror acknowledged something on this connection
  // Reconnecting: pages and chunks the mirror held at this and the last synchronisation, and
  // connections in a row without progress (the connect thread's own).
  uint64_t mirror_held_ = 0, last_mirror_held_ = 0;
  uint32_t no_progress_ = 0;
  size_t sync_batch_pages_ = kPagesPerBatch;  // the connect thread's own
  // With run_unprotected, the connect thread's own (or the constructor's): outputs leave
  // without a mirror now; and why there is none, for the state line.
  bool released_unprotected_ = false;
  std::string unprotected_why_ = "no mirror: ";
  std::unique_ptr<Channel> channel_;
  pb::ReplicaRoots mirror_roots_;  // of the connected mirror's replica
  Stats stats_;
  std::chrono::steady_clock::time_point sync_start_;
  std::thread epoch_thread_, connect_thread_;
  // When the epoch loop last made a pass (steady clock, ns): the daemon's watchdog proves
  // progress with it. Atomic, so that reading it never waits on a loop that is stuck.
  std::atomic<int64_t> epoch_loop_ns_{std::chrono::steady_clock::now().time_since_epoch().count()};
};

}  // namespace

absl::StatusOr<std::unique_ptr<Mirror>> Mirror::Start(checkpoint::ReplicaStore& replica,
                                                      Options options) {
  auto m = std::make_unique<MirrorImpl>(replica, std::move(options));
  if (auto s = m->Listen(); !s.ok()) return s;
  return m;
}

absl::StatusOr<std::unique_ptr<Primary>> Primary::Start(checkpoint::EpochEngine& engine,
                                                        vmm::OutputGate& gate, Options options) {
  if (options.epoch < std::chrono::milliseconds(5) ||
      options.epoch > std::chrono::milliseconds(1000)) {
    return absl::InvalidArgumentError("the epoch must be 5 to 1000 ms");
  }
  auto p = std::make_unique<PrimaryImpl>(engine, gate, std::move(options));
  p->Start();
  return p;
}

}  // namespace romulus::replicator
