#include "cli/control.h"

#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <cstring>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "cli/args.h"
#include "google/protobuf/util/json_util.h"
#include "switchover/switchover.h"
#include "vmm/ledger_protocol.h"
#include "vmm/sys.h"

namespace romulus::cli {
namespace {

constexpr uint32_t kMaxControlFrame = 64 * 1024;
constexpr uint64_t kNotGiven = ~0ull;
// How long `romulus migrate` waits for the answer beyond its timeout. A post-copy's answer
// comes once all of the VM's memory has crossed, which at 1 Gbit/s takes about 9 s a GiB.
constexpr int kHandOverAnswerMs = 5000, kPostcopyAnswerMs = 3600 * 1000;

absl::StatusOr<sockaddr_un> Address(const std::string& path) {
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (path.empty() || path.size() >= sizeof(addr.sun_path)) {
    return absl::InvalidArgumentError(
        absl::StrCat("control socket path must be 1 to ", sizeof(addr.sun_path) - 1, " bytes"));
  }
  std::memcpy(addr.sun_path, path.c_str(), path.size() + 1);
  return addr;
}

// One length-prefixed message from an untrusted peer, bounded in size.
template <typename Message>
absl::Status ReadMessage(int fd, Message* msg) {
  uint8_t header[4];
  if (auto s = vmm::ReadFully(fd, header, 4, "control socket read"); !s.ok()) return s;
  uint32_t n = vmm::DecodeFrameLength(header);
  if (n > kMaxControlFrame) return absl::DataLossError("control message too large");
  std::string body(n, '\0');
  if (auto s = vmm::ReadFully(fd, body.data(), n, "control socket read"); !s.ok()) return s;
  if (!msg->ParseFromString(body)) return absl::DataLossError("malformed control message");
  return absl::OkStatus();
}

void SetTimeouts(int fd, int timeout_ms) {
  timeval tv{timeout_ms / 1000, (timeout_ms % 1000) * 1000};
  ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  ::setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
}

class ControlServerImpl : public ControlServer {
 public:
  ControlServerImpl(vmm::Fd fd, std::string path, ControlHandlers handlers)
      : fd_(std::move(fd)), path_(std::move(path)), handlers_(std::move(handlers)) {
    thread_ = std::thread([this] { Serve(); });
  }
  ~ControlServerImpl() override {
    stop_ = true;
    ::shutdown(fd_.get(), SHUT_RDWR);
    thread_.join();
    if (migration_.joinable()) migration_.join();
    ::unlink(path_.c_str());
  }

 private:
  void Serve() {
    while (!stop_) {
      pollfd p{fd_.get(), POLLIN, 0};
      if (::poll(&p, 1, 200) <= 0) continue;  // wakes to notice stop_
      vmm::Fd client(::accept4(fd_.get(), nullptr, nullptr, SOCK_CLOEXEC));
      if (!client.valid()) continue;
      SetTimeouts(client.get(), 1000);  // a client that stalls does not hold the server
      pb::ControlRequest req;
      pb::ControlReply reply;
      if (auto s = ReadMessage(client.get(), &req); !s.ok()) {
        reply.set_error(std::string(s.message()));
      } else if (req.command_case() == pb::ControlRequest::kStatus) {
        *reply.mutable_status() = handlers_.status();
      } else if (req.command_case() == pb::ControlRequest::kPromote) {
        auto done =
            handlers_.promote
                ? handlers_.promote(req.promote().force())
                : absl::FailedPreconditionError("only a mirror can be promoted; this is a primary");
        if (done.ok()) {
          reply.set_promoted(*done);
        } else {
          reply.set_error(std::string(done.status().message()));
        }
      } else if (req.command_case() == pb::ControlRequest::kMigrate) {
        if (!handlers_.migrate) {
          reply.set_error("only a primary can migrate its VM; this is not one");
        } else if (req.migrate().timeout_ms() > 600000) {
          reply.set_error("migration timeout over 600000 ms");
        } else if (migrating_) {
          reply.set_error("a migration is under way");
        } else {
          if (migration_.joinable()) migration_.join();
          migrating_ = true;
          migration_ = std::thread([this, client = std::move(client),
                                    request = req.migrate()]() mutable {
            pb::ControlReply reply;
            auto done = handlers_.migrate(request);
            if (done.ok()) {
              reply.set_migrated(done->line);
              reply.set_downtime_ms(done->downtime_ms);
            } else {
              reply.set_error(std::string(done.status().message()));
            }
            (void)vmm::WriteFully(client.get(), vmm::EncodeFrame(reply), "control socket write");
            migrating_ = false;
          });
          continue;  // the migration's thread answers
        }
      } else {
        reply.set_error("unknown control command");
      }
      // A client that left gets no answer; the write fails without harm (no SIGPIPE).
      (void)vmm::WriteFully(client.get(), vmm::EncodeFrame(reply), "control socket write");
    }
  }

  vmm::Fd fd_;
  std::string path_;
  ControlHandlers handlers_;
  std::atomic<bool> stop_{false};
  std::thread thread_;
  std::atomic<bool> migrating_{false};
  std::thread migration_;  // the last migration asked for (joined before the next)
};

}  // namespace

absl::StatusOr<std::unique_ptr<ControlServer>> ControlServer::Start(const std::string& path,
                                                                    ControlHandlers handlers) {
  auto addr = Address(path);
  if (!addr.ok()) return addr.status();
  vmm::Fd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (!fd.valid()) return vmm::ErrnoStatus("control socket");
  ::unlink(path.c_str());  // a socket left by a process that died
  if (::bind(fd.get(), reinterpret_cast<sockaddr*>(&*addr), sizeof(*addr)) != 0 ||
      ::listen(fd.get(), 8) != 0) {
    return vmm::ErrnoStatus(absl::StrCat("control socket ", path));
  }
  return std::unique_ptr<ControlServer>(
      new ControlServerImpl(std::move(fd), path, std::move(handlers)));
}

namespace {

// One request, one reply; the reply's error becomes the status.
absl::StatusOr<pb::ControlReply> Ask(const std::string& path, const pb::ControlRequest& req,
                                     int timeout_ms) {
  auto addr = Address(path);
  if (!addr.ok()) return addr.status();
  vmm::Fd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (!fd.valid()) return vmm::ErrnoStatus("control socket");
  SetTimeouts(fd.get(), timeout_ms);
  if (::connect(fd.get(), reinterpret_cast<sockaddr*>(&*addr), sizeof(*addr)) != 0) {
    return vmm::ErrnoStatus(absl::StrCat("connect to ", path, " (is romulus running there?)"));
  }
  if (auto s = vmm::WriteFully(fd.get(), vmm::EncodeFrame(req), "control socket write"); !s.ok()) {
    return s;
  }
  pb::ControlReply reply;
  if (auto s = ReadMessage(fd.get(), &reply); !s.ok()) return s;
  if (!reply.error().empty()) return absl::FailedPreconditionError(reply.error());
  return reply;
}

}  // namespace

absl::StatusOr<pb::StatusReply> QueryStatus(const std::string& path, int timeout_ms) {
  pb::ControlRequest req;
  req.set_status(true);
  auto reply = Ask(path, req, timeout_ms);
  if (!reply.ok()) return reply.status();
  return reply->status();
}

absl::StatusOr<std::string> RequestPromotion(const std::string& path, bool force, int timeout_ms) {
  pb::ControlRequest req;
  req.mutable_promote()->set_force(force);
  auto reply = Ask(path, req, timeout_ms);
  if (!reply.ok()) return reply.status();
  return reply->promoted();
}

absl::StatusOr<Migrated> RequestMigration(const std::string& path, const pb::MigrateRequest& m,
                                          int reply_timeout_ms) {
  pb::ControlRequest req;
  *req.mutable_migrate() = m;
  auto reply = Ask(path, req, reply_timeout_ms);
  if (!reply.ok()) return reply.status();
  return Migrated{.line = reply->migrated(), .downtime_ms = reply->downtime_ms()};
}

absl::StatusOr<Migrated> RequestMigration(const std::string& path,
                                          std::chrono::milliseconds timeout) {
  pb::MigrateRequest m;
  m.set_timeout_ms(static_cast<uint32_t>(timeout.count()));
  return RequestMigration(path, m, static_cast<int>(timeout.count()) + 5000);
}

// "post-copy to the destination: 1200/262144 pages (0%), 3/16 disk chunks, 56 faults (wait p50
// 1.10 ms p99 4.90 ms), 95.1 MB/s, ETA 2.1 s"
std::string PostcopyLine(const pb::PostcopyStatus& p) {
  return absl::StrFormat(
      "post-copy (%s): %d/%d pages (%.0f%%), %d/%d disk chunks, %d fetched on demand, %d faults "
      "(wait p50 %.2f ms p99 %.2f ms), %.1f MB/s, %s",
      p.side(), p.pages_here(), p.pages(),
      p.pages() ? 100.0 * static_cast<double>(p.pages_here()) / static_cast<double>(p.pages())
                : 100.0,
      p.chunks_here(), p.chunks(), p.demand_pages(), p.faults(), p.fault_wait_p50_ms(),
      p.fault_wait_p99_ms(), p.mb_per_s(),
      p.done()             ? absl::StrFormat("done in %.1f s", p.seconds())
      : !p.error().empty() ? absl::StrCat("failed: ", p.error())
      : p.mb_per_s() > 0   ? absl::StrFormat("ETA %.1f s", p.eta_s())
                           : std::string("ETA ?"));
}

std::string FormatStatus(const pb::StatusReply& s) {
  std::string out = absl::StrFormat(
      "role:             %s\nvm:               %s\nplatform:         %s\n"
      "state:            %s\n",
      s.role(), s.vm_id(), s.platform().empty() ? "-" : s.platform(), s.state());
  absl::StrAppendFormat(&out, "peer:             %s\n",
                        s.peer_connected() ? s.peer() : std::string("not connected"));
  if (!s.protection().empty()) {
    absl::StrAppendFormat(&out, "frames:           %s\n", s.protection());
  }
  if (s.role() == "primary" && s.unprotected_s() > 0) {
    absl::StrAppendFormat(&out, "unprotected:      for %.1f s, %d connections failed since\n",
                          s.unprotected_s(), s.failed_connections());
  }
  if (s.has_sync()) {
    const pb::SyncStatus& y = s.sync();
    absl::StrAppendFormat(
        &out,
        "sync:             %.1f/%.1f MiB (%.0f%%), %.1f MB/s, ETA %.1f s, "
        "round %d, %.1f MiB on the wire\n",
        static_cast<double>(y.done_bytes()) / (1 << 20),
        static_cast<double>(y.total_bytes()) / (1 << 20),
        y.total_bytes()
            ? 100.0 * static_cast<double>(y.done_bytes()) / static_cast<double>(y.total_bytes())
            : 0.0,
        y.mb_per_s(), y.eta_s(), y.round(), static_cast<double>(y.wire_bytes()) / (1 << 20));
  }
  if (s.has_last_sync()) {
    const pb::SyncStatus& y = s.last_sync();
    absl::StrAppendFormat(&out,
                          "last sync:        %.1f MiB of memory and disk in %.2f s (%.1f MiB "
                          "already at the mirror), %.1f MiB on the wire",
                          static_cast<double>(y.done_bytes()) / (1 << 20), y.seconds(),
                          static_cast<double>(y.unchanged_bytes()) / (1 << 20),
                          static_cast<double>(y.wire_bytes()) / (1 << 20));
    if (y.deduplicated_pages() + y.base_pages() > 0) {
      absl::StrAppendFormat(&out, "; %u pages as references (%u to the base image)",
                            y.deduplicated_pages() + y.base_pages(), y.base_pages());
    }
    out += "\n";
  }
  for (const pb::ReplicationPathState& p : s.replication_paths()) {
    absl::StrAppendFormat(&out, "replication path: %s: %s, %.1f MiB sent, %.1f MiB received",
                          p.peer(), p.up() ? "up" : "down",
                          static_cast<double>(p.bytes_sent()) / (1 << 20),
                          static_cast<double>(p.bytes_received()) / (1 << 20));
    if (p.resent() > 0) absl::StrAppendFormat(&out, ", %d frames sent again", p.resent());
    if (!p.up() && !p.error().empty()) absl::StrAppendFormat(&out, " (%s)", p.error());
    out += "\n";
  }
  if (s.paths_size() > 0) {
    absl::StrAppendFormat(&out, "peer alive:       %s\n", s.peer_alive() ? "yes" : "no");
  }
  for (const pb::PathState& p : s.paths()) {
    absl::StrAppendFormat(&out, "path:             %s: %s", p.name(), p.up() ? "up" : "down");
    if (p.up()) absl::StrAppendFormat(&out, ", loss %.0f%%", 100 * p.loss());
    if (p.rtt_ms() >= 0) absl::StrAppendFormat(&out, ", rtt %.2f ms", p.rtt_ms());
    if (p.timeout_ms() > 0) absl::StrAppendFormat(&out, ", timeout %d ms", p.timeout_ms());
    out += "\n";
  }
  if (!s.witness().empty()) {
    absl::StrAppendFormat(&out, "lease:            %s (witness %s)\n",
                          s.lease_held()             ? std::string("held by this host")
                          : s.lease_holder().empty() ? std::string("nobody holds it")
                                                     : "held by " + s.lease_holder(),
                          s.witness());
  }
  if (!s.handed_over_because().empty()) {
    absl::StrAppendFormat(&out, "handed over:      because %s\n", s.handed_over_because());
  }
  if (s.has_postcopy())
    absl::StrAppendFormat(&out, "post-copy:        %s\n", PostcopyLine(s.postcopy()));
  if (s.has_health()) {
    const pb::HealthStatus& h = s.health();
    absl::StrAppendFormat(&out, "health:           %s (%d checks, %d moves asked, %d refused)\n",
                          h.state(), h.checks(), h.attempts(), h.refusals());
    if (!h.last_decision().empty()) {
      absl::StrAppendFormat(&out, "health decision:  %s\n", h.last_decision());
    }
    for (const std::string& p : h.problems()) {
      absl::StrAppendFormat(&out, "health problem:   %s\n", p);
    }
  }
  absl::StrAppendFormat(&out,
                        "epochs:           %d (committed epoch %d, lag %d)\n"
                        "pause:            p50 %.2f ms, p99 %.2f ms\n"
                        "held outputs:     %d\n"
                        "bytes:            %d\n"
                        "resyncs:          %d\nrefused:          %d\n",
                        s.epochs(), s.committed_epoch(), s.lag_epochs(), s.pause_p50_ms(),
                        s.pause_p99_ms(), s.held_outputs(), s.bytes(), s.resyncs(), s.rejected());
  return out;
}

int StatusCommand(int argc, char** argv) {
  std::string socket;
  bool json = false;
  Args args("romulus status --socket PATH [--json]",
            "Asks a running `romulus primary` or `romulus mirror` for its status through its\n"
            "control socket (control_socket in its config): role, state and why (for a\n"
            "primary: whether outputs are held and why), peer, initial-sync progress, epochs,\n"
            "replica lag, pause times, held outputs.");
  args.String("socket", &socket, "the control socket");
  args.Bool("json", &json, "print one JSON object");
  if (int rc = args.Prologue(argc, argv); rc >= 0) return rc;
  if (socket.empty()) return args.UsageError("--socket is required");
  auto st = QueryStatus(socket);
  if (!st.ok()) {
    std::fprintf(stderr, "romulus status: %s\n", std::string(st.status().message()).c_str());
    return 1;
  }
  if (json) {
    std::string out;
    google::protobuf::util::JsonPrintOptions o;
    o.always_print_primitive_fields = true;
    (void)google::protobuf::util::MessageToJsonString(*st, &out, o);
    std::printf("%s\n", out.c_str());
  } else {
    std::fputs(FormatStatus(*st).c_str(), stdout);
  }
  return 0;
}

namespace {

// `romulus NAME --socket PATH ...`: parses, asks the process, prints what it did. `check`
// finds usage errors in the other options.
int ControlCommand(const char* name, Args& args, const std::string& socket,
                   const std::function<absl::StatusOr<std::string>()>& ask, int argc, char** argv,
                   const std::function<absl::Status()>& check = nullptr) {
  if (int rc = args.Prologue(argc, argv); rc >= 0) return rc;
  if (socket.empty()) return args.UsageError("--socket is required");
  if (check) {
    if (absl::Status s = check(); !s.ok()) return args.UsageError(s.message());
  }
  auto done = ask();
  if (!done.ok()) {
    std::fprintf(stderr, "romulus %s: %s\n", name, std::string(done.status().message()).c_str());
    return 1;
  }
  std::printf("romulus %s: %s\n", name, done->c_str());
  return 0;
}

}  // namespace

int PromoteCommand(int argc, char** argv) {
  std::string socket;
  bool force = false;
  Args args("romulus promote --socket PATH [--force]",
            "Makes a mirror resume its replica (the last committed checkpoint) as the primary.\n"
            "It first needs the witness's lease or a successful fencing command, so that the\n"
            "old primary cannot still be releasing outputs. --force skips that: use it only\n"
            "when you know the old primary is down.");
  args.String("socket", &socket, "the mirror's control socket");
  args.Bool("force", &force, "promote without the lease or a fence");
  return ControlCommand(
      "promote", args, socket, [&] { return RequestPromotion(socket, force); }, argc, argv);
}

int MigrateCommand(int argc, char** argv) {
  std::string socket, to;
  uint64_t timeout_ms = 10000;
  uint64_t rounds = kNotGiven;
  bool postcopy = false, accept_risk = false;
  Args args(
      "romulus migrate --socket PATH [--timeout-ms N]\n"
      "       romulus migrate --socket PATH --postcopy [--to HOST:PORT] [--precopy-rounds N]\n"
      "                       --accept-postcopy-risk",
      "Planned migration: the primary pauses its VM for good, takes the last checkpoint,\n"
      "waits for the mirror to commit it (its outputs leave), hands the witness's lease\n"
      "over if there is one, and tells the mirror to resume the VM, which then runs there.\n"
      "Prints the downtime (VM paused here until the mirror said it runs). If the mirror\n"
      "refuses or the last checkpoint is not committed in time, the VM runs on here.\n"
      "Afterwards this host is the mirror of the new primary (if its config has a\n"
      "replication_port), and the same command against the new primary's socket\n"
      "migrates the VM back.\n"
      "\n"
      "--postcopy moves the VM first and its memory after, to a host whose replication\n"
      "listener need hold nothing (a new host, one that lost its disk): the guest resumes\n"
      "there at once and every page it touches before it arrives is fetched on demand, while\n"
      "the rest streams behind. Until all of it is there the VM lives on both hosts: its\n"
      "outputs are held (so if the destination fails, it resumes here losing nothing), and\n"
      "if this host fails the destination stops it. That risk needs --accept-postcopy-risk.\n"
      "--precopy-rounds N (the hybrid) first copies memory N times while the VM runs, so\n"
      "that only what the guest writes meanwhile is left for after. Progress is printed each\n"
      "second; the config's migration block sets the defaults.");
  args.String("socket", &socket, "the primary's control socket");
  args.Uint("timeout-ms", &timeout_ms,
            "how long the last checkpoint and the mirror's answer may take, or with --postcopy "
            "how long the destination may be silent (1 to 600000)");
  args.Bool("postcopy", &postcopy, "move the VM first and its memory after");
  args.String("to", &to,
              "post-copy's destination (HOST:PORT of its replication listener; "
              "default: the configured peer)");
  args.Uint("precopy-rounds", &rounds, "the hybrid: pre-copy rounds before post-copy (0 to 100)");
  args.Bool("accept-postcopy-risk", &accept_risk,
            "go on although the VM dies with this host until all of its memory has arrived");
  return ControlCommand(
      "migrate", args, socket,
      [&]() -> absl::StatusOr<std::string> {
        pb::MigrateRequest req;
        req.set_timeout_ms(static_cast<uint32_t>(timeout_ms));
        req.set_postcopy(postcopy);
        req.set_to(to);
        req.set_accept_postcopy_risk(accept_risk);
        if (rounds != kNotGiven) req.set_precopy_rounds(static_cast<uint32_t>(rounds));
        // A post-copy takes as long as its memory takes to cross: its progress is shown
        // meanwhile, and the wait ends only when the primary answers or stops answering.
        absl::StatusOr<Migrated> done;
        std::atomic<bool> answered{false};
        std::thread ask([&] {
          done = RequestMigration(
              socket, req,
              static_cast<int>(timeout_ms) + (postcopy ? kPostcopyAnswerMs : kHandOverAnswerMs));
          answered = true;
        });
        auto next = std::chrono::steady_clock::now() + std::chrono::seconds(1);
        std::string last;
        while (!answered) {
          std::this_thread::sleep_for(std::chrono::milliseconds(50));
          if (answered || std::chrono::steady_clock::now() < next) continue;
          next += std::chrono::seconds(1);
          auto st = QueryStatus(socket, 1000);
          if (st.ok() && st->has_postcopy() && !st->postcopy().done()) {
            std::string line = PostcopyLine(st->postcopy());
            if (line != last) std::fprintf(stderr, "romulus migrate: %s\n", line.c_str());
            last = line;
          }
        }
        ask.join();
        if (!done.ok()) return done.status();
        return done->line;
      },
      argc, argv,
      [&]() -> absl::Status {
        if (timeout_ms < 1 || timeout_ms > 600000) {
          return absl::InvalidArgumentError("--timeout-ms must be 1 to 600000");
        }
        if (rounds != kNotGiven && rounds > 100) {
          return absl::InvalidArgumentError("--precopy-rounds must be 0 to 100");
        }
        if (!to.empty()) {
          if (auto ep = switchover::ParseEndpoint(to); !ep.ok()) {
            return absl::InvalidArgumentError(absl::StrCat("--to: ", ep.status().message()));
          }
        }
        return absl::OkStatus();
      });
}

}  // namespace romulus::cli
