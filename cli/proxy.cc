#include "cli/proxy.h"

#include <atomic>
#include <boost/asio.hpp>
#include <deque>
#include <optional>
#include <set>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "cli/ledger_client.h"
#include "guest/abi.h"
#include "vmm/ledger_protocol.h"

namespace romulus::cli {
namespace {

namespace asio = boost::asio;
using asio::ip::tcp;
using Clock = std::chrono::steady_clock;
using boost::system::error_code;

// How the proxy knows the primary: the host whose ledger port accepts a connection. A host
// opens its ledger endpoint when it starts running the VM (as the first primary, promoted, or
// handed the VM) and closes it when it gives the VM up, so a mirror's port refuses. That is the
// very fact the proxy needs (where a request can go), it works from any machine that can reach
// the clients' service (no unix control socket on the proxy's machine, no key, no heartbeat
// path configured on the hosts), and it cannot be out of date the way a status answer can. A
// host that accepts but does not answer (paused, or holding its outputs while it has no
// mirror) is left after answer_timeout, and the others are tried first.
//
// Exactly-once: requests from one client connection go to a host one at a time, in order, so
// that at most one request per connection is unanswered when a host fails. Its resend carries
// the same (client id, request id); the guest keeps, per client id, the last request id and
// its answer in guest memory, which every checkpoint carries to the mirror. If the old primary
// applied it and that epoch committed, the new primary answers the resend from that table; if
// the epoch did not commit, nobody saw its answer (outputs wait for their commit) and the new
// primary applies it once.

constexpr int kClientSocketBuffer = 64 << 10;

struct Request {
  std::string frame;  // as the client sent it, length included; sent again as it is
  uint64_t client_id = 0, request_id = 0;
  Clock::time_point deadline;
  bool sent = false;  // has reached a host: until answered its outcome is unknown
};

class ProxyImpl;

// One connection to a host, for one client connection. Its handlers compare it with the
// client's current one, so a late completion from a connection given up does nothing.
struct Upstream {
  Upstream(asio::io_context& io, int host) : socket(io), timer(io), host(host) {}
  tcp::socket socket;
  asio::steady_timer timer;  // connect, then each answer, must come before `due`
  Clock::time_point due;
  int host;
  bool ready = false;  // connected
  std::string out;     // the frame being written
  uint8_t header[4];
  std::vector<uint8_t> body;
};

class ClientConnection : public std::enable_shared_from_this<ClientConnection> {
 public:
  ClientConnection(ProxyImpl& proxy, tcp::socket socket);
  void Start() { ReadHeader(); }
  // The proxy found a primary: requests waiting for one go there; a connection to another host
  // is given up (that host lost the VM, even if this connection has not noticed yet).
  void PrimaryChanged();
  std::string peer() const { return peer_; }
  size_t queued() const { return queue_.size(); }

 private:
  // The client's side.
  void ReadHeader();
  void ReadBody(uint32_t len);
  void OnRequest();
  void Refuse(const std::string& why);
  void Reply(std::string frame);
  void ReplyError(const Request& r, uint32_t status, const std::string& why);
  void WriteNext();
  void MaybeResumeReading();
  bool CanRead() const {
    return !closed_ && !draining_ && queue_.size() < Proxy::kMaxQueuedRequests &&
           queued_bytes_ < Proxy::kMaxQueuedRequestBytes &&
           out_bytes_ < Proxy::kMaxQueuedReplyBytes;
  }
  void MaybeFinish();
  void Close();

  // The hosts' side.
  void Forward();
  void Connect();
  void ReadAnswerHeader();
  void ReadAnswerBody(uint32_t len);
  void OnAnswer();
  void ArmAnswerTimer();
  void HostFailed(const std::string& why);
  void DropUpstream();
  void ArmHoldTimer();
  void OnHoldTimer();

  ProxyImpl& proxy_;
  tcp::socket socket_;
  std::string peer_;
  uint8_t header_[4];
  std::vector<uint8_t> body_;
  bool reading_ = false;    // a read from the client is outstanding
  bool draining_ = false;   // no more requests: answer those queued, then close
  std::string last_words_;  // sent once drained (a refused client's error)
  bool closed_ = false;
  std::deque<Request> queue_;  // the front is at the host when in_flight_
  size_t queued_bytes_ = 0;
  bool in_flight_ = false;
  asio::steady_timer hold_timer_;
  std::shared_ptr<Upstream> up_;
  std::deque<std::string> out_;
  size_t out_bytes_ = 0;
};

class ProxyImpl : public Proxy {
 public:
  explicit ProxyImpl(ProxyOptions o)
      : acceptor_(io_), o_(std::move(o)), probe_socket_(io_), probe_timer_(io_) {}

  ~ProxyImpl() override {
    io_.stop();
    if (thread_.joinable()) thread_.join();
    clients_.clear();  // the rest go with the handlers that hold them, with io_
  }

  absl::Status Listen() {
    if (o_.hosts.empty()) return absl::InvalidArgumentError("a proxy needs at least one host");
    for (const std::string& h : o_.hosts) {
      std::string host;
      uint16_t port = 0;
      if (auto s = ParseLedgerAddress(h, &host, &port); !s.ok()) return s;
      error_code ec;
      hosts_.emplace_back(asio::ip::make_address(host, ec), port);
    }
    stale_.assign(hosts_.size(), false);
    error_code ec;
    auto addr = asio::ip::make_address(o_.listen, ec);
    if (ec) return absl::InvalidArgumentError(absl::StrCat("bad listen address '", o_.listen, "'"));
    tcp::endpoint ep(addr, o_.port);
    acceptor_.open(ep.protocol(), ec);
    if (!ec) acceptor_.set_option(tcp::acceptor::reuse_address(true), ec);
    // ClientConnection connections inherit these: the kernel's buffers for a client are bounded too
    // (a client has one request at a host at a time, so larger ones would buy nothing).
    if (!ec) acceptor_.set_option(asio::socket_base::send_buffer_size(kClientSocketBuffer), ec);
    if (!ec) acceptor_.set_option(asio::socket_base::receive_buffer_size(kClientSocketBuffer), ec);
    if (!ec) acceptor_.bind(ep, ec);
    if (!ec) acceptor_.listen(asio::socket_base::max_listen_connections, ec);
    if (ec) {
      return absl::UnavailableError(
          absl::StrCat("proxy cannot listen on ", o_.listen, ":", o_.port, ": ", ec.message()));
    }
    port_ = acceptor_.local_endpoint().port();
    Accept();
    FindPrimary(0);
    thread_ = std::thread([this] { io_.run(); });
    return absl::OkStatus();
  }

  uint16_t port() const override { return port_; }
  Stats stats() const override {
    Stats s;
    s.clients = clients_accepted_.load();
    s.requests = requests_.load();
    s.answered = answered_.load();
    s.resent = resent_.load();
    s.expired = expired_.load();
    s.malformed = malformed_.load();
    s.host_failures = host_failures_.load();
    s.primaries = primaries_.load();
    s.primary = primary_.load();
    s.stale_answers = stale_answers_.load();
    s.newest_term = newest_term_.load();
    return s;
  }

  // An answer of `term` from `host` may be forwarded: no answer of a newer term came before it
  // (the fencing token: a VM that a newer term superseded never speaks through the proxy). Term
  // 0: hosts without a witness, which have no terms. (io thread)
  bool TermCurrent(int host, uint64_t term) {
    if (term == 0) return true;
    auto h = static_cast<size_t>(host);
    if (term < newest_term_.load()) {
      stale_answers_++;
      stale_[h] = true;
      return false;
    }
    newest_term_ = term;
    stale_[h] = false;
    return true;
  }

  // For the clients (io thread).
  const ProxyOptions& options() const { return o_; }
  asio::io_context& io() { return io_; }
  int primary() const { return primary_.load(); }
  const tcp::endpoint& host(int i) const { return hosts_[static_cast<size_t>(i)]; }
  std::string HostName(int i) const { return o_.hosts[static_cast<size_t>(i)]; }
  void Log(const std::string& line) {
    if (o_.log) o_.log(line);
  }
  void Request() { requests_++; }
  void Answered() { answered_++; }
  void Resent() { resent_++; }
  void Expired() { expired_++; }
  void Malformed() { malformed_++; }

  // A client's connection to `host` failed: unless the proxy has moved on from that host
  // already, it looks for the primary, trying the other hosts first.
  void HostFailed(int host, const std::string& why) {
    host_failures_++;
    if (primary_.load() != host) return;
    Log(absl::StrCat("primary ", HostName(host), " failed: ", why,
                     "; holding requests while the hosts are tried"));
    primary_ = -1;
    lost_at_ = Clock::now();
    FindPrimary(host + 1);
  }

  void Remove(const std::shared_ptr<ClientConnection>& c) {
    clients_.erase(c);
    if (accept_paused_ && clients_.size() < o_.max_clients) {
      accept_paused_ = false;
      Accept();
    }
  }

 private:
  void Accept() {
    if (clients_.size() >= o_.max_clients) {
      if (!accept_paused_) {
        Log(absl::StrCat(clients_.size(),
                         " clients connected (max_clients): new ones wait until one leaves"));
      }
      accept_paused_ = true;
      return;
    }
    acceptor_.async_accept([this](error_code ec, tcp::socket socket) {
      if (ec == asio::error::operation_aborted) return;
      if (ec) {
        // Out of descriptors, say: the connection waits in the backlog; try again shortly.
        if (accept_failures_++ == 0) Log(absl::StrCat("accept failed: ", ec.message()));
        accept_retry_ = std::make_unique<asio::steady_timer>(io_, std::chrono::milliseconds(50));
        accept_retry_->async_wait([this](error_code e) {
          if (!e) Accept();
        });
        return;
      }
      accept_failures_ = 0;
      clients_accepted_++;
      auto c = std::make_shared<ClientConnection>(*this, std::move(socket));
      clients_.insert(c);
      c->Start();
      Accept();
    });
  }

  // Tries the hosts in turn from `first` until one accepts a connection: that one is the
  // primary. After a round in which none did, waits probe_interval before the next.
  void FindPrimary(int first) {
    if (probing_) return;
    probing_ = true;
    probe_next_ = first;
    probe_round_.clear();
    probe_stale_ = false;
    Probe();
  }

  void Probe() {
    int i = probe_next_ % static_cast<int>(hosts_.size());
    uint64_t serial = ++probe_serial_;
    error_code ec;
    probe_socket_.close(ec);
    probe_timer_.expires_after(o_.answer_timeout);
    probe_timer_.async_wait([this, serial](error_code e) {
      error_code ignored;
      if (!e && serial == probe_serial_) probe_socket_.close(ignored);  // completes the connect
    });
    probe_socket_.async_connect(hosts_[static_cast<size_t>(i)], [this, i, serial](error_code e) {
      if (serial != probe_serial_) return;
      probe_timer_.cancel();
      error_code ignored;
      probe_socket_.close(ignored);
      // A host that answered in an older term is tried only once a round found no other.
      bool stale = stale_[static_cast<size_t>(i)] && !probe_stale_;
      if (!e && !stale) return Found(i);
      if (stale) e = asio::error::make_error_code(asio::error::connection_refused);
      probe_round_.push_back(absl::StrCat(HostName(i), " ",
                                          stale ? std::string("answered in an older term")
                                          : e == asio::error::operation_aborted
                                              ? std::string("did not answer")
                                              : e.message()));
      probe_next_++;
      if (probe_round_.size() < hosts_.size()) return Probe();
      if (!told_unreachable_) {
        told_unreachable_ = true;
        Log(absl::StrCat("no host accepts (", absl::StrJoin(probe_round_, "; "),
                         "); holding requests, trying again every ", o_.probe_interval.count(),
                         " ms"));
      }
      probe_round_.clear();
      probe_stale_ = true;
      probe_timer_.expires_after(o_.probe_interval);
      probe_timer_.async_wait([this, serial](error_code e2) {
        if (!e2 && serial == probe_serial_) Probe();
      });
    });
  }

  void Found(int i) {
    probing_ = false;
    told_unreachable_ = false;
    primary_ = i;
    primaries_++;
    size_t held = 0;
    for (const auto& c : clients_) held += c->queued();
    std::string after =
        lost_at_
            ? absl::StrCat(
                  ", ",
                  std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - *lost_at_)
                      .count(),
                  " ms after the last one failed")
            : "";
    Log(absl::StrCat("primary: ", HostName(i), after, "; ", held, " requests held"));
    lost_at_.reset();
    // A copy: a client may leave (and be erased) while it is told.
    std::vector<std::shared_ptr<ClientConnection>> all(clients_.begin(), clients_.end());
    for (const auto& c : all) c->PrimaryChanged();
  }

  asio::io_context io_;  // first: destroyed last, after everything that belongs to it
  tcp::acceptor acceptor_;
  ProxyOptions o_;
  std::unique_ptr<asio::steady_timer> accept_retry_;
  uint64_t accept_failures_ = 0;
  bool accept_paused_ = false;
  std::vector<tcp::endpoint> hosts_;
  std::set<std::shared_ptr<ClientConnection>> clients_;
  // Finding the primary (io thread).
  tcp::socket probe_socket_;
  asio::steady_timer probe_timer_;
  bool probing_ = false, told_unreachable_ = false;
  bool probe_stale_ = false;  // this round tries hosts that answered in an older term too
  std::vector<bool> stale_;   // per host: its last answer was of an older term
  int probe_next_ = 0;
  uint64_t probe_serial_ = 0;
  std::vector<std::string> probe_round_;  // why each host of this round refused
  std::optional<Clock::time_point> lost_at_;
  std::atomic<int> primary_{-1};
  uint16_t port_ = 0;
  std::thread thread_;
  std::atomic<uint64_t> clients_accepted_{0}, requests_{0}, answered_{0}, resent_{0}, expired_{0},
      malformed_{0}, host_failures_{0}, primaries_{0}, stale_answers_{0}, newest_term_{0};
};

ClientConnection::ClientConnection(ProxyImpl& proxy, tcp::socket socket)
    : proxy_(proxy), socket_(std::move(socket)), hold_timer_(proxy.io()) {
  error_code ec;
  auto ep = socket_.remote_endpoint(ec);
  peer_ = ec ? "unknown" : absl::StrCat(ep.address().to_string(), ":", ep.port());
  socket_.set_option(tcp::no_delay(true), ec);
}

// ---- the client's side ----

void ClientConnection::ReadHeader() {
  if (reading_) return;
  if (!CanRead()) return;  // MaybeResumeReading() goes on once there is room
  reading_ = true;
  asio::async_read(
      socket_, asio::buffer(header_), [self = shared_from_this()](error_code ec, size_t) {
        self->reading_ = false;
        if (self->closed_) return;
        if (ec) {
          // The client closed its side (or the connection broke): what it sent is still answered,
          // as far as it still reads.
          self->draining_ = true;
          return self->MaybeFinish();
        }
        uint32_t len = vmm::DecodeFrameLength(self->header_);
        if (len == 0 || len > vmm::kMaxLedgerFrame) {
          return self->Refuse(
              absl::StrCat("frame of ", len, " bytes (1 to ", vmm::kMaxLedgerFrame, " allowed)"));
        }
        self->ReadBody(len);
      });
}

void ClientConnection::ReadBody(uint32_t len) {
  body_.resize(len);
  reading_ = true;
  asio::async_read(socket_, asio::buffer(body_),
                   [self = shared_from_this()](error_code ec, size_t) {
                     self->reading_ = false;
                     if (self->closed_) return;
                     if (ec) {
                       self->draining_ = true;
                       return self->MaybeFinish();
                     }
                     self->OnRequest();
                   });
}

void ClientConnection::OnRequest() {
  pb::LedgerRequest q;
  if (!q.ParseFromArray(body_.data(), static_cast<int>(body_.size()))) {
    return Refuse("malformed request frame");
  }
  // The host answers bad ops and ids itself; the proxy needs only the ids to match the answer.
  Request r;
  r.frame.assign(reinterpret_cast<const char*>(header_), 4);
  r.frame.append(reinterpret_cast<const char*>(body_.data()), body_.size());
  r.client_id = q.client_id();
  r.request_id = q.request_id();
  r.deadline = Clock::now() + proxy_.options().hold;
  proxy_.Request();
  queued_bytes_ += r.frame.size();
  queue_.push_back(std::move(r));
  if (queue_.size() == 1) ArmHoldTimer();
  Forward();
  ReadHeader();
}

// A frame the proxy cannot read: the client and the proxy no longer agree where frames begin,
// so nothing after it can be read. What it sent before is still answered; then one error frame
// (request id 0: it answers no request) says why, and the connection closes.
void ClientConnection::Refuse(const std::string& why) {
  proxy_.Malformed();
  proxy_.Log(absl::StrCat("client ", peer_, ": ", why, "; answering its ", queue_.size(),
                          " earlier requests, then closing"));
  pb::LedgerResponse r;
  r.set_status(RML_ERR_MALFORMED);
  r.set_error(absl::StrCat("romulus proxy: ", why, "; closing the connection"));
  last_words_ = vmm::EncodeFrame(r);
  draining_ = true;
  MaybeFinish();
}

void ClientConnection::ReplyError(const Request& r, uint32_t status, const std::string& why) {
  pb::LedgerResponse out;
  out.set_client_id(r.client_id);
  out.set_request_id(r.request_id);
  out.set_status(status);
  out.set_error(why);
  Reply(vmm::EncodeFrame(out));
}

void ClientConnection::Reply(std::string frame) {
  if (closed_) return;
  out_bytes_ += frame.size();
  out_.push_back(std::move(frame));
  if (out_.size() == 1) WriteNext();
}

void ClientConnection::WriteNext() {
  asio::async_write(socket_, asio::buffer(out_.front()),
                    [self = shared_from_this()](error_code ec, size_t) {
                      if (self->closed_) return;
                      if (ec) return self->Close();  // the client is gone
                      self->out_bytes_ -= self->out_.front().size();
                      self->out_.pop_front();
                      if (!self->out_.empty()) self->WriteNext();
                      self->Forward();  // held while the client had answers to read
                      self->MaybeResumeReading();
                      self->MaybeFinish();
                    });
}

void ClientConnection::MaybeResumeReading() {
  if (!reading_ && CanRead()) ReadHeader();
}

// A draining client closes once everything queued is answered and written.
void ClientConnection::MaybeFinish() {
  if (closed_ || !draining_ || !queue_.empty()) return;
  if (!last_words_.empty()) {
    Reply(std::move(last_words_));
    last_words_.clear();
  }
  if (out_.empty()) Close();
}

void ClientConnection::Close() {
  if (closed_) return;
  closed_ = true;
  error_code ec;
  socket_.shutdown(tcp::socket::shutdown_both, ec);
  socket_.close(ec);
  hold_timer_.cancel();
  DropUpstream();
  proxy_.Remove(shared_from_this());
}

// ---- the hosts' side ----

void ClientConnection::PrimaryChanged() {
  if (closed_) return;
  if (up_ && up_->host != proxy_.primary()) DropUpstream();
  Forward();
}

// Sends the oldest request to the primary, when there is one and nothing is at a host.
void ClientConnection::Forward() {
  if (closed_ || queue_.empty() || in_flight_) return;
  // Answers the client does not read: no more requests go out for it until it does.
  if (out_bytes_ >= Proxy::kMaxQueuedReplyBytes) return;
  if (!up_) {
    if (proxy_.primary() >= 0) Connect();
    return;  // else PrimaryChanged() comes once the proxy has found one
  }
  if (!up_->ready) return;  // the connect's handler comes back here
  Request& r = queue_.front();
  if (r.sent) proxy_.Resent();
  r.sent = true;
  in_flight_ = true;
  up_->out = r.frame;
  ArmAnswerTimer();
  asio::async_write(up_->socket, asio::buffer(up_->out),
                    [self = shared_from_this(), up = up_](error_code ec, size_t) {
                      if (up != self->up_) return;
                      if (ec) self->HostFailed(absl::StrCat("send: ", ec.message()));
                    });
}

void ClientConnection::Connect() {
  up_ = std::make_shared<Upstream>(proxy_.io(), proxy_.primary());
  ArmAnswerTimer();
  up_->socket.async_connect(proxy_.host(up_->host),
                            [self = shared_from_this(), up = up_](error_code ec) {
                              if (up != self->up_) return;
                              if (ec)
                                return self->HostFailed(absl::StrCat("connect: ", ec.message()));
                              error_code ignored;
                              up->socket.set_option(tcp::no_delay(true), ignored);
                              up->ready = true;
                              up->timer.cancel();
                              self->ReadAnswerHeader();
                              self->Forward();
                            });
}

// A read is always outstanding on a host connection, so that its end is seen at once, even
// while no request is there.
void ClientConnection::ReadAnswerHeader() {
  asio::async_read(
      up_->socket, asio::buffer(up_->header),
      [self = shared_from_this(), up = up_](error_code ec, size_t) {
        if (up != self->up_) return;
        if (ec) {
          return self->HostFailed(ec == asio::error::eof ? "closed the connection" : ec.message());
        }
        uint32_t len = vmm::DecodeFrameLength(up->header);
        if (len == 0 || len > vmm::kMaxLedgerFrame) {
          return self->HostFailed(absl::StrCat("sent a frame of ", len, " bytes"));
        }
        self->ReadAnswerBody(len);
      });
}

void ClientConnection::ReadAnswerBody(uint32_t len) {
  up_->body.resize(len);
  asio::async_read(up_->socket, asio::buffer(up_->body),
                   [self = shared_from_this(), up = up_](error_code ec, size_t) {
                     if (up != self->up_) return;
                     if (ec) return self->HostFailed(ec.message());
                     self->OnAnswer();
                   });
}

void ClientConnection::OnAnswer() {
  pb::LedgerResponse a;
  if (!a.ParseFromArray(up_->body.data(), static_cast<int>(up_->body.size()))) {
    return HostFailed("sent a malformed answer");
  }
  if (!in_flight_ || queue_.empty()) return HostFailed("answered a request it was not sent");
  const Request& r = queue_.front();
  if (a.client_id() != r.client_id || a.request_id() != r.request_id) {
    return HostFailed(absl::StrCat("answered request ", a.client_id(), "/", a.request_id(), " for ",
                                   r.client_id, "/", r.request_id));
  }
  if (!proxy_.TermCurrent(up_->host, a.term())) {
    return HostFailed(absl::StrCat("answered in term ", a.term(), ", older than term ",
                                   proxy_.stats().newest_term,
                                   " seen before (a superseded VM): answer not forwarded"));
  }
  in_flight_ = false;
  up_->timer.cancel();
  std::string frame(reinterpret_cast<const char*>(up_->header), 4);
  frame.append(reinterpret_cast<const char*>(up_->body.data()), up_->body.size());
  queued_bytes_ -= r.frame.size();
  queue_.pop_front();
  proxy_.Answered();
  Reply(std::move(frame));
  ArmHoldTimer();
  ReadAnswerHeader();
  Forward();
  MaybeResumeReading();
  MaybeFinish();
}

void ClientConnection::ArmAnswerTimer() {
  up_->due = Clock::now() + proxy_.options().answer_timeout;
  up_->timer.expires_at(up_->due);
  up_->timer.async_wait([self = shared_from_this(), up = up_](error_code ec) {
    if (ec || up != self->up_) return;
    if (up->ready && !self->in_flight_) return;  // answered meanwhile
    if (Clock::now() < up->due) return;          // re-armed: that wait decides
    self->HostFailed(absl::StrCat(up->ready ? "no answer" : "no connection", " within ",
                                  self->proxy_.options().answer_timeout.count(),
                                  " ms (answer_timeout_ms)"));
  });
}

// The request at the host, if any, goes again to whichever host the proxy finds next.
void ClientConnection::HostFailed(const std::string& why) {
  if (!up_) return;
  int host = up_->host;
  DropUpstream();
  proxy_.HostFailed(host, why);
  Forward();
}

void ClientConnection::DropUpstream() {
  if (!up_) return;
  error_code ec;
  up_->socket.close(ec);
  up_->timer.cancel();
  up_.reset();
  in_flight_ = false;
}

void ClientConnection::ArmHoldTimer() {
  if (queue_.empty()) {
    hold_timer_.cancel();
    return;
  }
  hold_timer_.expires_at(queue_.front().deadline);
  hold_timer_.async_wait([self = shared_from_this()](error_code ec) {
    if (!ec) self->OnHoldTimer();
  });
}

// Requests past their hold bound get an error that says whether they may have been applied.
void ClientConnection::OnHoldTimer() {
  if (closed_) return;
  auto now = Clock::now();
  bool expired = false;
  while (!queue_.empty() && queue_.front().deadline <= now) {
    Request r = std::move(queue_.front());
    if (in_flight_) DropUpstream();  // its answer, should it come, must not meet the next one
    queued_bytes_ -= r.frame.size();
    queue_.pop_front();
    proxy_.Expired();
    expired = true;
    ReplyError(
        r, RML_ERR_UNAVAILABLE,
        absl::StrCat("romulus proxy: no primary answered within ", proxy_.options().hold.count(),
                     " ms (hold_ms); ",
                     r.sent ? "a host had it, so it may have been applied: send the same request "
                              "id again to learn its outcome"
                            : "no host had it: it was not applied"));
  }
  if (!expired) return ArmHoldTimer();  // an early wake-up (a re-armed timer's old wait)
  ArmHoldTimer();
  Forward();
  MaybeResumeReading();
  MaybeFinish();
}

}  // namespace

absl::Status ParseLedgerAddress(const std::string& text, std::string* address, uint16_t* port) {
  std::string host;
  if (auto s = ParseHostPort(text, &host, port); !s.ok()) return s;
  if (host.size() > 2 && host.front() == '[' && host.back() == ']') {
    host = host.substr(1, host.size() - 2);
  }
  if (host == "localhost") host = "127.0.0.1";
  error_code ec;
  asio::ip::make_address(host, ec);
  if (ec) {
    return absl::InvalidArgumentError(
        absl::StrCat("'", host, "' is not an IPv4 or IPv6 address (or localhost)"));
  }
  *address = host;
  return absl::OkStatus();
}

ProxyOptions ProxyOptionsFrom(const pb::ProxyConfig& c) {
  ProxyOptions o;
  o.listen = c.listen();
  o.port = static_cast<uint16_t>(c.port());
  o.hosts.assign(c.host().begin(), c.host().end());
  o.hold = std::chrono::milliseconds(c.hold_ms());
  o.answer_timeout = std::chrono::milliseconds(c.answer_timeout_ms());
  o.probe_interval = std::chrono::milliseconds(c.probe_interval_ms());
  o.max_clients = c.max_clients();
  return o;
}

absl::StatusOr<std::unique_ptr<Proxy>> Proxy::Start(ProxyOptions options) {
  auto p = std::make_unique<ProxyImpl>(std::move(options));
  if (auto s = p->Listen(); !s.ok()) return s;
  return p;
}

}  // namespace romulus::cli
