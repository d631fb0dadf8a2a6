// `romulus status` against a running `romulus mirror` (no KVM needed): it says what the mirror
// is doing and why; a bad request on the control socket is refused without harm.
#include "cli/control.h"

#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <fstream>
#include <future>

#include "tests/test_util.h"
#include "vmm/ledger_protocol.h"

namespace romulus::control_test {
namespace {

using testing::Child;
using testing::TempDir;

TEST(ControlSocket, StatusSaysWhatTheMirrorDoesAndRefusesGarbage) {
  TempDir dir;
  std::ofstream(dir.File("key")) << "a-test-key-of-some-length\n";
  std::string sock = dir.File("mirror.sock");
  std::ofstream(dir.File("mirror.conf"), std::ios::trunc)
      << "vm_id: \"ctl\"\nmemory_mib: 16\ndisk_mib: 4\nport: " << testing::FreePort() << "\n"
      << "psk_file: \"" << dir.File("key") << "\"\nreplica_disk: \"" << dir.File("replica.img")
      << "\"\ncontrol_socket: \"" << sock << "\"\n";
  Child mirror({"mirror", "--config", dir.File("mirror.conf")});
  ASSERT_NE(mirror.WaitForLine("waiting for the primary", 30), "") << mirror.output();

  Child status({"status", "--socket", sock});
  ASSERT_EQ(status.Wait(30), 0) << status.output();
  EXPECT_NE(status.output().find("role:             mirror"), std::string::npos) << status.output();
  EXPECT_NE(status.output().find("waiting for a primary; no replica yet"), std::string::npos)
      << status.output();
  Child json({"status", "--socket", sock, "--json"});
  ASSERT_EQ(json.Wait(30), 0) << json.output();
  EXPECT_NE(json.output().find("\"role\":\"mirror\""), std::string::npos) << json.output();
  EXPECT_NE(json.output().find("\"committedEpoch\":\"-1\""), std::string::npos) << json.output();

  // A frame that claims 4 GiB: refused with an error reply; the server keeps serving.
  int fd = ::socket(AF_UNIX, SOCK_STREAM, 0);
  sockaddr_un u{};
  u.sun_family = AF_UNIX;
  std::strcpy(u.sun_path, sock.c_str());
  ASSERT_EQ(::connect(fd, reinterpret_cast<sockaddr*>(&u), sizeof(u)), 0);
  ASSERT_EQ(::write(fd, "\xff\xff\xff\xff", 4), 4);
  char buf[256];
  ssize_t n = ::read(fd, buf, sizeof(buf));
  ::close(fd);
  ASSERT_GT(n, 4);
  EXPECT_NE(std::string(buf + 4, static_cast<size_t>(n - 4)).find("too large"), std::string::npos);
  auto again = cli::QueryStatus(sock);
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(again->role(), "mirror");

  // A mirror has no VM to migrate; a bad timeout is refused before anything is asked.
  Child migrate({"migrate", "--socket", sock});
  EXPECT_EQ(migrate.Wait(30), 1);
  EXPECT_NE(migrate.output().find("romulus migrate: only a primary can migrate its VM"),
            std::string::npos)
      << migrate.output();
  Child bad_timeout({"migrate", "--socket", sock, "--timeout-ms", "0"});
  EXPECT_EQ(bad_timeout.Wait(30), 2);  // a usage error
  EXPECT_NE(bad_timeout.output().find("--timeout-ms must be 1 to 600000"), std::string::npos)
      << bad_timeout.output();
  Child help({"migrate", "--help"});
  EXPECT_EQ(help.Wait(30), 0);
  EXPECT_NE(help.output().find("downtime"), std::string::npos) << help.output();

  Child missing({"status", "--socket", dir.File("nothing.sock")});
  EXPECT_EQ(missing.Wait(30), 1);
  std::string said = missing.output();
  EXPECT_NE(said.find("is romulus running there?"), std::string::npos);
  EXPECT_EQ(std::count(said.begin(), said.end(), '\n'), 1);

  mirror.Signal(SIGTERM);
  EXPECT_EQ(mirror.Wait(30), 0) << mirror.output();
  EXPECT_NE(::access(sock.c_str(), F_OK), 0);  // the socket file is gone with the mirror
}

// A client that leaves before its answer is written costs the server nothing: the write fails
// quietly (a SIGPIPE would end the whole primary), and the next client is served.
TEST(ControlSocket, AClientThatLeavesBeforeItsAnswerDoesNotHurtTheServer) {
  TempDir dir;
  std::string sock = dir.File("control.sock");
  std::promise<void> left;
  std::shared_future<void> client_left = left.get_future().share();
  std::atomic<int> asked{0};
  auto server = cli::ControlServer::Start(sock, {.status = [&] {
                                            if (asked++ == 0) client_left.wait();
                                            pb::StatusReply r;
                                            r.set_role("mirror");
                                            return r;
                                          }});
  ASSERT_TRUE(server.ok()) << server.status();
  int fd = ::socket(AF_UNIX, SOCK_STREAM, 0);
  sockaddr_un u{};
  u.sun_family = AF_UNIX;
  std::strcpy(u.sun_path, sock.c_str());
  ASSERT_EQ(::connect(fd, reinterpret_cast<sockaddr*>(&u), sizeof(u)), 0);
  pb::ControlRequest req;
  req.set_status(true);
  std::string frame = vmm::EncodeFrame(req);
  ASSERT_EQ(::write(fd, frame.data(), frame.size()), static_cast<ssize_t>(frame.size()));
  ::close(fd);
  left.set_value();
  auto again = cli::QueryStatus(sock);
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(again->role(), "mirror");
  EXPECT_EQ(asked.load(), 2);
}

}  // namespace
}  // namespace romulus::control_test
