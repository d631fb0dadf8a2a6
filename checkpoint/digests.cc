// What both ends compute alike: the Merkle trees over pages and disk chunks, the running digest of
// a pre-copy stream and the digest over a whole checkpoint.
#include <algorithm>

#include "checkpoint/checkpoint.h"
#include "vmm/xxhash_dispatch.h"

namespace romulus::checkpoint {
namespace {

uint64_t Chain(uint64_t value, std::initializer_list<uint64_t> words) {
  return XXH3_64bits_withSeed(std::data(words), words.size() * sizeof(uint64_t), value);
}

}  // namespace

void SyncDigest::AddPage(uint64_t gfn, uint64_t hash) { value_ = Chain(value_, {1, gfn, hash}); }

void SyncDigest::AddDisk(uint64_t offset, uint64_t length, uint64_t hash) {
  value_ = Chain(value_, {2, offset, length, hash});
}

void SyncDigest::AddSamePages(uint64_t level, uint64_t node, uint64_t hash) {
  value_ = Chain(value_, {3, level, node, hash});
}

HashTree::HashTree(std::vector<uint64_t> leaves) {
  levels_.push_back(std::move(leaves));
  while (levels_.back().size() > 1) {
    const std::vector<uint64_t>& below = levels_.back();
    std::vector<uint64_t> above((below.size() + kFanout - 1) / kFanout);
    for (uint64_t i = 0; i < above.size(); i++) {
      uint64_t first = i * kFanout, n = std::min<uint64_t>(kFanout, below.size() - first);
      above[i] = XXH3_64bits(below.data() + first, n * sizeof(uint64_t));
    }
    levels_.push_back(std::move(above));
  }
}

HashTree HashTree::OverPages(const vmm::GuestMemory& memory) {
  std::vector<uint64_t> leaves(memory.pages());
  for (uint64_t i = 0; i < leaves.size(); i++) {
    leaves[i] = XXH3_64bits(memory.data() + i * vmm::kPageSize, vmm::kPageSize);
  }
  return HashTree(std::move(leaves));
}

absl::StatusOr<HashTree> HashTree::OverDisk(int fd, uint64_t bytes) {
  std::vector<uint64_t> leaves;
  std::string chunk(kDiskChunk, '\0');
  for (uint64_t off = 0; off < bytes; off += kDiskChunk) {
    size_t n = std::min(kDiskChunk, bytes - off);
    if (::pread(fd, chunk.data(), n, static_cast<off_t>(off)) != static_cast<ssize_t>(n)) {
      return vmm::ErrnoStatus("read disk image to hash it");
    }
    leaves.push_back(XXH3_64bits(chunk.data(), n));
  }
  return HashTree(std::move(leaves));
}

std::pair<uint64_t, uint64_t> HashTree::Children(size_t level, uint64_t i) const {
  return {i * kFanout, std::min((i + 1) * kFanout, width(level - 1))};
}

std::pair<uint64_t, uint64_t> HashTree::Leaves(size_t level, uint64_t i) const {
  uint64_t span = 1;
  for (size_t l = 0; l < level; l++) span *= kFanout;
  return {i * span, std::min((i + 1) * span, width(0))};
}

uint64_t Checkpoint::bytes() const {
  uint64_t n = pages.size() + gfns.size() * 16 + static_cast<uint64_t>(state.ByteSizeLong());
  for (const DiskWrite& w : disk_writes) n += w.data.size() + 8;
  return n;
}

uint64_t CheckpointDigest(const Checkpoint& c, uint64_t sync_digest) {
  XXH3_state_t* st = XXH3_createState();
  XXH3_64bits_reset(st);
  uint64_t head[4] = {c.epoch, c.full ? 1u : 0u, c.gfns.size(), sync_digest};
  XXH3_64bits_update(st, head, sizeof(head));
  XXH3_64bits_update(st, c.gfns.data(), c.gfns.size() * sizeof(uint64_t));
  XXH3_64bits_update(st, c.hashes.data(), c.hashes.size() * sizeof(uint64_t));
  for (const DiskWrite& w : c.disk_writes) {
    uint64_t h[2] = {w.sector, XXH3_64bits(w.data.data(), w.data.size())};
    XXH3_64bits_update(st, h, sizeof(h));
  }
  std::string state = c.state.SerializeAsString();
  XXH3_64bits_update(st, state.data(), state.size());
  uint64_t d = XXH3_64bits_digest(st);
  XXH3_freeState(st);
  return d;
}

}  // namespace romulus::checkpoint
