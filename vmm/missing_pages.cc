#include "vmm/missing_pages.h"

#include <fcntl.h>
#include <linux/magic.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/statfs.h>
#include <sys/syscall.h>

#include <algorithm>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace romulus::vmm {
namespace {

// USERFAULTFD_IOC_NEW (Linux 6.1): a userfaultfd from /dev/userfaultfd, for where the system call
// is refused faults from the kernel.
constexpr unsigned long kUserfaultfdIocNew = _IO(0xAA, 0x00);

// A userfaultfd that also catches the kernel's accesses (a write(2) from guest RAM, KVM reading
// it): the system call needs privilege for that, /dev/userfaultfd only access to the device.
absl::StatusOr<Fd> OpenUserfaultfd() {
  int flags = O_CLOEXEC | O_NONBLOCK;
  Fd uffd(static_cast<int>(::syscall(SYS_userfaultfd, flags)));
  if (!uffd.valid()) {
    int err = errno;
    Fd dev(::open("/dev/userfaultfd", O_RDWR | O_CLOEXEC));
    if (dev.valid()) uffd = Fd(::ioctl(dev.get(), kUserfaultfdIocNew, flags));
    if (!uffd.valid()) {
      return ErrnoStatus("userfaultfd for post-copy (needs CAP_SYS_PTRACE or /dev/userfaultfd)",
                         err);
    }
  }
  uffdio_api api{};
  api.api = UFFD_API;
  if (auto s = Ioctl(uffd.get(), UFFDIO_API, &api, "UFFDIO_API"); !s.ok()) return s;
  return uffd;
}

// Wakes whatever waits on `uffd` for the page at `address`.
void Wake(int uffd, uint64_t address) {
  uffdio_range r{address, kPageSize};
  (void)Ioctl(uffd, UFFDIO_WAKE, &r, "UFFDIO_WAKE");  // fails only when nothing is registered
}

// A fault on a page that is not missing: one that was placed since (the waiter on this mapping
// may not have been woken), or one never written (a zero page the source did not send, a hole
// in guest RAM's backing). A zero page fills the latter and finds the former there; either way
// the waiter goes on.
void Resolve(int uffd, uint64_t address) {
  uffdio_zeropage z{};
  z.range = {address, kPageSize};
  if (::ioctl(uffd, UFFDIO_ZEROPAGE, &z) != 0) Wake(uffd, address);
}

}  // namespace

MissingPages::MissingPages(GuestMemory& memory, Options options)
    : memory_(memory),
      options_(std::move(options)),
      missing_(memory.pages()),
      requested_(memory.pages()),
      asked_at_(memory.pages()) {}

absl::StatusOr<std::unique_ptr<MissingPages>> MissingPages::Create(GuestMemory& memory,
                                                                   const DirtyBitmap& missing,
                                                                   Options options) {
  if (missing.pages() != memory.pages()) {
    return absl::InvalidArgumentError(
        absl::StrCat("a bitmap of ", missing.pages(), " pages for guest RAM of ", memory.pages()));
  }
  // Holes can be made, and read as missing, only in a shared tmpfs (or memfd) mapping; the
  // private mappings of a snapshot's file are read-only to the monitor and must stay intact.
  struct statfs fs;
  int access = ::fcntl(memory.fd(), F_GETFL);
  if (::fstatfs(memory.fd(), &fs) != 0 || fs.f_type != TMPFS_MAGIC || access < 0 ||
      (access & O_ACCMODE) != O_RDWR) {
    return absl::FailedPreconditionError(
        "post-copy needs guest RAM shared from a memfd or a tmpfs file, not a private or "
        "disk-backed mapping");
  }
  std::unique_ptr<MissingPages> mp(new MissingPages(memory, std::move(options)));
  mp->missing_ = missing;
  mp->missing_count_ = missing.Count();

  // Holes where pages are missing: what the backing held there must never be read.
  uint64_t run_start = 0, run_pages = 0;
  auto punch = [&]() -> absl::Status {
    if (run_pages == 0) return absl::OkStatus();
    if (::fallocate(memory.fd(), FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                    static_cast<off_t>(run_start * kPageSize),
                    static_cast<off_t>(run_pages * kPageSize)) != 0) {
      return ErrnoStatus("discard the missing pages of guest RAM");
    }
    run_pages = 0;
    return absl::OkStatus();
  };
  absl::Status punched;
  missing.ForEach([&](uint64_t gfn) {
    if (!punched.ok()) return;
    if (run_pages && gfn != run_start + run_pages) punched = punch();
    if (run_pages == 0) run_start = gfn;
    run_pages++;
  });
  if (punched.ok()) punched = punch();
  if (!punched.ok()) return punched;

  auto uffd = OpenUserfaultfd();
  if (!uffd.ok()) return uffd.status();
  uffdio_register reg{};
  reg.range.start = reinterpret_cast<uint64_t>(memory.data());
  reg.range.len = memory.size();
  reg.mode = UFFDIO_REGISTER_MODE_MISSING;
  if (::ioctl(uffd->get(), UFFDIO_REGISTER, &reg) != 0) {
    return ErrnoStatus("register guest RAM for missing pages");
  }
  mp->own_uffd_ = uffd->get();
  mp->mappings_.push_back({std::move(*uffd), reg.range.start, 0});
  mp->wake_ = Fd(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  if (!mp->wake_.valid()) return ErrnoStatus("eventfd");
  mp->thread_ = std::thread([p = mp.get()] { p->FaultLoop(); });
  return mp;
}

MissingPages::~MissingPages() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  Poke();
  if (thread_.joinable()) thread_.join();
}

void MissingPages::Poke() {
  uint64_t one = 1;
  if (::write(wake_.get(), &one, sizeof(one)) < 0) {
    // Only a counter at its maximum refuses, and then the thread has a wake-up pending anyway.
  }
}

absl::Status MissingPages::AddMapping(Fd uffd, uint64_t address, uint64_t first_page) {
  if (!uffd.valid() || first_page >= memory_.pages()) {
    return absl::InvalidArgumentError("a mapping outside guest RAM");
  }
  // The fault thread reads every pending fault until there is none.
  int fl = ::fcntl(uffd.get(), F_GETFL);
  if (fl < 0 || ::fcntl(uffd.get(), F_SETFL, fl | O_NONBLOCK) != 0) return ErrnoStatus("fcntl");
  {
    std::lock_guard<std::mutex> lock(mu_);
    mappings_.push_back({std::move(uffd), address, first_page});
    // Something may wait on it already, for a page placed since: each waiter retries, and one
    // whose page is still missing faults again.
    const Mapping& m = mappings_.back();
    uffdio_range all{m.address, (memory_.pages() - m.first_page) * kPageSize};
    (void)Ioctl(m.uffd.get(), UFFDIO_WAKE, &all, "UFFDIO_WAKE");
  }
  Poke();
  return absl::OkStatus();
}

absl::Status MissingPages::Place(uint64_t gfn, const void* bytes) {
  if (gfn >= memory_.pages()) {
    return absl::OutOfRangeError(
        absl::StrFormat("page %#x lies outside guest RAM (%d pages)", gfn, memory_.pages()));
  }
  // One page at a time: a second Place of the same page returns only once the first has placed
  // it and counted it (so that, when it answers AlreadyExists, the page is here).
  std::lock_guard<std::mutex> placing(place_mu_);
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!missing_.Test(gfn)) {
      return absl::AlreadyExistsError(absl::StrFormat("page %#x is here already", gfn));
    }
  }
  uffdio_copy copy{};
  copy.dst = reinterpret_cast<uint64_t>(memory_.data()) + gfn * kPageSize;
  copy.src = reinterpret_cast<uint64_t>(bytes);
  copy.len = kPageSize;
  int rc;
  do {
    rc = ::ioctl(own_uffd_, UFFDIO_COPY, &copy);
  } while (rc != 0 && (errno == EINTR || errno == EAGAIN));
  if (rc != 0) {
    // The backing has a page where one was missing: something wrote guest RAM through a mapping
    // that is not registered.
    return ErrnoStatus(absl::StrFormat("place page %#x", gfn));
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    missing_.Clear(gfn);
    missing_count_--;
    placed_++;
    if (requested_.Test(gfn)) {
      int64_t ns = std::chrono::duration_cast<std::chrono::nanoseconds>(
                       std::chrono::steady_clock::now() - asked_at_[gfn])
                       .count();
      if (waits_ns_.size() < kWaitSamples) {
        waits_ns_.push_back(ns);
      } else {
        waits_ns_[waited_ % kWaitSamples] = ns;
      }
      waited_++;
    }
    // The copy woke the monitor's own waiters; another mapping's wait on its own userfaultfd.
    for (size_t i = 1; i < mappings_.size(); i++) {
      const Mapping& m = mappings_[i];
      if (gfn >= m.first_page) Wake(m.uffd.get(), m.address + (gfn - m.first_page) * kPageSize);
    }
  }
  return absl::OkStatus();
}

bool MissingPages::IsMissing(uint64_t gfn) const {
  std::lock_guard<std::mutex> lock(mu_);
  return gfn < missing_.pages() && missing_.Test(gfn);
}

MissingPages::Stats MissingPages::stats() const {
  std::vector<int64_t> waits;
  Stats s;
  {
    std::lock_guard<std::mutex> lock(mu_);
    s.missing = missing_count_.load();
    s.placed = placed_;
    s.faults = faults_;
    waits = waits_ns_;
  }
  if (!waits.empty()) {
    std::sort(waits.begin(), waits.end());
    auto at = [&](double q) {
      return std::chrono::nanoseconds(waits[static_cast<size_t>(q * (waits.size() - 1))]);
    };
    s.wait_p50 = at(0.5);
    s.wait_p99 = at(0.99);
    s.wait_max = std::chrono::nanoseconds(waits.back());
  }
  return s;
}

void MissingPages::FaultLoop() {
  NameThread("rml-faults");
  while (true) {
    std::vector<pollfd> fds;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (stop_) return;
      fds.push_back({wake_.get(), POLLIN, 0});
      for (const Mapping& m : mappings_) fds.push_back({m.uffd.get(), POLLIN, 0});
    }
    if (::poll(fds.data(), fds.size(), -1) < 0) {
      if (errno == EINTR) continue;
      return;  // cannot happen with valid descriptors
    }
    if (fds[0].revents) {
      uint64_t n;
      if (::read(wake_.get(), &n, sizeof(n)) < 0) {
        // Non-blocking: another wake-up consumed it.
      }
    }
    for (size_t i = 1; i < fds.size(); i++) {
      if (fds[i].revents) Serve(i - 1);
    }
  }
}

void MissingPages::Serve(size_t mapping) {
  int uffd;
  uint64_t address, first_page;
  {
    std::lock_guard<std::mutex> lock(mu_);
    const Mapping& m = mappings_[mapping];
    uffd = m.uffd.get();
    address = m.address;
    first_page = m.first_page;
  }
  uffd_msg msgs[16];
  while (true) {
    ssize_t n = ::read(uffd, msgs, sizeof(msgs));
    if (n <= 0) return;  // EAGAIN: nothing pending
    for (ssize_t i = 0; i < n / static_cast<ssize_t>(sizeof(uffd_msg)); i++) {
      if (msgs[i].event != UFFD_EVENT_PAGEFAULT) continue;
      uint64_t at = msgs[i].arg.pagefault.address & ~(kPageSize - 1);
      if (at < address) continue;
      uint64_t gfn = first_page + (at - address) / kPageSize;
      if (gfn >= memory_.pages()) continue;
      bool ask = false;
      {
        std::lock_guard<std::mutex> lock(mu_);
        if (!missing_.Test(gfn)) {
          Resolve(uffd, at);
        } else if (!requested_.Test(gfn)) {
          requested_.Set(gfn);
          asked_at_[gfn] = std::chrono::steady_clock::now();
          faults_++;
          ask = true;
        }
      }
      if (ask && options_.on_fault) options_.on_fault(gfn);
    }
  }
}

}  // namespace romulus::vmm
