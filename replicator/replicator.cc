// clang-format off
// Boost 1.74 uses std::exchange without including <utility>: include it first.
#include <utility>
#include <boost/asio.hpp>
// clang-format on
#include "replicator/replicator.h"

#include <fcntl.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/random.h>
#include <sys/socket.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <deque>
#include <fstream>
#include <list>
#include <mutex>
#include <optional>
#include <random>
#include <thread>

#include "absl/strings/str_cat.h"
#include "replicator/bond.h"
#include "replicator/channel.h"
#include "replicator/mirror_session.h"
#include "replicator/postcopy.h"
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
// The longest a mirror that refused a connection waits for the primary to read why and close.
constexpr std::chrono::milliseconds kRefusalLinger{2000};

// Handshakes that may run at once on a mirror; one more connection ends the one that has run
// longest (a primary's takes a round trip, so only a peer that stalls its own is ended).
constexpr size_t kMaxHandshakes = 16;

namespace asio = boost::asio;
using asio::ip::tcp;
using Clock = std::chrono::steady_clock;

// How the handshake of one accepted connection ended.
struct Handshaken {
  absl::StatusOr<std::unique_ptr<Channel>> channel = absl::UnknownError("no handshake");
  uint64_t session = 0;
  pb::Hello hello;
  Clock::time_point done{};
};

// Runs the handshakes of accepted connections side by side, each on a thread of its own: a
// connection that never finishes its handshake (idle, slow, or not knowing the key) would
// otherwise hold every later one, a primary's too, for the whole handshake timeout.
class HandshakePool {
 public:
  using Run = std::function<Handshaken(tcp::socket)>;
  explicit HandshakePool(Run run)
      : run_(std::move(run)), wake_(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)) {}
  ~HandshakePool() {
    ShutOlderThan(Clock::time_point::max());
    for (Running& r : running_) r.thread.join();  // each ends soon: its socket is shut
  }
  HandshakePool(const HandshakePool&) = delete;
  HandshakePool& operator=(const HandshakePool&) = delete;

  // Readable while a finished handshake waits to be taken (-1: none can be waited for).
  int wake_fd() const { return wake_.get(); }

  void Start(tcp::socket socket) {
    std::lock_guard<std::mutex> lock(mu_);
    size_t live = 0;
    for (const Running& r : running_) live += !r.finished && !r.shut;
    if (live >= kMaxHandshakes) {
      for (Running& r : running_) {  // oldest first
        if (r.finished || r.shut) continue;
        ::shutdown(r.shut_fd.get(), SHUT_RDWR);
        r.shut = true;
        break;
      }
    }
    // A second descriptor of the socket, so that it can be shut while the handshake's thread
    // may be closing its own.
    Running& r = running_.emplace_back();
    r.shut_fd = vmm::Fd(::fcntl(socket.native_handle(), F_DUPFD_CLOEXEC, 0));
    r.started = Clock::now();
    r.thread = std::thread([this, &r, s = std::move(socket)]() mutable {
      vmm::NameThread("rml-handshake");
      Handshaken h = run_(std::move(s));
      h.done = Clock::now();
      std::lock_guard<std::mutex> lock(mu_);
      done_.push_back(std::move(h));
      r.finished = true;
      uint64_t one = 1;
      if (wake_.valid()) (void)!::write(wake_.get(), &one, sizeof(one));
    });
  }

  // The handshake that finished first and was not taken yet.
  std::optional<Handshaken> Take() {
    std::lock_guard<std::mutex> lock(mu_);
    if (wake_.valid()) {
      uint64_t n;
      (void)!::read(wake_.get(), &n, sizeof(n));
    }
    for (auto it = running_.begin(); it != running_.end();) {
      if (!it->finished) {
        ++it;
        continue;
      }
      it->thread.join();  // it only has to return
      it = running_.erase(it);
    }
    if (done_.empty()) return std::nullopt;
    Handshaken h = std::move(done_.front());
    done_.pop_front();
    return h;
  }

  // Ends the handshakes that began before `start` (all of them: when stopping).
  void ShutOlderThan(Clock::time_point start) {
    std::lock_guard<std::mutex> lock(mu_);
    for (Running& r : running_) {
      if (r.finished || r.shut || r.started >= start) continue;
      ::shutdown(r.shut_fd.get(), SHUT_RDWR);
      r.shut = true;
    }
  }

 private:
  struct Running {
    vmm::Fd shut_fd;
    Clock::time_point started{};
    bool finished = false, shut = false;  // under mu_
    std::thread thread;
  };
  const Run run_;
  const vmm::Fd wake_;
  std::mutex mu_;
  std::list<Running> running_;   // under mu_; a list: each thread holds its own element
  std::deque<Handshaken> done_;  // under mu_
};

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
      : replica_(replica), options_(std::move(options)) {
    stats_.term = options_.term;
    stats_.committed_epoch = replica.committed_epoch();  // a hand-over's state is committed
  }

  ~MirrorImpl() override {
    stop_ = true;
    for (auto& a : acceptors_) ::shutdown(a->native_handle(), SHUT_RDWR);
    handshakes_.ShutOlderThan(Clock::time_point::max());
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (channel_) channel_->Shutdown();
      if (post_main_) post_main_->Shutdown();
      if (post_demand_) post_demand_->Shutdown();
    }
    if (thread_.joinable()) thread_.join();
  }

  absl::Status Listen() {
    std::vector<std::string> addresses = {options_.listen};
    for (const std::string& a : options_.listen_paths) {
      if (std::find(addresses.begin(), addresses.end(), a) == addresses.end()) {
        addresses.push_back(a);
      }
    }
    for (const std::string& address : addresses) {
      boost::system::error_code ec;
      auto addr = asio::ip::make_address(address, ec);
      if (ec) return absl::InvalidArgumentError(absl::StrCat("bad listen address '", address, "'"));
      // Every path's address at the same port: the first one's, when any free port was asked for.
      tcp::endpoint ep(addr, acceptors_.empty() ? options_.port : port_);
      auto acceptor = std::make_unique<tcp::acceptor>(io_);
      acceptor->open(ep.protocol(), ec);
      if (!ec) acceptor->set_option(tcp::acceptor::reuse_address(true), ec);
      if (!ec) acceptor->bind(ep, ec);
      if (!ec) acceptor->listen(4, ec);
      if (!ec) acceptor->non_blocking(true, ec);
      if (ec) {
        return absl::UnavailableError(
            absl::StrCat("mirror cannot listen on ", address, ":", ep.port(), ": ", ec.message()));
      }
      port_ = acceptor->local_endpoint().port();
      acceptors_.push_back(std::move(acceptor));
    }
    thread_ = std::thread([this] {
      vmm::NameThread("rml-mirror");
      Serve();
    });
    return absl::OkStatus();
  }

  uint16_t port() const override { return port_; }

  Stats stats() const override {
    std::lock_guard<std::mutex> lock(mu_);
    Stats s = stats_;
    if (channel_) s.paths = channel_->paths();
    if (postcopy_) s.postcopy = postcopy_->progress();
    return s;
  }

  void WithReplica(const std::function<void(checkpoint::ReplicaStore&)>& fn) override {
    std::lock_guard<std::mutex> lock(apply_mu_);
    fn(replica_);
  }

 private:
  // The next connection on any listening address whose handshake ended (well or not), or nullopt
  // at `deadline` (or when stopping). Handshakes run side by side (HandshakePool).
  std::optional<Handshaken> NextHandshake(std::optional<Clock::time_point> deadline) {
    std::vector<pollfd> fds;
    for (auto& a : acceptors_) fds.push_back({a->native_handle(), POLLIN, 0});
    fds.push_back({handshakes_.wake_fd(), POLLIN, 0});
    while (!stop_) {
      while (auto h = handshakes_.Take()) {
        if (h->channel.ok() && Clock::now() - h->done > options_.peer_timeout) {
          // Finished while this host served another primary: its primary has given up on it.
          Log(options_.log, absl::StrCat("dropped the connection of ", (*h->channel)->peer(),
                                         ": it waited past the peer timeout"));
          continue;
        }
        return h;
      }
      // Read timeouts end a silent handshake; this also ends one that trickles.
      handshakes_.ShutOlderThan(Clock::now() - options_.peer_timeout);
      // Waits are short, so that stopping (which shuts the acceptors) is seen soon.
      int wait = 200;
      if (deadline) {
        auto left = std::chrono::duration_cast<std::chrono::milliseconds>(*deadline - Clock::now());
        if (left.count() <= 0) return std::nullopt;
        wait = std::min<int>(wait, static_cast<int>(left.count()) + 1);
      }
      int n = ::poll(fds.data(), fds.size(), wait);
      if (stop_) return std::nullopt;
      if (n < 0 && errno != EINTR) {
        Log(options_.log, absl::StrCat("waiting for primaries failed: ", std::strerror(errno)));
        std::this_thread::sleep_for(vmm::kAcceptRetryPause);
      }
      for (size_t i = 0; n > 0 && i < acceptors_.size(); i++) {
        if (fds[i].revents == 0) continue;
        tcp::socket socket(io_);
        boost::system::error_code ec;
        acceptors_[i]->accept(socket, ec);
        if (stop_) return std::nullopt;
        if (ec == asio::error::would_block || ec == asio::error::try_again) continue;
        if (ec) {  // say, out of descriptors: a primary's connection waits in the backlog
          if (accept_failures_++ == 0) {
            Log(options_.log, absl::StrCat("accepting a primary failed: ", ec.message(),
                                           "; retrying until it works"));
          }
          if (!vmm::AcceptFailedForThatConnection(ec.value())) {
            std::this_thread::sleep_for(vmm::kAcceptRetryPause);
          }
          continue;
        }
        if (accept_failures_ > 0) {
          Log(options_.log, absl::StrCat("accepting primaries again after ", accept_failures_,
                                         " failed accepts"));
          accept_failures_ = 0;
        }
        socket.non_blocking(false, ec);
        handshakes_.Start(std::move(socket));
      }
    }
    return std::nullopt;
  }

  // Authenticates one accepted connection: a primary's (or one path of it).
  Handshaken Handshake(tcp::socket socket) {
    Handshaken h;
    h.channel =
        Channel::Accept(std::move(socket), {options_.identity, options_.key, options_.protection},
                        options_.peer_timeout, &h.session, &h.hello);
    return h;
  }

  // The other connection of a post-copy source (`want`: its main or its demand one), which
  // follows the first (same session) within the peer timeout; nullptr when it does not. Either
  // may come first: their handshakes run side by side.
  std::unique_ptr<Channel> PostcopyPartner(uint64_t session, pb::PostcopyConnection want) {
    auto next = NextHandshake(Clock::now() + options_.peer_timeout);
    if (!next) return nullptr;
    uint64_t next_session = next->session;
    const pb::Hello& h = next->hello;
    auto& ch = next->channel;
    if (!ch.ok()) {
      Reject(
          absl::StrCat("refused a post-copy source's second connection: ", ch.status().message()));
      return nullptr;
    }
    if (h.postcopy() != want || next_session != session) {
      Reject("refused a post-copy source: its second connection was not the other of its pair");
      return nullptr;
    }
    return std::move(*ch);
  }

  // The next primary's connection: one channel, or the paths of one bond made one. A bond whose
  // paths do not all arrive within the peer timeout is dropped; while it forms, connections of
  // any other are refused. A post-copy source's two connections: its main one, and its demand
  // one in `demand`.
  std::unique_ptr<Channel> NextConnection(uint64_t* session, uint64_t* term,
                                          std::unique_ptr<Channel>* demand) {
    while (!stop_) {
      auto next = NextHandshake(std::nullopt);
      if (!next) return nullptr;
      *session = next->session;
      const pb::Hello& hello = next->hello;
      auto& ch = next->channel;
      if (!ch.ok()) {
        Reject(absl::StrCat("refused a primary: ", ch.status().message()));
        continue;
      }
      if (hello.postcopy() == pb::POSTCOPY_MAIN || hello.postcopy() == pb::POSTCOPY_DEMAND) {
        bool main_first = hello.postcopy() == pb::POSTCOPY_MAIN;
        auto other =
            PostcopyPartner(*session, main_first ? pb::POSTCOPY_DEMAND : pb::POSTCOPY_MAIN);
        if (!other) continue;
        if (main_first) {
          *demand = std::move(other);
          return std::move(*ch);
        }
        *demand = std::move(*ch);
        return other;
      }
      if (hello.postcopy() != pb::POSTCOPY_NONE) {
        Reject("refused a connection of an unknown post-copy kind");
        continue;
      }
      {
        std::lock_guard<std::mutex> lock(mu_);
        if (hello.term() < stats_.term) {
          Reject(absl::StrCat("refused a primary of term ", hello.term(),
                              ": this replica holds checkpoints of term ", stats_.term,
                              ", so that primary was superseded"));
          continue;
        }
      }
      *term = hello.term();
      if (hello.bond() == 0 || hello.path_count() <= 1) return std::move(*ch);
      uint64_t bond = hello.bond();
      uint32_t count = hello.path_count();
      std::vector<std::unique_ptr<Channel>> paths(count);
      paths[hello.path_index()] = std::move(*ch);
      uint32_t have = 1;
      auto deadline = std::chrono::steady_clock::now() + options_.peer_timeout;
      while (have < count && !stop_) {
        auto next = NextHandshake(deadline);
        if (!next) break;
        uint64_t next_session = next->session;
        const pb::Hello& h = next->hello;
        auto& path = next->channel;
        if (!path.ok()) {
          Reject(absl::StrCat("refused a primary's path: ", path.status().message()));
        } else if (next_session == *session && h.bond() != bond) {
          // The same primary gave up on this bond (a path it could not reach) and starts
          // another: that one is formed instead.
          if (h.bond() == 0 || h.path_count() <= 1) return std::move(*path);
          Log(options_.log, absl::StrCat("the primary formed a new connection of ", h.path_count(),
                                         " paths instead"));
          bond = h.bond();
          count = h.path_count();
          paths.clear();
          paths.resize(count);
          paths[h.path_index()] = std::move(*path);
          have = 1;
          deadline = std::chrono::steady_clock::now() + options_.peer_timeout;
        } else if (h.bond() != bond || h.path_count() != count || paths[h.path_index()] ||
                   next_session != *session) {
          Reject(absl::StrCat("refused a primary's connection (bond ", h.bond() % 100000, ", path ",
                              h.path_index(), " of ", h.path_count(),
                              "): not a missing path of the connection being formed (bond ",
                              bond % 100000, ", ", have, " of ", count, " paths)"));
        } else {
          paths[h.path_index()] = std::move(*path);
          have++;
        }
      }
      if (have < count) {
        if (!stop_) {
          Reject(absl::StrCat("dropped a primary's connection: ", have, " of its ", count,
                              " paths arrived within ", options_.peer_timeout.count(), " ms"));
        }
        continue;
      }
      return MakeBond(std::move(paths), options_.log);
    }
    return nullptr;
  }

  void Serve() {
    while (!stop_) {
      uint64_t session = 0, term = 0;
      std::unique_ptr<Channel> demand;
      std::unique_ptr<Channel> ch = NextConnection(&session, &term, &demand);
      if (!ch) return;
      if (demand) {
        if (ReceivePostcopy(std::move(ch), std::move(demand))) {
          for (auto& a : acceptors_) ::shutdown(a->native_handle(), SHUT_RDWR);
          return;  // this host runs the VM now (or stopped it): no primary may connect
        }
        continue;
      }
      ch->set_on_frame(options_.on_traffic);
      ch->KeepAlive(kChannelKeepalive);  // a long commit here is no silence
      {
        std::lock_guard<std::mutex> lock(mu_);
        if (stop_) return;  // stopped during the handshake: the channel was not there to shut
        channel_ = std::move(ch);
        stats_.connections++;
        stats_.connected = true;
        stats_.peer = channel_->peer();
      }
      Log(options_.log, absl::StrCat("primary ", channel_->peer(), " connected"));
      bool new_session = session != session_;
      session_ = session;
      MirrorSession conversation({replica_, apply_mu_, stats_, mu_, options_}, channel_->peer(),
                                 term);
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
        for (auto& a : acceptors_) ::shutdown(a->native_handle(), SHUT_RDWR);
        return;
      }
      if (stop_) continue;
      Log(options_.log, absl::StrCat("primary disconnected: ", why.message()));
      if (why.code() == absl::StatusCode::kUnavailable && options_.on_peer_closed) {
        options_.on_peer_closed();
      }
    }
  }

  // A post-copy migration to this host, on the mirror's thread (the node runs the VM it
  // adopts). True when the VM was adopted, whatever happened after.
  bool ReceivePostcopy(std::unique_ptr<Channel> main, std::unique_ptr<Channel> demand) {
    std::string peer = main->peer();
    // Refused before the destination's protocol ran (which tells the source itself): the source
    // is told why on the main connection, so that it need not make sense of a broken pipe.
    auto refuse = [&](absl::string_view why) {
      pb::Frame f;
      f.mutable_refusal()->set_reason(PeerText(why));
      (void)main->Send(f);
    };
    if (!options_.postcopy) {
      refuse("this host takes no post-copy migration");
      Reject(absl::StrCat("refused a post-copy migration from ", peer, ": this host takes none"));
      return false;
    }
    main->set_on_frame(options_.on_traffic);
    PostcopyDestination destination(
        {.identity = options_.identity, .peer_timeout = options_.peer_timeout});
    {
      std::lock_guard<std::mutex> lock(mu_);
      postcopy_ = &destination;
      post_main_ = main.get();
      post_demand_ = demand.get();
      stats_.connections++;
      stats_.connected = true;
      stats_.peer = peer;
    }
    Log(options_.log, absl::StrCat("post-copy source ", peer, " connected"));
    bool adopted = false, ran = false;
    absl::Status s = options_.postcopy([&](const PostcopyAdopt& adopt) {
      ran = true;
      return destination.Run(
          *main, *demand,
          [&](std::unique_ptr<vmm::GuestMemory> memory, const pb::VmSnapshot& state,
              vmm::DirtyBitmap missing, vmm::DirtyBitmap missing_chunks,
              std::function<void(uint64_t)> on_page,
              std::function<void(uint64_t)> on_chunk) -> absl::StatusOr<PostcopyTarget> {
            auto target = adopt(std::move(memory), state, std::move(missing),
                                std::move(missing_chunks), std::move(on_page), std::move(on_chunk));
            adopted = target.ok();
            return target;
          });
    });
    {
      std::lock_guard<std::mutex> lock(mu_);
      postcopy_ = nullptr;
      post_main_ = post_demand_ = nullptr;
      stats_.postcopy = destination.progress();
      stats_.connected = false;
      stats_.handed_over = adopted;
    }
    if (!adopted) {
      if (!ran) refuse(s.message());
      Reject(absl::StrCat("refused a post-copy migration from ", peer, ": ", s.message()));
    }
    return adopted;
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
    if (!roots.ok()) return Refuse(ch, nullptr, roots.status());
    if (auto s = ch.Send(*roots); !s.ok()) return s;
    FrameReadAhead frames(ch, kFramesReadAhead);
    while (!stop_) {
      auto f = frames.Next();
      if (!f.ok()) {
        // A frame that failed its integrity check, or was too large or malformed: the
        // connection is refused like one that carried a bad checkpoint.
        if (f.status().code() != absl::StatusCode::kDataLoss) return f.status();
        {
          std::lock_guard<std::mutex> lock(mu_);
          stats_.rejected++;
        }
        return Refuse(ch, nullptr, f.status());
      }
      auto replies = conversation.Receive(std::move(*f));
      if (!replies.ok()) return Refuse(ch, &frames, replies.status());
      for (const pb::Frame& reply : *replies) {
        if (auto s = ch.Send(reply); !s.ok()) return s;
      }
      if (conversation.handed_over()) {
        ch.Flush(options_.peer_timeout);  // the reply goes before the connection ends
        return absl::CancelledError("the VM was handed over to this host");
      }
    }
    return absl::CancelledError("stopping");
  }

  // Ends a connection for `why`, telling the primary first (pb::Refusal), so that its log and
  // status say why rather than that the connection broke. While `frames` is given, what the
  // primary still sends is read and dropped until it closes (briefly at most), so that it reads
  // the refusal before its sends fail.
  absl::Status Refuse(Channel& ch, FrameReadAhead* frames, absl::Status why) {
    pb::Frame f;
    f.mutable_refusal()->set_reason(PeerText(why.message()));
    if (!ch.Send(f).ok()) return why;
    auto linger = std::min<std::chrono::milliseconds>(options_.peer_timeout, kRefusalLinger);
    ch.Flush(linger);
    auto until = std::chrono::steady_clock::now() + linger;
    while (frames && !stop_ && frames->Next(until).ok()) {
    }
    return why;
  }

  checkpoint::ReplicaStore& replica_;
  Options options_;
  asio::io_context io_;
  std::vector<std::unique_ptr<tcp::acceptor>> acceptors_;  // one per listening address
  uint64_t accept_failures_ = 0;  // in a row: the first is logged, and the recovery
  // Destroyed before what its threads use (options_, io_), after the thread that starts them.
  HandshakePool handshakes_{[this](tcp::socket s) { return Handshake(std::move(s)); }};
  std::thread thread_;
  std::atomic<bool> stop_{false};
  uint16_t port_ = 0;
  uint64_t session_ = 0;
  std::mutex apply_mu_;    // held while the replica is read or changed
  mutable std::mutex mu_;  // stats and the current channel
  std::unique_ptr<Channel> channel_;
  // A post-copy migration under way (under mu_): its progress, and its connections to shut.
  PostcopyDestination* postcopy_ = nullptr;
  Channel *post_main_ = nullptr, *post_demand_ = nullptr;
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

  absl::StatusOr<HandoverReport> HandOver(
      std::chrono::milliseconds timeout, const std::function<absl::Status()>& committed,
      const std::string& reason, const std::function<absl::Status()>& unanswered) override {
    return session_.HandOver(timeout, committed, reason, unanswered);
  }

 private:
  // With run_unprotected, while no mirror is connected: outputs leave without one, once
  // before_unprotected (if set) succeeded; until then they stay held, and the next connection
  // attempt tries again. On the connecting thread (or the constructor, without a hook).
  void GoUnprotected(absl::string_view why) {
    if (!options_.run_unprotected) return;
    gate_.AboutToOpen();  // the witness must hear of it before the hook asks it
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

  // One connection to the mirror: over its one address, or one connection per path made one
  // bond. Paths that cannot be connected are left out (the connection goes on the others, as a
  // new bond); they are tried again at the next connection.
  absl::StatusOr<std::unique_ptr<Channel>> ConnectMirror(asio::io_context& io,
                                                         std::mt19937_64& rng) {
    Channel::Terms terms{options_.identity, options_.key, options_.protection};
    terms.term = options_.term ? options_.term() : 0;
    connection_term_ = terms.term;
    std::vector<Options::Path> paths = options_.mirror_paths;
    if (paths.empty()) paths.push_back({options_.mirror_host, options_.mirror_port});
    std::vector<size_t> use(paths.size());
    for (size_t i = 0; i < use.size(); i++) use[i] = i;
    for (;;) {
      if (use.size() == 1) {  // a connection of its own
        // A connection of its own carries no bond, whatever an earlier try with more paths set.
        Channel::Terms alone{options_.identity, options_.key, options_.protection};
        alone.term = terms.term;
        return Channel::Connect(io, paths[use[0]].host, paths[use[0]].port, alone, session_id_,
                                options_.peer_timeout);
      }
      terms.bond = rng() | 1;
      terms.path_count = static_cast<uint32_t>(use.size());
      std::vector<std::unique_ptr<Channel>> channels;
      std::vector<size_t> reached;
      std::string failures;
      for (size_t k = 0; k < use.size(); k++) {
        if (session_.stopping()) return absl::CancelledError("stopping");
        terms.path_index = static_cast<uint32_t>(k);
        auto ch = Channel::Connect(io, paths[use[k]].host, paths[use[k]].port, terms, session_id_,
                                   options_.peer_timeout);
        if (ch.ok()) {
          channels.push_back(std::move(*ch));
          reached.push_back(use[k]);
        } else {
          absl::StrAppend(&failures, failures.empty() ? "" : "; ", "path ", use[k], ": ",
                          ch.status().message());
        }
      }
      if (reached.size() == use.size()) return MakeBond(std::move(channels), options_.log);
      if (reached.empty()) return absl::UnavailableError(failures);
      Log(options_.log, absl::StrCat(failures, "; connecting over ", reached.size(), " of ",
                                     paths.size(), " paths"));
      channels.clear();  // the mirror drops the unfinished bond when the next one arrives
      use = reached;
    }
  }

  void ConnectLoop() {
    asio::io_context io;
    std::string last_error;
    std::mt19937_64 rng(session_id_);
    while (true) {
      if (session_.stopping()) return;
      if (!released_unprotected_) GoUnprotected(unprotected_why_);
      auto ch = ConnectMirror(io, rng);
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
      if (roots.ok() && roots->has_refusal()) {
        roots = MirrorRefused(roots->refusal());
      } else if (roots.ok() && !roots->has_replica_roots()) {
        roots = absl::DataLossError("expected the replica's tree roots");
      }
      if (!roots.ok()) {
        std::string line(roots.status().message());
        if (roots.status().code() != absl::StatusCode::kAborted) {
          line = absl::StrCat("mirror refused: ", line);
        }
        if (roots.status().code() == absl::StatusCode::kDataLoss) session_.Rejected();
        Log(options_.log, line);
        if (options_.run_unprotected) {
          unprotected_why_ = absl::StrCat(line, ": ");
          GoUnprotected(unprotected_why_);
        } else {
          session_.SetState(absl::StrCat(line, "; outputs held"));
        }
        no_progress_++;
        BackOff(rng);
        continue;
      }
      session_.Open(std::move(*ch), roots->replica_roots());
      absl::Status why = session_.Synchronise(sync_batch_pages_);
      if (why.ok()) {
        // From the full checkpoint on, outputs wait for the mirror (they were released so far
        // only when running unprotected; the full checkpoint covers everything before it). The
        // mirror may commit checkpoints of this connection's term from now on.
        if (options_.on_mirror_commits) options_.on_mirror_commits(connection_term_);
        if (options_.run_unprotected) gate_.SetHolding(true);
        released_unprotected_ = false;
        why = session_.Stream();
      }
      PrimarySession::Outcome outcome = session_.Close();
      if (why.code() == absl::StatusCode::kCancelled) return;  // stopping, not a lost mirror
      // The mirror's own words, when it said why it ended the connection, rather than how the
      // end was seen here (often "Broken pipe").
      if (outcome.refused) why = *outcome.refused;
      if (why.code() == absl::StatusCode::kDataLoss) session_.Rejected();
      if (outcome.handed_over) return;  // the VM runs at the mirror now
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
  uint64_t session_id_ = 0;       // tells the mirror whether epochs continue or start afresh
  uint64_t connection_term_ = 0;  // the term the current connection's handshake carried
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
