// The small replica the replication target decodes frames for, shared with the corpus generator
// (which answers tree queries from the same trees).
#ifndef ROMULUS_FUZZ_REPLICATION_GEOMETRY_H_
#define ROMULUS_FUZZ_REPLICATION_GEOMETRY_H_

#include <array>
#include <cstdint>
#include <vector>

#include "checkpoint/checkpoint.h"
#include "vmm/guest_memory.h"

namespace romulus::fuzz {

inline constexpr uint64_t kFuzzMemoryPages = 64;
inline constexpr uint64_t kFuzzMemoryBytes = kFuzzMemoryPages * 4096;
inline constexpr uint64_t kFuzzDiskBytes = 4 * checkpoint::kDiskChunk;
// The mirror target's replica: a ReplicaStore's memory is a guest's, 16 MiB at least.
inline constexpr uint64_t kFuzzReplicaMemoryBytes = vmm::kMinMemoryBytes;
inline constexpr uint64_t kFuzzReplicaPages = kFuzzReplicaMemoryBytes / 4096;

// Trees over `pages` and `chunks` leaves with fixed leaf hashes. Four shapes: empty, one leaf,
// two levels, and three (over 64 * 64 pages), so that every comparison path has a small case.
inline const checkpoint::ReplicaTrees& FuzzTrees(uint8_t which) {
  auto make = [](uint64_t pages, uint64_t chunks) {
    auto leaves = [](uint64_t n, uint64_t salt) {
      std::vector<uint64_t> v(n);
      for (uint64_t i = 0; i < n; i++) v[i] = (i + salt) * 0x9e3779b97f4a7c15ull;
      return v;
    };
    return checkpoint::ReplicaTrees{checkpoint::HashTree(leaves(pages, 1)),
                                    checkpoint::HashTree(leaves(chunks, 7))};
  };
  static const std::array<checkpoint::ReplicaTrees, 4> trees = {make(0, 0), make(1, 1), make(70, 3),
                                                                make(4200, 65)};
  return trees[which % trees.size()];
}

}  // namespace romulus::fuzz

#endif  // ROMULUS_FUZZ_REPLICATION_GEOMETRY_H_
