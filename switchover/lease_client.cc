// A node's side of the witness lease: one connected UDP socket and one thread. The lease is
// counted from when the granted request was sent, never from when the reply arrived, and a timer
// at its end says "lost" the moment it lapses.
// clang-format off
// Boost 1.74 uses std::exchange without including <utility>: include it first.
#include <utility>
#include <boost/asio.hpp>
// clang-format on
#include <condition_variable>
#include <map>
#include <mutex>
#include <thread>

#include "absl/strings/str_cat.h"
#include "switchover/authority.h"
#include "switchover/datagram.h"
#include "switchover/switchover.h"

namespace romulus::switchover {
namespace {

namespace asio = boost::asio;
using asio::ip::udp;
using std::chrono::milliseconds;

constexpr size_t kMaxPending = 64;  // requests whose replies are still accepted
// How often a node that may not release without a mirror asks the witness again, at most.
constexpr std::chrono::milliseconds kAskAgainEvery{5};

class LeaseClientImpl : public LeaseClient {
 public:
  explicit LeaseClientImpl(Options o)
      : o_(std::move(o)),
        socket_(io_),
        renew_timer_(io_),
        expiry_timer_(io_),
        retry_timer_(io_),
        next_id_(RandomU64() >> 1) {}

  ~LeaseClientImpl() override {
    io_.stop();
    if (thread_.joinable()) thread_.join();
  }

  absl::Status Open() {
    if (o_.renew.count() <= 0) return absl::InvalidArgumentError("renew interval must be positive");
    auto witness = ToUdp(o_.witness);
    if (!witness.ok())
      return absl::InvalidArgumentError(absl::StrCat("witness: ", witness.status().message()));
    witness_name_ = absl::StrCat(o_.witness.host, ":", o_.witness.port);
    boost::system::error_code ec;
    socket_.open(witness->protocol(), ec);
    if (!ec && !o_.local_address.empty()) {
      auto local = ToUdp({o_.local_address, 0});
      if (!local.ok()) return local.status();
      socket_.bind(*local, ec);
    }
    if (!ec) socket_.connect(*witness, ec);  // the kernel drops datagrams from anyone else
    if (ec) {
      return absl::UnavailableError(
          absl::StrCat("lease: cannot reach witness ", witness_name_, ": ", ec.message()));
    }
    Receive();
    Renew();
    thread_ = std::thread([this] { io_.run(); });
    return absl::OkStatus();
  }

  void Want(bool want) override {
    asio::post(io_, [this, want] {
      std::unique_lock<std::mutex> lock(mu_);
      if (want_ == want) return;
      want_ = want;
      if (want) {
        SendLocked(pb::LEASE_ACQUIRE, "");
      } else {
        bool was = HeldLocked(Clock::now());
        state_.Drop(Clock::now());
        promotion_unprotected_ = false;
        SendLocked(pb::LEASE_RELEASE, "");
        lock.unlock();
        if (was) Lost("released");
      }
    });
  }

  void SetStateTerm(uint64_t term) override {
    std::lock_guard<std::mutex> lock(mu_);
    state_.SetStateTerm(term);
  }

  void SetMirrorTerm(uint64_t term) override {
    std::lock_guard<std::mutex> lock(mu_);
    state_.SetMirrorTerm(term);
    asking_unprotected_ = false;  // outputs wait for that mirror now
  }

  absl::Status AcquireWithin(milliseconds wait, const Promotion& promotion) override {
    {
      std::lock_guard<std::mutex> lock(mu_);
      superseded_.clear();
      takeover_ = promotion.takeover;
      promotion_unprotected_ = promotion.unprotected;
      // A promotion runs its term at once: a tentative hold left from an earlier post-copy
      // adoption that failed would leave the witness's record of it behind.
      if (promotion.takeover) tentative_ = false;
    }
    Want(true);
    std::unique_lock<std::mutex> lock(mu_);
    absl::Status s = WaitLocked(
        lock, wait, [&] { return HeldLocked(Clock::now()); },
        [&] { return absl::StrCat("witness ", witness_name_, ": ", WhyNotLocked(Clock::now())); });
    takeover_ = false;  // renewals are no takeovers
    return s;
  }

  void SetReleaseState(std::shared_ptr<std::atomic<bool>> flag) override {
    std::lock_guard<std::mutex> lock(mu_);
    release_state_ = std::move(flag);
    promotion_unprotected_ = false;  // the node's gate says it from now on
  }

  absl::Status DeclareUnprotected(milliseconds wait) override {
    std::unique_lock<std::mutex> lock(mu_);
    // Granted already (a promotion that said so): no request to wait for.
    if (!state_.MayReleaseUnprotected(Clock::now())) AskAgainLocked(Clock::now());
    return WaitLocked(
        lock, wait, [&] { return state_.MayReleaseUnprotected(Clock::now()); },
        [&] {
          return absl::StrCat(
              "witness ", witness_name_,
              " did not grant the lease for releasing without a mirror: ",
              HeldLocked(Clock::now()) ? "no reply yet" : WhyNotLocked(Clock::now()));
        });
  }

  bool may_release_unprotected() override {
    std::lock_guard<std::mutex> lock(mu_);
    auto now = Clock::now();
    if (state_.MayReleaseUnprotected(now)) return true;
    if (now - last_asked_ >= kAskAgainEvery) AskAgainLocked(now);
    return false;
  }

  void SetTentative(bool tentative) override {
    std::lock_guard<std::mutex> lock(mu_);
    tentative_ = tentative;
  }

  absl::Status Confirm(milliseconds wait) override {
    std::unique_lock<std::mutex> lock(mu_);
    tentative_ = false;
    superseded_.clear();
    uint64_t term = state_.term();
    if (confirmed_ >= term && HeldLocked(Clock::now())) return absl::OkStatus();
    asio::post(io_, [this] {
      std::lock_guard<std::mutex> l(mu_);
      if (want_) SendLocked(pb::LEASE_ACQUIRE, "");
    });
    return WaitLocked(
        lock, wait, [&] { return confirmed_ >= term && HeldLocked(Clock::now()); },
        [&] {
          return absl::StrCat("witness ", witness_name_, " did not confirm term ", term, ": ",
                              WhyNotLocked(Clock::now()));
        });
  }

  absl::Status TransferTo(const std::string& node, milliseconds wait) override {
    std::unique_lock<std::mutex> lock(mu_);
    if (!HeldLocked(Clock::now())) {
      return absl::FailedPreconditionError("cannot hand over a lease this node does not hold");
    }
    transfer_to_ = node;
    asio::post(io_, [this] {
      std::lock_guard<std::mutex> l(mu_);
      want_ = false;
      state_.Drop(Clock::now());  // from the moment it is sent, this node no longer holds it
      promotion_unprotected_ = false;
      SendLocked(pb::LEASE_TRANSFER, transfer_to_);
    });
    auto deadline = Clock::now() + wait;
    while (holder_ != node) {
      if (cv_.wait_until(lock, deadline) == std::cv_status::timeout && holder_ != node) {
        return absl::UnavailableError(absl::StrCat("witness ", witness_name_,
                                                   " did not confirm the hand-over to ", node, ": ",
                                                   WhyNotLocked(Clock::now())));
      }
    }
    return absl::OkStatus();
  }

  bool held() const override {
    std::lock_guard<std::mutex> lock(mu_);
    return HeldLocked(Clock::now());
  }

  uint64_t term() const override {
    std::lock_guard<std::mutex> lock(mu_);
    return state_.term();
  }

  Status status() const override {
    std::lock_guard<std::mutex> lock(mu_);
    auto now = Clock::now();
    Status s;
    s.held = HeldLocked(now);
    s.term = state_.term();
    s.holder = holder_;
    if (s.held) s.remaining = std::chrono::duration_cast<milliseconds>(state_.held_until() - now);
    s.reason = reason_;
    s.witness_reachable = last_reply_ != Clock::time_point{} && now - last_reply_ < 4 * o_.renew;
    s.held_since = state_.held_since();
    s.held_until = state_.held_until();
    return s;
  }

 private:
  bool HeldLocked(Clock::time_point now) const { return state_.Held(now); }

  // Waits, for at most `wait`, until `done()`; fails at once when the witness said this node
  // was superseded, and at the end with `why_not()`.
  template <typename Done, typename WhyNot>
  absl::Status WaitLocked(std::unique_lock<std::mutex>& lock, milliseconds wait, Done done,
                          WhyNot why_not) {
    auto deadline = Clock::now() + wait;
    while (!done()) {
      if (!superseded_.empty()) return SupersededLocked();
      if (cv_.wait_until(lock, deadline) == std::cv_status::timeout && !done()) {
        return absl::UnavailableError(why_not());
      }
    }
    return absl::OkStatus();
  }

  // A request now rather than at the next renewal: it says what the release state says then.
  void AskAgainLocked(Clock::time_point now) {
    last_asked_ = now;
    asking_unprotected_ = true;
    asio::post(io_, [this] {
      std::lock_guard<std::mutex> l(mu_);
      if (want_) SendLocked(pb::LEASE_ACQUIRE, "");
    });
  }

  bool SaysUnprotectedLocked() const {
    return promotion_unprotected_ || (release_state_ && !release_state_->load());
  }

  // The witness said this node's state was superseded: asking again cannot change that.
  absl::Status SupersededLocked() const {
    return absl::FailedPreconditionError(
        absl::StrCat("witness ", witness_name_, ": ", superseded_));
  }

  std::string WhyNotLocked(Clock::time_point now) const {
    if (last_reply_ == Clock::time_point{} || now - last_reply_ >= 4 * o_.renew) {
      return "no reply (unreachable, or it does not know this key)";
    }
    return reason_.empty() ? "lease not granted" : reason_;
  }

  void Log(const std::string& line) {
    if (o_.log) o_.log(line);
  }

  void SendLocked(pb::LeaseOp op, const std::string& to) {
    pb::SwitchoverMessage m;
    pb::LeaseRequest* r = m.mutable_lease_request();
    r->set_vm_id(o_.vm_id);
    r->set_node(o_.node);
    r->set_op(op);
    r->set_to_node(to);
    r->set_request_id(++next_id_);
    r->set_nonce(nonce_);
    r->set_state_term(state_.request_term());
    r->set_tentative(op == pb::LEASE_ACQUIRE && tentative_);
    r->set_takeover(op == pb::LEASE_ACQUIRE && takeover_);
    bool unprotected = SaysUnprotectedLocked();
    r->set_releases_only_acknowledged(!unprotected);
    // Only when asking to release without a mirror: a holder that merely has not yet been
    // acknowledged everything it released (its outputs wait for its mirror) needs no new term,
    // and its mirror, synchronising in this one, would be dropped by a new one.
    if (asking_unprotected_ && state_.term() <= state_.mirror_term()) {
      r->set_mirror_term(state_.mirror_term());
    }
    state_.Sent(next_id_, unprotected);
    pending_[next_id_] = {Clock::now(), op, unprotected};
    while (pending_.size() > kMaxPending) pending_.erase(pending_.begin());
    boost::system::error_code ec;
    socket_.send(asio::buffer(Seal(o_.key, m)), 0, ec);  // a lost request is retried next renew
  }

  void Renew() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (want_) SendLocked(pb::LEASE_ACQUIRE, "");
    }
    renew_timer_.expires_after(o_.renew);
    renew_timer_.async_wait([this](const boost::system::error_code& ec) {
      if (!ec) Renew();
    });
  }

  void Receive() {
    socket_.async_receive(asio::buffer(buffer_),
                          [this](const boost::system::error_code& ec, size_t n) {
                            if (ec == asio::error::operation_aborted) return;
                            if (!ec) Accept(absl::string_view(buffer_.data(), n));
                            Receive();  // a refused send shows up here as an error: keep listening
                          });
  }

  void Accept(absl::string_view bytes) {
    auto now = Clock::now();
    auto m = switchover::Open(o_.key, bytes);
    if (!m.ok() || !m->has_lease_reply()) return;
    const pb::LeaseReply& r = m->lease_reply();
    std::unique_lock<std::mutex> lock(mu_);
    auto it = pending_.find(r.request_id());
    if (it == pending_.end()) return;      // not an answer to a request of ours still open
    if (r.ttl_ms() > kMaxLeaseMs) return;  // no witness grants that: not an answer to believe
    auto [sent_at, op, said_unprotected] = it->second;
    pending_.erase(pending_.begin(), std::next(it));
    last_reply_ = now;
    nonce_ = r.next_nonce().substr(0, kMaxNameBytes);
    holder_ = r.holder().substr(0, kMaxNameBytes);
    if (r.granted()) confirmed_ = std::max(confirmed_, r.confirmed());
    LeaseState::Event event;
    if (r.reason() != "challenge") reason_ = r.reason().substr(0, 256);
    if (r.reason() == "challenge") {
      if (want_)
        SendLocked(pb::LEASE_ACQUIRE, "");
      else if (op == pb::LEASE_TRANSFER)
        SendLocked(pb::LEASE_TRANSFER, transfer_to_);
      else if (op == pb::LEASE_RELEASE)
        SendLocked(pb::LEASE_RELEASE, "");
    } else if (event = state_.OnReply(r, op, said_unprotected, want_, sent_at, now);
               event.superseded) {
      // Asking again cannot change the answer: this node's state is older than a term that ran.
      want_ = false;
      superseded_ = reason_.empty() ? "superseded by a newer term" : reason_;
    } else if (r.granted() && op == pb::LEASE_ACQUIRE && want_ && HeldLocked(now)) {
      ArmExpiryLocked();  // gained or renewed
    } else if (!r.granted() && op == pb::LEASE_ACQUIRE && want_ && !r.holder().empty() &&
               r.ttl_ms() < o_.renew.count()) {
      // Someone else's lease ends before the next renewal tick: ask again just after it does.
      retry_timer_.expires_after(milliseconds(r.ttl_ms() + 1));
      retry_timer_.async_wait([this](const boost::system::error_code& ec) {
        std::lock_guard<std::mutex> l(mu_);
        if (!ec && want_ && !HeldLocked(Clock::now())) SendLocked(pb::LEASE_ACQUIRE, "");
      });
    }
    std::string superseded = event.superseded ? superseded_ : "";
    uint64_t term = state_.term();
    lock.unlock();
    cv_.notify_all();
    if (event.gained) {
      Log(absl::StrCat("lease gained from witness ", witness_name_, " (term ", term, ")"));
      if (o_.on_gained) o_.on_gained();
    }
    if (!superseded.empty()) {
      Log(absl::StrCat("witness ", witness_name_, ": ", superseded));
      if (o_.on_superseded) o_.on_superseded(superseded);
    }
  }

  void ArmExpiryLocked() {
    expiry_timer_.expires_at(state_.held_until());
    expiry_timer_.async_wait([this](const boost::system::error_code& ec) {
      if (ec) return;  // re-armed by a renewal
      std::unique_lock<std::mutex> lock(mu_);
      if (HeldLocked(Clock::now()) || !want_) return;
      std::string why = WhyNotLocked(Clock::now());
      lock.unlock();
      Lost(why);
    });
  }

  void Lost(const std::string& why) {
    Log(absl::StrCat("lease lost: ", why));
    if (o_.on_lost) o_.on_lost();
  }

  Options o_;
  asio::io_context io_;
  udp::socket socket_;
  asio::steady_timer renew_timer_, expiry_timer_, retry_timer_;
  std::array<char, kMaxDatagramBytes + 1> buffer_;
  std::string witness_name_;
  std::thread thread_;

  mutable std::mutex mu_;
  std::condition_variable cv_;
  bool want_ = false;
  uint64_t next_id_;
  struct Pending {
    Clock::time_point sent_at;
    pb::LeaseOp op;
    bool unprotected;  // what the request said
  };
  std::map<uint64_t, Pending> pending_;
  std::string nonce_, holder_, reason_, transfer_to_;
  std::string superseded_;  // the witness's word that this node's state was superseded
  bool tentative_ = false;
  bool takeover_ = false;  // while a promotion asks
  // Asking to release without a mirror (AskAgainLocked), until a mirror holds outputs again.
  bool asking_unprotected_ = false;
  bool promotion_unprotected_ = false;  // a promotion whose VM runs without a mirror
  std::shared_ptr<std::atomic<bool>> release_state_;
  Clock::time_point last_asked_{};
  uint64_t confirmed_ = 0;  // the newest term the witness said ran
  LeaseState state_;
  Clock::time_point last_reply_{};
};

}  // namespace

absl::StatusOr<std::unique_ptr<LeaseClient>> LeaseClient::Start(Options options) {
  auto c = std::make_unique<LeaseClientImpl>(std::move(options));
  if (auto s = c->Open(); !s.ok()) return s;
  return c;
}

}  // namespace romulus::switchover
