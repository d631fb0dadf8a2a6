// A set of guest page numbers, one bit per 4 KiB page.
#ifndef ROMULUS_VMM_DIRTY_BITMAP_H_
#define ROMULUS_VMM_DIRTY_BITMAP_H_

#include <cstdint>
#include <vector>

namespace romulus::vmm {

class DirtyBitmap {
 public:
  DirtyBitmap() = default;
  explicit DirtyBitmap(uint64_t pages) : pages_(pages), words_((pages + 63) / 64) {}

  uint64_t pages() const { return pages_; }
  void Set(uint64_t page) { words_[page / 64] |= 1ull << (page % 64); }
  void Clear(uint64_t page) { words_[page / 64] &= ~(1ull << (page % 64)); }
  bool Test(uint64_t page) const { return (words_[page / 64] >> (page % 64)) & 1; }
  uint64_t Count() const;
  void Merge(const DirtyBitmap& other);
  std::vector<uint64_t>& words() { return words_; }
  const std::vector<uint64_t>& words() const { return words_; }

  template <typename Fn>
  void ForEach(Fn&& fn) const {
    for (uint64_t w = 0; w < words_.size(); w++) {
      uint64_t bits = words_[w];
      while (bits) {
        fn(w * 64 + static_cast<uint64_t>(__builtin_ctzll(bits)));
        bits &= bits - 1;
      }
    }
  }

 private:
  uint64_t pages_ = 0;
  std::vector<uint64_t> words_;
};

}  // namespace romulus::vmm

#endif  // ROMULUS_VMM_DIRTY_BITMAP_H_
