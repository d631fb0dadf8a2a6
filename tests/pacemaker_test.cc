// Romulus under Pacemaker: ocf-tester on the OCF agent (ocf/romulus), and a real two-node
// Corosync + Pacemaker cluster from Debian, each node a network, mount and UTS namespace of its
// own (tests/pacemaker_node.sh starts its daemons directly), running two Romulus VMs as
// promotable clones and, beside them, a pair protected by Romulus' own witness for comparison.
// Fencing is on: tests/fence_netns powers a node off by killing every process in its network
// namespace. vm1 takes the fast path (its mirror fences the silent primary's node through
// Pacemaker's fencer, stonith_admin, and promotes itself at once); vm2 is Pacemaker's alone.
// Ledger clients run in a third namespace linked to both nodes. Every wait is bounded; the
// daemons, namespaces and files go away with the fixture, also when a check fails.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <thread>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_replace.h"
#include "absl/strings/str_split.h"
#include "cli/control.h"
#include "cli/load.h"
#include "cli/process.h"
#include "tests/netns.h"
#include "tests/test_util.h"

namespace romulus::pacemaker_test {
namespace {

using Clock = std::chrono::steady_clock;
using testing::ReadFile;
using testing::WaitUntil;

struct Shell {
  int rc = -1;
  std::string out;
};

// Runs a shell command (stdout and stderr together, at most 256 KiB kept).
Shell Sh(const std::string& command) {
  Shell r;
  FILE* f = ::popen((command + " 2>&1").c_str(), "r");
  if (f == nullptr) return r;
  char buf[4096];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof(buf), f)) > 0) {
    if (r.out.size() < (256 << 10)) r.out.append(buf, n);
  }
  int status = ::pclose(f);
  r.rc = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return r;
}

std::string Quote(const std::string& s) {
  return "'" + absl::StrReplaceAll(s, {{"'", "'\\''"}}) + "'";
}

void WriteFile(const std::string& path, const std::string& text) { std::ofstream(path) << text; }

double MsBetween(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double, std::milli>(b - a).count();
}

// Empty when the cluster programs are here; else which one is missing.
std::string ClusterProgramsMissing() {
  for (const char* p :
       {"corosync", "pacemakerd", "crm_resource", "crm_attribute", "crm_mon", "cibadmin",
        "corosync-cfgtool", "ocf-tester", "nsenter", "unshare", "stonith_admin"}) {
    if (Sh(absl::StrCat("command -v ", p)).rc != 0) {
      return absl::StrCat(p,
                          " is not installed (Debian: pacemaker corosync pacemaker-cli-utils "
                          "resource-agents)");
    }
  }
  return "";
}

// The hosts run VMs on the platform each picks (as every VM test, they skip where none can).
#define ROMULUS_REQUIRE_CLUSTER_PROGRAMS()                                        \
  do {                                                                            \
    if (std::string why = ClusterProgramsMissing(); !why.empty()) {               \
      GTEST_SKIP() << "needs Corosync, Pacemaker and ocf-tester: " << why;        \
    }                                                                             \
    if (auto p = vmm::ChoosePlatform(); !p.ok()) {                                \
      GTEST_SKIP() << "needs a platform that runs VMs: " << p.status().message(); \
    }                                                                             \
  } while (0)

const std::string kAgent = std::string(ROMULUS_SOURCE_DIR) + "/ocf/romulus";
const std::string kFenceAgent = std::string(ROMULUS_SOURCE_DIR) + "/tests/fence_netns";

TEST(PacemakerAgent, OcfTesterPasses) {
  ROMULUS_REQUIRE_CLUSTER_PROGRAMS();
  testing::TempDir dir;
  WriteFile(dir.File("key"), "ocf-tester-key-0123456789abcdef\n");
  uint16_t port = testing::FreePort(), ledger = testing::FreePort(), none = testing::FreePort();
  std::string common = absl::StrFormat(
      "vm_id: \"vmt\"\nmemory_mib: 64\ndisk_mib: 8\npsk_file: \"%s\"\ncontrol_socket: \"%s\"\n"
      "ledger_listen: \"127.0.0.1\"\nledger_port: %d\n",
      dir.File("key"), dir.File("vmt.sock"), ledger);
  WriteFile(dir.File("mirror.conf"),
            absl::StrFormat("%slisten: \"127.0.0.1\"\nport: %d\nreplica_disk: \"%s\"\n"
                            "seed_memory_file: \"%s\"\n",
                            common, port, dir.File("vmt.img"), dir.File("vmt.mem")));
  WriteFile(dir.File("primary.conf"),
            absl::StrFormat("%sdisk: \"%s\"\nmemory_file: \"%s\"\nmirror: \"127.0.0.1:%d\"\n"
                            "replication_listen: \"127.0.0.1\"\nreplication_port: %d\n"
                            "workload { working_set_pages: 64 write_rate: 1000 }\n",
                            common, dir.File("vmt.img"), dir.File("vmt.mem"), none, port));
  // Run as root, ocf-tester also runs the agent's meta-data as the user nobody: a copy in a
  // directory anyone may enter, wherever the checkout is (a clone in a 0700 directory is not).
  testing::TempDir open_dir;
  ASSERT_EQ(::chmod(open_dir.path().c_str(), 0755), 0);
  std::string agent = open_dir.File("romulus");
  std::filesystem::copy_file(kAgent, agent);
  ASSERT_EQ(::chmod(agent.c_str(), 0755), 0);
  Shell r = Sh(absl::StrCat(
      "HA_RSCTMP=", Quote(dir.path()), " ocf-tester -n vmt -o binary=", ROMULUS_BINARY,
      " -o config=", dir.File("mirror.conf"), " -o primary_config=", dir.File("primary.conf"),
      " -o bootstrap=standalone -o log_file=", dir.File("vmt.log"), " ", agent));
  std::printf("%s", r.out.c_str());
  EXPECT_EQ(r.rc, 0) << ReadFile(dir.File("vmt.log"));
  EXPECT_NE(r.out.find("passed all tests"), std::string::npos);
  // Every promote and demote restarted the host in its role: the log shows both roles ran.
  std::string log = ReadFile(dir.File("vmt.log"));
  EXPECT_NE(log.find("romulus primary: VM running"), std::string::npos);
  EXPECT_NE(log.find("romulus mirror: waiting for the primary"), std::string::npos);
}

// Node i (0, 1) is "node<i+1>" at 10.88.1.<i+1> on the cluster link, reached by the clients at
// kClientSide[i]; the clients' namespace is 10.88.2.100 / 10.88.3.100 on its two links.
const char* const kNode[2] = {"node1", "node2"};
const char* const kClusterAddr[2] = {"10.88.1.1", "10.88.1.2"};
const char* const kClientSide[2] = {"10.88.2.1", "10.88.3.2"};
const char* const kWitnessFrom[2] = {"10.88.2.100", "10.88.3.100"};

class PacemakerNetns : public ::testing::Test {
 protected:
  void SetUp() override {
    ROMULUS_REQUIRE_CLUSTER_PROGRAMS();
    if (std::string why = testing::NetnsUnavailable("rmlpcmk-"); !why.empty()) {
      GTEST_SKIP() << "needs network namespaces: " << why;
    }
    lab_ = std::make_unique<testing::NetnsLab>("rmlpcmk-");
    for (const char* h : {"n1", "n2", "c"}) ASSERT_TRUE(lab_->AddHost(h).ok());
    for (auto [a, aa, b, ba] : {std::tuple{"n1", kClusterAddr[0], "n2", kClusterAddr[1]},
                                {"n1", kClientSide[0], "c", kWitnessFrom[0]},
                                {"n2", kClientSide[1], "c", kWitnessFrom[1]}}) {
      auto l = lab_->Link(a, aa, b, ba);
      ASSERT_TRUE(l.ok()) << l.status();
    }
  }

  void TearDown() override {
    if (HasFailure()) {
      for (auto& p : witness_pair_) std::printf("---- witness pair:\n%s", p->output().c_str());
    }
    witness_pair_.clear();
    for (int i = 0; i < 2; i++) KillNode(i);
    // The whole logs, for a look after the namespaces are gone (also after a pass, with
    // ROMULUS_KEEP_CLUSTER_LOGS set).
    if (HasFailure() || std::getenv("ROMULUS_KEEP_CLUSTER_LOGS") != nullptr) {
      for (int i = 0; i < 2; i++) {
        (void)Sh(absl::StrCat("mkdir -p /tmp/rmlpcmk-last/", kNode[i], " && cp ", Dir(i),
                              "/media/*.log ", Dir(i), "/log-pcmk/pacemaker.log /tmp/rmlpcmk-last/",
                              kNode[i], "/"));
      }
      std::printf("the nodes' logs are in /tmp/rmlpcmk-last\n");
      for (int i = 0; i < 2; i++) {
        std::printf("---- %s: the end of pacemaker.log\n%s", kNode[i],
                    Sh("tail -n 60 " + Dir(i) + "/log-pcmk/pacemaker.log").out.c_str());
        for (const char* vm : {"vm1", "vm2"}) {
          std::printf("---- %s: %s.log\n%s", kNode[i], vm,
                      Sh(absl::StrCat("tail -n 40 ", Dir(i), "/media/", vm, ".log")).out.c_str());
        }
      }
    }
    lab_.reset();
  }

  std::string Dir(int i) const { return dir_.File(kNode[i]); }
  std::string Ns(int i) const { return lab_->Namespace(i == 0 ? "n1" : "n2"); }
  std::string Socket(int i, const std::string& vm) const {
    return absl::StrCat(Dir(i), "/media/", vm, ".sock");
  }

  // Kills every process in node i's namespace (its daemons and the VMs' hosts): the node dies
  // as if its power went.
  void KillNode(int i) {
    if (!lab_) return;
    for (int round = 0; round < 50; round++) {
      Shell pids = Sh("ip netns pids " + Ns(i));
      if (pids.rc != 0 || pids.out.empty()) return;
      for (absl::string_view p : absl::StrSplit(pids.out, '\n', absl::SkipWhitespace())) {
        int pid = std::atoi(std::string(p).c_str());
        if (pid > 1) ::kill(pid, SIGKILL);
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(20));  // for the kernel to reap
    }
  }

  // Runs `command` inside node i (network, mount and UTS namespaces).
  Shell In(int i, const std::string& command) {
    return Sh(absl::StrCat("nsenter -t ", anchor_[i], " -m -n -u -- sh -c ", Quote(command)));
  }

  void WriteClusterFiles() {
    WriteFile(
        dir_.File("corosync.conf"),
        absl::StrFormat("totem {\n version: 2\n cluster_name: romulus\n transport: knet\n"
                        " crypto_cipher: aes256\n crypto_hash: sha256\n token: 1000\n}\n"
                        "nodelist {\n node {\n  ring0_addr: %s\n  name: node1\n  nodeid: 1\n }\n"
                        " node {\n  ring0_addr: %s\n  name: node2\n  nodeid: 2\n }\n}\n"
                        "quorum {\n provider: corosync_votequorum\n two_node: 1\n}\n"
                        "logging {\n to_logfile: yes\n logfile: /var/log/corosync/corosync.log\n"
                        " to_stderr: no\n to_syslog: no\n timestamp: on\n}\n",
                        kClusterAddr[0], kClusterAddr[1]));
    ASSERT_EQ(Sh("head -c 256 /dev/urandom > " + dir_.File("authkey")).rc, 0);
  }

  // The Romulus configs of VM `vm` (ports 74NN replication, 75NN ledger, 76NN heartbeats) on
  // both nodes; the primary config for its first boot only on node `first`. `fast`: the mirror
  // that finds the primary silent on every path has Pacemaker's fencer power the other node
  // off, and promotes itself once it did. 1500 ms of silence: 200 ms fenced a live node here
  // when the machine was loaded, and so did 500 ms in a run of the whole test command (two
  // tests and a build on two cores); the fencer answers only once Corosync dropped the node
  // (token + consensus, 2.2 s) anyway, so a shorter timeout gains little.
  void WriteVmConfigs(const std::string& vm, int n, int first, bool fast) {
    for (int i = 0; i < 2; i++) {
      std::string media = Dir(i) + "/media/";
      std::filesystem::create_directories(media);
      WriteFile(media + vm + ".key", absl::StrCat("pacemaker-test-key-", vm, "-0123456789\n"));
      std::string common = absl::StrFormat(
          "vm_id: \"%s\"\nmemory_mib: 64\ndisk_mib: 8\npsk_file: \"/media/%s.key\"\n"
          "control_socket: \"/media/%s.sock\"\nledger_listen: \"0.0.0.0\"\nledger_port: %d\n"
          "switchover {\n  node: \"%s\"\n  path { local: \"%s:%d\" remote: \"%s:%d\" }\n%s}\n",
          vm, vm, vm, 7500 + n, kNode[i], kClusterAddr[i], 7600 + n, kClusterAddr[1 - i], 7600 + n,
          fast ? absl::StrFormat("  heartbeat_timeout_ms: 1500\n  fence_command: \"stonith_admin "
                                 "--fence %s --timeout 20\"\n  fence_timeout_ms: 25000\n",
                                 kNode[1 - i])
               : "");
      WriteFile(media + vm + "-mirror.conf",
                absl::StrFormat("%slisten: \"0.0.0.0\"\nport: %d\nreplica_disk: \"/media/%s.img\"\n"
                                "seed_memory_file: \"/media/%s.mem\"\nreplicate_to: \"%s:%d\"\n",
                                common, 7400 + n, vm, vm, kClusterAddr[1 - i], 7400 + n));
      if (i == first) {
        WriteFile(media + vm + "-primary.conf",
                  absl::StrFormat("%sdisk: \"/media/%s.img\"\nmemory_file: \"/media/%s.mem\"\n"
                                  "mirror: \"%s:%d\"\nreplication_listen: \"0.0.0.0\"\n"
                                  "replication_port: %d\n"
                                  "workload { working_set_pages: 256 write_rate: 2000 }\n",
                                  common, vm, vm, kClusterAddr[1 - i], 7400 + n, 7400 + n));
      }
    }
  }

  // What the fence agent needs to find a node's processes: per node, the inode of its network
  // namespace (see tests/fence_netns).
  void WriteFenceFiles() {
    std::filesystem::create_directories(dir_.File("netns"));
    for (int i = 0; i < 2; i++) {
      Shell r = Sh("stat -L -c %i /run/netns/" + Ns(i));
      ASSERT_EQ(r.rc, 0) << r.out;
      WriteFile(dir_.File("netns/") + kNode[i], r.out);
    }
  }

  void StartNode(int i) {
    Shell r = Sh(absl::StrCat("ip netns exec ", Ns(i), " unshare -m -u --propagation private sh ",
                              ROMULUS_SOURCE_DIR, "/tests/pacemaker_node.sh ", Dir(i), " ",
                              kNode[i], " ", kAgent, " ", kFenceAgent));
    ASSERT_EQ(r.rc, 0) << r.out;
    auto at = r.out.find("anchor ");
    ASSERT_NE(at, std::string::npos) << r.out;
    anchor_[i] = std::atoi(r.out.c_str() + at + 7);
    ASSERT_GT(anchor_[i], 1);
  }

  // One fence device for both nodes; a fenced node stays off (pcmk_reboot_action=off) until the
  // test powers it on, as an operator would after a repair.
  std::string ClusterResources() {
    std::string xml = absl::StrFormat(
        "<primitive id=\"fence-netns\" class=\"stonith\" type=\"fence_netns\">"
        "<instance_attributes id=\"fence-ia\">"
        "<nvpair id=\"fence-dir\" name=\"netns_dir\" value=\"%s\"/>"
        "<nvpair id=\"fence-hl\" name=\"pcmk_host_list\" value=\"node1 node2\"/>"
        "<nvpair id=\"fence-ra\" name=\"pcmk_reboot_action\" value=\"off\"/>"
        "</instance_attributes><operations>"
        "<op id=\"fence-mon\" name=\"monitor\" interval=\"60s\"/></operations></primitive>",
        dir_.File("netns"));
    for (const char* vm : {"vm1", "vm2"}) {
      absl::StrAppendFormat(
          &xml,
          "<clone id=\"%1$s-clone\"><meta_attributes id=\"%1$s-clone-meta\">"
          "<nvpair id=\"%1$s-p\" name=\"promotable\" value=\"true\"/>"
          "<nvpair id=\"%1$s-pm\" name=\"promoted-max\" value=\"1\"/>"
          "<nvpair id=\"%1$s-pnm\" name=\"promoted-node-max\" value=\"1\"/>"
          "<nvpair id=\"%1$s-cm\" name=\"clone-max\" value=\"2\"/>"
          "<nvpair id=\"%1$s-cnm\" name=\"clone-node-max\" value=\"1\"/>"
          "<nvpair id=\"%1$s-n\" name=\"notify\" value=\"true\"/></meta_attributes>"
          "<primitive id=\"%1$s\" class=\"ocf\" provider=\"romulus\" type=\"romulus\">"
          "<instance_attributes id=\"%1$s-ia\">"
          "<nvpair id=\"%1$s-c\" name=\"config\" value=\"/media/%1$s-mirror.conf\"/>"
          "<nvpair id=\"%1$s-pc\" name=\"primary_config\" value=\"/media/%1$s-primary.conf\"/>"
          "<nvpair id=\"%1$s-b\" name=\"binary\" value=\"%2$s\"/>"
          "<nvpair id=\"%1$s-l\" name=\"log_file\" value=\"/media/%1$s.log\"/>"
          "</instance_attributes><operations>"
          "<op id=\"%1$s-mp\" name=\"monitor\" interval=\"1s\" role=\"Promoted\" timeout=\"20s\"/>"
          "<op id=\"%1$s-mu\" name=\"monitor\" interval=\"2s\" role=\"Unpromoted\" "
          "timeout=\"20s\"/>"
          "<op id=\"%1$s-start\" name=\"start\" interval=\"0\" timeout=\"60s\"/>"
          "<op id=\"%1$s-stop\" name=\"stop\" interval=\"0\" timeout=\"30s\"/>"
          "<op id=\"%1$s-pr\" name=\"promote\" interval=\"0\" timeout=\"60s\"/>"
          "<op id=\"%1$s-de\" name=\"demote\" interval=\"0\" timeout=\"60s\"/>"
          "<op id=\"%1$s-no\" name=\"notify\" interval=\"0\" timeout=\"20s\"/>"
          "</operations></primitive></clone>",
          vm, ROMULUS_BINARY);
    }
    return "<resources>" + xml + "</resources>";
  }

  absl::StatusOr<pb::StatusReply> Status(int i, const std::string& vm) {
    return cli::QueryStatus(Socket(i, vm), 1000);
  }
  bool IsRole(int i, const std::string& vm, const std::string& role) {
    auto s = Status(i, vm);
    return s.ok() && s->role() == role;
  }
  // A mirror whose replica is committed and in sync with a live primary.
  bool InSync(int i, const std::string& vm) {
    auto s = Status(i, vm);
    return s.ok() && s->role() == "mirror" && s->peer_connected() && s->committed_epoch() >= 0 &&
           s->state() == "replicating";
  }
  // Node i's promotion score for `vm`, as Pacemaker holds it ("" when none).
  std::string Score(int from, int i, const std::string& vm) {
    Shell r = In(from, absl::StrCat("crm_attribute --promotion=", vm, " -N ", kNode[i], " -G -q"));
    if (r.rc != 0) return "";
    return std::string(absl::StripAsciiWhitespace(r.out));
  }
  // How many times the cluster fenced `node` successfully, as node `from`'s fencer recorded it.
  int Fenced(int from, const char* node, std::string* history) {
    Shell r = In(from, absl::StrCat("stonith_admin --history ", node));
    *history = r.out;
    int n = 0;
    for (absl::string_view line : absl::StrSplit(r.out, '\n')) {
      if (absl::StrContains(line, absl::StrCat(" of ", node, " successful"))) n++;
    }
    return n;
  }
  // Pacemaker's view: `vm` promoted on node i, and no failed action of it recorded.
  bool PacemakerPromoted(int from, const std::string& vm, int i) {
    Shell r = In(from, absl::StrCat("crm_resource --locate -r ", vm, "-clone"));
    return r.rc == 0 && absl::StrContains(r.out, absl::StrCat(kNode[i], " Promoted"));
  }

  // The VM runs on node p, protected by node 1-p, whose promotion score says so.
  bool Protected(const std::string& vm, int p) {
    return IsRole(p, vm, "primary") && InSync(1 - p, vm) && Score(p, 1 - p, vm) == "1000";
  }

  // Ledger clients in the clients' namespace, starting at node `p`'s address of `vm` (ledger
  // port `port`) with the other node's as the standby, on a thread of their own.
  std::thread Load(uint16_t port, int p, double seconds, absl::StatusOr<cli::LoadReport>* report) {
    cli::LoadOptions o;
    o.host = kClientSide[p];
    o.port = port;
    o.standby_host = kClientSide[1 - p];
    o.standby_port = port;
    o.clients = 4;
    o.duration_s = seconds;
    o.rate = 400;
    o.timeout_ms = 3000;
    o.attempts = 2000;  // keeps retrying (50 ms back-off) through a failover of seconds
    return std::thread([this, o, report] { lab_->RunIn("c", [&] { *report = cli::RunLoad(o); }); });
  }

  void ExpectNothingLost(const absl::StatusOr<cli::LoadReport>& r, const char* what) {
    ASSERT_TRUE(r.ok()) << what << ": " << r.status();
    lost_ += r->lost_acknowledged;
    std::printf("%s: %s", what, cli::FormatReport(*r).c_str());
    EXPECT_TRUE(r->ok()) << what;
    EXPECT_EQ(r->lost_acknowledged, 0u) << what;
    EXPECT_EQ(r->unresolved, 0u) << what;
    EXPECT_GT(r->requests, 0u) << what;
  }

  // The witness pair: VM "vm3" with its primary in node1's namespace, its mirror in node2's and
  // the witness in the clients', as plain processes Pacemaker does not manage.
  void StartWitnessPair() {
    std::string key = dir_.File("vm3.key");
    WriteFile(key, "witness-pair-key-0123456789abcdef\n");
    for (int i = 0; i < 2; i++) {
      std::string common = absl::StrFormat(
          "vm_id: \"vm3\"\nmemory_mib: 64\ndisk_mib: 8\npsk_file: \"%s\"\n"
          "control_socket: \"%s\"\nledger_listen: \"0.0.0.0\"\nledger_port: 7503\n"
          "switchover {\n  node: \"%s\"\n  path { local: \"%s:7603\" remote: \"%s:7603\" }\n"
          "  witness: \"%s:7300\"\n  heartbeat_timeout_ms: 100\n}\n",
          key, dir_.File(absl::StrCat("vm3-", i, ".sock")), kNode[i], kClusterAddr[i],
          kClusterAddr[1 - i], kWitnessFrom[i]);
      std::string disk = dir_.File(absl::StrCat("vm3-", i, ".img"));
      WriteFile(dir_.File(absl::StrCat("vm3-", i, ".conf")),
                i == 0 ? absl::StrFormat("%sdisk: \"%s\"\nmirror: \"%s:7403\"\n"
                                         "workload { working_set_pages: 256 write_rate: 2000 }\n",
                                         common, disk, kClusterAddr[1])
                       : absl::StrFormat("%slisten: \"0.0.0.0\"\nport: 7403\nreplica_disk: \"%s\"\n"
                                         "replicate_to: \"%s:7403\"\n",
                                         common, disk, kClusterAddr[0]));
    }
    auto run = [&](const std::string& ns, std::vector<std::string> args) {
      args.insert(args.begin(), {"netns", "exec", ns, ROMULUS_BINARY});
      auto p = cli::Process::Start(access("/usr/sbin/ip", X_OK) == 0 ? "/usr/sbin/ip" : "/sbin/ip",
                                   args);
      EXPECT_TRUE(p.ok()) << p.status();
      if (p.ok()) witness_pair_.push_back(std::move(*p));
    };
    run(lab_->Namespace("c"), {"witness", "--psk-file", key, "--listen", "0.0.0.0:7300", "--state",
                               dir_.File("witness.state"), "--init"});
    run(Ns(1), {"mirror", "--config", dir_.File("vm3-1.conf")});
    run(Ns(0), {"primary", "--config", dir_.File("vm3-0.conf")});
  }

  testing::TempDir dir_;
  std::unique_ptr<testing::NetnsLab> lab_;
  int anchor_[2] = {0, 0};
  std::vector<std::unique_ptr<cli::Process>> witness_pair_;
  uint64_t lost_ = 0;  // acknowledged writes lost, over every load of the test
};

TEST_F(PacemakerNetns, PromotesOnKillsAndMigratesOnMove) {
  auto t_start = Clock::now();
  WriteClusterFiles();
  ASSERT_NO_FATAL_FAILURE(WriteFenceFiles());
  // vm1 boots on node1, vm2 on node2, each protected by the other node; vm1 with the fast path.
  WriteVmConfigs("vm1", 1, /*first=*/0, /*fast=*/true);
  WriteVmConfigs("vm2", 2, /*first=*/1, /*fast=*/false);
  for (int i = 0; i < 2; i++) ASSERT_NO_FATAL_FAILURE(StartNode(i));

  // A DC is elected (about 24 s here) with both nodes online.
  ASSERT_TRUE(WaitUntil(
      [&] {
        Shell r = In(0, "crm_mon -1");
        return r.rc == 0 && r.out.find("Current DC: node") != std::string::npos &&
               r.out.find("Online: [ node1 node2 ]") != std::string::npos;
      },
      120))
      << In(0, "crm_mon -1").out;
  std::printf("cluster: DC elected, both nodes online %.1f s after start\n",
              MsBetween(t_start, Clock::now()) / 1000);
  ASSERT_EQ(In(0, "crm_attribute -t crm_config -n stonith-enabled -v true").rc, 0);
  WriteFile(Dir(0) + "/media/resources.xml", ClusterResources());
  Shell created = In(0, "cibadmin -C -o resources -x /media/resources.xml");
  ASSERT_EQ(created.rc, 0) << created.out;
  auto t_created = Clock::now();

  ASSERT_TRUE(WaitUntil([&] { return Protected("vm1", 0) && Protected("vm2", 1); }, 90))
      << In(0, "crm_mon -1").out;
  std::printf(
      "cluster: vm1 promoted on node1, vm2 on node2, each protected by the other node (mirror "
      "replicating, promotion score 1000), fencing enabled, %.1f s after the resources were "
      "created\n",
      MsBetween(t_created, Clock::now()) / 1000);
  for (const char* vm : {"vm1", "vm2"}) {
    EXPECT_EQ(
        In(0, absl::StrCat("crm_attribute -t crm_config -n romulus-created-", vm, " -G -q")).rc, 0);
  }

  // Baseline in the same run: the witness pair (heartbeats every 10 ms, dead after 100 ms, a
  // 150 ms lease), kill -9 of its primary under load. Started once the cluster has settled.
  double witness_ms = -1;
  {
    StartWitnessPair();
    ASSERT_FALSE(HasFailure());
    ASSERT_TRUE(WaitUntil(
        [&] {
          auto s = cli::QueryStatus(dir_.File("vm3-1.sock"), 1000);
          return s.ok() && s->state() == "replicating" && s->committed_epoch() >= 0;
        },
        60));
    absl::StatusOr<cli::LoadReport> report = absl::UnknownError("not run");
    std::thread load = Load(7503, 0, 4, &report);
    std::this_thread::sleep_for(std::chrono::milliseconds(1500));  // load before the kill
    auto t_kill = Clock::now();
    witness_pair_[2]->Signal(SIGKILL);
    load.join();
    ExpectNothingLost(report, "witness pair");
    ASSERT_TRUE(report.ok() && report->first_standby_answer);
    witness_ms = MsBetween(t_kill, *report->first_standby_answer);
    witness_pair_.clear();
  }

  // crm_resource --move of vm2's promoted instance to node1: a planned migration.
  double downtime_ms = -1;
  {
    absl::StatusOr<cli::LoadReport> report = absl::UnknownError("not run");
    std::thread load = Load(7502, 1, 5, &report);
    std::this_thread::sleep_for(std::chrono::milliseconds(1500));
    Shell moved = In(0, "crm_resource --move -r vm2-clone --promoted -N node1");
    EXPECT_EQ(moved.rc, 0) << moved.out;
    bool done = WaitUntil([&] { return IsRole(0, "vm2", "primary"); }, 60);
    load.join();
    ASSERT_TRUE(done) << In(0, "crm_mon -1").out;
    ExpectNothingLost(report, "vm2 moved by crm_resource --move");
    std::string log = ReadFile(Dir(1) + "/media/vm2.log");
    auto at = log.find("after the VM paused here (downtime");
    ASSERT_NE(at, std::string::npos) << "no planned migration in node2's vm2 log:\n" << log;
    auto from = log.rfind("resumed at the mirror ", at);
    ASSERT_NE(from, std::string::npos);
    downtime_ms = std::atof(log.c_str() + from + std::strlen("resumed at the mirror "));
    std::string line =
        log.substr(log.rfind('\n', at) + 1, log.find('\n', at) - log.rfind('\n', at));
    std::printf("move: %s", line.c_str());
    EXPECT_EQ(In(0, "crm_resource --clear -r vm2-clone").rc, 0);
  }
  ASSERT_TRUE(WaitUntil([&] { return Protected("vm2", 0); }, 90)) << In(0, "crm_mon -1").out;

  // kill -9 of vm2's primary on node1, under load: Pacemaker's monitor sees it failed
  // (promoted), stops it, and promotes node2's in-sync mirror. Nothing is fenced (the stop
  // succeeded).
  double pcmk_promoted_ms = -1, pcmk_answer_ms = -1;
  {
    pid_t pid = std::atoi(ReadFile(Dir(0) + "/run/resource-agents/romulus-vm2.pid").c_str());
    ASSERT_GT(pid, 1);
    absl::StatusOr<cli::LoadReport> report = absl::UnknownError("not run");
    std::thread load = Load(7502, 0, 6, &report);
    std::this_thread::sleep_for(std::chrono::milliseconds(1500));  // load before the kill
    auto t_kill = Clock::now();
    ASSERT_EQ(::kill(pid, SIGKILL), 0);
    bool promoted = WaitUntil([&] { return IsRole(1, "vm2", "primary"); }, 60);
    pcmk_promoted_ms = MsBetween(t_kill, Clock::now());
    load.join();
    ASSERT_TRUE(promoted) << In(1, "crm_mon -1").out;
    ExpectNothingLost(report, "vm2 under Pacemaker, primary killed");
    ASSERT_TRUE(report.ok() && report->first_standby_answer);
    pcmk_answer_ms = MsBetween(t_kill, *report->first_standby_answer);
  }
  // node1 comes back as vm2's mirror (Pacemaker restarts the failed instance) and is protected.
  ASSERT_TRUE(WaitUntil([&] { return Protected("vm2", 1); }, 90)) << In(1, "crm_mon -1").out;
  std::string history;
  EXPECT_EQ(Fenced(1, "node1", &history), 0) << history;

  // node2 dies whole (corosync, Pacemaker, vm2's primary, vm1's mirror), under load on vm2:
  // node1's Pacemaker sees the node gone, fences it (its own request: no fast path watches a
  // primary on node2 from node1 here) and only then promotes its in-sync mirror of vm2.
  double node_promoted_ms = -1, node_answer_ms = -1;
  int node2_fenced = -1;
  {
    absl::StatusOr<cli::LoadReport> report = absl::UnknownError("not run");
    std::thread load = Load(7502, 1, 8, &report);
    std::this_thread::sleep_for(std::chrono::milliseconds(1500));
    auto t_kill = Clock::now();
    KillNode(1);
    bool promoted = WaitUntil([&] { return IsRole(0, "vm2", "primary"); }, 60);
    node_promoted_ms = MsBetween(t_kill, Clock::now());
    load.join();
    ASSERT_TRUE(promoted) << In(0, "crm_mon -1").out;
    ExpectNothingLost(report, "vm2 under Pacemaker, node2 killed whole");
    ASSERT_TRUE(report.ok() && report->first_standby_answer);
    node_answer_ms = MsBetween(t_kill, *report->first_standby_answer);
    EXPECT_TRUE(IsRole(0, "vm1", "primary"));  // vm1 stays where it runs
    node2_fenced = Fenced(0, "node2", &history);
    EXPECT_EQ(node2_fenced, 1) << history;
    EXPECT_TRUE(absl::StrContains(history, "client=pacemaker-controld")) << history;
    std::printf("fencing history (node1):\n%s", history.c_str());
  }

  // node2 is powered on again (its /run empty, as after a reboot): it rejoins, its instances
  // are probed as stopped and start as mirrors, and both VMs, both on node1 now, are protected.
  auto t_power_on = Clock::now();
  ASSERT_NO_FATAL_FAILURE(StartNode(1));
  ASSERT_TRUE(WaitUntil([&] { return Protected("vm1", 0) && Protected("vm2", 0); }, 120))
      << In(0, "crm_mon -1").out;
  std::printf("node2 powered on: rejoined, both VMs protected again %.1f s later\n",
              MsBetween(t_power_on, Clock::now()) / 1000);

  // kill -9 of vm1's primary on node1, which runs both primaries, under load on both: vm1's
  // mirror on node2 finds it silent, has Pacemaker's fencer power node1 off (all of it: vm2's
  // primary too) and promotes itself at once; Pacemaker, told node1 is fenced, promotes vm2's
  // mirror. One event, both paths.
  double fast_promoted_ms = -1, fast_answer_ms = -1, slow_promoted_ms = -1, slow_answer_ms = -1;
  {
    pid_t pid = std::atoi(ReadFile(Dir(0) + "/run/resource-agents/romulus-vm1.pid").c_str());
    ASSERT_GT(pid, 1);
    absl::StatusOr<cli::LoadReport> r1 = absl::UnknownError("not run"), r2 = r1;
    std::thread load1 = Load(7501, 0, 7, &r1);
    std::thread load2 = Load(7502, 0, 7, &r2);
    std::this_thread::sleep_for(std::chrono::milliseconds(1500));  // load before the kill
    auto t_kill = Clock::now();
    ASSERT_EQ(::kill(pid, SIGKILL), 0);
    bool promoted = WaitUntil(
        [&] {
          if (fast_promoted_ms < 0 && IsRole(1, "vm1", "primary")) {
            fast_promoted_ms = MsBetween(t_kill, Clock::now());
          }
          if (slow_promoted_ms < 0 && IsRole(1, "vm2", "primary")) {
            slow_promoted_ms = MsBetween(t_kill, Clock::now());
          }
          return fast_promoted_ms >= 0 && slow_promoted_ms >= 0;
        },
        60);
    load1.join();
    load2.join();
    ASSERT_TRUE(promoted) << In(1, "crm_mon -1").out;
    ExpectNothingLost(r1, "vm1, fast path (primary killed, its node fenced)");
    ExpectNothingLost(r2, "vm2 under Pacemaker (its node fenced)");
    ASSERT_TRUE(r1.ok() && r1->first_standby_answer && r2.ok() && r2->first_standby_answer);
    fast_answer_ms = MsBetween(t_kill, *r1->first_standby_answer);
    slow_answer_ms = MsBetween(t_kill, *r2->first_standby_answer);
  }
  // vm1 was promoted by whichever came first: its own fast path (the heartbeats' silence, then
  // the fence) or Pacemaker's promote (its monitor and a transition; the agent's forced promote
  // runs the same fence command). Which one wins is a race, and both fence node1 first.
  std::string vm1_log = ReadFile(Dir(1) + "/media/vm1.log");
  size_t self_promoted = vm1_log.rfind("promoted (the primary was silent on every path");
  size_t by_agent = vm1_log.rfind("promoted (asked by an operator");
  if (by_agent != std::string::npos && self_promoted != std::string::npos &&
      self_promoted > by_agent) {
    by_agent = std::string::npos;
  }
  size_t promoted_at = by_agent != std::string::npos ? by_agent : self_promoted;
  ASSERT_NE(promoted_at, std::string::npos) << vm1_log;
  const char* vm1_path =
      by_agent != std::string::npos
          ? "Pacemaker's promote, before the fast path's heartbeat timeout ran out"
          : "its own fast path";
  std::printf("vm1 promoted by %s: %s\n", vm1_path,
              vm1_log.substr(promoted_at, vm1_log.find('\n', promoted_at) - promoted_at).c_str());
  // Before its first output left without a mirror, the promoted host withdrew node1's
  // promotion score (the agent's --unprotected-command), so that node1's replica, behind from
  // then on, could not be promoted.
  // (Looked for from where the VM resumed here: the agent writes its promote's line into the
  // log only once `romulus promote` returned.)
  size_t resumed = vm1_log.rfind("VM running, ledger on");
  ASSERT_NE(resumed, std::string::npos) << vm1_log;
  EXPECT_NE(vm1_log.find("unprotected command succeeded", resumed), std::string::npos) << vm1_log;
  // node1 is off: nothing runs in its namespace, and the cluster fenced it exactly once.
  EXPECT_EQ(Sh("ip netns pids " + Ns(0)).out, "");
  int fenced = Fenced(1, "node1", &history);
  EXPECT_EQ(fenced, 1) << history;
  std::printf("fencing history (node2):\n%s", history.c_str());
  // Pacemaker agrees: both promoted on node2, vm1's self-promotion recorded as no failure.
  ASSERT_TRUE(WaitUntil(
      [&] { return PacemakerPromoted(1, "vm1", 1) && PacemakerPromoted(1, "vm2", 1); }, 60))
      << In(1, "crm_mon -1").out;
  Shell mon = In(1, "crm_mon -1");
  EXPECT_EQ(mon.out.find("Failed Resource Actions"), std::string::npos) << mon.out;

  std::printf(
      "pacemaker summary: witness pair kill -9 -> first answer %.0f ms; vm2 (Pacemaker only): "
      "kill -9 of its primary -> promoted %.0f ms, first answer %.0f ms; node killed whole "
      "(fenced by Pacemaker %d time(s)) -> promoted %.0f ms, first answer %.0f ms; "
      "crm_resource --move downtime %.1f ms; kill -9 of vm1's primary (node1 fenced %d time(s), "
      "vm2's primary with it): vm1 (fast path configured, promoted by %s) -> promoted %.0f ms, "
      "first answer %.0f ms, vm2 "
      "Pacemaker -> promoted %.0f ms, first answer %.0f ms; %lu acknowledged writes lost; the "
      "test took %.0f s\n",
      witness_ms, pcmk_promoted_ms, pcmk_answer_ms, node2_fenced, node_promoted_ms, node_answer_ms,
      downtime_ms, fenced, vm1_path, fast_promoted_ms, fast_answer_ms, slow_promoted_ms,
      slow_answer_ms, static_cast<unsigned long>(lost_), MsBetween(t_start, Clock::now()) / 1000);
}

}  // namespace
}  // namespace romulus::pacemaker_test
