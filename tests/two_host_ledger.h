// A ledger kept in a test process and served on two ports, one at a time: what a failover looks
// like to ledger clients (and to `romulus proxy`), without a VM.
#ifndef ROMULUS_TESTS_TWO_HOST_LEDGER_H_
#define ROMULUS_TESTS_TWO_HOST_LEDGER_H_

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <array>
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <map>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "guest/abi.h"
#include "proto/romulus.pb.h"
#include "vmm/ledger_protocol.h"

namespace romulus::testing {

// A ledger kept in this process and served on two ports, one at a time: exactly-once by
// (client, request id) like the guest's, so a resent request gets its first answer again. Each
// host's answers carry its term (`terms`; 0: none, as without a witness).
class TwoHostLedger {
 public:
  explicit TwoHostLedger(uint64_t die_after, std::array<uint64_t, 2> terms = {0, 0})
      : die_after_(die_after), terms_(terms) {
    for (int h = 0; h < 2; h++) {
      fds_[h] = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
      int one = 1;
      ::setsockopt(fds_[h], SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
      sockaddr_in a{};
      a.sin_family = AF_INET;
      a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
      if (::bind(fds_[h], reinterpret_cast<sockaddr*>(&a), sizeof(a)) != 0) std::abort();
      socklen_t len = sizeof(a);
      ::getsockname(fds_[h], reinterpret_cast<sockaddr*>(&a), &len);
      ports_[h] = ntohs(a.sin_port);
    }
    // The second host listens only once the first has died. Under the lock: the accept thread
    // adds to threads_ as soon as a client connects, maybe before emplace_back has returned.
    std::lock_guard<std::mutex> lock(mu_);
    Serve(0);
  }
  ~TwoHostLedger() {
    stop_ = true;
    for (int fd : fds_) ::shutdown(fd, SHUT_RDWR);
    for (;;) {  // threads may start others until their listeners have stopped
      std::vector<std::thread> threads;
      {
        std::lock_guard<std::mutex> lock(mu_);
        for (int fd : conns_) ::shutdown(fd, SHUT_RDWR);
        threads.swap(threads_);
      }
      if (threads.empty()) break;
      for (auto& t : threads) t.join();
    }
    for (int fd : conns_) ::close(fd);
    for (int fd : fds_) ::close(fd);
  }
  uint16_t port(int host) const { return ports_[host]; }
  // Answers the host sent (or tried to: a connection that ended under one counts it too).
  uint64_t answered(int host) const { return answered_[host]; }
  bool died() const { return died_; }
  std::chrono::steady_clock::time_point died_at() const {
    std::lock_guard<std::mutex> lock(mu_);
    return died_at_;
  }

 private:
  void Serve(int host) {
    ::listen(fds_[host], 64);
    threads_.emplace_back([this, host] {
      while (!stop_ && !(host == 0 && died_)) {
        int c = ::accept4(fds_[host], nullptr, nullptr, SOCK_CLOEXEC);
        if (c < 0) return;
        std::lock_guard<std::mutex> lock(mu_);
        conns_.push_back(c);
        threads_.emplace_back([this, host, c] { Connection(host, c); });
      }
    });
  }

  void Connection(int host, int fd) {
    for (;;) {
      uint8_t header[4];
      if (::recv(fd, header, 4, MSG_WAITALL) != 4) break;
      uint32_t n = vmm::DecodeFrameLength(header);
      if (n > vmm::kMaxLedgerFrame) break;
      std::string body(n, '\0');
      if (n && ::recv(fd, body.data(), n, MSG_WAITALL) != static_cast<ssize_t>(n)) break;
      pb::LedgerRequest q;
      if (!q.ParseFromString(body)) break;
      bool die = false;
      std::string out;
      {
        std::lock_guard<std::mutex> lock(mu_);
        if (host == 0 && died_) break;
        pb::LedgerResponse r = Apply(q);
        r.set_term(terms_[static_cast<size_t>(host)]);
        if (host == 0 && ++served_ == die_after_) die = true;  // applied; the answer is lost
        out = vmm::EncodeFrame(r);
      }
      if (die) {
        Die();
        break;
      }
      // Counted before it goes: a client that has the answer must find it counted (counted
      // after, a test read 1 where 2 were sent, under TSan).
      answered_[host]++;
      if (::send(fd, out.data(), out.size(), MSG_NOSIGNAL) != static_cast<ssize_t>(out.size()))
        break;
    }
    ::shutdown(fd, SHUT_RDWR);
  }

  // Host 0 dies: its listener and every connection close; host 1 starts listening.
  void Die() {
    // The listener first, as when a process dies: whoever sees a connection end and comes back
    // is refused.
    ::shutdown(fds_[0], SHUT_RDWR);
    std::lock_guard<std::mutex> lock(mu_);
    died_ = true;
    died_at_ = std::chrono::steady_clock::now();
    for (int fd : conns_) ::shutdown(fd, SHUT_RDWR);
    Serve(1);
  }

  pb::LedgerResponse Apply(const pb::LedgerRequest& q) {
    auto& [last_id, last] = sessions_[q.client_id()];
    if (q.request_id() == last_id) return last;
    pb::LedgerResponse r;
    r.set_client_id(q.client_id());
    r.set_request_id(q.request_id());
    if (q.request_id() < last_id) {
      r.set_status(RML_ERR_STALE_REQUEST);
      return r;
    }
    r.set_status(RML_OK);
    switch (q.op()) {
      case pb::OPEN:
        balances_.push_back(0);
        r.set_account(static_cast<uint32_t>(balances_.size() - 1));
        r.set_seq(++seq_);
        break;
      case pb::DEPOSIT:
      case pb::TRANSFER:
      case pb::READ: {
        if (q.account() >= balances_.size() ||
            (q.op() == pb::TRANSFER && q.to_account() >= balances_.size())) {
          r.set_status(RML_ERR_NO_ACCOUNT);
          break;
        }
        int64_t& from = balances_[q.account()];
        if (q.op() == pb::DEPOSIT) from += q.amount();
        if (q.op() == pb::TRANSFER) {
          if (from < q.amount()) {
            r.set_status(RML_ERR_INSUFFICIENT_FUNDS);
            break;
          }
          from -= q.amount();
          balances_[q.to_account()] += q.amount();
          r.set_to_balance(balances_[q.to_account()]);
        }
        r.set_account(q.account());
        r.set_balance(from);
        r.set_seq(q.op() == pb::READ ? seq_ : ++seq_);
        break;
      }
      default:
        r.set_status(RML_ERR_UNKNOWN_OP);
    }
    last_id = q.request_id();
    last = r;
    return r;
  }

  const uint64_t die_after_;
  const std::array<uint64_t, 2> terms_;
  int fds_[2] = {-1, -1};
  uint16_t ports_[2] = {0, 0};
  std::atomic<bool> stop_{false}, died_{false};
  std::atomic<uint64_t> answered_[2] = {0, 0};
  mutable std::mutex mu_;
  std::vector<int> conns_;
  std::chrono::steady_clock::time_point died_at_;
  std::vector<std::thread> threads_;
  uint64_t served_ = 0, seq_ = 0;
  std::vector<int64_t> balances_;
  std::map<uint64_t, std::pair<uint64_t, pb::LedgerResponse>> sessions_;
};

}  // namespace romulus::testing

#endif  // ROMULUS_TESTS_TWO_HOST_LEDGER_H_
