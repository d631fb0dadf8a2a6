// Test hosts as network namespaces on this machine: veth links between them, nftables rules on
// them, and code run inside one of them. Everything is removed when the lab goes, also when a
// test fails; namespaces a killed test run left behind are removed by the next lab.
#ifndef ROMULUS_TESTS_NETNS_H_
#define ROMULUS_TESTS_NETNS_H_

#include <functional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace romulus::testing {

// Empty when this process can build a lab (root, `ip`, `nft`); else why not. It tries a
// namespace named `prefix`<pid>-probe.
std::string NetnsUnavailable(const std::string& prefix = "romt");

#define ROMULUS_REQUIRE_NETNS()                                                   \
  do {                                                                            \
    if (std::string why = ::romulus::testing::NetnsUnavailable(); !why.empty()) { \
      GTEST_SKIP() << "needs network namespaces: " << why;                        \
    }                                                                             \
  } while (0)

class NetnsLab {
 public:
  // Namespaces are named PREFIX<pid>-<lab>-<host>.
  explicit NetnsLab(std::string prefix = "romt");
  ~NetnsLab();
  NetnsLab(const NetnsLab&) = delete;
  NetnsLab& operator=(const NetnsLab&) = delete;

  // A host with loopback up.
  absl::Status AddHost(const std::string& host);
  // A veth pair between two hosts with an IPv4 /24 address on each end ("10.x.y.z").
  // Returns the link's index, used to name its interfaces.
  absl::StatusOr<int> Link(const std::string& a, const std::string& a_address, const std::string& b,
                           const std::string& b_address);
  // The name of `host`'s end of link `link`.
  std::string Interface(int link, const std::string& host) const;
  // Replaces `host`'s nftables ruleset with `rules` ("" removes all rules).
  absl::Status SetRules(const std::string& host, const std::string& rules);
  // Drops everything in and out of the given interfaces of `host` ("" none).
  absl::Status Cut(const std::string& host, const std::vector<std::string>& interfaces);
  // Caps what `host` sends out of `interface` at `rate` (tc's syntax, e.g. "200mbit") with a
  // token bucket filter: a path of that bandwidth.
  absl::Status Limit(const std::string& host, const std::string& interface,
                     const std::string& rate);
  // Runs `fn` on a thread inside `host`'s namespace: sockets it opens (and threads it starts)
  // live there.
  void RunIn(const std::string& host, const std::function<void()>& fn);
  // The namespace's name (for `ip netns exec`).
  std::string Namespace(const std::string& host) const { return Ns(host); }

 private:
  std::string Ns(const std::string& host) const { return prefix_ + host; }
  std::string kind_;    // the prefix every lab of this kind shares
  std::string prefix_;  // this lab's
  std::vector<std::string> hosts_;
  std::vector<std::pair<std::string, std::string>> links_;  // hosts of each link
};

}  // namespace romulus::testing

#endif  // ROMULUS_TESTS_NETNS_H_
