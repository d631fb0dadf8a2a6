// Planned-migration downtime and re-protection bytes over loopback, no KVM needed: a software VM
// (a host thread dirtying its working set, tests/soft_vm.h) is migrated back and forth between
// two in-process hosts. Each migration is timed from the VM's pause on the old host to the
// mirror's answer that it runs on the new one; after each, the old host's memory becomes the
// new primary's replica and is resynchronised by hash comparison.
// Baselines from the same run: a memcpy of as many pages as the last checkpoint carried, and
// the bytes of the first (full) synchronisation. Resuming a KVM VM (Vm::Adopt) is not included.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "bench/bench_util.h"
#include "replicator/replicator.h"
#include "tests/soft_vm.h"

namespace {

using romulus::bench::Clock;
using romulus::bench::WaitFor;
using romulus::testing::SoftVm;
namespace cp = romulus::checkpoint;
namespace rp = romulus::replicator;

const char kKey[] = "migration-bench-key-0123456789";
constexpr uint64_t kDisk = 64ull << 20, kWorkingSet = 8192, kPage = 4096;

double Pct(const std::vector<double>& v, double p) { return romulus::bench::Quantile(v, p); }

[[noreturn]] void Die(const std::string& what) {
  romulus::bench::Die("romulus_migration_bench", what);
}

struct Host {
  std::string disk;
  romulus::vmm::OutputGate gate;
  std::unique_ptr<SoftVm> vm;
  std::unique_ptr<cp::EpochEngine> engine;
  std::unique_ptr<rp::Primary> primary;
  std::unique_ptr<cp::ReplicaStore> replica;
  std::unique_ptr<rp::Mirror> mirror;
};

class Bench {
 public:
  Bench(uint64_t memory, const std::string& dir) : memory_(memory) {
    a_.disk = dir + "/a.img";
    b_.disk = dir + "/b.img";
    options_.memory_bytes = memory;
    options_.disk_bytes = kDisk;
    options_.working_set_pages = kWorkingSet;
    options_.writes_per_ms = 20;  // 20 random 8-byte writes per ms to the working set
  }
  ~Bench() {
    for (Host* h : {&a_, &b_}) {
      h->primary.reset();
      h->mirror.reset();
      h->engine.reset();
      h->vm.reset();
    }
  }

  void Run(int migrations) {
    a_.vm = SoftVm::Create(a_.disk, options_);
    if (!a_.vm) Die("cannot create the VM");
    a_.vm->FillWithNoise();  // every page costs its size on the wire
    (void)a_.vm->Start();    // a software VM always starts
    auto r = cp::ReplicaStore::Create(memory_, b_.disk, kDisk);
    if (!r.ok()) Die(std::string(r.status().message()));
    b_.replica = std::move(*r);
    Protect(a_, b_);
    uint64_t full_sync = a_.primary->stats().sync.wire_bytes;
    double full_sync_ms = protect_ms_;

    std::vector<double> downtime, commit, copy_ms, reprotect, reprotect_ms;
    std::vector<uint64_t> pages;
    Host *from = &a_, *to = &b_;
    for (int i = 0; i < migrations; i++) {
      auto report = from->primary->HandOver(std::chrono::seconds(30), nullptr, "");
      if (!report.ok()) Die(std::string(report.status().message()));
      downtime.push_back(report->downtime_ms);
      commit.push_back(report->commit_ms);
      pages.push_back(report->final_pages);
      copy_ms.push_back(CopyMs(report->final_pages));
      BecomeMirror(*from);
      Protect(*to, *from);
      reprotect.push_back(static_cast<double>(to->primary->stats().sync.wire_bytes));
      reprotect_ms.push_back(protect_ms_);
      std::swap(from, to);
    }
    std::vector<double> page_counts(pages.begin(), pages.end());
    double copy50 = std::max(Pct(copy_ms, 0.5), 1e-6);
    std::printf(
        "%4lu MiB guest, %lu-page working set written at 20 random pages/ms, %d migrations:\n"
        "  downtime (pause here -> runs there): p50 %.1f ms, max %.1f ms; of which the last "
        "checkpoint committed: p50 %.1f ms\n"
        "  last checkpoint: p50 %.0f pages; a memcpy of as many pages takes p50 %.3f ms: "
        "downtime = %.1fx that copy\n"
        "  re-protection after each migration: p50 %.1f MiB on the wire vs %.1f MiB for the "
        "first full synchronisation (%.3fx) of %.1f MiB of memory and disk; protected again "
        "after p50 %.0f ms vs %.0f ms (%.2fx)\n",
        static_cast<unsigned long>(memory_ >> 20), static_cast<unsigned long>(kWorkingSet),
        migrations, Pct(downtime, 0.5), Pct(downtime, 1.0), Pct(commit, 0.5), Pct(page_counts, 0.5),
        copy50, Pct(downtime, 0.5) / copy50, Pct(reprotect, 0.5) / (1 << 20),
        static_cast<double>(full_sync) / (1 << 20),
        Pct(reprotect, 0.5) / static_cast<double>(full_sync),
        static_cast<double>(memory_ + kDisk) / (1 << 20), Pct(reprotect_ms, 0.5), full_sync_ms,
        Pct(reprotect_ms, 0.5) / std::max(full_sync_ms, 1e-3));
    std::fflush(stdout);
  }

 private:
  // `to` mirrors `from`; returns once 50 epochs are committed there.
  void Protect(Host& from, Host& to) {
    // Options filled field by field: GCC 12 at -O3 warns (maybe-uninitialized, falsely) on a
    // designated initialiser of these nested aggregates.
    rp::Mirror::Options mo;
    mo.identity = {"bench", memory_, kDisk};
    mo.key = kKey;
    mo.on_handover = [this, &to](uint64_t, const std::string&) { return Resume(to); };
    auto m = rp::Mirror::Start(*to.replica, std::move(mo));
    if (!m.ok()) Die(std::string(m.status().message()));
    to.mirror = std::move(*m);
    from.engine =
        std::make_unique<cp::EpochEngine>(*from.vm, from.gate, cp::EpochEngine::Options{});
    rp::Primary::Options po;
    po.identity = {"bench", memory_, kDisk};
    po.key = kKey;
    po.mirror_port = to.mirror->port();
    po.epoch = std::chrono::milliseconds(25);
    auto p = rp::Primary::Start(*from.engine, from.gate, std::move(po));
    if (!p.ok()) Die(std::string(p.status().message()));
    from.primary = std::move(*p);
    auto t0 = Clock::now();
    if (!WaitFor([&] { return from.primary->stats().acked >= 1; }, 300)) Die("no protection");
    protect_ms_ = std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
    if (!WaitFor([&] { return from.primary->stats().acked >= 50; }, 300)) Die("no protection");
  }

  absl::Status Resume(Host& h) {
    absl::StatusOr<cp::ReplicaStore::Committed> c;
    h.mirror->WithReplica([&](cp::ReplicaStore& r) { c = r.TakeCommitted(); });
    if (!c.ok()) return c.status();
    auto vm = SoftVm::Adopt(std::move(c->memory), c->disk_path, options_);
    if (!vm) return absl::InternalError("cannot adopt the replica");
    (void)vm->Start();  // a software VM always starts
    h.vm = std::move(vm);
    return absl::OkStatus();
  }

  void BecomeMirror(Host& h) {
    h.primary.reset();
    h.engine.reset();
    h.mirror.reset();
    auto r = cp::ReplicaStore::Adopt(h.vm->TakeMemory(), h.disk);
    if (!r.ok()) Die(std::string(r.status().message()));
    h.vm.reset();
    h.replica = std::move(*r);
  }

  // A memcpy of `pages` scattered pages of a buffer the size of the guest's working set: the
  // best of 20 runs on buffers already touched.
  double CopyMs(uint64_t pages) {
    static std::vector<uint8_t> src(kWorkingSet * kPage, 1), dst(kWorkingSet * kPage, 2);
    double best = 1e9;
    for (int run = 0; run < 20; run++) {
      auto t0 = Clock::now();
      for (uint64_t i = 0; i < pages; i++) {
        uint64_t at = (i * 7919 % kWorkingSet) * kPage;
        std::memcpy(dst.data() + at, src.data() + at, kPage);
      }
      volatile uint8_t sink = dst[(pages * 7919 % kWorkingSet) * kPage];
      (void)sink;
      best = std::min(best, std::chrono::duration<double, std::milli>(Clock::now() - t0).count());
    }
    return best;
  }

  uint64_t memory_;
  double protect_ms_ = 0;  // the last Protect(): mirror started -> full checkpoint committed
  SoftVm::Options options_;
  Host a_, b_;
};

}  // namespace

int main(int argc, char** argv) {
  int migrations = argc > 1 ? std::atoi(argv[1]) : 10;
  if (migrations < 1 || migrations > 1000)
    Die("usage: romulus_migration_bench [MIGRATIONS 1-1000]");
  char tmpl[] = "/tmp/romulus-migration-bench-XXXXXX";
  if (!::mkdtemp(tmpl)) Die("cannot create a temporary directory");
  std::string dir = tmpl;
  for (uint64_t mib : {256ull, 1024ull}) {
    Bench(mib << 20, dir).Run(migrations);
  }
  for (const char* f : {"/a.img", "/b.img"}) std::remove((dir + f).c_str());
  std::remove(dir.c_str());
  return 0;
}
