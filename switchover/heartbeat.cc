// Heartbeats: one UDP socket per path, all served by one thread. Each tick sends a heartbeat on
// every path and re-evaluates which paths (and so whether the peer) are alive. Each path's
// socket is connected to the peer's end of it, so that the kernel drops datagrams from anywhere
// else before they take room in the socket's buffer: a flood of them cannot crowd out the peer's.
// clang-format off
// Boost 1.74 uses std::exchange without including <utility>: include it first.
#include <utility>
#include <boost/asio.hpp>
// clang-format on
#include <algorithm>
#include <array>
#include <atomic>
#include <mutex>
#include <thread>

#include "absl/strings/str_cat.h"
#include "switchover/datagram.h"
#include "switchover/failure_detector.h"
#include "switchover/switchover.h"

namespace romulus::switchover {
namespace {

namespace asio = boost::asio;
using asio::ip::udp;

constexpr size_t kSentRing = 256;                       // our send times, by seq, for RTT
constexpr std::chrono::milliseconds kLossWindow{1000};  // loss is measured over this
// Datagrams read per wake-up before the thread turns to its other work (ticks, other paths).
constexpr int kDrainBatch = 256;
// Asked for each path's receive buffer (the kernel may give less): room for a burst of the
// peer's datagrams that arrives while this host is too busy to read them.
constexpr int kReceiveBuffer = 1 << 20;

struct Path {
  Path(asio::io_context& io, FailureDetector::Options detect) : socket(io), detector(detect) {}
  udp::socket socket;
  udp::endpoint remote, from;
  std::string name;
  std::array<char, kMaxDatagramBytes + 1> buffer;

  uint64_t seq = 0;  // our last heartbeat on this path
  std::array<Clock::time_point, kSentRing> sent_at{};
  uint64_t sent = 0, rejected = 0;

  // The peer, as heard on this path: when, and how late its heartbeats came (FailureDetector).
  bool heard = false;
  uint64_t peer_session = 0, peer_seq = 0, received = 0;
  Clock::time_point last_rx{};
  FailureDetector detector;
  uint64_t window_seq = 0, window_received = 0;
  Clock::time_point window_start{};
  double loss = 0, rtt_ms = -1;
  bool up = false;  // as last reported
  // Heartbeats received when the peer's replication stream closed (while it stays closed).
  uint64_t received_at_close = 0;
  // The peer's host answered a heartbeat of ours with "port unreachable" since the last one it
  // sent: no process of the peer holds the path's port.
  bool refused = false;
};

std::string Show(const udp::endpoint& e) {
  return absl::StrCat(e.address().to_string(), ":", e.port());
}

class HeartbeatImpl : public Heartbeat {
 public:
  explicit HeartbeatImpl(Options o) : o_(std::move(o)), session_(RandomU64()), timer_(io_) {}

  ~HeartbeatImpl() override {
    io_.stop();
    if (thread_.joinable()) thread_.join();
  }

  absl::Status Open() {
    if (o_.paths.empty()) return absl::InvalidArgumentError("no heartbeat paths configured");
    if (o_.interval.count() <= 0 || o_.timeout <= o_.interval) {
      return absl::InvalidArgumentError("heartbeat timeout must be longer than the interval");
    }
    if (o_.timeout_max.count() == 0) o_.timeout_max = 4 * o_.timeout;
    if (o_.timeout_max < o_.timeout) {
      return absl::InvalidArgumentError("heartbeat timeout ceiling must be at least the timeout");
    }
    for (const PathConfig& pc : o_.paths) {
      auto local = ToUdp(pc.local);
      if (!local.ok()) return local.status();
      auto remote = ToUdp(pc.remote);
      if (!remote.ok()) return remote.status();
      auto p = std::make_unique<Path>(
          io_, FailureDetector::Options{.floor = o_.timeout, .ceiling = o_.timeout_max});
      boost::system::error_code ec;
      p->socket.open(local->protocol(), ec);
      if (!ec) p->socket.bind(*local, ec);
      if (!ec) p->socket.connect(*remote, ec);
      if (!ec) p->socket.non_blocking(true, ec);
      if (!ec) p->socket.set_option(asio::socket_base::receive_buffer_size(kReceiveBuffer), ec);
      if (ec) {
        return absl::UnavailableError(
            absl::StrCat("heartbeat path: cannot bind ", Show(*local), ": ", ec.message()));
      }
      p->remote = *remote;
      p->name = absl::StrCat(Show(p->socket.local_endpoint()), " -> ", Show(*remote));
      paths_.push_back(std::move(p));
    }
    for (auto& p : paths_) Receive(*p);
    Tick();
    thread_ = std::thread([this] { io_.run(); });
    return absl::OkStatus();
  }

  void NoteTrafficFromPeer() override {
    last_traffic_ns_.store(Clock::now().time_since_epoch().count(), std::memory_order_relaxed);
    stream_closed_.store(false, std::memory_order_relaxed);  // a new connection
  }

  void NotePeerClosedStream() override {
    {
      std::lock_guard<std::mutex> lock(mu_);
      for (auto& p : paths_) p->received_at_close = p->received;
      stream_closed_.store(true, std::memory_order_relaxed);
    }
    // A heartbeat on every path now rather than at the next tick: if the peer's process is gone,
    // its host's "port unreachable" comes back within a round trip (Drain).
    asio::post(io_, [this] {
      {
        std::lock_guard<std::mutex> lock(mu_);
        auto now = Clock::now();
        for (auto& p : paths_) Send(*p, now);  // may find a refusal from an earlier one
      }
      Judge();
    });
  }

  bool peer_closed_stream() const override {
    std::lock_guard<std::mutex> lock(mu_);
    return StreamClosedLocked();
  }

  bool peer_alive() const override {
    std::lock_guard<std::mutex> lock(mu_);
    return AliveLocked(Clock::now());
  }

  bool never_heard() const override {
    std::lock_guard<std::mutex> lock(mu_);
    for (const auto& p : paths_) {
      if (p->heard) return false;
    }
    return last_traffic_ns_.load(std::memory_order_relaxed) == 0;
  }

  void SetRole(const std::string& role) override {
    std::lock_guard<std::mutex> lock(role_mu_);
    role_ = role;
  }

  std::string peer_role() const override {
    std::lock_guard<std::mutex> lock(mu_);
    return peer_role_;
  }

  std::string peer_node() const override {
    std::lock_guard<std::mutex> lock(mu_);
    return peer_node_;
  }

  std::vector<PathStatus> paths() const override {
    std::lock_guard<std::mutex> lock(mu_);
    std::vector<PathStatus> out;
    auto now = Clock::now();
    for (const auto& p : paths_) {
      PathStatus s;
      s.name = p->name;
      s.up = PathUp(*p, now);
      s.loss = s.up ? p->loss : 1.0;
      s.rtt_ms = p->rtt_ms;
      s.sent = p->sent;
      s.received = p->received;
      s.rejected = p->rejected;
      s.timeout = p->detector.timeout(now);
      out.push_back(s);
    }
    return out;
  }

 private:
  std::chrono::milliseconds timeout() const override {
    std::lock_guard<std::mutex> lock(mu_);
    return TimeoutLocked(Clock::now());
  }

  bool PathUp(const Path& p, Clock::time_point now) const {
    if (p.refused && StreamClosedLocked()) return false;  // the peer's process is gone
    return p.heard && now - p.detector.last_heard() < PathTimeoutLocked(p, now);
  }

  // Every path's port refuses datagrams at the peer's host, and its replication stream closed:
  // what a process that died leaves behind, seen as soon as one heartbeat of ours finds it gone
  // rather than after the silence its gaps call for.
  bool ProcessGoneLocked() const {
    if (!StreamClosedLocked()) return false;
    for (const auto& p : paths_) {
      if (!p->refused) return false;
    }
    return true;
  }

  std::chrono::milliseconds PathTimeoutLocked(const Path& p, Clock::time_point now) const {
    // With the stream closed, what the gaps need (at least two intervals), but no more than the
    // configured timeout: gaps learned while the host was busy (starting, synchronising) would
    // otherwise hold a dead peer for up to the ceiling.
    return StreamClosedLocked()
               ? std::min(o_.timeout, p.detector.TimeoutAbove(now, 2 * o_.interval))
               : p.detector.timeout(now);
  }

  // The peer's replication stream ended from its side, and no path heard three heartbeats since
  // (those sent before it died may still be on their way, or waiting in a busy host's socket; a
  // live peer's keep coming an interval apart).
  bool StreamClosedLocked() const {
    if (!stream_closed_.load(std::memory_order_relaxed)) return false;
    for (const auto& p : paths_) {
      if (p->received >= p->received_at_close + 3) return false;
    }
    return true;
  }

  std::chrono::milliseconds TimeoutLocked(Clock::time_point now) const {
    std::chrono::milliseconds t =
        StreamClosedLocked() ? std::min(o_.timeout, 2 * o_.interval) : o_.timeout;
    for (const auto& p : paths_) t = std::max(t, PathTimeoutLocked(*p, now));
    return t;
  }

  bool AliveLocked(Clock::time_point now) const {
    for (const auto& p : paths_) {
      if (PathUp(*p, now)) return true;
    }
    // The replication stream's frames are no heartbeats: how late they come is not learned.
    if (StreamClosedLocked()) return false;
    int64_t t = last_traffic_ns_.load(std::memory_order_relaxed);
    return t != 0 && now - Clock::time_point(Clock::duration(t)) < TimeoutLocked(now);
  }

  void Log(const std::string& line) {
    if (o_.log) o_.log(line);
  }

  void Tick() {
    // Heartbeats that arrived while this thread could not run (a busy host) are in the sockets:
    // they count before anything is judged.
    for (auto& p : paths_) Drain(*p);
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto now = Clock::now();
      for (auto& p : paths_) Send(*p, now);
    }
    Judge();
    auto now = Clock::now();
    next_tick_ = next_tick_ + o_.interval < now ? now + o_.interval  // fell behind: no burst
                                                : next_tick_ + o_.interval;
    timer_.expires_at(next_tick_);
    timer_.async_wait([this](const boost::system::error_code& ec) {
      if (!ec) Tick();
    });
  }

  // Re-evaluates which paths, and so whether the peer, are alive; says what changed.
  void Judge() {
    auto now = Clock::now();
    std::vector<std::string> lines;
    int transition = 0;  // +1 back, -1 dead
    std::chrono::milliseconds timeout{0};
    bool stream_closed = false, gone = false;
    {
      std::lock_guard<std::mutex> lock(mu_);
      for (auto& p : paths_) {
        bool up = PathUp(*p, now);
        if (up != p->up) {
          p->up = up;
          lines.push_back(absl::StrCat("path ", p->name, up ? " up" : " down"));
        }
        if (now - p->window_start >= kLossWindow) {
          if (p->peer_seq > p->window_seq) {
            double expected = static_cast<double>(p->peer_seq - p->window_seq);
            p->loss = 1.0 - static_cast<double>(p->received - p->window_received) / expected;
            if (p->loss < 0) p->loss = 0;
          }
          p->window_seq = p->peer_seq;
          p->window_received = p->received;
          p->window_start = now;
        }
      }
      bool alive = AliveLocked(now);
      timeout = TimeoutLocked(now);
      stream_closed = StreamClosedLocked();
      gone = ProcessGoneLocked();
      if (alive != alive_) {
        transition = alive ? 1 : -1;
        alive_ = alive;
      }
    }
    for (const auto& line : lines) Log(line);
    if (transition < 0) {
      Log(gone ? std::string("peer dead: its process is gone (its replication stream closed, and "
                             "its host refuses heartbeats on every path)")
               : absl::StrCat("peer dead: no path heard from it for ", timeout.count(), " ms",
                              stream_closed ? ", and its replication stream closed" : ""));
      if (o_.on_peer_dead) o_.on_peer_dead();
    } else if (transition > 0) {
      Log("peer alive");
      if (o_.on_peer_back) o_.on_peer_back();
    }
  }

  void Send(Path& p, Clock::time_point now) {
    pb::SwitchoverMessage m;
    pb::Heartbeat* h = m.mutable_heartbeat();
    h->set_vm_id(o_.vm_id);
    h->set_node(o_.node);
    {
      std::lock_guard<std::mutex> lock(role_mu_);
      h->set_role(role_);
    }
    h->set_session(session_);
    h->set_seq(++p.seq);
    if (p.heard) {
      h->set_echo_seq(p.peer_seq);
      h->set_echo_hold_us(
          std::chrono::duration_cast<std::chrono::microseconds>(now - p.last_rx).count());
    }
    p.sent_at[p.seq % kSentRing] = now;
    boost::system::error_code ec;
    p.socket.send(asio::buffer(Seal(o_.key, m)), 0, ec);
    if (!ec) ++p.sent;  // an unreachable path refuses sends: it shows as not sending
    if (ec == asio::error::connection_refused) p.refused = true;
  }

  void Receive(Path& p) {
    p.socket.async_wait(udp::socket::wait_read, [this, &p](const boost::system::error_code& ec) {
      if (ec == asio::error::operation_aborted) return;
      Drain(p);
      Receive(p);
    });
  }

  // Reads what waits in the path's socket, up to a batch. The kernel reports an ICMP "port
  // unreachable" before datagrams queued earlier: those, read after a refusal, were sent before
  // it and do not clear it.
  void Drain(Path& p) {
    bool refused = false;
    for (int i = 0; i < kDrainBatch; i++) {
      boost::system::error_code ec;
      size_t n = p.socket.receive_from(asio::buffer(p.buffer), p.from, 0, ec);
      if (ec == asio::error::would_block || ec == asio::error::try_again) break;
      if (!ec) {
        Accept(p, absl::string_view(p.buffer.data(), n), /*clears_refusal=*/!refused);
      } else if (ec == asio::error::connection_refused) {
        std::lock_guard<std::mutex> lock(mu_);
        p.refused = true;  // unauthenticated: a forged one at worst starts a failover, which
                           // the witness keeps safe
        refused = true;
      }
    }
    if (refused) Judge();
  }

  void Accept(Path& p, absl::string_view bytes, bool clears_refusal) {
    auto now = Clock::now();
    std::lock_guard<std::mutex> lock(mu_);
    if (p.from != p.remote) {  // before the MAC: cheap
      ++p.rejected;
      return;
    }
    auto m = switchover::Open(o_.key, bytes);
    if (!m.ok() || !m->has_heartbeat()) {
      ++p.rejected;
      return;
    }
    const pb::Heartbeat& h = m->heartbeat();
    // Heartbeats are numbered from 1: a 0 is no heartbeat.
    if (h.vm_id() != o_.vm_id || h.node() == o_.node || h.node().size() > kMaxNameBytes ||
        h.role().size() > kMaxNameBytes || h.seq() == 0) {
      ++p.rejected;
      return;
    }
    if (h.session() == p.peer_session && p.heard) {
      if (h.seq() <= p.peer_seq) {  // replayed or reordered
        ++p.rejected;
        return;
      }
    } else if (p.heard && PathUp(p, now)) {
      // A second sender claiming the peer's place while the peer is alive: a replay.
      ++p.rejected;
      return;
    } else {
      p.peer_session = h.session();
      p.detector.Forget();
      p.window_seq = h.seq() - 1;
      p.window_received = p.received;
      p.window_start = now;
    }
    if (h.echo_seq() != 0 && h.echo_seq() <= p.seq && p.seq - h.echo_seq() < kSentRing) {
      // The peer held our heartbeat for echo_hold_us of the time since we sent it; a hold longer
      // than that time is no measurement (and converted to our clock's units, it could overflow).
      auto since_sent = std::chrono::duration_cast<std::chrono::microseconds>(
          now - p.sent_at[h.echo_seq() % kSentRing]);
      if (since_sent.count() >= 0 &&
          h.echo_hold_us() <= static_cast<uint64_t>(since_sent.count())) {
        auto rtt = since_sent - std::chrono::microseconds(h.echo_hold_us());
        double ms = std::chrono::duration<double, std::milli>(rtt).count();
        p.rtt_ms = p.rtt_ms < 0 ? ms : 0.8 * p.rtt_ms + 0.2 * ms;
      }
    }
    p.heard = true;
    if (clears_refusal) p.refused = false;
    p.peer_seq = h.seq();
    p.last_rx = now;
    p.detector.Heard(now);
    ++p.received;
    peer_role_ = h.role();
    peer_node_ = h.node();
  }

  Options o_;
  std::mutex role_mu_;
  std::string role_ = o_.role;  // guarded by role_mu_: it changes with the host's role
  const uint64_t session_;
  asio::io_context io_;
  asio::steady_timer timer_;
  Clock::time_point next_tick_{};
  std::vector<std::unique_ptr<Path>> paths_;
  std::thread thread_;
  mutable std::mutex mu_;
  std::atomic<int64_t> last_traffic_ns_{0};
  std::atomic<bool> stream_closed_{false};  // the peer's stream ended (NotePeerClosedStream)
  bool alive_ = false;
  std::string peer_role_, peer_node_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<Heartbeat>> Heartbeat::Start(Options options) {
  auto hb = std::make_unique<HeartbeatImpl>(std::move(options));
  if (auto s = hb->Open(); !s.ok()) return s;
  return hb;
}

}  // namespace romulus::switchover
