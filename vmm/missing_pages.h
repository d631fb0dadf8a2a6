// Guest RAM whose pages arrive after the guest runs (post-copy migration): every access to a
// page that is not here yet, by a vCPU, by the monitor's devices or by the kernel on their behalf,
// waits until the page's bytes are placed, and each page is placed whole, so that nothing ever
// reads a missing page as zeros or half written.
//
// How: the pages still missing are holes in the memory's shared backing (a memfd, or a file on
// tmpfs), and every mapping of it that anything reads through is registered with a userfaultfd
// for missing pages. A page is placed with UFFDIO_COPY, which fills the backing and maps it in one
// step; mappings registered elsewhere (the process platform's stub) are then woken. The monitor's
// own mapping is registered too, because a read through it would otherwise fill the hole with
// zeros for every mapping.
#ifndef ROMULUS_VMM_MISSING_PAGES_H_
#define ROMULUS_VMM_MISSING_PAGES_H_

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"
#include "vmm/dirty_bitmap.h"
#include "vmm/guest_memory.h"
#include "vmm/sys.h"

namespace romulus::vmm {

class MissingPages {
 public:
  struct Options {
    // Something waits for page `gfn`: ask for it. Runs on the fault thread, once per page, and
    // must neither block for long nor touch guest RAM (the thread that places pages may be the
    // one it would wait for).
    std::function<void(uint64_t gfn)> on_fault;
  };
  struct Stats {
    uint64_t missing = 0;  // pages not placed yet
    uint64_t placed = 0;
    uint64_t faults = 0;  // pages something waited for
    // How long they waited (fault seen to page placed), over the last kWaitSamples faults.
    std::chrono::nanoseconds wait_p50{0}, wait_p99{0}, wait_max{0};
  };
  static constexpr size_t kWaitSamples = 4096;

  // The pages set in `missing` (of `memory`) are not here: their contents are discarded (they
  // become holes) and the monitor's mapping is registered. Every other page is here: one that
  // guest RAM's backing has no page for (never written) reads as zeros. Guest RAM must be a shared
  // mapping of a memfd or of a tmpfs file (FailedPrecondition otherwise, saying so).
  static absl::StatusOr<std::unique_ptr<MissingPages>> Create(GuestMemory& memory,
                                                              const DirtyBitmap& missing,
                                                              Options options);
  // Ends the fault thread. Whatever still waits for a page then faults it in as zeros: stop the
  // guest first (a guest must never run on a page that did not arrive).
  ~MissingPages();
  MissingPages(const MissingPages&) = delete;
  MissingPages& operator=(const MissingPages&) = delete;

  // Another mapping of the same memory, in this or another process, already registered for
  // missing pages with `uffd`; guest page `first_page` is at
  // `address` in it and the mapping covers the pages from there to the end of guest RAM. Its
  // faults are served like the monitor's own.
  absl::Status AddMapping(Fd uffd, uint64_t address, uint64_t first_page);

  // Page `gfn` arrived: its 4 KiB are placed and whatever waits for it goes on. OutOfRange for a
  // page outside guest RAM, AlreadyExists for one that is here (placed before, or never
  // missing): the page is left as it was.
  absl::Status Place(uint64_t gfn, const void* bytes);

  bool complete() const { return missing_count_.load() == 0; }
  // Whether `gfn` still has to arrive.
  bool IsMissing(uint64_t gfn) const;
  Stats stats() const;

 private:
  struct Mapping {
    Fd uffd;
    uint64_t address = 0;  // of first_page
    uint64_t first_page = 0;
  };
  MissingPages(GuestMemory& memory, Options options);
  void FaultLoop();
  void Poke();                 // the fault thread looks at mappings_ and stop_ again
  void Serve(size_t mapping);  // reads the pending faults of one mapping

  GuestMemory& memory_;
  Options options_;
  int own_uffd_ = -1;  // the monitor's mapping's (owned by mappings_[0])
  Fd wake_;            // an eventfd, for Poke

  std::mutex place_mu_;  // held by Place throughout
  mutable std::mutex mu_;
  DirtyBitmap missing_;                                          // under mu_
  DirtyBitmap requested_;                                        // under mu_: on_fault ran for it
  std::vector<std::chrono::steady_clock::time_point> asked_at_;  // under mu_, per requested page
  std::vector<Mapping> mappings_;                                // under mu_; the monitor's first
  std::vector<int64_t> waits_ns_;                                // under mu_, a ring
  uint64_t faults_ = 0, placed_ = 0, waited_ = 0;                // under mu_
  bool stop_ = false;                                            // under mu_
  std::atomic<uint64_t> missing_count_{0};
  std::thread thread_;
};

}  // namespace romulus::vmm

#endif  // ROMULUS_VMM_MISSING_PAGES_H_
