// What content the mirror already holds, so that a page equal to one it holds travels as a
// reference (its xxh3-128) instead of 4 KiB. Both ends keep a ContentIndex over the same pages:
// those whose contents crossed the stream since the synchronisation began, each updated by every
// later page, in stream order. The primary hashes what it sends, the mirror what it received, and
// a reference the mirror cannot find in its own index is refused: nothing rests on trusting the
// primary's view. A BaseImage is a memory image both hosts can read (on shared storage), indexed
// alike, whose pages are referenced the same way when both ends hold the same one.
#ifndef ROMULUS_CHECKPOINT_CONTENT_INDEX_H_
#define ROMULUS_CHECKPOINT_CONTENT_INDEX_H_

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "vmm/guest_memory.h"
#include "vmm/sys.h"

namespace romulus::checkpoint {

// The xxh3-128 of a page: 128 bits, so that no collision a guest could find aliases two pages.
struct ContentHash {
  uint64_t lo = 0, hi = 0;
  friend bool operator==(const ContentHash& a, const ContentHash& b) {
    return a.lo == b.lo && a.hi == b.hi;
  }
  friend bool operator!=(const ContentHash& a, const ContentHash& b) { return !(a == b); }
  // Abseil's hash is seeded per process: a guest cannot choose contents that pile up in one
  // bucket of an index.
  template <typename H>
  friend H AbslHashValue(H h, const ContentHash& c) {
    return H::combine(std::move(h), c.lo, c.hi);
  }
};
ContentHash HashPage(const uint8_t* page);  // of vmm::kPageSize bytes
const ContentHash& ZeroPageHash();

// Which page holds a content: O(1) to record, overwrite, forget and find, and exact after any
// sequence of them (a guest is untrusted: 200k pages of equal content cost no more). Pages of
// equal content form a ring; the map names one page of each ring. All-zero pages are never
// indexed (they travel as flags).
class ContentIndex {
 public:
  explicit ContentIndex(uint64_t pages = 0);
  // Page `gfn` now holds the content `hash` (the zero page's: it holds nothing worth
  // referencing). Pages past `pages` are never indexed.
  void Record(uint64_t gfn, const ContentHash& hash);
  void Forget(uint64_t gfn);
  // A page that holds `hash`, if any.
  std::optional<uint64_t> Find(const ContentHash& hash) const;
  void Clear();
  uint64_t pages() const { return next_.size(); }
  uint64_t contents() const { return head_.size(); }  // distinct contents held

 private:
  static constexpr uint64_t kNone = ~0ull;
  std::vector<ContentHash> hash_;
  std::vector<uint64_t> next_, prev_;  // kNone: the page is not indexed
  absl::flat_hash_map<ContentHash, uint64_t> head_;
};

// A raw memory image (a guest image, a snapshot's memory file) both hosts can read: its pages,
// indexed by content, are what a reference to it resolves to. Read-only; opened once at start.
class BaseImage {
 public:
  // At most `max_bytes` (the guest's memory), a whole number of pages.
  static absl::StatusOr<std::shared_ptr<const BaseImage>> Open(const std::string& path,
                                                               uint64_t max_bytes);
  std::optional<uint64_t> Find(const ContentHash& hash) const;  // a page holding it
  // Page `page` into `out` (vmm::kPageSize bytes); the caller checks what it reads against the
  // page's hash, as the file could have changed since it was indexed.
  absl::Status Read(uint64_t page, uint8_t* out) const;
  // Over every page's content in order: two hosts with equal digests hold the same image.
  uint64_t digest() const { return digest_; }
  uint64_t pages() const { return pages_; }
  const std::string& path() const { return path_; }

 private:
  BaseImage() = default;
  std::string path_;
  vmm::Fd fd_;
  uint64_t pages_ = 0, digest_ = 0;
  absl::flat_hash_map<ContentHash, uint64_t> index_;
};

}  // namespace romulus::checkpoint

#endif  // ROMULUS_CHECKPOINT_CONTENT_INDEX_H_
