// The daemons as systemd runs them: the units pass `systemd-analyze verify`, each daemon speaks
// the notify protocol to the socket systemd would give it (here one the test binds and reads), and
// a primary whose epoch loop is stuck stops its watchdog pings, so that systemd would kill it.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/ptrace.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <deque>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <sstream>
#include <thread>

#include "absl/strings/str_cat.h"
#include "cli/config.h"
#include "cli/process.h"
#include "tests/test_util.h"

namespace romulus::systemd_test {
namespace {

using Clock = std::chrono::steady_clock;
using testing::FreePort;
using testing::TempDir;

// What `cmd` printed (stdout and stderr) and its exit status.
std::pair<int, std::string> RunShell(const std::string& cmd) {
  std::string out;
  FILE* p = ::popen((cmd + " 2>&1").c_str(), "r");
  if (p == nullptr) return {-1, "popen failed"};
  char buf[4096];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof(buf), p)) > 0) out.append(buf, n);
  int status = ::pclose(p);
  return {WIFEXITED(status) ? WEXITSTATUS(status) : -1, out};
}

TEST(SystemdUnits, EveryUnitPassesSystemdAnalyzeVerify) {
  if (RunShell("command -v systemd-analyze").first != 0) {
    GTEST_SKIP() << "needs systemd-analyze (Debian package systemd)";
  }
  // A root holding the units, the binary where they name it and the system's own units (which
  // verify loads for the dependencies every service has).
  TempDir root;
  namespace fs = std::filesystem;
  fs::create_directories(root.path() + "/etc/systemd/system");
  fs::create_directories(root.path() + "/usr/lib/systemd");
  fs::copy("/usr/lib/systemd/system", root.path() + "/usr/lib/systemd/system",
           fs::copy_options::recursive | fs::copy_options::copy_symlinks);
  std::vector<std::string> units;
  for (const auto& e : fs::directory_iterator(ROMULUS_UNIT_DIR)) {
    std::string name = e.path().filename();
    fs::copy_file(e.path(), root.path() + "/etc/systemd/system/" + name);
    std::ifstream in(e.path());
    std::string line;
    while (std::getline(in, line)) {
      if (line.rfind("ExecStart=", 0) != 0) continue;
      std::string binary = line.substr(10, line.find(' ') - 10);
      fs::create_directories(root.path() + fs::path(binary).parent_path().string());
      fs::copy_file(ROMULUS_BINARY, root.path() + binary, fs::copy_options::overwrite_existing);
    }
    // Templates are verified as an instance.
    units.push_back(name.find("@.") != std::string::npos ? name.replace(name.find("@."), 2, "@vm1.")
                                                         : name);
  }
  ASSERT_EQ(units.size(), 4u);
  for (const std::string& unit : units) {
    auto [rc, out] = RunShell("cd / && systemd-analyze verify --root=" + root.path() + " " + unit);
    EXPECT_EQ(rc, 0) << unit << ": " << out;
    EXPECT_EQ(out, "") << unit;  // warnings (an unknown key, a bad value) exit 0 too
  }
}

TEST(SystemdUnits, TheExampleConfigsLoad) {
  std::string dir = std::string(ROMULUS_SOURCE_DIR) + "/systemd/examples/";
  auto primary = cli::LoadPrimaryConfig(dir + "vm1-primary.conf");
  EXPECT_TRUE(primary.ok()) << primary.status();
  auto mirror = cli::LoadMirrorConfig(dir + "vm1-mirror.conf");
  EXPECT_TRUE(mirror.ok()) << mirror.status();
  auto proxy = cli::LoadProxyConfig(dir + "vm1-proxy.conf");
  ASSERT_TRUE(proxy.ok()) << proxy.status();
  ASSERT_EQ(proxy->host_size(), 2);
  // The proxy's example names the hosts' ledgers as their examples configure them.
  ASSERT_TRUE(primary.ok() && mirror.ok());
  EXPECT_EQ(proxy->host(0), absl::StrCat("192.0.2.1:", primary->ledger_port()));
  EXPECT_EQ(proxy->host(1), absl::StrCat("192.0.2.2:", mirror->ledger_port()));
  EXPECT_EQ(primary->ledger_listen(), "0.0.0.0");
  EXPECT_EQ(mirror->ledger_listen(), "0.0.0.0");
}

// The socket systemd passes in NOTIFY_SOCKET: a unix datagram socket whose messages the test
// reads in order. Like systemd, it reads them as they come (a thread of its own): a sender blocks
// once ten are queued unread (net.unix.max_dgram_qlen).
class NotifySocket {
 public:
  explicit NotifySocket(const std::string& path) : path_(path) {
    fd_ = ::socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    sockaddr_un a{};
    a.sun_family = AF_UNIX;
    std::snprintf(a.sun_path, sizeof(a.sun_path), "%s", path.c_str());
    bound_ = fd_ >= 0 && ::bind(fd_, reinterpret_cast<sockaddr*>(&a), sizeof(a)) == 0;
    if (bound_) reader_ = std::thread([this] { Read(); });
  }
  ~NotifySocket() {
    ::shutdown(fd_, SHUT_RDWR);
    if (reader_.joinable()) reader_.join();
    ::close(fd_);
  }
  bool bound() const { return bound_; }
  const std::string& path() const { return path_; }
  // The next message within `seconds` ("" if none).
  std::string Next(double seconds) {
    std::unique_lock<std::mutex> lock(mu_);
    if (!cv_.wait_for(lock, testing::Scaled(seconds), [&] { return !queue_.empty(); })) return "";
    std::string m = std::move(queue_.front());
    queue_.pop_front();
    return m;
  }
  // Waits for a message that starts with `prefix`, keeping every message seen on the way.
  std::string WaitFor(const std::string& prefix, double seconds) {
    auto deadline = Clock::now() + testing::Scaled(seconds);
    while (Clock::now() < deadline) {
      std::string m = Next(std::chrono::duration<double>(deadline - Clock::now()).count() /
                           testing::TimeScale());
      if (m.empty()) break;
      seen.push_back(m);
      if (m.rfind(prefix, 0) == 0) return m;
    }
    return "";
  }
  // Queues kMarker behind every message sent so far.
  static constexpr char kMarker[] = "MARKER-FROM-THE-TEST";
  void Mark() {
    int fd = ::socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    sockaddr_un a{};
    a.sun_family = AF_UNIX;
    std::snprintf(a.sun_path, sizeof(a.sun_path), "%s", path_.c_str());
    EXPECT_EQ(
        ::sendto(fd, kMarker, sizeof(kMarker) - 1, 0, reinterpret_cast<sockaddr*>(&a), sizeof(a)),
        static_cast<ssize_t>(sizeof(kMarker) - 1));
    ::close(fd);
  }
  std::vector<std::string> seen;

 private:
  void Read() {
    char buf[4096];
    for (;;) {
      ssize_t n = ::recv(fd_, buf, sizeof(buf), 0);
      if (n <= 0) return;  // shut down
      std::lock_guard<std::mutex> lock(mu_);
      queue_.emplace_back(buf, n);
      cv_.notify_all();
    }
  }
  std::string path_;
  int fd_ = -1;
  bool bound_ = false;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::string> queue_;
  std::thread reader_;
};

// A daemon started as systemd starts a notify service with WatchdogSec=: NOTIFY_SOCKET and
// WATCHDOG_USEC in its environment (through env(1), which execs it as the same process).
std::unique_ptr<cli::Process> StartNotified(const NotifySocket& socket,
                                            std::chrono::microseconds watchdog,
                                            std::vector<std::string> args) {
  std::vector<std::string> env_args = {"NOTIFY_SOCKET=" + socket.path(),
                                       absl::StrCat("WATCHDOG_USEC=", watchdog.count()),
                                       ROMULUS_BINARY};
  env_args.insert(env_args.end(), args.begin(), args.end());
  auto p = cli::Process::Start("/usr/bin/env", env_args);
  EXPECT_TRUE(p.ok()) << p.status();
  return p.ok() ? std::move(*p) : nullptr;
}

struct Pair {
  TempDir dir;
  std::string mirror_conf, primary_conf;
};

Pair WritePair(const std::string& platform) {
  Pair p;
  std::ofstream(p.dir.File("key")) << "a-test-key-of-some-length\n";
  uint16_t port = FreePort();
  p.mirror_conf = p.dir.File("mirror.conf");
  p.primary_conf = p.dir.File("primary.conf");
  std::ofstream(p.mirror_conf) << "vm_id: \"t\"\nmemory_mib: 64\ndisk_mib: 8\nport: " << port
                               << "\npsk_file: \"" << p.dir.File("key") << "\"\nreplica_disk: \""
                               << p.dir.File("replica.img") << "\"\nplatform: \"" << platform
                               << "\"\n";
  std::ofstream(p.primary_conf) << "vm_id: \"t\"\nmemory_mib: 64\ndisk: \""
                                << p.dir.File("primary.img") << "\"\ndisk_mib: 8\nplatform: \""
                                << platform << "\"\nmirror: \"127.0.0.1:" << port
                                << "\"\npsk_file: \"" << p.dir.File("key") << "\"\n"
                                << "epoch_ms: 10\nledger_port: " << FreePort() << "\n"
                                << "workload { working_set_pages: 256 write_rate: 2000 }\n";
  return p;
}

// Index of the first message starting with `prefix` (-1 if none).
int IndexOf(const std::vector<std::string>& seen, const std::string& prefix) {
  for (size_t i = 0; i < seen.size(); i++) {
    if (seen[i].rfind(prefix, 0) == 0) return static_cast<int>(i);
  }
  return -1;
}

std::string Joined(const std::vector<std::string>& seen) {
  std::string s;
  for (const auto& m : seen) s += m + " | ";
  return s;
}

constexpr std::chrono::microseconds kWatchdog{400000};

// A mirror and a primary started as systemd starts them, each with a notify socket of its own.
struct NotifiedPair {
  explicit NotifiedPair(const std::string& platform)
      : files(WritePair(platform)),
        mirror_socket(files.dir.File("mirror.notify")),
        primary_socket(files.dir.File("primary.notify")) {}
  Pair files;
  NotifySocket mirror_socket, primary_socket;
  std::unique_ptr<cli::Process> mirror, primary;
};

// Starts the mirror, then the primary, each until it said READY=1.
void StartUntilReady(NotifiedPair& p) {
  ASSERT_TRUE(p.mirror_socket.bound() && p.primary_socket.bound());
  p.mirror = StartNotified(p.mirror_socket, kWatchdog, {"mirror", "--config", p.files.mirror_conf});
  ASSERT_NE(p.mirror, nullptr);
  ASSERT_NE(p.mirror_socket.WaitFor("READY=1", 30), "") << p.mirror->output();
  p.primary =
      StartNotified(p.primary_socket, kWatchdog, {"primary", "--config", p.files.primary_conf});
  ASSERT_NE(p.primary, nullptr);
  ASSERT_NE(p.primary_socket.WaitFor("READY=1", 60), "") << Joined(p.primary_socket.seen);
}

class VmSystemd : public testing::PlatformTest {};

// The mirror is ready once it listens, the primary once its first checkpoint is committed; each
// says its state in STATUS= first, pings the watchdog only after READY=1, and says STOPPING=1
// when told to stop.
TEST_P(VmSystemd, PrimaryAndMirrorSendReadyStatusAndWatchdogInOrder) {
  NotifiedPair pair(platform_name());
  StartUntilReady(pair);
  if (HasFatalFailure()) return;
  NotifySocket &mirror_socket = pair.mirror_socket, &primary_socket = pair.primary_socket;
  auto &mirror = pair.mirror, &primary = pair.primary;
  // By READY the primary was protected: its first checkpoint was committed at the mirror.
  ASSERT_TRUE(primary->WaitForLine("protected: replicating", testing::ScaledMs(30)).ok())
      << primary->output();
  for (NotifySocket* s : {&mirror_socket, &primary_socket}) {
    ASSERT_NE(s->WaitFor("WATCHDOG=1", 10), "") << Joined(s->seen);
    ASSERT_NE(s->WaitFor("WATCHDOG=1", 10), "") << Joined(s->seen);  // and again
    int status = IndexOf(s->seen, "STATUS="), ready = IndexOf(s->seen, "READY=1"),
        watchdog = IndexOf(s->seen, "WATCHDOG=1");
    EXPECT_GE(status, 0) << Joined(s->seen);
    EXPECT_LT(status, ready) << Joined(s->seen);
    EXPECT_LT(ready, watchdog) << Joined(s->seen);
  }
  EXPECT_NE(IndexOf(mirror_socket.seen, "STATUS="), -1);
  primary->Signal(SIGTERM);
  EXPECT_NE(primary_socket.WaitFor("STOPPING=1", 30), "") << Joined(primary_socket.seen);
  EXPECT_EQ(primary->Wait(testing::ScaledMs(30)), 0) << primary->output();
  mirror->Signal(SIGTERM);
  EXPECT_NE(mirror_socket.WaitFor("STOPPING=1", 30), "") << Joined(mirror_socket.seen);
  EXPECT_EQ(mirror->Wait(testing::ScaledMs(60)), 0) << mirror->output();
}

// The thread of `pid` named `name` (as /proc/PID/task/TID/comm shows it); 0 if none.
pid_t ThreadNamed(pid_t pid, const std::string& name) {
  namespace fs = std::filesystem;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(absl::StrCat("/proc/", pid, "/task"), ec)) {
    std::string comm;
    std::ifstream(e.path() / "comm") >> comm;
    if (comm == name) return static_cast<pid_t>(std::stol(e.path().filename()));
  }
  return 0;
}

// A stuck epoch loop, made from outside: the test stops that one thread with ptrace (the rest of
// the daemon, its heartbeats and main loop included, runs on). The pings stop, so systemd would
// kill it; once the thread runs again, they come back.
TEST_P(VmSystemd, APrimaryWhoseEpochLoopIsStuckStopsPingingTheWatchdog) {
  NotifiedPair pair(platform_name());
  StartUntilReady(pair);
  if (HasFatalFailure()) return;
  NotifySocket& primary_socket = pair.primary_socket;
  auto &mirror = pair.mirror, &primary = pair.primary;
  ASSERT_NE(primary_socket.WaitFor("WATCHDOG=1", 10), "") << Joined(primary_socket.seen);

  pid_t epoch = ThreadNamed(primary->pid(), "rml-epoch");
  ASSERT_NE(epoch, 0) << "no thread named rml-epoch in " << primary->pid();
  ASSERT_EQ(::ptrace(PTRACE_SEIZE, epoch, nullptr, nullptr), 0) << std::strerror(errno);
  ASSERT_EQ(::ptrace(PTRACE_INTERRUPT, epoch, nullptr, nullptr), 0) << std::strerror(errno);
  int status = 0;
  ASSERT_EQ(::waitpid(epoch, &status, __WALL), epoch);
  ASSERT_TRUE(WIFSTOPPED(status));
  // Once the loop has been stuck for longer than the watchdog interval, no ping may follow. A
  // marker the test sends into the socket then separates the pings sent before from any after.
  std::this_thread::sleep_until(Clock::now() + kWatchdog + std::chrono::milliseconds(100));
  primary_socket.Mark();
  while (primary_socket.Next(10) != NotifySocket::kMarker) {
  }
  int pings_after = 0;
  for (auto end = Clock::now() + kWatchdog * 4; Clock::now() < end;) {
    std::string m = primary_socket.Next(0.1);
    if (!m.empty()) primary_socket.seen.push_back(m);
    if (m.rfind("WATCHDOG=1", 0) == 0) pings_after++;
  }
  // The daemon itself still runs (its status loop is not the loop that proves progress).
  EXPECT_EQ(::kill(primary->pid(), 0), 0);
  EXPECT_EQ(pings_after, 0) << "pinged the watchdog with its epoch loop stopped: "
                            << Joined(primary_socket.seen);
  ASSERT_EQ(::ptrace(PTRACE_DETACH, epoch, nullptr, nullptr), 0) << std::strerror(errno);
  EXPECT_NE(primary_socket.WaitFor("WATCHDOG=1", 10), "") << "no pings after the loop resumed";

  primary->Signal(SIGTERM);
  EXPECT_EQ(primary->Wait(testing::ScaledMs(30)), 0) << primary->output();
  mirror->Signal(SIGTERM);
  EXPECT_EQ(mirror->Wait(testing::ScaledMs(60)), 0) << mirror->output();
}

ROMULUS_ON_EVERY_PLATFORM(VmSystemd);

// A daemon started as systemd starts a Type=notify unit: READY, a STATUS saying `status`, watchdog
// pings after READY, and STOPPING when told to stop.
void ExpectNotifyLifecycle(const TempDir& dir, const std::vector<std::string>& args,
                           const std::string& status_text) {
  NotifySocket socket(dir.File(args[0] + ".notify"));
  ASSERT_TRUE(socket.bound());
  auto daemon = StartNotified(socket, kWatchdog, args);
  ASSERT_NE(daemon, nullptr);
  ASSERT_NE(socket.WaitFor("READY=1", 30), "") << daemon->output();
  int status = IndexOf(socket.seen, "STATUS=");
  ASSERT_GE(status, 0) << Joined(socket.seen);
  EXPECT_NE(socket.seen[status].find(status_text), std::string::npos) << Joined(socket.seen);
  ASSERT_NE(socket.WaitFor("WATCHDOG=1", 10), "") << Joined(socket.seen);
  EXPECT_LT(IndexOf(socket.seen, "READY=1"), IndexOf(socket.seen, "WATCHDOG=1"));
  daemon->Signal(SIGTERM);
  EXPECT_NE(socket.WaitFor("STOPPING=1", 30), "") << Joined(socket.seen);
  EXPECT_EQ(daemon->Wait(testing::ScaledMs(30)), 0) << daemon->output();
}

TEST(Systemd, TheWitnessSendsReadyStatusAndWatchdogAndStopping) {
  TempDir dir;
  std::ofstream(dir.File("key")) << "a-test-key-of-some-length\n";
  ExpectNotifyLifecycle(dir,
                        {"witness", "--listen", "127.0.0.1:0", "--psk-file", dir.File("key"),
                         "--state", dir.File("witness.state"), "--init"},
                        "serving leases");
}

// romulus-proxy@.service: with no host answering yet, the proxy is ready (it holds requests).
TEST(Systemd, TheProxySendsReadyStatusAndWatchdogAndStopping) {
  TempDir dir;
  uint16_t port = testing::FreePort(), host = port;
  for (int i = 0; i < 100 && host == port; i++) host = testing::FreePort();
  ASSERT_NE(host, port);
  std::ofstream(dir.File("proxy.conf"))
      << "port: " << port << "\nhost: \"127.0.0.1:" << host << "\"\n";
  ExpectNotifyLifecycle(dir, {"proxy", "--config", dir.File("proxy.conf")}, "primary unknown");
}

// Without NOTIFY_SOCKET (started by hand, by a test, by another supervisor) nothing changes.
TEST(Systemd, WithoutNotifySocketTheWitnessRunsAsBefore) {
  TempDir dir;
  std::ofstream(dir.File("key")) << "a-test-key-of-some-length\n";
  testing::Child witness({"witness", "--listen", "127.0.0.1:0", "--psk-file", dir.File("key"),
                          "--state", dir.File("witness.state"), "--init"});
  EXPECT_NE(witness.WaitForLine("serving leases", 30), "");
  witness.Signal(SIGTERM);
  EXPECT_EQ(witness.Wait(30), 0) << witness.output();
}

// systemd that does not read (PID 1 busy, say) must not stall the daemon's loop: the witness's
// notify socket is full before it starts, and it still stops at once when told to.
TEST(Systemd, ADaemonWhoseNotificationsAreNotReadStillStopsWhenTold) {
  TempDir dir;
  std::ofstream(dir.File("key")) << "a-test-key-of-some-length\n";
  std::string path = dir.File("unread.notify");
  int unread = ::socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  sockaddr_un a{};
  a.sun_family = AF_UNIX;
  std::snprintf(a.sun_path, sizeof(a.sun_path), "%s", path.c_str());
  ASSERT_EQ(::bind(unread, reinterpret_cast<sockaddr*>(&a), sizeof(a)), 0);
  int sender = ::socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  int queued = 0;
  while (queued < 10000 && ::sendto(sender, "X=1", 3, MSG_DONTWAIT, reinterpret_cast<sockaddr*>(&a),
                                    sizeof(a)) == 3) {
    queued++;
  }
  ::close(sender);
  ASSERT_EQ(errno, EAGAIN) << "the queue never filled: " << queued;
  std::vector<std::string> args = {"NOTIFY_SOCKET=" + path,
                                   "WATCHDOG_USEC=100000",
                                   ROMULUS_BINARY,
                                   "witness",
                                   "--listen",
                                   "127.0.0.1:0",
                                   "--psk-file",
                                   dir.File("key"),
                                   "--state",
                                   dir.File("witness.state"),
                                   "--init"};
  auto witness = cli::Process::Start("/usr/bin/env", args);
  ASSERT_TRUE(witness.ok()) << witness.status();
  ASSERT_TRUE((*witness)->WaitForLine("serving leases", testing::ScaledMs(30)).ok());
  (*witness)->Signal(SIGTERM);
  EXPECT_EQ((*witness)->Wait(testing::ScaledMs(30)), 0) << (*witness)->output();
  EXPECT_NE((*witness)->output().find("romulus witness: stopped"), std::string::npos);
  ::close(unread);
}

}  // namespace
}  // namespace romulus::systemd_test
