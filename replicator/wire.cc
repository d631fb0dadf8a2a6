// The replication stream's frames: encoding a checkpoint or pre-copy batch into frames, and
// decoding frames from an untrusted peer with every count and size checked.
#include <lz4.h>

#include <algorithm>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "replicator/replicator.h"

namespace romulus::replicator {
namespace {

using checkpoint::Checkpoint;
using checkpoint::PageRun;
using vmm::AllZero;
constexpr size_t kDiskBytesPerBatch = 1 << 20;

constexpr size_t kSector = 512;

// `raw` as it goes on the wire into `out`: LZ4-compressed when asked and it makes it smaller.
pb::Compression Pack(std::string raw, pb::Compression compression, std::string* out) {
  if (compression == pb::LZ4 && !raw.empty()) {
    std::string packed(static_cast<size_t>(LZ4_compressBound(static_cast<int>(raw.size()))), '\0');
    int len = LZ4_compress_default(raw.data(), packed.data(), static_cast<int>(raw.size()),
                                   static_cast<int>(packed.size()));
    if (len > 0 && static_cast<size_t>(len) < raw.size()) {  // else: incompressible, send raw
      packed.resize(static_cast<size_t>(len));
      *out = std::move(packed);
      return pb::LZ4;
    }
  }
  *out = std::move(raw);
  return pb::COMPRESSION_NONE;
}

// Decompresses what a peer sent, which must come to exactly `size` bytes.
absl::Status Unpack(const std::string& data, pb::Compression compression, size_t size,
                    absl::string_view what, std::string* out) {
  if (compression != pb::LZ4) {
    return absl::DataLossError(absl::StrCat(what, " with unknown compression ", compression));
  }
  out->resize(size);
  int got = LZ4_decompress_safe(data.data(), out->data(), static_cast<int>(data.size()),
                                static_cast<int>(size));
  if (got < 0 || static_cast<size_t>(got) != size) {
    return absl::DataLossError(absl::StrCat(what, " does not decompress to its size"));
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<pb::Compression> ParseCompression(absl::string_view name) {
  if (name.empty() || name == "none") return pb::COMPRESSION_NONE;
  if (name == "lz4") return pb::LZ4;
  return absl::InvalidArgumentError(
      absl::StrCat("unknown compression '", name.substr(0, 32), "' (none or lz4)"));
}

pb::Frame PageBatchFrame(uint64_t epoch, bool sync, const PageRun& run, size_t begin, size_t n,
                         pb::Compression compression, Dedup* dedup) {
  pb::Frame f;
  pb::PageBatch* b = f.mutable_pages();
  b->set_epoch(epoch);
  b->set_sync(sync);
  std::string zero((n + 7) / 8, '\0'), ref((n + 7) / 8, '\0'), ref_hashes;
  std::string raw;
  raw.reserve(n * vmm::kPageSize);
  bool any_zero = false;
  for (size_t j = 0; j < n; j++) {
    uint64_t gfn = run.gfns[begin + j], hash = run.hashes[begin + j];
    b->add_gfns(gfn);
    b->add_hashes(hash);
    const uint8_t* page = run.pages.data() + (begin + j) * vmm::kPageSize;
    if (AllZero(page, vmm::kPageSize)) {
      zero[j / 8] = static_cast<char>(zero[j / 8] | (1 << (j % 8)));
      any_zero = true;
      if (dedup) dedup->sent.Forget(gfn);
      continue;
    }
    if (dedup) {
      // Hashed here, on the sending thread, not while the VM is paused.
      checkpoint::ContentHash h = checkpoint::HashPage(page);
      bool held = dedup->sent.Find(h).has_value();
      bool in_base = !held && dedup->base && dedup->base->Find(h).has_value();
      dedup->sent.Record(gfn, h);
      if (held || in_base) {
        (held ? dedup->deduplicated : dedup->from_base)++;
        ref[j / 8] = static_cast<char>(ref[j / 8] | (1 << (j % 8)));
        uint64_t words[2] = {h.lo, h.hi};
        ref_hashes.append(reinterpret_cast<const char*>(words), sizeof(words));
        continue;
      }
    }
    raw.append(reinterpret_cast<const char*>(page), vmm::kPageSize);
  }
  if (any_zero) b->set_zero(std::move(zero));
  if (!ref_hashes.empty()) {
    b->set_ref(std::move(ref));
    b->set_ref_hashes(std::move(ref_hashes));
  }
  b->set_compression(Pack(std::move(raw), compression, b->mutable_data()));
  return f;
}

absl::StatusOr<PageRun> DecodePageBatch(const pb::PageBatch& b, uint64_t memory_pages) {
  size_t n = static_cast<size_t>(b.gfns_size());
  if (n == 0 || n > kPagesPerBatch || static_cast<size_t>(b.hashes_size()) != n) {
    return absl::DataLossError("page batch with inconsistent counts");
  }
  if (!b.zero().empty() && b.zero().size() != (n + 7) / 8) {
    return absl::DataLossError("page batch with a zero mask of the wrong size");
  }
  if (!b.ref().empty() && b.ref().size() != (n + 7) / 8) {
    return absl::DataLossError("page batch with a reference mask of the wrong size");
  }
  auto is_zero = [&](size_t j) {
    return !b.zero().empty() && (static_cast<uint8_t>(b.zero()[j / 8]) >> (j % 8)) & 1;
  };
  auto is_ref = [&](size_t j) {
    return !b.ref().empty() && (static_cast<uint8_t>(b.ref()[j / 8]) >> (j % 8)) & 1;
  };
  size_t nonzero = 0, refs = 0;
  for (size_t j = 0; j < n; j++) {
    if (b.gfns(static_cast<int>(j)) >= memory_pages) {
      return absl::DataLossError(
          absl::StrCat("page number ", b.gfns(static_cast<int>(j)), " outside guest memory"));
    }
    if (is_zero(j) && is_ref(j)) {
      return absl::DataLossError("page batch with a page flagged both zero and a reference");
    }
    refs += is_ref(j) ? 1 : 0;
    nonzero += is_zero(j) || is_ref(j) ? 0 : 1;
  }
  if (b.ref_hashes().size() != refs * 16) {
    return absl::DataLossError(absl::StrCat("page batch with ", refs, " references but ",
                                            b.ref_hashes().size(), " bytes of their hashes"));
  }
  std::string unpacked;
  const std::string* data = &b.data();
  if (b.compression() != pb::COMPRESSION_NONE) {
    if (auto s =
            Unpack(b.data(), b.compression(), nonzero * vmm::kPageSize, "page batch", &unpacked);
        !s.ok()) {
      return s;
    }
    data = &unpacked;
  }
  if (data->size() != nonzero * vmm::kPageSize) {
    return absl::DataLossError("page batch with inconsistent counts or sizes");
  }
  PageRun run;
  run.gfns.assign(b.gfns().begin(), b.gfns().end());
  run.hashes.assign(b.hashes().begin(), b.hashes().end());
  run.pages.resize(n * vmm::kPageSize);  // zero pages stay zero, references until resolved
  run.refs.reserve(refs);
  const char* src = data->data();
  for (size_t j = 0; j < n; j++) {
    if (is_zero(j)) continue;
    if (is_ref(j)) {
      uint64_t words[2];
      std::memcpy(words, b.ref_hashes().data() + run.refs.size() * 16, sizeof(words));
      run.refs.push_back({.index = j, .hash = {words[0], words[1]}});
      continue;
    }
    std::memcpy(run.pages.data() + j * vmm::kPageSize, src, vmm::kPageSize);
    src += vmm::kPageSize;
  }
  return run;
}

pb::Frame SyncDiskFrame(const checkpoint::SyncChunk& chunk, const std::vector<uint64_t>* mirror,
                        pb::Compression compression) {
  pb::Frame f;
  pb::SyncDisk* d = f.mutable_sync_disk();
  d->set_offset(chunk.offset);
  d->set_length(static_cast<uint32_t>(chunk.data.size()));
  d->set_hash(chunk.hash);
  uint64_t index = chunk.offset / checkpoint::kDiskChunk;
  if (mirror != nullptr && index < mirror->size() && (*mirror)[index] == chunk.hash) {
    d->set_same(true);
  } else if (AllZero(reinterpret_cast<const uint8_t*>(chunk.data.data()), chunk.data.size())) {
    d->set_zero(true);
  } else {
    // Zero sectors travel as flags, as zero pages do: one sector written into an empty chunk
    // costs a sector, not the chunk.
    size_t sectors = chunk.data.size() % kSector ? 0 : chunk.data.size() / kSector;
    std::string zero((sectors + 7) / 8, '\0'), rest;
    bool any_zero = false;
    for (size_t i = 0; i < sectors; i++) {
      const char* s = chunk.data.data() + i * kSector;
      if (AllZero(reinterpret_cast<const uint8_t*>(s), kSector)) {
        zero[i / 8] = static_cast<char>(zero[i / 8] | (1 << (i % 8)));
        any_zero = true;
      } else {
        rest.append(s, kSector);
      }
    }
    if (any_zero) d->set_zero_sectors(std::move(zero));
    d->set_compression(
        Pack(any_zero ? std::move(rest) : chunk.data, compression, d->mutable_data()));
  }
  return f;
}

absl::StatusOr<std::optional<std::string>> SyncDiskData(const pb::SyncDisk& d) {
  if ((d.zero() || d.same()) != d.data().empty() || (d.zero() && d.same())) {
    return absl::DataLossError("pre-copy disk chunk: zero or same flag and data disagree");
  }
  if (d.zero() || d.same()) return std::nullopt;
  if (d.length() == 0 || d.length() > checkpoint::kDiskChunk) {
    return absl::DataLossError(absl::StrCat("pre-copy disk chunk of ", d.length(), " bytes"));
  }
  const std::string& mask = d.zero_sectors();
  size_t sectors = d.length() / kSector;
  if (!mask.empty() && (d.length() % kSector || mask.size() != (sectors + 7) / 8)) {
    return absl::DataLossError("pre-copy disk chunk with a zero-sector mask of the wrong size");
  }
  auto is_zero = [&](size_t i) {
    return !mask.empty() && (static_cast<uint8_t>(mask[i / 8]) >> (i % 8)) & 1;
  };
  size_t nonzero = d.length();
  for (size_t i = 0; i < sectors; i++) nonzero -= is_zero(i) ? kSector : 0;
  std::string data;
  if (d.compression() == pb::COMPRESSION_NONE) {
    data = d.data();
  } else if (auto s = Unpack(d.data(), d.compression(), nonzero, "pre-copy disk chunk", &data);
             !s.ok()) {
    return s;
  }
  if (data.size() != nonzero) {
    return absl::DataLossError("pre-copy disk chunk whose data does not fit its length");
  }
  if (mask.empty()) return data;
  std::string chunk(d.length(), '\0');
  const char* src = data.data();
  for (size_t i = 0; i < sectors; i++) {
    if (is_zero(i)) continue;
    std::memcpy(chunk.data() + i * kSector, src, kSector);
    src += kSector;
  }
  return chunk;
}

std::vector<pb::Frame> CheckpointFrames(const Checkpoint& c, pb::Compression compression,
                                        Dedup* dedup) {
  std::vector<pb::Frame> frames;
  for (size_t i = 0; i < c.gfns.size(); i += kPagesPerBatch) {
    frames.push_back(PageBatchFrame(
        c.epoch, false, c, i, std::min(kPagesPerBatch, c.gfns.size() - i), compression, dedup));
  }
  pb::Frame disk;
  size_t batched = 0;
  for (const checkpoint::DiskWrite& w : c.disk_writes) {
    if (batched + w.data.size() > kDiskBytesPerBatch && batched > 0) {
      frames.push_back(std::move(disk));
      disk = pb::Frame();
      batched = 0;
    }
    pb::DiskWriteBatch* b = disk.mutable_disk();
    b->set_epoch(c.epoch);
    b->add_sectors(w.sector);
    b->add_data(w.data);
    batched += w.data.size();
  }
  if (batched > 0) frames.push_back(std::move(disk));
  pb::Frame t;
  pb::CheckpointTrailer* tr = t.mutable_trailer();
  tr->set_epoch(c.epoch);
  tr->set_full(c.full);
  tr->set_pages(c.gfns.size());
  tr->set_disk_writes(c.disk_writes.size());
  *tr->mutable_state() = c.state;
  tr->set_digest(c.digest);
  frames.push_back(std::move(t));
  return frames;
}

absl::StatusOr<std::optional<Checkpoint>> CheckpointAssembler::Add(pb::Frame f) {
  auto epoch_ok = [&](uint64_t epoch) -> absl::Status {
    if (!started_) {
      started_ = true;
      cp_ = Checkpoint();
      cp_.epoch = epoch;
      disk_bytes_received_ = 0;
    } else if (epoch != cp_.epoch) {
      return absl::DataLossError(
          absl::StrCat("frame of epoch ", epoch, " inside checkpoint ", cp_.epoch));
    }
    return absl::OkStatus();
  };
  if (f.has_pages() && !f.pages().sync()) {
    const pb::PageBatch& b = f.pages();
    if (auto s = epoch_ok(b.epoch()); !s.ok()) return s;
    if (cp_.gfns.size() + static_cast<size_t>(b.gfns_size()) > memory_pages_) {
      return absl::DataLossError("more pages than guest memory holds");
    }
    auto run = DecodePageBatch(b, memory_pages_);
    if (!run.ok()) return run.status();
    for (checkpoint::PageRef& r : run->refs) {
      r.index += cp_.gfns.size();
      cp_.refs.push_back(r);
    }
    cp_.gfns.insert(cp_.gfns.end(), run->gfns.begin(), run->gfns.end());
    cp_.hashes.insert(cp_.hashes.end(), run->hashes.begin(), run->hashes.end());
    cp_.pages.insert(cp_.pages.end(), run->pages.begin(), run->pages.end());
    return std::nullopt;
  }
  if (f.has_disk()) {
    pb::DiskWriteBatch& b = *f.mutable_disk();
    if (auto s = epoch_ok(b.epoch()); !s.ok()) return s;
    if (b.sectors_size() != b.data_size() || b.sectors_size() == 0) {
      return absl::DataLossError("disk batch with inconsistent counts");
    }
    for (int i = 0; i < b.sectors_size(); i++) {
      disk_bytes_received_ += b.data(i).size();
      // A guest rewrites its journal's last sector often: allow some rewriting, not unbounded.
      if (disk_bytes_received_ > std::max<uint64_t>(2 * disk_bytes_, 64ull << 20)) {
        return absl::DataLossError("more disk writes in one checkpoint than allowed");
      }
      cp_.disk_writes.push_back({b.sectors(i), std::move(*b.mutable_data(i))});
    }
    return std::nullopt;
  }
  if (f.has_trailer()) {
    pb::CheckpointTrailer& t = *f.mutable_trailer();
    if (auto s = epoch_ok(t.epoch()); !s.ok()) return s;
    started_ = false;
    if (t.pages() != cp_.gfns.size() || t.disk_writes() != cp_.disk_writes.size()) {
      return absl::DataLossError(
          absl::StrCat("checkpoint ", t.epoch(), " is truncated: trailer says ", t.pages(),
                       " pages and ", t.disk_writes(), " disk writes, received ", cp_.gfns.size(),
                       " and ", cp_.disk_writes.size()));
    }
    cp_.full = t.full();
    cp_.state = std::move(*t.mutable_state());
    cp_.digest = t.digest();
    return std::optional<Checkpoint>(std::move(cp_));
  }
  if (started_) return absl::DataLossError("pre-copy frame inside a checkpoint");
  return absl::DataLossError("unexpected frame in the checkpoint stream");
}

}  // namespace romulus::replicator
