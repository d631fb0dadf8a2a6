#include "vmm/ledger_endpoint.h"

#include <atomic>
#include <boost/asio.hpp>
#include <deque>
#include <mutex>
#include <thread>
#include <unordered_map>

#include "absl/strings/str_cat.h"
#include "proto/romulus.pb.h"
#include "vmm/ledger_protocol.h"
#include "vmm/sys.h"

namespace romulus::vmm {
namespace {

namespace asio = boost::asio;
using asio::ip::tcp;

constexpr size_t kMaxInFlightPerConnection = 64;
// A reply from the guest carries no error text: its frame is at most 71 bytes (seven fields of at
// most 11 bytes each, and the length). Each request in flight counts as this much.
constexpr size_t kHeldReplyBytes = 128;

class Endpoint;

class Connection : public std::enable_shared_from_this<Connection> {
 public:
  Connection(Endpoint& endpoint, tcp::socket socket);
  void Start() { ReadHeader(); }
  void Send(std::string frame);  // on the io thread
  void ResponseDone();           // on the io thread
  std::string peer() const { return peer_; }

 private:
  void ReadHeader();
  void ReadBody(uint32_t len);
  void OnRequest();
  void Reply(const pb::LedgerResponse& r) { Send(EncodeFrame(r)); }
  void WriteNext();
  void Close(absl::string_view why);
  // Replies waiting to be written, and those still to come for requests in flight.
  size_t queued_bytes() const { return out_bytes_ + in_flight_ * kHeldReplyBytes; }

  Endpoint& endpoint_;
  tcp::socket socket_;
  std::string peer_;
  uint8_t header_[4];
  std::vector<uint8_t> body_;
  std::deque<std::string> out_;
  size_t out_bytes_ = 0;  // in out_
  size_t in_flight_ = 0;
  bool reading_paused_ = false;
  bool closed_ = false;
};

// A response on its way out. Held outputs may be released after the endpoint is gone, so a
// delivery owns the io_context and the connection; members are destroyed in reverse order, so
// the connection goes before the io_context it belongs to.
struct Delivery {
  std::shared_ptr<boost::asio::io_context> io;
  std::shared_ptr<Connection> conn;
  std::string frame;
};

class Endpoint : public LedgerEndpoint {
 public:
  Endpoint(LedgerDevice& ledger, OutputGate& gate, std::function<void(absl::string_view)> log)
      : ledger_(ledger),
        gate_(gate),
        log_(std::move(log)),
        io_(std::make_shared<asio::io_context>()),
        acceptor_(*io_),
        accept_retry_(*io_) {}

  ~Endpoint() override {
    ledger_.SetResponseSink(nullptr);  // waits for a response being handed over
    // Answers the gate released just before (a post-copy's source releases its last ones as the
    // VM leaves) were posted to the loop: they go out before it stops. Stopped at once, they
    // kept their connections open, and their clients waited for a timeout to try elsewhere.
    asio::post(*io_, [io = io_.get()] { io->stop(); });
    if (thread_.joinable()) thread_.join();
  }

  absl::Status Listen(const std::string& address, uint16_t port) {
    boost::system::error_code ec;
    auto addr = asio::ip::make_address(address, ec);
    if (ec) return absl::InvalidArgumentError(absl::StrCat("bad listen address '", address, "'"));
    tcp::endpoint ep(addr, port);
    acceptor_.open(ep.protocol(), ec);
    if (!ec) acceptor_.set_option(tcp::acceptor::reuse_address(true), ec);
    if (!ec) acceptor_.bind(ep, ec);
    if (!ec) acceptor_.listen(asio::socket_base::max_listen_connections, ec);
    if (ec) {
      return absl::UnavailableError(absl::StrCat("ledger endpoint cannot listen on ", address, ":",
                                                 port, ": ", ec.message()));
    }
    port_ = acceptor_.local_endpoint().port();
    ledger_.SetResponseSink([this](const rml_response& r) { OnResponse(r); });
    Accept();
    thread_ = std::thread([this] { io_->run(); });
    return absl::OkStatus();
  }

  uint16_t port() const override { return port_; }
  Stats stats() const override {
    return Stats{connections_.load(), requests_.load(), rejected_.load()};
  }

  void Log(absl::string_view line) {
    if (log_) log_(line);
  }
  void Rejected() { rejected_++; }

  // io thread: forwards a request to the guest and remembers who asked.
  absl::Status Submit(const std::shared_ptr<Connection>& c, const rml_request& r) {
    requests_++;
    std::lock_guard<std::mutex> lock(mu_);  // held across Submit so the tag is known first
    auto tag = ledger_.Submit(r);
    if (!tag.ok()) return tag.status();
    waiting_[*tag] = c;
    return absl::OkStatus();
  }

 private:
  void Accept() {
    acceptor_.async_accept([this](boost::system::error_code ec, tcp::socket socket) {
      if (ec == asio::error::operation_aborted) return;  // the acceptor was closed
      if (ec) return AcceptFailed(ec);
      if (accept_failures_ > 0) {
        Log(absl::StrCat("ledger endpoint: accepting again after ", accept_failures_,
                         " failed accepts"));
        accept_failures_ = 0;
      }
      connections_++;
      std::make_shared<Connection>(*this, std::move(socket))->Start();
      Accept();
    });
  }

  // Say, out of descriptors: the client's connection waits in the backlog, and the endpoint
  // keeps trying to take it (said once, not at every try).
  void AcceptFailed(const boost::system::error_code& ec) {
    if (accept_failures_++ == 0) {
      Log(absl::StrCat("ledger endpoint: accept failed: ", ec.message(),
                       "; retrying until it works"));
    }
    if (AcceptFailedForThatConnection(ec.value())) return Accept();
    accept_retry_.expires_after(kAcceptRetryPause);
    accept_retry_.async_wait([this](boost::system::error_code e) {
      if (!e) Accept();
    });
  }

  // vCPU thread: a response from the guest leaves through the output gate.
  void OnResponse(const rml_response& r) {
    std::shared_ptr<Connection> c;
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = waiting_.find(r.tag);
      if (it == waiting_.end()) return;  // asked before a restore
      c = std::move(it->second);
      waiting_.erase(it);
    }
    pb::LedgerResponse out;
    out.set_client_id(r.client_id);
    out.set_request_id(r.request_id);
    out.set_status(r.status);
    out.set_account(r.account);
    out.set_balance(r.balance);
    out.set_to_balance(r.to_balance);
    out.set_seq(r.seq);
    out.set_term(gate_.term());
    auto delivery = std::make_shared<Delivery>(Delivery{io_, std::move(c), EncodeFrame(out)});
    gate_.Push([delivery] {
      asio::post(*delivery->io, [delivery] {
        delivery->conn->ResponseDone();  // first: the reply is no longer counted as in flight
        delivery->conn->Send(std::move(delivery->frame));
      });
    });
  }

  LedgerDevice& ledger_;
  OutputGate& gate_;
  std::function<void(absl::string_view)> log_;
  std::shared_ptr<asio::io_context> io_;
  tcp::acceptor acceptor_;
  asio::steady_timer accept_retry_;
  uint64_t accept_failures_ = 0;  // in a row (io thread)
  std::thread thread_;
  uint16_t port_ = 0;
  std::mutex mu_;
  // Requests in the guest, by tag. A connection lives until its answers have gone out.
  std::unordered_map<uint64_t, std::shared_ptr<Connection>> waiting_;
  std::atomic<uint64_t> connections_{0}, requests_{0}, rejected_{0};
};

Connection::Connection(Endpoint& endpoint, tcp::socket socket)
    : endpoint_(endpoint), socket_(std::move(socket)) {
  boost::system::error_code ec;
  auto ep = socket_.remote_endpoint(ec);
  peer_ = ec ? "unknown" : absl::StrCat(ep.address().to_string(), ":", ep.port());
  socket_.set_option(tcp::no_delay(true), ec);
}

void Connection::Close(absl::string_view why) {
  if (closed_) return;
  closed_ = true;
  if (!why.empty()) endpoint_.Log(absl::StrCat("ledger client ", peer_, ": ", why, "; closing"));
  boost::system::error_code ec;
  socket_.shutdown(tcp::socket::shutdown_both, ec);
  socket_.close(ec);
  // Nothing more will be written; the front may still be the buffer of a write being aborted.
  while (out_.size() > 1) {
    out_bytes_ -= out_.back().size();
    out_.pop_back();
  }
}

void Connection::ReadHeader() {
  if (closed_) return;  // dropped while answering the last request
  if (in_flight_ >= kMaxInFlightPerConnection) {
    reading_paused_ = true;  // resumes when a response goes out
    return;
  }
  asio::async_read(socket_, asio::buffer(header_),
                   [self = shared_from_this()](boost::system::error_code ec, size_t) {
                     if (ec) return self->Close("");
                     uint32_t len = DecodeFrameLength(self->header_);
                     if (len == 0 || len > kMaxLedgerFrame) {
                       self->endpoint_.Rejected();
                       return self->Close(absl::StrCat("frame of ", len, " bytes (1 to ",
                                                       kMaxLedgerFrame, " allowed)"));
                     }
                     self->ReadBody(len);
                   });
}

void Connection::ReadBody(uint32_t len) {
  body_.resize(len);
  asio::async_read(socket_, asio::buffer(body_),
                   [self = shared_from_this()](boost::system::error_code ec, size_t) {
                     if (ec) return self->Close("");
                     self->OnRequest();
                   });
}

void Connection::OnRequest() {
  pb::LedgerRequest req;
  if (!req.ParseFromArray(body_.data(), static_cast<int>(body_.size()))) {
    endpoint_.Rejected();
    return Close("malformed request frame");
  }
  pb::LedgerResponse err;
  err.set_client_id(req.client_id());
  err.set_request_id(req.request_id());
  if (req.op() < pb::OPEN || req.op() > pb::READ) {
    endpoint_.Rejected();
    err.set_status(RML_ERR_UNKNOWN_OP);
    err.set_error(absl::StrCat("unknown op ", static_cast<int>(req.op())));
    Reply(err);
    return ReadHeader();
  }
  if (req.client_id() == 0 || req.request_id() == 0) {
    endpoint_.Rejected();
    err.set_status(RML_ERR_BAD_CLIENT);
    err.set_error("client_id and request_id must be non-zero");
    Reply(err);
    return ReadHeader();
  }
  rml_request r{};
  r.client_id = req.client_id();
  r.request_id = req.request_id();
  r.op = static_cast<uint32_t>(req.op());
  r.account = req.account();
  r.to_account = req.to_account();
  r.amount = req.amount();
  if (auto s = endpoint_.Submit(shared_from_this(), r); !s.ok()) {
    err.set_status(RML_ERR_LEDGER_FULL);
    err.set_error(std::string(s.message()));
    Reply(err);
  } else {
    in_flight_++;
  }
  ReadHeader();
}

void Connection::ResponseDone() {
  if (in_flight_ > 0) in_flight_--;
  if (reading_paused_ && !closed_) {
    reading_paused_ = false;
    ReadHeader();
  }
}

void Connection::Send(std::string frame) {
  if (closed_) return;
  if (queued_bytes() + frame.size() > LedgerEndpoint::kMaxQueuedBytes) {
    return Close(absl::StrCat("does not read its replies: queued_bytes=", queued_bytes(),
                              " limit_bytes=", LedgerEndpoint::kMaxQueuedBytes));
  }
  out_bytes_ += frame.size();
  out_.push_back(std::move(frame));
  if (out_.size() == 1) WriteNext();
}

void Connection::WriteNext() {
  asio::async_write(socket_, asio::buffer(out_.front()),
                    [self = shared_from_this()](boost::system::error_code ec, size_t) {
                      if (ec) return self->Close("");
                      self->out_bytes_ -= self->out_.front().size();
                      self->out_.pop_front();
                      if (!self->out_.empty()) self->WriteNext();
                    });
}

}  // namespace

absl::StatusOr<std::unique_ptr<LedgerEndpoint>> LedgerEndpoint::Start(
    LedgerDevice& ledger, OutputGate& gate, const std::string& address, uint16_t port,
    std::function<void(absl::string_view)> log) {
  auto ep = std::make_unique<Endpoint>(ledger, gate, std::move(log));
  if (auto s = ep->Listen(address, port); !s.ok()) return s;
  return ep;
}

}  // namespace romulus::vmm
