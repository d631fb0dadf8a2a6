// The content index both ends keep of the stream, and the shared base image.
#include "checkpoint/content_index.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include "absl/strings/str_cat.h"
#include "vmm/sys.h"
#include "vmm/xxhash_dispatch.h"

namespace romulus::checkpoint {

ContentHash HashPage(const uint8_t* page) {
  XXH128_hash_t h = XXH3_128bits(page, vmm::kPageSize);
  return {h.low64, h.high64};
}

const ContentHash& ZeroPageHash() {
  static const ContentHash zero = [] {
    std::vector<uint8_t> page(vmm::kPageSize, 0);
    return HashPage(page.data());
  }();
  return zero;
}

ContentIndex::ContentIndex(uint64_t pages) : hash_(pages), next_(pages, kNone), prev_(pages) {}

void ContentIndex::Record(uint64_t gfn, const ContentHash& hash) {
  if (gfn >= next_.size()) return;  // outside memory: never indexed, on either end
  if (next_[gfn] != kNone) {
    if (hash_[gfn] == hash) return;
    Forget(gfn);
  }
  if (hash == ZeroPageHash()) return;
  hash_[gfn] = hash;
  auto [it, fresh] = head_.try_emplace(hash, gfn);
  if (fresh) {
    next_[gfn] = prev_[gfn] = gfn;
    return;
  }
  uint64_t head = it->second, tail = prev_[head];
  next_[tail] = gfn;
  prev_[gfn] = tail;
  next_[gfn] = head;
  prev_[head] = gfn;
}

void ContentIndex::Forget(uint64_t gfn) {
  if (gfn >= next_.size()) return;
  uint64_t next = next_[gfn];
  if (next == kNone) return;
  auto it = head_.find(hash_[gfn]);
  if (next == gfn) {
    head_.erase(it);
  } else {
    uint64_t prev = prev_[gfn];
    next_[prev] = next;
    prev_[next] = prev;
    if (it->second == gfn) it->second = next;
  }
  next_[gfn] = kNone;
}

std::optional<uint64_t> ContentIndex::Find(const ContentHash& hash) const {
  auto it = head_.find(hash);
  if (it == head_.end()) return std::nullopt;
  return it->second;
}

void ContentIndex::Clear() {
  head_.clear();
  std::fill(next_.begin(), next_.end(), kNone);
}

absl::StatusOr<std::shared_ptr<const BaseImage>> BaseImage::Open(const std::string& path,
                                                                 uint64_t max_bytes) {
  auto bad = [&](const std::string& why) {
    return absl::InvalidArgumentError(absl::StrCat("base image ", path, ": ", why));
  };
  vmm::Fd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd.valid()) return vmm::ErrnoStatus(absl::StrCat("open base image ", path));
  struct stat st;
  if (::fstat(fd.get(), &st) != 0) return vmm::ErrnoStatus(absl::StrCat("stat ", path));
  if (!S_ISREG(st.st_mode)) return bad("not a regular file");
  uint64_t size = static_cast<uint64_t>(st.st_size);
  if (size == 0 || size % vmm::kPageSize) return bad("not a whole number of 4 KiB pages");
  if (size > max_bytes) {
    return bad(absl::StrCat(size, " bytes, larger than the guest's memory (", max_bytes, ")"));
  }
  auto image = std::shared_ptr<BaseImage>(new BaseImage());
  image->path_ = path;
  image->pages_ = size / vmm::kPageSize;
  XXH3_state_t* digest = XXH3_createState();
  XXH3_64bits_reset(digest);
  std::vector<uint8_t> buf(256 * vmm::kPageSize);
  for (uint64_t page = 0; page < image->pages_;) {
    uint64_t n = std::min<uint64_t>(256, image->pages_ - page);
    if (::pread(fd.get(), buf.data(), n * vmm::kPageSize,
                static_cast<off_t>(page * vmm::kPageSize)) !=
        static_cast<ssize_t>(n * vmm::kPageSize)) {
      XXH3_freeState(digest);
      return vmm::ErrnoStatus(absl::StrCat("read base image ", path));
    }
    for (uint64_t i = 0; i < n; i++, page++) {
      ContentHash h = HashPage(buf.data() + i * vmm::kPageSize);
      XXH3_64bits_update(digest, &h, sizeof(h));
      if (h != ZeroPageHash()) image->index_.try_emplace(h, page);
    }
  }
  image->digest_ = XXH3_64bits_digest(digest);
  XXH3_freeState(digest);
  image->fd_ = std::move(fd);
  return std::shared_ptr<const BaseImage>(std::move(image));
}

std::optional<uint64_t> BaseImage::Find(const ContentHash& hash) const {
  auto it = index_.find(hash);
  if (it == index_.end()) return std::nullopt;
  return it->second;
}

absl::Status BaseImage::Read(uint64_t page, uint8_t* out) const {
  if (page >= pages_ ||
      ::pread(fd_.get(), out, vmm::kPageSize, static_cast<off_t>(page * vmm::kPageSize)) !=
          static_cast<ssize_t>(vmm::kPageSize)) {
    return absl::DataLossError(absl::StrCat("base image ", path_, ": page ", page, " unreadable"));
  }
  return absl::OkStatus();
}

}  // namespace romulus::checkpoint
