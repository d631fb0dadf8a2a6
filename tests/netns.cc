#include "tests/netns.h"

#include <dirent.h>
#include <fcntl.h>
#include <gtest/gtest.h>
#include <sched.h>
#include <signal.h>
#include <unistd.h>

#include <cstdio>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace romulus::testing {
namespace {

// Runs a shell command; its output goes into the error when it fails.
absl::Status Run(const std::string& command) {
  FILE* f = ::popen((command + " 2>&1").c_str(), "r");
  if (f == nullptr) return absl::InternalError("popen failed");
  std::string out;
  char buf[512];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof(buf), f)) > 0 && out.size() < 4096) out.append(buf, n);
  int status = ::pclose(f);
  if (status != 0) return absl::InternalError(absl::StrCat("'", command, "' failed: ", out));
  return absl::OkStatus();
}

// Namespaces named <prefix><pid>-... whose process is gone: a killed run's leftovers.
void RemoveStaleNamespaces(const std::string& prefix) {
  DIR* d = ::opendir("/run/netns");
  if (d == nullptr) return;
  std::vector<std::string> stale;
  while (dirent* e = ::readdir(d)) {
    std::string name = e->d_name;
    if (name.rfind(prefix, 0) != 0) continue;
    int pid = std::atoi(name.c_str() + prefix.size());
    if (pid > 0 && pid != ::getpid() && ::kill(pid, 0) != 0) stale.push_back(name);
  }
  ::closedir(d);
  for (const auto& name : stale) (void)Run("ip netns delete " + name);
}

}  // namespace

std::string NetnsUnavailable(const std::string& prefix) {
  if (::geteuid() != 0) return "not root";
  if (::access("/usr/sbin/ip", X_OK) != 0 && ::access("/sbin/ip", X_OK) != 0) {
    return "iproute2 (ip) is not installed";
  }
  if (::access("/usr/sbin/nft", X_OK) != 0) return "nftables (nft) is not installed";
  std::string probe = absl::StrCat(prefix, ::getpid(), "-probe");
  if (auto s = Run("ip netns add " + probe); !s.ok()) return std::string(s.message());
  (void)Run("ip netns delete " + probe);
  return "";
}

NetnsLab::NetnsLab(std::string prefix) : kind_(std::move(prefix)) {
  static int labs = 0;
  RemoveStaleNamespaces(kind_);
  prefix_ = absl::StrCat(kind_, ::getpid(), "-", labs++, "-");
}

NetnsLab::~NetnsLab() {
  for (const auto& host : hosts_) (void)Run("ip netns delete " + Ns(host));  // veths go too
}

absl::Status NetnsLab::AddHost(const std::string& host) {
  if (auto s = Run("ip netns add " + Ns(host)); !s.ok()) return s;
  hosts_.push_back(host);
  return Run(absl::StrCat("ip -n ", Ns(host), " link set lo up"));
}

std::string NetnsLab::Interface(int link, const std::string& host) const {
  return absl::StrCat("l", link, links_[link].first == host ? "a" : "b");
}

absl::StatusOr<int> NetnsLab::Link(const std::string& a, const std::string& a_address,
                                   const std::string& b, const std::string& b_address) {
  int link = static_cast<int>(links_.size());
  links_.emplace_back(a, b);
  // Interface names only need to be unique inside a namespace; create them inside `a`.
  std::string ia = Interface(link, a), ib = Interface(link, b);
  for (const std::string& cmd : {
           absl::StrCat("ip -n ", Ns(a), " link add ", ia, " type veth peer name ", ib, " netns ",
                        Ns(b)),
           absl::StrCat("ip -n ", Ns(a), " addr add ", a_address, "/24 dev ", ia),
           absl::StrCat("ip -n ", Ns(b), " addr add ", b_address, "/24 dev ", ib),
           absl::StrCat("ip -n ", Ns(a), " link set ", ia, " up"),
           absl::StrCat("ip -n ", Ns(b), " link set ", ib, " up"),
       }) {
    if (auto s = Run(cmd); !s.ok()) return s;
  }
  return link;
}

absl::Status NetnsLab::SetRules(const std::string& host, const std::string& rules) {
  std::string script = "flush ruleset\n" + rules;
  std::string file = absl::StrCat("/tmp/", Ns(host), ".nft");
  FILE* f = std::fopen(file.c_str(), "w");
  if (f == nullptr) return absl::InternalError("cannot write " + file);
  std::fwrite(script.data(), 1, script.size(), f);
  std::fclose(f);
  absl::Status s = Run(absl::StrCat("ip netns exec ", Ns(host), " nft -f ", file));
  ::unlink(file.c_str());
  return s;
}

absl::Status NetnsLab::Cut(const std::string& host, const std::vector<std::string>& interfaces) {
  if (interfaces.empty()) return SetRules(host, "");
  std::string set = absl::StrCat("{ \"", absl::StrJoin(interfaces, "\", \""), "\" }");
  return SetRules(host, absl::StrCat("table inet cut {\n"
                                     "  chain in { type filter hook input priority 0; iifname ",
                                     set, " drop; }\n",
                                     "  chain out { type filter hook output priority 0; oifname ",
                                     set, " drop; }\n}\n"));
}

absl::Status NetnsLab::Limit(const std::string& host, const std::string& interface,
                             const std::string& rate) {
  // A bucket of 256 KiB: a few frames at once at any rate tested, and no latency limit that
  // would drop what TCP has in flight.
  return Run(absl::StrCat("ip netns exec ", Ns(host), " tc qdisc replace dev ", interface,
                          " root tbf rate ", rate, " burst 256kb latency 400ms"));
}

void NetnsLab::RunIn(const std::string& host, const std::function<void()>& fn) {
  std::string error;
  std::thread t([&] {
    int fd = ::open(("/run/netns/" + Ns(host)).c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0 || ::setns(fd, CLONE_NEWNET) != 0) {
      error = "cannot enter namespace " + Ns(host);
      if (fd >= 0) ::close(fd);
      return;
    }
    ::close(fd);
    fn();
  });
  t.join();
  if (!error.empty()) ADD_FAILURE() << error;
}

}  // namespace romulus::testing
