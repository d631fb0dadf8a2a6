// The control socket (cli/control.h), both ways. Input: a mode byte, then the bytes of one
// connection:
//   even mode: what a local client sends to a ControlServer (whose handlers answer at once);
//     whatever it sent, the server must answer with one well-formed reply frame;
//   odd mode: what a process sends back to `romulus status` (mode / 2 % 3 == 0, the reply then
//     formatted), `romulus promote` (1) or `romulus migrate` (2).
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <thread>

#include "cli/control.h"
#include "fuzz/fuzz_util.h"
#include "vmm/ledger_protocol.h"
#include "vmm/sys.h"

namespace romulus::fuzz {
namespace {

constexpr std::chrono::milliseconds kWait{10000};  // only a hang takes this long

sockaddr_un Address(const std::string& path) {
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (path.size() >= sizeof(addr.sun_path)) std::abort();
  std::memcpy(addr.sun_path, path.c_str(), path.size() + 1);
  return addr;
}

const std::string& ServerPath() {
  static const std::string path = [] {
    std::string p = ScratchDir() + "/server.sock";
    cli::ControlHandlers h;
    h.status = [] {
      pb::StatusReply s;
      s.set_role("mirror");
      s.set_state("protected");
      return s;
    };
    h.promote = [](bool force) -> absl::StatusOr<std::string> {
      if (force) return std::string("promoted");
      return absl::FailedPreconditionError("no lease");
    };
    h.migrate = [](const pb::MigrateRequest& req) -> absl::StatusOr<cli::Migrated> {
      return cli::Migrated{.line = "migrated",
                           .downtime_ms = static_cast<double>(req.timeout_ms())};
    };
    static auto server = cli::ControlServer::Start(p, std::move(h));
    if (!server.ok()) std::abort();
    return p;
  }();
  return path;
}

// The request stream of one connection to the server; its reply must be one whole frame.
void ToServer(absl::string_view bytes) {
  sockaddr_un addr = Address(ServerPath());
  vmm::Fd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (::connect(fd.get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) std::abort();
  (void)vmm::WriteFully(fd.get(), bytes, "write");  // the server may stop reading early
  ::shutdown(fd.get(), SHUT_WR);
  auto reply = ReadUntilClosed(fd.get(), 1 << 20, kWait);
  if (!reply) {
    std::fprintf(stderr, "the control server did not answer within %lld ms\n",
                 static_cast<long long>(kWait.count()));
    std::abort();
  }
  pb::ControlReply r;
  if (reply->size() < 4 ||
      vmm::DecodeFrameLength(reinterpret_cast<const uint8_t*>(reply->data())) !=
          reply->size() - 4 ||
      !r.ParseFromArray(reply->data() + 4, static_cast<int>(reply->size() - 4))) {
    std::fprintf(stderr, "the control server's reply is not one well-formed frame\n");
    std::abort();
  }
}

// `bytes` as what a process answers to a client's request.
void ToClient(int kind, absl::string_view bytes) {
  static const std::string path = ScratchDir() + "/fake.sock";
  static const int listener = [] {
    int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_un addr = Address(path);
    if (::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0 || ::listen(fd, 4) != 0)
      std::abort();
    return fd;
  }();
  std::thread fake([&] {
    pollfd p{listener, POLLIN, 0};
    if (::poll(&p, 1, static_cast<int>(kWait.count())) != 1) return;
    vmm::Fd conn(::accept4(listener, nullptr, nullptr, SOCK_CLOEXEC));
    uint8_t header[4];
    if (!vmm::ReadFully(conn.get(), header, 4, "read").ok()) return;
    std::string request(std::min<uint32_t>(vmm::DecodeFrameLength(header), 1 << 16), '\0');
    if (!vmm::ReadFully(conn.get(), request.data(), request.size(), "read").ok()) return;
    (void)vmm::WriteFully(conn.get(), bytes, "write");  // the client may stop reading early
  });
  switch (kind % 3) {
    case 0:
      if (auto s = cli::QueryStatus(path, static_cast<int>(kWait.count())); s.ok()) {
        (void)cli::FormatStatus(*s);
      }
      break;
    case 1:
      (void)cli::RequestPromotion(path, false, static_cast<int>(kWait.count()));
      break;
    default:
      (void)cli::RequestMigration(path, std::chrono::milliseconds(1000));
      break;
  }
  fake.join();
}

// The first byte picks the side that reads the input (and, for the client, how it answers).
void Run(Input& in) {
  uint8_t mode = in.Byte();
  if (mode % 2 == 0) {
    ToServer(in.Rest());
  } else {
    ToClient(mode / 2, in.Rest());
  }
}

}  // namespace
}  // namespace romulus::fuzz

ROMULUS_FUZZ_TARGET(Run)
