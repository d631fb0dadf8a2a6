// What protecting replication frames costs (issue 17): the same software VM (tests/soft_vm.h)
// replicated over loopback with frames unprotected (the baseline), authenticated in clear, and
// encrypted with each AEAD, all in one run. For each: the initial synchronisation of
// incompressible memory (the cipher works on every byte: compression is off), then a steady
// state with a large working set written, its replication MB/s and epoch pauses. Modes are
// interleaved over several rounds so that a change in the machine's load falls on all of them;
// throughputs are medians over rounds, pauses pooled, and each ratio to the baseline is the
// median of the ratios within a round (a synchronisation lasts under a second, so the load
// that the rounds meet differs more than the modes within one round do). A raw loopback TCP blast
// of as many bytes as a synchronisation sent is the ceiling the figures are read against.
// Everything runs twice: with both hosts on all CPUs, where the mirror's cipher work competes
// with the primary's on the same cores as it never would on two machines, and with each host on
// a core of its own (the goal is judged there).
#include <sched.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "bench/bench_util.h"
#include "bench/loopback.h"
#include "replicator/frame_protection.h"
#include "replicator/replicator.h"
#include "tests/soft_vm.h"

namespace {

using romulus::bench::Clock;
using romulus::bench::Ratio;
using romulus::bench::Secs;
using romulus::bench::WaitFor;
using romulus::testing::SoftVm;
namespace cp = romulus::checkpoint;
namespace pb = romulus::pb;
namespace rp = romulus::replicator;

const char kKey[] = "protection-bench-key-0123456789";

struct Sizes {
  uint64_t memory, disk, working_set, writes_per_ms;
  double steady_seconds;
  int rounds;
};
// writes_per_ms 100 over 8192 pages: about 2,100 distinct pages (8 MiB) per 25 ms epoch, some
// 340 MB/s offered, so that the steady state exercises the cipher rather than idles.
constexpr Sizes kFull = {256ull << 20, 16ull << 20, 8192, 100, 2.0, 5};
constexpr Sizes kQuick = {32ull << 20, 4ull << 20, 1024, 20, 0.5, 1};

struct Mode {
  const char* name;
  rp::Protection protection;
};
const Mode kModes[] = {
    {"none (baseline)", {.cipher = pb::FRAME_CIPHER_NONE, .encrypt = false}},
    {"aes-256-gcm, in clear", {.cipher = pb::AES_256_GCM, .encrypt = false}},
    {"aes-256-gcm, encrypted", {.cipher = pb::AES_256_GCM, .encrypt = true}},
    {"chacha20-poly1305, encrypted", {.cipher = pb::CHACHA20_POLY1305, .encrypt = true}},
};
constexpr size_t kModeCount = sizeof(kModes) / sizeof(kModes[0]);

[[noreturn]] void Die(const std::string& what) {
  romulus::bench::Die("romulus_protection_bench", what);
}

double Pct(const std::vector<double>& v, double p) { return romulus::bench::Quantile(v, p); }

// One mode, one round.
struct Sample {
  uint64_t sync_bytes = 0;  // on the wire until the first commit (pre-copy + full checkpoint)
  double sync_seconds = 0;
  double steady_mbps = 0, epochs_per_s = 0, pages_per_epoch = 0;
  std::vector<double> pauses;  // ms, every epoch of the steady window
  std::string protection;      // as the primary describes its connection
};

// Where the two hosts run. Shared: all their threads on all CPUs, so that the mirror's cipher
// work competes with the primary's, as it never does on two machines. Apart: the primary and the
// guest on CPU 0, the mirror on CPU 1, a core for each host, as two machines would have at least.
enum class Placement { kShared, kApart };

// Pins the calling thread (and the threads it starts from now on) to `cpu`, or with -1 lets it
// run anywhere again.
void PinTo(int cpu) {
  cpu_set_t set;
  CPU_ZERO(&set);
  unsigned n = std::thread::hardware_concurrency();
  for (unsigned c = 0; c < n; c++) {
    if (cpu < 0 || static_cast<unsigned>(cpu) == c) CPU_SET(c, &set);
  }
  if (::sched_setaffinity(0, sizeof(set), &set) != 0) Die("sched_setaffinity failed");
}

Sample RunOne(const Sizes& z, const Mode& mode, Placement placement, const std::string& dir) {
  bool apart = placement == Placement::kApart;
  if (apart) PinTo(0);
  SoftVm::Options vo;
  vo.memory_bytes = z.memory;
  vo.disk_bytes = z.disk;
  vo.working_set_pages = z.working_set;
  vo.writes_per_ms = z.writes_per_ms;
  auto vm = SoftVm::Create(dir + "/vm.img", vo);
  if (!vm) Die("cannot create the VM");
  vm->FillWithNoise();
  (void)vm->Start();  // a software VM always starts
  auto replica = cp::ReplicaStore::Create(z.memory, dir + "/replica.img", z.disk);
  if (!replica.ok()) Die(std::string(replica.status().message()));
  // Options filled field by field: GCC 12 at -O3 warns (maybe-uninitialized, falsely) on a
  // designated initialiser of these nested aggregates.
  rp::Mirror::Options mo;
  mo.identity = {"bench", z.memory, z.disk};
  mo.key = kKey;
  mo.protection = mode.protection;
  // The mirror's threads are started by this one, and inherit where it runs.
  absl::StatusOr<std::unique_ptr<rp::Mirror>> mirror;
  std::thread([&] {
    if (apart) PinTo(1);
    mirror = rp::Mirror::Start(**replica, std::move(mo));
  }).join();
  if (!mirror.ok()) Die(std::string(mirror.status().message()));
  romulus::vmm::OutputGate gate;
  auto engine = std::make_unique<cp::EpochEngine>(*vm, gate, cp::EpochEngine::Options{});
  rp::Primary::Options po;
  po.identity = {"bench", z.memory, z.disk};
  po.key = kKey;
  po.mirror_port = (*mirror)->port();
  po.epoch = std::chrono::milliseconds(25);
  po.compression = pb::COMPRESSION_NONE;
  po.protection = mode.protection;
  auto primary = rp::Primary::Start(*engine, gate, std::move(po));
  if (!primary.ok()) Die(std::string(primary.status().message()));
  rp::Primary& p = **primary;

  Sample out;
  // bytes_sent is published once the full checkpoint's frames are out, which may be just after
  // its acknowledgement arrived.
  if (!WaitFor([&] { return p.stats().acked >= 1 && p.stats().bytes_sent > 0; }, 600)) {
    Die(std::string(mode.name) + ": no first commit within 600 s: " + p.stats().state);
  }
  rp::Primary::Stats s = p.stats();
  out.sync_bytes = s.bytes_sent;
  out.sync_seconds = s.sync.seconds;
  out.protection = s.protection;

  // A second of steady state before the window, so that pre-copy's leftovers are not in it.
  uint64_t settle = s.acked + 40;
  if (!WaitFor([&] { return p.stats().acked >= settle; }, 60)) Die("replication stalled");
  rp::Primary::Stats a = p.stats();
  auto ta = Clock::now();
  std::this_thread::sleep_for(std::chrono::duration<double>(z.steady_seconds));
  rp::Primary::Stats b = p.stats();
  double secs = Secs(Clock::now() - ta);
  if (b.resyncs != a.resyncs || !b.connected || (*mirror)->stats().rejected != 0) {
    Die(std::string(mode.name) + ": the connection was lost during the steady state: " + b.state);
  }
  uint64_t epochs = b.checkpoints - a.checkpoints;
  out.steady_mbps = static_cast<double>(b.bytes_sent - a.bytes_sent) / secs / 1e6;
  out.epochs_per_s = static_cast<double>(epochs) / secs;
  out.pages_per_epoch = Ratio(static_cast<double>(b.dirty_pages - a.dirty_pages), epochs);
  size_t n = std::min<size_t>(epochs, b.pause_ms.size());
  out.pauses.assign(b.pause_ms.end() - static_cast<std::ptrdiff_t>(n), b.pause_ms.end());

  primary->reset();
  mirror->reset();
  engine.reset();
  vm.reset();
  if (apart) PinTo(-1);
  return out;
}

}  // namespace

double SyncMBps(const Sample& s) {
  return static_cast<double>(s.sync_bytes) / std::max(s.sync_seconds, 1e-9) / 1e6;
}

// The lowest ratios to the baseline: over the modes with the cipher a default configuration
// chooses (encrypted), and over all of them.
struct Verdict {
  double worst = 1e9, worst_chosen = 1e9;
  std::string worst_what, worst_chosen_what;
};

// Prints each mode's figures over the rounds of one placement (samples[mode][round]).
Verdict Report(const std::vector<std::vector<Sample>>& samples, pb::FrameCipher chosen) {
  struct Figures {
    double sync_mbps, sync_seconds, steady_mbps, epochs_per_s, pages_per_epoch, p50, p99;
    uint64_t sync_bytes;
    double sync_ratio, steady_ratio;  // to the baseline of the same round, median over rounds
  };
  std::vector<Figures> f(kModeCount);
  for (size_t m = 0; m < kModeCount; m++) {
    std::vector<double> sync, sync_s, steady, eps, ppe, pauses, sync_ratio, steady_ratio;
    for (size_t r = 0; r < samples[m].size(); r++) {
      const Sample& s = samples[m][r];
      const Sample& b = samples[0][r];
      sync_ratio.push_back(Ratio(SyncMBps(s), SyncMBps(b)));
      steady_ratio.push_back(Ratio(s.steady_mbps, b.steady_mbps));
      sync.push_back(SyncMBps(s));
      sync_s.push_back(s.sync_seconds);
      steady.push_back(s.steady_mbps);
      eps.push_back(s.epochs_per_s);
      ppe.push_back(s.pages_per_epoch);
      pauses.insert(pauses.end(), s.pauses.begin(), s.pauses.end());
    }
    f[m] = {Pct(sync, 0.5),       Pct(sync_s, 0.5),
            Pct(steady, 0.5),     Pct(eps, 0.5),
            Pct(ppe, 0.5),        Pct(pauses, 0.5),
            Pct(pauses, 0.99),    samples[m].back().sync_bytes,
            Pct(sync_ratio, 0.5), Pct(steady_ratio, 0.5)};
  }

  const Figures& base = f[0];
  double raw = romulus::bench::RawLoopbackMBps(base.sync_bytes);
  std::printf("raw loopback TCP, %.0f MB in one connection: %.0f MB/s\n",
              static_cast<double>(base.sync_bytes) / 1e6, raw);
  Verdict v;
  for (size_t m = 0; m < kModeCount; m++) {
    const Figures& x = f[m];
    std::printf(
        "%-29s [%s] sync %.0f MB/s (%.0f MB in %.2f s) x%.2f, %.2f of raw; steady %.0f MB/s "
        "x%.2f (%.1f epochs/s, %.0f pages/epoch); pause p50 %.2f ms x%.2f, p99 %.2f ms x%.2f\n",
        kModes[m].name, samples[m].back().protection.c_str(), x.sync_mbps,
        static_cast<double>(x.sync_bytes) / 1e6, x.sync_seconds, x.sync_ratio,
        Ratio(x.sync_mbps, raw), x.steady_mbps, x.steady_ratio, x.epochs_per_s, x.pages_per_epoch,
        x.p50, Ratio(x.p50, base.p50), x.p99, Ratio(x.p99, base.p99));
    if (m == 0) continue;
    bool is_chosen = kModes[m].protection.cipher == chosen && kModes[m].protection.encrypt;
    for (auto [ratio, phase] : {std::pair{x.sync_ratio, "sync"}, {x.steady_ratio, "steady"}}) {
      std::string what = std::string(kModes[m].name) + ", " + phase;
      if (ratio < v.worst) v.worst = ratio, v.worst_what = what;
      if (is_chosen && ratio < v.worst_chosen) v.worst_chosen = ratio, v.worst_chosen_what = what;
    }
  }
  std::fflush(stdout);
  return v;
}

int main(int argc, char** argv) {
  bool quick = false;
  for (int i = 1; i < argc; i++) {
    if (std::strcmp(argv[i], "--quick") == 0) {
      quick = true;
    } else {
      Die("usage: romulus_protection_bench [--quick]\n"
          "  --quick: small sizes and one round, to check that it works");
    }
  }
  const Sizes& z = quick ? kQuick : kFull;
  char tmpl[] = "/tmp/romulus-protection-bench-XXXXXX";
  if (!::mkdtemp(tmpl)) Die("cannot create a temporary directory");
  std::string dir = tmpl;

  std::printf(
      "machine: %s\n"
      "%lu MiB incompressible guest + %lu MiB disk, compression none, 25 ms epochs; steady "
      "state: %lu-page working set, %lu writes/ms, %.1f s windows; %d round(s), modes "
      "interleaved\n",
      romulus::bench::MachineLoad().c_str(), static_cast<unsigned long>(z.memory >> 20),
      static_cast<unsigned long>(z.disk >> 20), static_cast<unsigned long>(z.working_set),
      static_cast<unsigned long>(z.writes_per_ms), z.steady_seconds, z.rounds);
  std::fflush(stdout);

  // Both placements when there are two CPUs to place the hosts on; the goal is judged apart (two
  // machines), shared is shown for what a single small machine would see.
  std::vector<Placement> placements = {Placement::kShared};
  if (std::thread::hardware_concurrency() >= 2) placements.push_back(Placement::kApart);
  std::vector<std::vector<std::vector<Sample>>> samples(
      placements.size(), std::vector<std::vector<Sample>>(kModeCount));
  for (int round = 0; round < z.rounds; round++) {
    for (size_t p = 0; p < placements.size(); p++) {
      for (size_t m = 0; m < kModeCount; m++) {
        samples[p][m].push_back(RunOne(z, kModes[m], placements[p], dir));
      }
    }
  }
  const pb::FrameCipher chosen = rp::CheapestCipher();
  Verdict verdict;
  for (size_t p = 0; p < placements.size(); p++) {
    std::printf("%s\n",
                placements[p] == Placement::kApart
                    ? "hosts apart (the primary and its guest on CPU 0, the mirror on CPU 1):"
                    : "hosts shared (primary, guest and mirror on all CPUs):");
    verdict = Report(samples[p], chosen);
  }
  std::printf("machine: %s\n", romulus::bench::MachineLoad().c_str());
  std::printf(
      "goal: with the default (encryption: auto, here %s) throughput >= 0.8 x unprotected, hosts "
      "%s: %s (worst ratio %.2f: %s); worst of all modes %.2f: %s\n",
      std::string(rp::CipherName(chosen)).c_str(),
      placements.back() == Placement::kApart ? "apart" : "shared",
      verdict.worst_chosen >= 0.8 ? "met" : "NOT met", verdict.worst_chosen,
      verdict.worst_chosen_what.c_str(), verdict.worst, verdict.worst_what.c_str());
  for (const char* name : {"/vm.img", "/replica.img"}) std::remove((dir + name).c_str());
  std::remove(dir.c_str());
  return 0;
}
