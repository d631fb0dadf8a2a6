// The ledger protocol (vmm/ledger_protocol.h) both ways. Input: a mode byte, then the bytes of one
// TCP connection on loopback:
//   even mode: what a client sends to a LedgerEndpoint, whose guest is played here (it answers
//     every request the device puts in its ring); every whole frame the endpoint sends back must
//     be a well-formed response, and it must close the connection once the client has;
//   odd mode: what a ledger sends to a LedgerClient, which reads responses until an error.
#include <netinet/in.h>
#include <sys/eventfd.h>
#include <sys/socket.h>

#include <atomic>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "cli/ledger_client.h"
#include "fuzz/fuzz_util.h"
#include "guest/abi.h"
#include "vmm/guest_memory.h"
#include "vmm/ledger_device.h"
#include "vmm/ledger_endpoint.h"
#include "vmm/ledger_protocol.h"
#include "vmm/output_gate.h"
#include "vmm/sys.h"

namespace romulus::fuzz {
namespace {

constexpr std::chrono::milliseconds kWait{10000};  // only a hang takes this long
// Written before the peer reads: within what loopback sockets buffer, so a write never waits.
constexpr size_t kMaxBytes = 64 * 1024;

vmm::Fd ConnectLoopback(uint16_t port) {
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(port);
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  vmm::Fd fd(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (::connect(fd.get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) std::abort();
  return fd;
}

// The endpoint with its device, over guest memory whose guest is this process: one for the
// whole run (requests of earlier inputs are all answered before the next starts).
class Ledger {
 public:
  Ledger() {
    auto mem = vmm::GuestMemory::CreateMemfd(vmm::kMinMemoryBytes);
    if (!mem.ok()) std::abort();
    mem_ = std::move(*mem);
    device_ = std::make_unique<vmm::LedgerDevice>(*mem_, [this] {
      uint64_t one = 1;
      (void)!::write(doorbell_.get(), &one, sizeof(one));
    });
    auto ep = vmm::LedgerEndpoint::Start(*device_, gate_, "127.0.0.1", 0, nullptr);
    if (!ep.ok()) std::abort();
    endpoint_ = std::move(*ep);
  }
  uint16_t port() const { return endpoint_->port(); }
  int doorbell() const { return doorbell_.get(); }

  // The guest's side: answers every request in the ring, then rings the response doorbell.
  void AnswerRequests() {
    uint64_t n;
    (void)!::read(doorbell_.get(), &n, sizeof(n));
    uint32_t head = Index(RML_REQ_RING_GPA + offsetof(rml_ring_header, head)).load();
    auto req_tail = Index(RML_REQ_RING_GPA + offsetof(rml_ring_header, tail));
    auto resp_head = Index(RML_RESP_RING_GPA + offsetof(rml_ring_header, head));
    uint32_t tail = req_tail.load(), out = resp_head.load();
    if (tail == head) return;
    for (; tail != head; tail++, out++) {
      rml_request q;
      std::memcpy(&q, Slot(RML_REQ_RING_GPA, tail), sizeof(q));
      rml_response r{};
      r.tag = q.tag;
      r.client_id = q.client_id;
      r.request_id = q.request_id;
      r.status = q.op == RML_OP_READ ? RML_ERR_NO_ACCOUNT : RML_OK;
      r.account = q.account;
      r.balance = q.amount;
      std::memcpy(Slot(RML_RESP_RING_GPA, out), &r, sizeof(r));
    }
    req_tail.store(tail);
    resp_head.store(out);
    if (!device_->OnResponseDoorbell().ok()) std::abort();
  }

 private:
  std::atomic_ref<uint32_t> Index(uint64_t gpa) {
    return std::atomic_ref<uint32_t>(*reinterpret_cast<uint32_t*>(mem_->data() + gpa));
  }
  uint8_t* Slot(uint64_t ring, uint32_t i) {
    return mem_->data() + ring + sizeof(rml_ring_header) + (i % RML_RING_SLOTS) * 64;
  }

  std::unique_ptr<vmm::GuestMemory> mem_;
  vmm::Fd doorbell_{::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)};
  vmm::OutputGate gate_;  // open: a response leaves once the guest gave it
  std::unique_ptr<vmm::LedgerDevice> device_;
  std::unique_ptr<vmm::LedgerEndpoint> endpoint_;
};

void ToEndpoint(absl::string_view bytes) {
  bytes = bytes.substr(0, kMaxBytes);
  static Ledger* ledger = new Ledger();  // never destroyed: responses may still be on their way
  vmm::Fd fd = ConnectLoopback(ledger->port());
  (void)vmm::WriteFully(fd.get(), bytes, "write");  // the endpoint may close early
  ::shutdown(fd.get(), SHUT_WR);
  std::string replies;
  auto deadline = std::chrono::steady_clock::now() + kWait;
  for (bool open = true; open;) {
    if (std::chrono::steady_clock::now() > deadline) {
      std::fprintf(stderr, "the ledger endpoint did not close the connection within %lld ms\n",
                   static_cast<long long>(kWait.count()));
      std::abort();
    }
    pollfd p[2] = {{fd.get(), POLLIN, 0}, {ledger->doorbell(), POLLIN, 0}};
    if (::poll(p, 2, 100) < 0) continue;
    if (p[1].revents) ledger->AnswerRequests();
    if (p[0].revents) {
      char buf[4096];
      ssize_t n = ::recv(fd.get(), buf, sizeof(buf), MSG_DONTWAIT);
      if (n > 0) replies.append(buf, static_cast<size_t>(n));
      if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR)) open = false;
    }
  }
  absl::string_view rest(replies);
  while (rest.size() >= 4) {
    uint32_t len = vmm::DecodeFrameLength(reinterpret_cast<const uint8_t*>(rest.data()));
    if (len > rest.size() - 4) break;  // cut short by the close
    pb::LedgerResponse r;
    if (!r.ParseFromArray(rest.data() + 4, static_cast<int>(len))) {
      std::fprintf(stderr, "the ledger endpoint sent a malformed response\n");
      std::abort();
    }
    rest.remove_prefix(4 + len);
  }
}

void ToClient(absl::string_view bytes) {
  bytes = bytes.substr(0, kMaxBytes);
  static const int listener = [] {
    int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0 || ::listen(fd, 4) != 0)
      std::abort();
    return fd;
  }();
  sockaddr_in addr{};
  socklen_t len = sizeof(addr);
  ::getsockname(listener, reinterpret_cast<sockaddr*>(&addr), &len);
  auto client = cli::LedgerClient::Connect("127.0.0.1", ntohs(addr.sin_port),
                                           static_cast<int>(kWait.count()));
  if (!client.ok()) std::abort();
  {
    vmm::Fd server(::accept4(listener, nullptr, nullptr, SOCK_CLOEXEC));
    if (!vmm::WriteFully(server.get(), bytes, "write").ok()) std::abort();
  }  // closed: the client reads to the end, then sees the close
  for (size_t i = 0; i <= bytes.size() / 4; i++) {
    if (!client->Receive().ok()) break;
  }
}

// The first byte picks the side that reads the input: the monitor's endpoint or the client.
void Run(Input& in) {
  if (in.Byte() % 2 == 0) {
    ToEndpoint(in.Rest());
  } else {
    ToClient(in.Rest());
  }
}

}  // namespace
}  // namespace romulus::fuzz

ROMULUS_FUZZ_TARGET(Run)
