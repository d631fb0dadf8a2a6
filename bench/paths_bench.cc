// Parallel paths (issue 15 §3): replication throughput over two paths against one, in the same
// run. Two test hosts (network namespaces p and m) are joined by two veth links, each capped at
// the same rate by a token bucket filter (`tc qdisc ... tbf`), as two network links of that
// bandwidth would be. The primary's software VM (tests/soft_vm.h) holds incompressible memory;
// the figure is the initial synchronisation's rate (bytes on the wire / time to the first
// commit), with one path (a plain connection, as before parallel paths) and with two (a bond),
// interleaved over rounds so that a change in the machine's load falls on both. The same runs on
// loopback (127.0.0.1 and 127.0.0.2, uncapped) show what the bond costs where the CPU, not the
// link, is the limit.
// Usage: romulus_paths_bench [--quick] [--rate RATE] (RATE in tc's syntax, default 200mbit).
#include <chrono>
#include <cstdio>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "bench/bench_util.h"
#include "replicator/replicator.h"
#include "tests/netns.h"
#include "tests/soft_vm.h"

namespace {

using romulus::bench::Clock;
using romulus::bench::Ratio;
using romulus::bench::WaitFor;
using romulus::testing::SoftVm;
namespace cp = romulus::checkpoint;
namespace rp = romulus::replicator;

const char kKey[] = "paths-bench-key-0123456789abcdef";
constexpr uint64_t kDisk = 4ull << 20;

[[noreturn]] void Die(const std::string& what) { romulus::bench::Die("romulus_paths_bench", what); }

struct Result {
  double mbps = 0;  // MB/s on the wire until the first commit
  uint64_t wire = 0;
  double seconds = 0;
};

// Runs `fn` in `host`'s namespace when there is a lab, else here.
void In(romulus::testing::NetnsLab* lab, const std::string& host, const std::function<void()>& fn) {
  if (lab) {
    lab->RunIn(host, fn);
  } else {
    fn();
  }
}

// One synchronisation of `memory` bytes of noise from p to m over `paths` of `addresses`.
Result Sync(romulus::testing::NetnsLab* lab, const std::vector<std::string>& addresses,
            size_t paths, uint64_t memory, const std::string& dir) {
  SoftVm::Options o;
  o.memory_bytes = memory;
  o.disk_bytes = kDisk;
  o.working_set_pages = 256;
  o.writes_per_ms = 5;
  auto vm = SoftVm::Create(dir + "/disk.img", o);
  if (!vm) Die("cannot create the software VM");
  vm->FillWithNoise();
  romulus::vmm::OutputGate gate;
  cp::EpochEngine engine(*vm, gate, cp::EpochEngine::Options{});
  if (!vm->Start().ok()) Die("cannot start the software VM");
  auto replica = cp::ReplicaStore::Create(memory, dir + "/replica.img", kDisk);
  if (!replica.ok()) Die(std::string(replica.status().message()));
  rp::Identity id{"paths-bench", memory, kDisk, romulus::pb::PLATFORM_UNSPECIFIED};
  std::unique_ptr<rp::Mirror> mirror;
  In(lab, "m", [&] {
    rp::Mirror::Options m;
    m.identity = id;
    m.key = kKey;
    m.listen = addresses[0];
    m.listen_paths = {addresses.begin() + 1, addresses.end()};
    m.port = 0;  // any free port: the same on every address
    auto started = rp::Mirror::Start(**replica, m);
    if (!started.ok()) Die(std::string(started.status().message()));
    mirror = std::move(*started);
  });
  std::unique_ptr<rp::Primary> primary;
  In(lab, "p", [&] {
    rp::Primary::Options p;
    p.identity = id;
    p.key = kKey;
    for (size_t i = 0; i < paths; i++) p.mirror_paths.push_back({addresses[i], mirror->port()});
    auto started = rp::Primary::Start(engine, gate, p);
    if (!started.ok()) Die(std::string(started.status().message()));
    primary = std::move(*started);
  });
  if (!WaitFor([&] { return primary->stats().acked >= 1; }, 300)) {
    Die("no commit within 300 s: " + primary->stats().state);
  }
  // Everything on the connection until the first commit (the pre-copy's own count stops when
  // its last frame is handed to the connection, which with two paths is before it is sent).
  auto stats = primary->stats();
  Result r;
  for (const auto& path : stats.paths) r.wire += path.bytes_sent;
  r.seconds = stats.sync.seconds;
  r.mbps = r.seconds > 0 ? static_cast<double>(r.wire) / r.seconds / 1e6 : 0;
  primary.reset();
  mirror.reset();
  return r;
}

// Rounds of one path then two; prints each and the ratio of the medians.
void Compare(const char* where, romulus::testing::NetnsLab* lab,
             const std::vector<std::string>& addresses, uint64_t memory, int rounds,
             const std::string& dir) {
  std::vector<double> one, two;
  for (int r = 0; r < rounds; r++) {
    for (size_t paths : {1, 2}) {
      Result res = Sync(lab, addresses, paths, memory, dir);
      std::printf("  %s, round %d, %zu path%s: %7.1f MiB in %6.2f s = %7.1f MB/s\n", where, r + 1,
                  paths, paths == 1 ? " " : "s", static_cast<double>(res.wire) / (1 << 20),
                  res.seconds, res.mbps);
      std::fflush(stdout);
      (paths == 1 ? one : two).push_back(res.mbps);
    }
  }
  double m1 = romulus::bench::Quantile(one, 0.5), m2 = romulus::bench::Quantile(two, 0.5);
  std::printf("%s: 1 path %.1f MB/s, 2 paths %.1f MB/s (medians of %d): 2 paths / 1 path = %.2fx\n",
              where, m1, m2, rounds, Ratio(m2, m1));
}

}  // namespace

int main(int argc, char** argv) {
  bool quick = false;
  std::string rate = "200mbit";
  for (int i = 1; i < argc; i++) {
    if (std::strcmp(argv[i], "--quick") == 0) {
      quick = true;
    } else if (std::strcmp(argv[i], "--rate") == 0 && i + 1 < argc) {
      rate = argv[++i];
    } else {
      Die("usage: romulus_paths_bench [--quick] [--rate RATE]");
    }
  }
  const uint64_t memory = quick ? 32ull << 20 : 128ull << 20;
  const int rounds = quick ? 1 : 3;
  char tmpl[] = "/tmp/romulus-paths-bench-XXXXXX";
  if (!::mkdtemp(tmpl)) Die("cannot make a temporary directory");
  std::string dir = tmpl;
  std::printf("romulus_paths_bench: %s; %llu MiB of incompressible memory synchronised\n",
              romulus::bench::MachineLoad().c_str(), static_cast<unsigned long long>(memory >> 20));
  if (std::string why = romulus::testing::NetnsUnavailable("rmpb"); !why.empty()) {
    std::printf("network namespaces: not measured (%s)\n", why.c_str());
  } else {
    romulus::testing::NetnsLab lab("rmpb");
    if (!lab.AddHost("p").ok() || !lab.AddHost("m").ok()) Die("cannot add the test hosts");
    std::vector<std::string> mirror = {"10.203.1.2", "10.203.2.2"};
    for (int i = 0; i < 2; i++) {
      auto l = lab.Link("p", absl::StrCat("10.203.", i + 1, ".1"), "m", mirror[i]);
      if (!l.ok()) Die(std::string(l.status().message()));
      if (auto s = lab.Limit("p", lab.Interface(*l, "p"), rate); !s.ok()) {
        Die(std::string(s.message()));
      }
    }
    Compare(absl::StrCat("netns, each path ", rate).c_str(), &lab, mirror, memory, rounds, dir);
  }
  Compare("loopback, uncapped", nullptr, {"127.0.0.1", "127.0.0.2"}, memory, rounds, dir);
  std::string rm = "rm -rf " + dir;
  if (std::system(rm.c_str()) != 0) std::fprintf(stderr, "could not remove %s\n", dir.c_str());
  return 0;
}
