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
#include <fstream>
#include <mutex>
#include <random>
#include <thread>

#include "absl/strings/str_cat.h"
#include "replicator/channel.h"
#include "replicator/mirror_session.h"
#include "replicator/primary_session.h"
#include "vmm/sys.h"

namespace romulus::replicator {
namespace {

// Reconnecting waits this long at first, doubling while connections get nowhere, up to the max.
constexpr std::chrono::milliseconds kBackOffFirst{25}, kBackOffMax{1000};
// Either side's channel sends a keepalive frame when it has sent nothing for this long, also while
// its own thread is busy (a mirror committing a large checkpoint, a primary hashing its memory):
// the peer's receive timeout then measures this host's life, not the length of its work.
constexpr std::chrono::milliseconds kChannelKeepalive{100};
// Frames a mirror receives and opens ahead of the one it stages (at most 4 x 4 MiB held).
constexpr size_t kFramesReadAhead = 4;

namespace asio = boost::asio;
using asio::ip::tcp;

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

// The primary's connection manager: connects to the mirror, hands each connection to the
// PrimarySession (the epoch protocol), and when one ends decides how to go on: back off while
// connections get nowhere, shrink the next synchronisation's frames, run unprotected if allowed.
class PrimaryImpl : public Primary {
 public:
  PrimaryImpl(checkpoint::EpochEngine& engine, vmm::OutputGate& gate, Options options)
      : gate_(gate), options_(std::move(options)), session_(engine, gate, options_) {
    if (::getrandom(&session_id_, sizeof(session_id_), 0) != sizeof(session_id_)) std::abort();
    session_id_ |= 1;
    if (!options_.run_unprotected) {
      session_.SetState("no mirror yet: outputs held until one commits");
    } else if (!options_.before_unprotected) {
      GoUnprotected("no mirror: ");
    } else {
      // The hook may take a while: it runs on the connecting thread, first thing.
      session_.SetState("no mirror yet: outputs held until before_unprotected has run");
    }
  }

  ~PrimaryImpl() override {
    session_.Stop();
    if (connect_thread_.joinable()) connect_thread_.join();
  }

  void Start() {
    session_.StartEpochClock();
    connect_thread_ = std::thread([this] {
      vmm::NameThread("rml-send");
      ConnectLoop();
    });
  }

  Stats stats() const override { return session_.stats(); }

  absl::StatusOr<HandoverReport> HandOver(std::chrono::milliseconds timeout,
                                          const std::function<absl::Status()>& committed,
                                          const std::string& reason) override {
    return session_.HandOver(timeout, committed, reason);
  }

 private:
  // With run_unprotected, while no mirror is connected: outputs leave without one, once
  // before_unprotected (if set) succeeded; until then they stay held, and the next connection
  // attempt tries again. On the connecting thread (or the constructor, without a hook).
  void GoUnprotected(absl::string_view why) {
    if (!options_.run_unprotected) return;
    if (!released_unprotected_ && options_.before_unprotected) {
      if (absl::Status s = options_.before_unprotected(); !s.ok()) {
        session_.SetState(absl::StrCat(why,
                                       "outputs held (not running unprotected until "
                                       "before_unprotected succeeds): ",
                                       s.message()));
        return;
      }
    }
    released_unprotected_ = true;
    gate_.SetHolding(false);
    session_.SetState(absl::StrCat(why, "running UNPROTECTED, outputs released"));
  }

  // Before connecting again: a wait that doubles with each connection in a row that got
  // nowhere (the mirror held no more of the VM than the time before, and none committed), with
  // jitter, so that a mirror that refuses or a link that corrupts is not hammered.
  void BackOff(std::mt19937_64& rng) {
    using std::chrono::milliseconds;
    auto wait = std::min(kBackOffFirst * (1u << std::min<uint32_t>(no_progress_, 10)), kBackOffMax);
    double jitter = std::uniform_real_distribution<double>(0.5, 1.5)(rng);
    session_.BackOff(std::chrono::duration_cast<milliseconds>(wait * jitter));
  }

  void ConnectLoop() {
    asio::io_context io;
    std::string last_error;
    std::mt19937_64 rng(session_id_);
    while (true) {
      if (session_.stopping()) return;
      if (!released_unprotected_) GoUnprotected(unprotected_why_);
      auto ch = Channel::Connect(io, options_.mirror_host, options_.mirror_port,
                                 {options_.identity, options_.key, options_.protection},
                                 session_id_, options_.peer_timeout);
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
      session_.Open(std::move(*ch), roots->replica_roots());
      absl::Status why = session_.Synchronise(sync_batch_pages_);
      if (why.ok()) {
        // From the full checkpoint on, outputs wait for the mirror (they were released so far
        // only when running unprotected; the full checkpoint covers everything before it).
        if (options_.run_unprotected) gate_.SetHolding(true);
        released_unprotected_ = false;
        why = session_.Stream();
      }
      PrimarySession::Outcome outcome = session_.Close();
      if (why.code() == absl::StatusCode::kCancelled) return;  // stopping, not a lost mirror
      if (outcome.handed_over) return;                         // the VM runs at the mirror now
      if (options_.run_unprotected) {
        unprotected_why_ = absl::StrCat("mirror lost (", why.message(), "): ");
        GoUnprotected(unprotected_why_);
      } else {
        session_.SetState(absl::StrCat("mirror lost, outputs held: ", why.message()));
      }
      session_.Unprotected();
      // Progress: a commit on this connection, or a synchronisation that found more of the VM
      // at the mirror than the last one (what verified there is kept across connections).
      bool progress = outcome.committed || outcome.mirror_held > last_mirror_held_;
      last_mirror_held_ = outcome.committed ? 0 : outcome.mirror_held;
      no_progress_ = progress ? 0 : no_progress_ + 1;
      // A synchronisation that did not finish shrinks the next one's page batches, so that on a
      // link that fails every so many bytes each connection still lands whole frames.
      sync_batch_pages_ =
          outcome.committed ? kPagesPerBatch : std::max<size_t>(sync_batch_pages_ / 2, 4);
      BackOff(rng);
    }
  }

  vmm::OutputGate& gate_;
  Options options_;
  PrimarySession session_;  // the epoch protocol; after options_, which it reads
  // The connecting thread's own (or the constructor's):
  uint64_t session_id_ = 0;  // tells the mirror whether epochs continue or start afresh
  // With run_unprotected: outputs leave without a mirror now; and why there is none, for the
  // state line.
  bool released_unprotected_ = false;
  std::string unprotected_why_ = "no mirror: ";
  // Pages and chunks the mirror held at the last synchronisation, and connections in a row
  // without progress.
  uint64_t last_mirror_held_ = 0;
  uint32_t no_progress_ = 0;
  size_t sync_batch_pages_ = kPagesPerBatch;
  std::thread connect_thread_;
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
