// Monitor benchmarks, on every platform that can run VMs here (or the one named). Every line
// starts with the platform's name, and each figure is printed next to a baseline measured in
// the same run:
//   - port-I/O exit round trip of a hand-made guest that only writes to the console port, next
//     to a getppid system call;
//   - state capture (vCPU + clock + devices) and whole-snapshot restore, restore next to reading
//     and hashing the same files;
//   - pause + harvest + copy of 256/1024/4096/16384 dirty pages next to a plain memcpy of those
//     pages;
//   - the fixed cost of a harvest with nothing dirty at 256 MiB and 1 GiB of guest RAM, next to a
//     memcpy of a dirty bitmap of that size;
//   - guest slowdown: memory-workload page writes/s under a 25 ms pause + harvest + copy cycle,
//     next to the same guest unprotected;
//   - ledger ops/s through the TCP endpoint; memory workload page writes/s achieved against
//     requested;
//   - (replication) the engine's pause per epoch next to a memcpy of the same pages; replication
//     MB/s next to raw loopback TCP, and ledger ops/s protected next to unprotected.
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "bench/bench_util.h"
#include "bench/loopback.h"
#include "checkpoint/checkpoint.h"
#include "cli/load.h"
#include "replicator/replicator.h"
#include "vmm/ledger_endpoint.h"
#include "vmm/vmm.h"

namespace {

using romulus::bench::Clock;
using romulus::vmm::Vm;
using std::chrono::milliseconds;
namespace pb = romulus::pb;
namespace vmm = romulus::vmm;

constexpr uint64_t kPage = vmm::kPageSize;

#define BENCH_RETURN_IF_ERROR(expr)           \
  do {                                        \
    if (absl::Status _s = (expr); !_s.ok()) { \
      return _s;                              \
    }                                         \
  } while (0)

bool g_quick = false;    // --quick: fewer runs and shorter intervals, to check that it works
std::string g_platform;  // printed at the start of every line

// A line of results, prefixed with the platform.
template <typename... Args>
void Line(const absl::FormatSpec<Args...>& format, const Args&... args) {
  std::printf("[%s] %s\n", g_platform.c_str(), absl::StrFormat(format, args...).c_str());
  std::fflush(stdout);
}

void Section(const std::string& title) {
  std::printf("== [%s] %s\n", g_platform.c_str(), title.c_str());
  std::fflush(stdout);
}

double Ms(Clock::duration d) { return std::chrono::duration<double, std::milli>(d).count(); }
double Us(Clock::duration d) { return std::chrono::duration<double, std::micro>(d).count(); }
using romulus::bench::Ratio;
using romulus::bench::Secs;
double Median(const std::vector<double>& v) { return romulus::bench::Quantile(v, 0.5); }
double P99(const std::vector<double>& v) { return romulus::bench::Quantile(v, 0.99); }

// Keeps the compiler from dropping a copy whose result nobody reads.
void Clobber(const void* p) { asm volatile("" : : "r"(p) : "memory"); }

// Page-aligned room for copies of guest pages, written once so that no page fault lands in a
// timed copy. (glibc's memcpy of a few KiB is `rep movsb` here, which is far slower when the
// destination lies just past the source modulo 4 KiB: an 8 KiB heap block copied to the one
// right after it took 5-13 us, against 0.14 us between page-aligned buffers.)
class PageBuffer {
 public:
  explicit PageBuffer(size_t pages = 0) { Reserve(pages); }
  void Reserve(size_t pages) {
    if (pages <= pages_ && base_ != nullptr) return;
    buf_.assign((pages + 1) * kPage, 0);
    uintptr_t at = reinterpret_cast<uintptr_t>(buf_.data());
    base_ = buf_.data() + (kPage - at % kPage) % kPage;
    pages_ = pages;
  }
  uint8_t* page(size_t i) { return base_ + i * kPage; }

 private:
  std::vector<uint8_t> buf_;
  uint8_t* base_ = nullptr;
  size_t pages_ = 0;
};

struct Scratch {
  std::string dir;
  Scratch() {
    char tmpl[] = "/tmp/romulus-bench-XXXXXX";
    if (::mkdtemp(tmpl) != nullptr) dir = tmpl;
  }
  ~Scratch() {
    if (!dir.empty()) std::filesystem::remove_all(dir);
  }
};

absl::StatusOr<std::unique_ptr<Vm>> Boot(pb::Platform platform, const Scratch& s, uint64_t memory,
                                         vmm::WorkloadConfig w,
                                         const std::string& guest_image = "") {
  if (s.dir.empty()) return absl::InternalError("cannot create a scratch directory in /tmp");
  vmm::VmConfig c;
  c.platform = platform;
  c.memory_bytes = memory;
  c.disk_path = s.dir + "/disk.img";
  c.workload = w;
  c.progress_ms = 0;
  c.guest_image_path = guest_image;
  BENCH_RETURN_IF_ERROR(vmm::BlockDevice::CreateImage(c.disk_path, 64ull << 20));
  return Vm::Boot(c);
}

// Lets the guest run for at least `min`, and until its memory workload has written `writes`
// more pages (but at most 10 s).
absl::Status RunGuest(Vm& vm, Clock::duration min, uint64_t writes) {
  auto t0 = Clock::now();
  uint64_t start = vm.guest_status().workload_pages;
  std::this_thread::sleep_for(min);
  while (vm.guest_status().workload_pages - start < writes) {
    if (Clock::now() - t0 > std::chrono::seconds(10)) {
      return absl::DeadlineExceededError(absl::StrCat("the guest wrote ",
                                                      vm.guest_status().workload_pages - start,
                                                      " pages in 10 s, not ", writes));
    }
    if (vm.exited()) return vm.Wait();
    std::this_thread::sleep_for(std::chrono::microseconds(200));
  }
  return absl::OkStatus();
}

// Copies each page in `dirty` from guest memory to `staging` (grown as needed); returns the
// pages, in order.
std::vector<uint64_t> CopyDirty(Vm& vm, const vmm::DirtyBitmap& dirty, PageBuffer& staging) {
  std::vector<uint64_t> list;
  list.reserve(dirty.Count());
  staging.Reserve(list.capacity());
  dirty.ForEach([&](uint64_t page) {
    std::memcpy(staging.page(list.size()), vm.memory().data() + page * kPage, kPage);
    list.push_back(page);
  });
  Clobber(staging.page(0));
  return list;
}

// getppid through syscall(2): the cheapest round trip into the kernel and back, in us.
double SyscallUs() {
  const int n = g_quick ? 100000 : 1000000;
  std::vector<double> runs;
  for (int run = 0; run < 5; run++) {
    auto t0 = Clock::now();
    for (int i = 0; i < n; i++) ::syscall(SYS_getppid);
    runs.push_back(Us(Clock::now() - t0) / n);
  }
  return Median(runs);
}

// 1. A guest that does nothing but `out %eax, (%dx)` to the console port with a length of 0 (the
// device does nothing with it), counting its exits in the boot page; exits/s over a fixed
// interval of the running guest.
absl::Status PortExits(pb::Platform platform) {
  Scratch s;
  constexpr uint32_t kCounter =
      RML_BOOT_GPA + offsetof(rml_boot, status) + offsetof(rml_status, reserved);
  auto le32 = [](uint32_t v) { return std::string(reinterpret_cast<const char*>(&v), 4); };
  std::string code;
  code += "\xbb";
  code += le32(kCounter);  // mov $kCounter, %ebx
  code += "\xba";
  code += le32(RML_PORT_CONSOLE);      // mov $RML_PORT_CONSOLE, %edx
  code += std::string("\x31\xc0", 2);  // xor %eax, %eax (0 bytes to the console)
  code += "\xef";                      // loop: out %eax, (%dx)
  code += "\x48\xff\x03";              //       incq (%rbx)
  code += "\xeb\xfa";                  //       jmp loop
  rml_image_header h{};
  h.magic = RML_IMAGE_MAGIC;
  h.abi_version = RML_ABI_VERSION;
  h.header_bytes = sizeof(h);
  h.entry = RML_IMAGE_GPA + sizeof(h);
  h.image_end = RML_IMAGE_GPA + sizeof(h) + code.size();
  std::string image(reinterpret_cast<const char*>(&h), sizeof(h));
  image += code;
  if (s.dir.empty()) return absl::InternalError("cannot create a scratch directory in /tmp");
  std::string path = s.dir + "/exits.bin";
  std::ofstream(path, std::ios::binary | std::ios::trunc) << image;
  auto vm = Boot(platform, s, 32ull << 20, {}, path);
  if (!vm.ok()) return vm.status();
  volatile const uint64_t* counter =
      reinterpret_cast<volatile const uint64_t*>((*vm)->memory().data() + kCounter);
  BENCH_RETURN_IF_ERROR((*vm)->Start());
  auto deadline = Clock::now() + std::chrono::seconds(10);
  while (*counter < 1000) {  // warm up
    if ((*vm)->exited()) return (*vm)->Wait();
    if (Clock::now() > deadline) return absl::DeadlineExceededError("the guest made no exits");
    std::this_thread::sleep_for(milliseconds(1));
  }
  std::vector<double> per_exit;
  uint64_t exits = 0;
  for (int run = 0; run < (g_quick ? 2 : 5); run++) {
    uint64_t c0 = *counter;
    auto t0 = Clock::now();
    std::this_thread::sleep_for(milliseconds(g_quick ? 100 : 400));
    uint64_t c1 = *counter;
    auto t1 = Clock::now();
    if (c1 == c0) return absl::InternalError("the guest stopped making exits");
    per_exit.push_back(Us(t1 - t0) / static_cast<double>(c1 - c0));
    exits += c1 - c0;
  }
  BENCH_RETURN_IF_ERROR((*vm)->Stop());
  double exit_us = Median(per_exit), sys_us = SyscallUs();
  Line(
      "port I/O exit round trip (hand-made guest: out to the console port, 0 bytes, in a loop; "
      "%lu exits in %d runs): p50 %.2f us/exit (%.0f exits/s); getppid system call %.3f us; "
      "ratio %.0f",
      static_cast<unsigned long>(exits), static_cast<int>(per_exit.size()), exit_us, 1e6 / exit_us,
      sys_us, Ratio(exit_us, sys_us));
  return absl::OkStatus();
}

absl::Status StateCaptureAndRestore(pb::Platform platform) {
  Scratch s;
  auto booted = Boot(platform, s, 256ull << 20, {.working_set_pages = 4096, .write_rate = 100000});
  if (!booted.ok()) return booted.status();
  Vm& vm = **booted;
  BENCH_RETURN_IF_ERROR(vm.Start());
  std::this_thread::sleep_for(milliseconds(200));  // let the guest run a while
  std::vector<double> capture;
  for (int i = 0; i < (g_quick ? 10 : 50); i++) {
    BENCH_RETURN_IF_ERROR(vm.Pause());
    auto t0 = Clock::now();
    auto st = vm.SaveState();
    capture.push_back(Ms(Clock::now() - t0));
    if (!st.ok()) return st.status();
    BENCH_RETURN_IF_ERROR(vm.Resume());
  }
  BENCH_RETURN_IF_ERROR(vm.Pause());
  auto t0 = Clock::now();
  auto saved = vm.SaveSnapshot(s.dir + "/snap");
  double save_ms = Ms(Clock::now() - t0);
  if (!saved.ok()) return saved.status();
  BENCH_RETURN_IF_ERROR(vm.Stop());
  std::vector<double> restore, baseline;
  for (int i = 0; i < (g_quick ? 2 : 5); i++) {
    t0 = Clock::now();
    auto r = Vm::Restore(s.dir + "/snap", s.dir + "/restored.img", nullptr);
    restore.push_back(Ms(Clock::now() - t0));
    if (!r.ok()) return r.status();
    // Baseline: read + hash the same memory file and copy the same disk, as plain file work.
    t0 = Clock::now();
    auto mem = vmm::GuestMemory::MapFilePrivate(s.dir + "/snap/memory.bin", 256ull << 20);
    if (!mem.ok()) return mem.status();
    volatile uint64_t d = (*mem)->Digest();
    (void)d;
    std::filesystem::copy_file(s.dir + "/snap/disk.img", s.dir + "/copy.img",
                               std::filesystem::copy_options::overwrite_existing);
    baseline.push_back(Ms(Clock::now() - t0));
  }
  Line("state capture (vCPU+clock+devices), paused VM: p50 %.3f ms, p99 %.3f ms (%d runs)",
       Median(capture), P99(capture), static_cast<int>(capture.size()));
  Line("snapshot to disk, 256 MiB RAM + 64 MiB disk, with fsync: %.0f ms", save_ms);
  Line(
      "restore from snapshot (verify + map memory, copy disk, apply state): p50 %.1f ms; "
      "baseline read+hash memory and copy disk: p50 %.1f ms; ratio %.2f",
      Median(restore), Median(baseline), Ratio(Median(restore), Median(baseline)));
  return absl::OkStatus();
}

// 2. Each epoch the guest writes its whole working set (sequentially, as fast as it can) at
// least once: it runs for 25 ms and, where writing `pages` pages takes longer, until it has.
absl::Status HarvestAndCopy(pb::Platform platform, uint64_t pages) {
  Scratch s;
  auto booted =
      Boot(platform, s, 256ull << 20,
           {.working_set_pages = pages, .write_rate = 0, .pattern = RML_PATTERN_SEQUENTIAL});
  if (!booted.ok()) return booted.status();
  Vm& vm = **booted;
  BENCH_RETURN_IF_ERROR(vm.Start());
  PageBuffer staging(pages + 64);
  std::vector<double> pause_ms, harvest_ms, copy_ms, total_ms, memcpy_ms, epoch_ms, dirty_counts;
  const int epochs = g_quick ? 8 : 40;
  for (int epoch = 0; epoch < epochs; epoch++) {
    auto start = Clock::now();
    BENCH_RETURN_IF_ERROR(RunGuest(vm, milliseconds(25), pages));  // one epoch of guest work
    auto t0 = Clock::now();
    BENCH_RETURN_IF_ERROR(vm.Pause());
    auto t1 = Clock::now();
    auto dirty = vm.HarvestDirty();
    if (!dirty.ok()) return dirty.status();
    auto t2 = Clock::now();
    std::vector<uint64_t> list = CopyDirty(vm, *dirty, staging);
    auto t3 = Clock::now();
    // Baseline: the same pages, copied with nothing else around it.
    for (size_t i = 0; i < list.size(); i++) {
      std::memcpy(staging.page(i), vm.memory().data() + list[i] * kPage, kPage);
    }
    Clobber(staging.page(0));
    auto t4 = Clock::now();
    BENCH_RETURN_IF_ERROR(vm.Resume());
    if (epoch < 3) continue;  // warm-up: first touches fault pages in
    pause_ms.push_back(Ms(t1 - t0));
    harvest_ms.push_back(Ms(t2 - t1));
    copy_ms.push_back(Ms(t3 - t2));
    total_ms.push_back(Ms(t3 - t0));
    memcpy_ms.push_back(Ms(t4 - t3));
    epoch_ms.push_back(Ms(t0 - start));
    dirty_counts.push_back(static_cast<double>(list.size()));
  }
  BENCH_RETURN_IF_ERROR(vm.Stop());
  double total = Median(total_ms), m = Median(memcpy_ms);
  Line(
      "%5lu pages/epoch (dirty p50 %5.0f, epoch p50 %.0f ms): pause+harvest+copy p50 %.3f ms "
      "p99 %.3f ms (pause %.3f, harvest %.3f, copy %.3f); memcpy of the same pages p50 %.3f ms; "
      "ratio %.2f",
      static_cast<unsigned long>(pages), Median(dirty_counts), Median(epoch_ms), total,
      P99(total_ms), Median(pause_ms), Median(harvest_ms), Median(copy_ms), m, Ratio(total, m));
  return absl::OkStatus();
}

// 3. The fixed cost of a harvest: the guest idle (no workload), the VM paused, nothing written
// since the previous harvest.
absl::Status FixedHarvest(pb::Platform platform, uint64_t memory) {
  Scratch s;
  auto booted = Boot(platform, s, memory, {.working_set_pages = 0});
  if (!booted.ok()) return booted.status();
  Vm& vm = **booted;
  BENCH_RETURN_IF_ERROR(vm.Start());
  std::this_thread::sleep_for(milliseconds(100));  // the guest is up and idle
  BENCH_RETURN_IF_ERROR(vm.Pause());
  auto first = vm.HarvestDirty();  // whatever boot and start-up wrote
  if (!first.ok()) return first.status();
  std::vector<double> harvest_us;
  uint64_t max_dirty = 0;
  for (int i = 0; i < (g_quick ? 10 : 100); i++) {
    auto t0 = Clock::now();
    auto dirty = vm.HarvestDirty();
    harvest_us.push_back(Us(Clock::now() - t0));
    if (!dirty.ok()) return dirty.status();
    max_dirty = std::max(max_dirty, dirty->Count());
  }
  BENCH_RETURN_IF_ERROR(vm.Stop());
  // Baseline: a memcpy of a dirty bitmap for this much memory (one bit a page), between
  // page-aligned buffers (see PageBuffer), per copy over batches of 1000 copies.
  uint64_t bitmap_bytes = memory / kPage / 8;
  PageBuffer src(bitmap_bytes / kPage), dst(bitmap_bytes / kPage);
  std::vector<double> copy_us;
  for (int run = 0; run < 20; run++) {
    auto t0 = Clock::now();
    for (int i = 0; i < 1000; i++) {
      std::memcpy(dst.page(0), src.page(0), bitmap_bytes);
      Clobber(dst.page(0));
    }
    copy_us.push_back(Us(Clock::now() - t0) / 1000);
  }
  Line(
      "harvest with nothing dirty (guest idle, VM paused), %4lu MiB of guest RAM: p50 %.1f us, "
      "p99 %.1f us (%d harvests, at most %lu pages dirty); baseline memcpy of a %lu KiB dirty "
      "bitmap (1 bit a page): %.3f us; ratio %.0f",
      static_cast<unsigned long>(memory >> 20), Median(harvest_us), P99(harvest_us),
      static_cast<int>(harvest_us.size()), static_cast<unsigned long>(max_dirty),
      static_cast<unsigned long>(bitmap_bytes >> 10), Median(copy_us),
      Ratio(Median(harvest_us), Median(copy_us)));
  return absl::OkStatus();
}

// 4. Guest slowdown: page writes/s of the memory workload (as fast as it can, uniform over the
// working set), unprotected and then under what checkpointing does every 25 ms: pause, harvest,
// copy the dirty pages, resume. (A cycle that overruns its 25 ms delays the next one, so that
// the guest always runs 25 ms between two.)
absl::Status Slowdown(pb::Platform platform, uint64_t ws) {
  Scratch s;
  auto booted = Boot(platform, s, 256ull << 20,
                     {.working_set_pages = ws, .write_rate = 0, .pattern = RML_PATTERN_UNIFORM});
  if (!booted.ok()) return booted.status();
  Vm& vm = **booted;
  BENCH_RETURN_IF_ERROR(vm.Start());
  std::this_thread::sleep_for(milliseconds(300));  // first touches
  const auto window = milliseconds(g_quick ? 500 : 2000);
  // Unprotected.
  uint64_t p0 = vm.guest_status().workload_pages;
  auto t0 = Clock::now();
  std::this_thread::sleep_for(window);
  uint64_t p1 = vm.guest_status().workload_pages;
  double unprotected = static_cast<double>(p1 - p0) / Secs(Clock::now() - t0);
  // Protected: the first harvest takes everything so far; then a cycle every 25 ms.
  BENCH_RETURN_IF_ERROR(vm.Pause());
  auto first = vm.HarvestDirty();
  if (!first.ok()) return first.status();
  BENCH_RETURN_IF_ERROR(vm.Resume());
  PageBuffer staging(ws + 64);
  std::vector<double> stop_ms, paused_ms, dirty_counts;
  p0 = vm.guest_status().workload_pages;
  t0 = Clock::now();
  auto next = t0;
  while (Clock::now() - t0 < window) {
    next += milliseconds(25);
    std::this_thread::sleep_until(next);
    auto c0 = Clock::now();
    BENCH_RETURN_IF_ERROR(vm.Pause());
    stop_ms.push_back(Ms(Clock::now() - c0));
    auto dirty = vm.HarvestDirty();
    if (!dirty.ok()) return dirty.status();
    std::vector<uint64_t> list = CopyDirty(vm, *dirty, staging);
    BENCH_RETURN_IF_ERROR(vm.Resume());
    auto resumed = Clock::now();
    paused_ms.push_back(Ms(resumed - c0));
    dirty_counts.push_back(static_cast<double>(list.size()));
    if (next < resumed) next = resumed;  // a cycle that overran: the guest still gets 25 ms
  }
  p1 = vm.guest_status().workload_pages;
  double elapsed = Secs(Clock::now() - t0);
  double protected_rate = static_cast<double>(p1 - p0) / elapsed;
  BENCH_RETURN_IF_ERROR(vm.Stop());
  double paused_total = 0;
  for (double p : paused_ms) paused_total += p;
  Line(
      "guest slowdown, working set %5lu pages (uniform, as fast as it can): with a 25 ms "
      "pause+harvest+copy cycle %.0f page writes/s vs unprotected %.0f page writes/s; ratio "
      "%.3f (per cycle: paused p50 %.3f ms p99 %.3f ms, of which stopping the vCPU p50 %.3f ms; "
      "%.1f%% of the time; dirty p50 %.0f pages; %d cycles)",
      static_cast<unsigned long>(ws), protected_rate, unprotected,
      Ratio(protected_rate, unprotected), Median(paused_ms), P99(paused_ms), Median(stop_ms),
      100 * paused_total / 1000 / elapsed, Median(dirty_counts),
      static_cast<int>(paused_ms.size()));
  return absl::OkStatus();
}

absl::Status LedgerThroughput(pb::Platform platform) {
  Scratch s;
  auto booted = Boot(platform, s, 256ull << 20, {.working_set_pages = 0});
  if (!booted.ok()) return booted.status();
  Vm& vm = **booted;
  vmm::OutputGate gate;
  auto ep = vmm::LedgerEndpoint::Start(vm.ledger(), gate, "127.0.0.1", 0, nullptr);
  if (!ep.ok()) return ep.status();
  BENCH_RETURN_IF_ERROR(vm.Start());
  absl::Status result;
  for (uint64_t clients : {1, 4, 16}) {
    romulus::cli::LoadOptions o;
    o.port = (*ep)->port();
    o.clients = clients;
    o.duration_s = g_quick ? 0.5 : 2;
    o.retry_pct = 0;
    auto r = romulus::cli::RunLoad(o);
    if (!r.ok()) {
      result.Update(r.status());
      continue;
    }
    Line("ledger, %2lu clients: %.0f ops/s, p50 %.0f us, p99 %.0f us, invariants %s",
         static_cast<unsigned long>(clients), r->ops_per_s, r->p50_us, r->p99_us,
         r->ok() ? "hold" : "VIOLATED");
  }
  ep->reset();
  result.Update(vm.Stop());
  return result;
}

absl::Status WorkloadRate(pb::Platform platform) {
  for (uint64_t rate : {10000ull, 100000ull, 1000000ull, 0ull}) {
    Scratch s;
    auto booted = Boot(platform, s, 256ull << 20, {.working_set_pages = 16384, .write_rate = rate});
    if (!booted.ok()) return booted.status();
    Vm& vm = **booted;
    BENCH_RETURN_IF_ERROR(vm.Start());
    std::this_thread::sleep_for(milliseconds(300));  // settle
    uint64_t p0 = vm.guest_status().workload_pages;
    auto t0 = Clock::now();
    std::this_thread::sleep_for(milliseconds(g_quick ? 300 : 1000));  // the measured interval
    uint64_t p1 = vm.guest_status().workload_pages;
    double secs = Secs(Clock::now() - t0);
    BENCH_RETURN_IF_ERROR(vm.Stop());
    double achieved = static_cast<double>(p1 - p0) / secs;
    if (rate) {
      Line("workload requested %8lu pages/s: achieved %10.0f pages/s, ratio %.3f",
           static_cast<unsigned long>(rate), achieved, achieved / static_cast<double>(rate));
    } else {
      Line("workload unthrottled: %.0f page writes/s", achieved);
    }
  }
  return absl::OkStatus();
}

// Pause per epoch with the engine, at N dirty pages per epoch, next to a memcpy of those pages.
absl::Status EpochPause(pb::Platform platform, uint64_t pages) {
  Scratch s;
  auto booted =
      Boot(platform, s, 256ull << 20,
           {.working_set_pages = pages, .write_rate = 0, .pattern = RML_PATTERN_SEQUENTIAL});
  if (!booted.ok()) return booted.status();
  Vm& vm = **booted;
  vmm::OutputGate gate;
  romulus::checkpoint::EpochEngine engine(vm, gate, {});
  BENCH_RETURN_IF_ERROR(vm.Start());
  std::vector<double> pause, copy, dirty;
  PageBuffer staging(pages * 2);
  for (int epoch = 0; epoch < (g_quick ? 8 : 43); epoch++) {
    std::this_thread::sleep_for(milliseconds(25));  // one epoch of guest work
    auto cp = engine.TakeCheckpoint();
    if (!cp.ok()) return cp.status();
    engine.Acknowledge((*cp)->epoch);
    if (epoch < 3) continue;  // the first is the full copy; then warm-up
    pause.push_back(engine.stats().last_pause_ms);
    size_t n = std::min<size_t>((*cp)->gfns.size(), pages * 2);
    auto t0 = Clock::now();
    for (size_t i = 0; i < n; i++) {
      std::memcpy(staging.page(i), vm.memory().data() + (*cp)->gfns[i] * kPage, kPage);
    }
    Clobber(staging.page(0));
    copy.push_back(Ms(Clock::now() - t0));
    dirty.push_back(static_cast<double>((*cp)->gfns.size()));
  }
  BENCH_RETURN_IF_ERROR(vm.Stop());
  Line(
      "working set %6lu pages, 25 ms epochs (dirty p50 %.0f): pause p50 %.3f ms p99 %.3f ms; "
      "memcpy of the same pages p50 %.3f ms; ratio %.2f",
      static_cast<unsigned long>(pages), Median(dirty), Median(pause), P99(pause), Median(copy),
      Median(pause) / std::max(Median(copy), 1e-6));
  return absl::OkStatus();
}

// Replication throughput and the cost of protection for the ledger, with 25 ms epochs.
absl::Status Replication(pb::Platform platform, uint64_t dirty_pages, uint64_t clients) {
  Scratch s;
  uint64_t memory = 256ull << 20, disk = 64ull << 20;
  auto booted =
      Boot(platform, s, memory,
           {.working_set_pages = dirty_pages, .write_rate = 0, .pattern = RML_PATTERN_SEQUENTIAL});
  if (!booted.ok()) return booted.status();
  Vm& vm = **booted;
  vmm::OutputGate gate;
  auto ep = vmm::LedgerEndpoint::Start(vm.ledger(), gate, "127.0.0.1", 0, nullptr);
  if (!ep.ok()) return ep.status();
  BENCH_RETURN_IF_ERROR(vm.Start());
  romulus::cli::LoadOptions o;
  o.port = (*ep)->port();
  o.clients = clients;
  o.duration_s = g_quick ? 1 : 3;
  o.retry_pct = 0;
  auto unprotected = romulus::cli::RunLoad(o);  // gate open, no engine yet
  if (!unprotected.ok()) return unprotected.status();

  auto replica = romulus::checkpoint::ReplicaStore::Create(memory, s.dir + "/replica.img", disk);
  if (!replica.ok()) return replica.status();
  // Options filled field by field: GCC 12 at -O3 warns (maybe-uninitialized, falsely) on a
  // designated initialiser of these nested aggregates.
  romulus::replicator::Mirror::Options mo;
  mo.identity = {"bench", memory, disk};
  mo.key = "bench-key-0123456789";
  auto mirror = romulus::replicator::Mirror::Start(**replica, std::move(mo));
  if (!mirror.ok()) return mirror.status();
  romulus::checkpoint::EpochEngine engine(vm, gate, {});
  romulus::replicator::Primary::Options po;
  po.identity = {"bench", memory, disk};
  po.key = "bench-key-0123456789";
  po.mirror_port = (*mirror)->port();
  po.epoch = milliseconds(25);
  auto primary = romulus::replicator::Primary::Start(engine, gate, std::move(po));
  if (!primary.ok()) return primary.status();
  auto t0 = Clock::now();
  while ((*mirror)->stats().committed_epoch < 0 && Clock::now() - t0 < std::chrono::seconds(60)) {
    std::this_thread::sleep_for(milliseconds(20));  // initial full copy
  }
  if ((*mirror)->stats().committed_epoch < 0) {
    return absl::DeadlineExceededError("the first synchronisation took over 60 s");
  }
  double sync_s = Secs(Clock::now() - t0);
  auto a = (*primary)->stats();
  auto ta = Clock::now();
  auto protected_run = romulus::cli::RunLoad(o);
  auto b = (*primary)->stats();
  double secs = Secs(Clock::now() - ta);
  double mbps = static_cast<double>(b.bytes_sent - a.bytes_sent) / secs / 1e6;
  double raw =
      romulus::bench::RawLoopbackMBps(std::max<uint64_t>(b.bytes_sent - a.bytes_sent, 64ull << 20));
  primary->reset();
  mirror->reset();
  ep->reset();
  BENCH_RETURN_IF_ERROR(vm.Stop());
  if (!protected_run.ok()) return protected_run.status();
  Line(
      "%6lu dirty pages/epoch, %2lu clients: replication %.0f MB/s vs raw loopback TCP "
      "%.0f MB/s (ratio %.2f); %.0f epochs/s (first synchronisation %.1f s, load %.1f s)",
      static_cast<unsigned long>(dirty_pages), static_cast<unsigned long>(clients), mbps, raw,
      mbps / raw, static_cast<double>(b.checkpoints - a.checkpoints) / secs, sync_s, secs);
  Line(
      "        ledger protected %.0f ops/s vs unprotected %.0f ops/s (ratio %.3f); latency "
      "p50 %.1f ms vs %.2f ms: +%.1f ms for a 25 ms epoch (ratio %.2f); invariants %s",
      protected_run->ops_per_s, unprotected->ops_per_s,
      Ratio(protected_run->ops_per_s, unprotected->ops_per_s), protected_run->p50_us / 1000,
      unprotected->p50_us / 1000, (protected_run->p50_us - unprotected->p50_us) / 1000,
      (protected_run->p50_us - unprotected->p50_us) / 25000.0,
      protected_run->ok() && unprotected->ok() ? "hold" : "VIOLATED");
  return absl::OkStatus();
}

int Usage() {
  std::fprintf(stderr,
               "usage: romulus_bench [all|vmm|replication|exits|harvest|slowdown] "
               "[kvm|process] [--quick]\n"
               "  Runs on every platform that can run VMs here, or only on the one named.\n"
               "  --quick: fewer runs and shorter intervals, to check that it works.\n");
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  std::string which = "all";
  std::vector<pb::Platform> platforms;
  for (int i = 1; i < argc; i++) {
    std::string arg = argv[i];
    if (arg == "--quick") {
      g_quick = true;
    } else if (arg == "kvm" || arg == "process") {
      auto p = vmm::ParsePlatform(arg);
      if (!p.ok()) return Usage();
      platforms.push_back(*p);
    } else if (arg == "all" || arg == "vmm" || arg == "replication" || arg == "exits" ||
               arg == "harvest" || arg == "slowdown") {
      which = arg;
    } else {
      return Usage();
    }
  }
  if (platforms.empty()) platforms = vmm::AvailablePlatforms();
  if (platforms.empty()) {
    std::fprintf(stderr, "romulus_bench: no platform can run VMs here (kvm: %s)\n",
                 std::string(vmm::CheckKvm().message()).c_str());
    return 1;
  }
  std::string names;
  for (pb::Platform p : platforms)
    absl::StrAppend(&names, names.empty() ? "" : ", ", vmm::PlatformName(p));
  std::printf("romulus_bench %s%s: platforms %s; %s\n", which.c_str(), g_quick ? " --quick" : "",
              names.c_str(), romulus::bench::MachineLoad().c_str());
  int failures = 0;
  auto run = [&](const char* what, absl::Status s) {
    if (s.ok()) return;
    failures++;
    std::printf("[%s] %s FAILED: %s\n", g_platform.c_str(), what, std::string(s.message()).c_str());
    std::fflush(stdout);
  };
  auto want = [&](std::initializer_list<const char*> groups) {
    for (const char* g : groups) {
      if (which == g) return true;
    }
    return false;
  };
  for (pb::Platform platform : platforms) {
    g_platform = std::string(vmm::PlatformName(platform));
    if (auto s = vmm::CheckPlatform(platform); !s.ok()) {
      run("platform check", s);
      continue;
    }
    if (want({"all", "vmm", "exits"})) {
      Section("port I/O exits");
      run("port exits", PortExits(platform));
    }
    if (want({"all", "vmm"})) {
      Section("state capture and restore");
      run("state capture and restore", StateCaptureAndRestore(platform));
    }
    if (want({"all", "vmm", "harvest"})) {
      Section(
          "pause + harvest + copy per epoch (the guest writes its working set sequentially, as "
          "fast as it can; an epoch is 25 ms, or as long as it takes to write every page)");
      for (uint64_t pages : {256, 1024, 4096, 16384}) {
        run("pause + harvest + copy", HarvestAndCopy(platform, pages));
      }
      Section("fixed cost of a harvest");
      for (uint64_t mib : {256ull, 1024ull})
        run("fixed harvest", FixedHarvest(platform, mib << 20));
    }
    if (want({"all", "vmm", "slowdown"})) {
      Section("guest slowdown under a 25 ms pause + harvest + copy cycle");
      for (uint64_t ws : {1024, 16384}) run("slowdown", Slowdown(platform, ws));
    }
    if (want({"all", "vmm"})) {
      Section("ledger through the TCP endpoint");
      run("ledger", LedgerThroughput(platform));
      Section("memory workload rate");
      run("workload rate", WorkloadRate(platform));
    }
    if (want({"all", "replication"})) {
      Section("epoch pause (engine: stop, harvest, stage, capture, resume) vs memcpy");
      for (uint64_t pages : {1024, 4096, 16384}) run("epoch pause", EpochPause(platform, pages));
      Section("replication over loopback, 25 ms epochs, 16 ledger clients");
      for (uint64_t pages : {1024, 4096, 16384}) {
        run("replication", Replication(platform, pages, 16));
      }
    }
  }
  return failures == 0 ? 0 : 1;
}
