// Monitor benchmarks. Each figure is printed next to a baseline measured in the same run:
//   - state capture (vCPU + clock + devices) and whole-snapshot restore, restore next to reading
//     and hashing the same files;
//   - pause + harvest + copy of 256/1024/4096 dirty pages next to a plain memcpy of those pages;
//   - ledger ops/s through the TCP endpoint;
//   - memory workload page writes/s achieved against requested.
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <string>
#include <thread>
#include <vector>

#include "checkpoint/checkpoint.h"
#include "cli/load.h"
#include "replicator/replicator.h"
#include "vmm/ledger_endpoint.h"
#include "vmm/vmm.h"

namespace {

using Clock = std::chrono::steady_clock;
using romulus::vmm::Vm;

double Ms(Clock::duration d) { return std::chrono::duration<double, std::milli>(d).count(); }

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v[v.size() / 2];
}
double P99(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v[std::min(v.size() - 1, v.size() * 99 / 100)];
}

struct Scratch {
  std::string dir;
  Scratch() {
    char tmpl[] = "/tmp/romulus-bench-XXXXXX";
    dir = ::mkdtemp(tmpl);
  }
  ~Scratch() { std::filesystem::remove_all(dir); }
};

std::unique_ptr<Vm> Boot(const Scratch& s, uint64_t memory, romulus::vmm::WorkloadConfig w) {
  romulus::vmm::VmConfig c;
  c.memory_bytes = memory;
  c.disk_path = s.dir + "/disk.img";
  c.workload = w;
  c.progress_ms = 0;
  if (!romulus::vmm::BlockDevice::CreateImage(c.disk_path, 64ull << 20).ok()) std::exit(1);
  auto vm = Vm::Boot(c);
  if (!vm.ok()) {
    std::fprintf(stderr, "bench: %s\n", std::string(vm.status().message()).c_str());
    std::exit(1);
  }
  return std::move(*vm);
}

void StateCaptureAndRestore() {
  Scratch s;
  auto vm = Boot(s, 256ull << 20, {.working_set_pages = 4096, .write_rate = 100000});
  (void)vm->Start();
  std::this_thread::sleep_for(std::chrono::milliseconds(200));  // let the guest run a while
  std::vector<double> capture;
  for (int i = 0; i < 50; i++) {
    (void)vm->Pause();
    auto t0 = Clock::now();
    auto st = vm->SaveState();
    capture.push_back(Ms(Clock::now() - t0));
    (void)vm->Resume();
  }
  (void)vm->Pause();
  auto t0 = Clock::now();
  (void)vm->SaveSnapshot(s.dir + "/snap");
  double save_ms = Ms(Clock::now() - t0);
  (void)vm->Stop();
  std::vector<double> restore, baseline;
  for (int i = 0; i < 5; i++) {
    t0 = Clock::now();
    auto r = Vm::Restore(s.dir + "/snap", s.dir + "/restored.img", nullptr);
    restore.push_back(Ms(Clock::now() - t0));
    if (!r.ok()) std::fprintf(stderr, "bench: %s\n", std::string(r.status().message()).c_str());
    // Baseline: read + hash the same memory file and copy the same disk, as plain file work.
    t0 = Clock::now();
    auto mem = romulus::vmm::GuestMemory::MapFilePrivate(s.dir + "/snap/memory.bin", 256ull << 20);
    volatile uint64_t d = (*mem)->Digest();
    (void)d;
    std::filesystem::copy_file(s.dir + "/snap/disk.img", s.dir + "/copy.img",
                               std::filesystem::copy_options::overwrite_existing);
    baseline.push_back(Ms(Clock::now() - t0));
  }
  std::printf("state capture (vCPU+clock+devices), paused VM: p50 %.3f ms, p99 %.3f ms (50 runs)\n",
              Median(capture), P99(capture));
  std::printf("snapshot to disk, 256 MiB RAM + 64 MiB disk, with fsync: %.0f ms\n", save_ms);
  std::printf(
      "restore from snapshot (verify + map memory, copy disk, apply state): p50 %.1f ms; "
      "baseline read+hash memory and copy disk: p50 %.1f ms; ratio %.2f\n",
      Median(restore), Median(baseline), Median(restore) / Median(baseline));
}

void HarvestAndCopy(uint64_t pages) {
  Scratch s;
  auto vm = Boot(s, 256ull << 20,
                 {.working_set_pages = pages, .write_rate = 0, .pattern = RML_PATTERN_UNIFORM});
  (void)vm->Start();
  std::vector<uint8_t> staging(8192 * romulus::vmm::kPageSize);
  std::vector<double> pause_ms, harvest_ms, memcpy_ms, dirty_counts;
  for (int epoch = 0; epoch < 40; epoch++) {
    std::this_thread::sleep_for(std::chrono::milliseconds(25));  // one epoch of guest work
    auto t0 = Clock::now();
    (void)vm->Pause();
    auto t1 = Clock::now();
    auto dirty = vm->HarvestDirty();
    std::vector<uint64_t> list;
    size_t n = 0;
    dirty->ForEach([&](uint64_t page) {
      if (n < 8192) {
        std::memcpy(staging.data() + n++ * romulus::vmm::kPageSize,
                    vm->memory().data() + page * romulus::vmm::kPageSize, romulus::vmm::kPageSize);
        list.push_back(page);
      }
    });
    auto t2 = Clock::now();
    // Baseline: the same pages, copied with nothing else around it.
    for (size_t i = 0; i < list.size(); i++) {
      std::memcpy(staging.data() + i * romulus::vmm::kPageSize,
                  vm->memory().data() + list[i] * romulus::vmm::kPageSize, romulus::vmm::kPageSize);
    }
    auto t3 = Clock::now();
    (void)vm->Resume();
    if (epoch < 3) continue;  // warm-up: first touches fault pages in
    pause_ms.push_back(Ms(t1 - t0));
    harvest_ms.push_back(Ms(t2 - t1));
    memcpy_ms.push_back(Ms(t3 - t2));
    dirty_counts.push_back(static_cast<double>(list.size()));
  }
  (void)vm->Stop();
  double h = Median(harvest_ms), m = Median(memcpy_ms);
  std::printf(
      "working set %5lu pages: dirty/epoch p50 %5.0f; pause (stop vCPU) p50 %.3f ms; "
      "harvest+copy p50 %.3f ms p99 %.3f ms; memcpy of the same pages p50 %.3f ms; "
      "ratio %.2f\n",
      static_cast<unsigned long>(pages), Median(dirty_counts), Median(pause_ms), h, P99(harvest_ms),
      m, m > 0 ? h / m : 0);
}

void LedgerThroughput() {
  Scratch s;
  auto vm = Boot(s, 256ull << 20, {.working_set_pages = 0});
  romulus::vmm::OutputGate gate;
  auto ep = romulus::vmm::LedgerEndpoint::Start(vm->ledger(), gate, "127.0.0.1", 0, nullptr);
  (void)vm->Start();
  for (uint64_t clients : {1, 4, 16}) {
    romulus::cli::LoadOptions o;
    o.port = (*ep)->port();
    o.clients = clients;
    o.duration_s = 2;
    o.retry_pct = 0;
    auto r = romulus::cli::RunLoad(o);
    if (!r.ok()) continue;
    std::printf("ledger, %2lu clients: %.0f ops/s, p50 %.0f us, p99 %.0f us, invariants %s\n",
                static_cast<unsigned long>(clients), r->ops_per_s, r->p50_us, r->p99_us,
                r->ok() ? "hold" : "VIOLATED");
  }
  ep->reset();
  (void)vm->Stop();
}

void WorkloadRate() {
  for (uint64_t rate : {10000ull, 100000ull, 1000000ull, 0ull}) {
    Scratch s;
    auto vm = Boot(s, 256ull << 20, {.working_set_pages = 16384, .write_rate = rate});
    (void)vm->Start();
    std::this_thread::sleep_for(std::chrono::milliseconds(300));  // settle
    uint64_t p0 = vm->guest_status().workload_pages;
    auto t0 = Clock::now();
    std::this_thread::sleep_for(std::chrono::seconds(1));  // the measured interval
    uint64_t p1 = vm->guest_status().workload_pages;
    double secs = std::chrono::duration<double>(Clock::now() - t0).count();
    (void)vm->Stop();
    double achieved = static_cast<double>(p1 - p0) / secs;
    if (rate) {
      std::printf("workload requested %8lu pages/s: achieved %10.0f pages/s, ratio %.3f\n",
                  static_cast<unsigned long>(rate), achieved, achieved / static_cast<double>(rate));
    } else {
      std::printf("workload unthrottled: %.0f page writes/s\n", achieved);
    }
  }
}

// Pause per epoch with the engine, at N dirty pages per epoch, next to a memcpy of those pages.
void EpochPause(uint64_t pages) {
  Scratch s;
  auto vm = Boot(s, 256ull << 20,
                 {.working_set_pages = pages, .write_rate = 0, .pattern = RML_PATTERN_SEQUENTIAL});
  romulus::vmm::OutputGate gate;
  romulus::checkpoint::EpochEngine engine(*vm, gate, {});
  (void)vm->Start();
  std::vector<double> pause, copy, dirty;
  std::vector<uint8_t> staging(pages * 2 * romulus::vmm::kPageSize);
  for (int epoch = 0; epoch < 43; epoch++) {
    std::this_thread::sleep_for(std::chrono::milliseconds(25));  // one epoch of guest work
    auto cp = engine.TakeCheckpoint();
    if (!cp.ok()) continue;
    engine.Acknowledge((*cp)->epoch);
    if (epoch < 3) continue;  // the first is the full copy; then warm-up
    pause.push_back(engine.stats().last_pause_ms);
    size_t n = std::min<size_t>((*cp)->gfns.size(), pages * 2);
    auto t0 = Clock::now();
    for (size_t i = 0; i < n; i++) {
      std::memcpy(staging.data() + i * romulus::vmm::kPageSize,
                  vm->memory().data() + (*cp)->gfns[i] * romulus::vmm::kPageSize,
                  romulus::vmm::kPageSize);
    }
    copy.push_back(Ms(Clock::now() - t0));
    dirty.push_back(static_cast<double>((*cp)->gfns.size()));
  }
  (void)vm->Stop();
  std::printf(
      "%6lu dirty pages/epoch (measured p50 %.0f): pause p50 %.3f ms p99 %.3f ms; memcpy of "
      "the same pages p50 %.3f ms; ratio %.2f\n",
      static_cast<unsigned long>(pages), Median(dirty), Median(pause), P99(pause), Median(copy),
      Median(pause) / std::max(Median(copy), 1e-6));
}

// MB/s through a plain loopback TCP connection, 1 MiB writes, for `bytes`.
double RawLoopbackMBps(uint64_t bytes) {
  int listener = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof(a);
  ::bind(listener, reinterpret_cast<sockaddr*>(&a), sizeof(a));
  ::getsockname(listener, reinterpret_cast<sockaddr*>(&a), &len);
  ::listen(listener, 1);
  std::thread sink([&] {
    int c = ::accept(listener, nullptr, nullptr);
    std::vector<char> buf(1 << 20);
    while (::read(c, buf.data(), buf.size()) > 0) {
    }
    ::close(c);
  });
  int out = ::socket(AF_INET, SOCK_STREAM, 0);
  ::connect(out, reinterpret_cast<sockaddr*>(&a), sizeof(a));
  std::vector<char> buf(1 << 20, 'x');
  auto t0 = Clock::now();
  for (uint64_t sent = 0; sent < bytes;) {
    ssize_t n = ::write(out, buf.data(), std::min<uint64_t>(buf.size(), bytes - sent));
    if (n <= 0) break;
    sent += static_cast<uint64_t>(n);
  }
  ::close(out);
  sink.join();
  ::close(listener);
  return static_cast<double>(bytes) / std::chrono::duration<double>(Clock::now() - t0).count() /
         1e6;
}

// Replication throughput and the cost of protection for the ledger, with 25 ms epochs.
void Replication(uint64_t dirty_pages, uint64_t clients) {
  Scratch s;
  uint64_t memory = 256ull << 20, disk = 64ull << 20;
  auto vm =
      Boot(s, memory,
           {.working_set_pages = dirty_pages, .write_rate = 0, .pattern = RML_PATTERN_SEQUENTIAL});
  romulus::vmm::OutputGate gate;
  auto ep = romulus::vmm::LedgerEndpoint::Start(vm->ledger(), gate, "127.0.0.1", 0, nullptr);
  (void)vm->Start();
  romulus::cli::LoadOptions o;
  o.port = (*ep)->port();
  o.clients = clients;
  o.duration_s = 3;
  o.retry_pct = 0;
  auto unprotected = romulus::cli::RunLoad(o);  // gate open, no engine yet

  auto replica = romulus::checkpoint::ReplicaStore::Create(memory, s.dir + "/replica.img", disk);
  auto mirror = romulus::replicator::Mirror::Start(
      **replica,
      {.identity = {"bench", memory, disk}, .key = "bench-key-0123456789", .log = nullptr});
  romulus::checkpoint::EpochEngine engine(*vm, gate, {});
  auto primary = romulus::replicator::Primary::Start(engine, gate,
                                                     {.identity = {"bench", memory, disk},
                                                      .key = "bench-key-0123456789",
                                                      .mirror_port = (*mirror)->port(),
                                                      .epoch = std::chrono::milliseconds(25),
                                                      .log = nullptr});
  auto t0 = Clock::now();
  while ((*mirror)->stats().committed_epoch < 0 && Clock::now() - t0 < std::chrono::seconds(60)) {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));  // initial full copy
  }
  auto a = (*primary)->stats();
  auto ta = Clock::now();
  auto protected_run = romulus::cli::RunLoad(o);
  auto b = (*primary)->stats();
  double secs = std::chrono::duration<double>(Clock::now() - ta).count();
  double mbps = static_cast<double>(b.bytes_sent - a.bytes_sent) / secs / 1e6;
  double raw = RawLoopbackMBps(std::max<uint64_t>(b.bytes_sent - a.bytes_sent, 64ull << 20));
  primary->reset();
  mirror->reset();
  ep->reset();
  (void)vm->Stop();
  if (!unprotected.ok() || !protected_run.ok()) return;
  std::printf(
      "%6lu dirty pages/epoch, %2lu clients: replication %.0f MB/s vs raw loopback TCP "
      "%.0f MB/s (ratio %.2f); %.0f epochs/s\n",
      static_cast<unsigned long>(dirty_pages), static_cast<unsigned long>(clients), mbps, raw,
      mbps / raw, static_cast<double>(b.checkpoints - a.checkpoints) / secs);
  std::printf(
      "        ledger protected %.0f ops/s vs unprotected %.0f ops/s (ratio %.3f); latency "
      "p50 %.1f ms vs %.2f ms: +%.1f ms for a 25 ms epoch (ratio %.2f)\n",
      protected_run->ops_per_s, unprotected->ops_per_s,
      protected_run->ops_per_s / unprotected->ops_per_s, protected_run->p50_us / 1000,
      unprotected->p50_us / 1000, (protected_run->p50_us - unprotected->p50_us) / 1000,
      (protected_run->p50_us - unprotected->p50_us) / 25000.0);
}

}  // namespace

int main(int argc, char** argv) {
  std::string which = argc > 1 ? argv[1] : "all";
  if (which != "all" && which != "vmm" && which != "replication") {
    std::fprintf(stderr, "usage: romulus_bench [all|vmm|replication]\n");
    return 2;
  }
  if (auto s = romulus::vmm::CheckKvm(); !s.ok()) {
    std::fprintf(stderr, "bench: %s\n", std::string(s.message()).c_str());
    return 1;
  }
  if (which == "replication") goto replication;
  std::printf("== state capture and restore\n");
  StateCaptureAndRestore();
  std::printf("== pause + harvest + copy, 25 ms epochs, uniform writes over the working set\n");
  for (uint64_t pages : {256, 1024, 4096}) HarvestAndCopy(pages);
  std::printf("== ledger through the TCP endpoint\n");
  LedgerThroughput();
  std::printf("== memory workload rate\n");
  WorkloadRate();
  if (which == "vmm") return 0;
replication:
  std::printf("== epoch pause (engine: stop, harvest, stage, capture, resume) vs memcpy\n");
  for (uint64_t pages : {1024, 4096, 16384}) EpochPause(pages);
  std::printf("== replication over loopback, 25 ms epochs, 16 ledger clients\n");
  for (uint64_t pages : {1024, 4096, 16384}) Replication(pages, 16);
  return 0;
}
