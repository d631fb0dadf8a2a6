// The mirror's end of the epoch pipeline: a checkpoint is verified whole before it touches the
// replica; a synchronisation builds a staging copy that its full checkpoint commits.
#include <fcntl.h>
#include <sys/stat.h>

#include <algorithm>
#include <cstring>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "checkpoint/checkpoint.h"
#include "vmm/xxhash_dispatch.h"

namespace romulus::checkpoint {
namespace {

// Writes a checkpoint's disk writes, already checked against the disk's size, to the image `fd`.
absl::Status WriteDiskWrites(int fd, const std::vector<DiskWrite>& writes, const char* what) {
  for (const DiskWrite& w : writes) {
    if (::pwrite(fd, w.data.data(), w.data.size(),
                 static_cast<off_t>(w.sector * RML_SECTOR_SIZE)) !=
        static_cast<ssize_t>(w.data.size())) {
      return vmm::ErrnoStatus(what);
    }
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::unique_ptr<ReplicaStore>> ReplicaStore::Create(uint64_t memory_bytes,
                                                                   const std::string& disk_path,
                                                                   uint64_t disk_bytes) {
  auto mem = vmm::GuestMemory::CreateMemfd(memory_bytes);
  if (!mem.ok()) return mem.status();
  if (auto s = vmm::BlockDevice::CreateImage(disk_path, disk_bytes); !s.ok()) return s;
  vmm::Fd fd(::open(disk_path.c_str(), O_RDWR | O_CLOEXEC));
  if (!fd.valid()) return vmm::ErrnoStatus(absl::StrCat("open replica disk ", disk_path));
  return std::unique_ptr<ReplicaStore>(
      new ReplicaStore(std::move(*mem), std::move(fd), disk_path, disk_bytes));
}

absl::StatusOr<std::unique_ptr<ReplicaStore>> ReplicaStore::Adopt(
    std::unique_ptr<vmm::GuestMemory> memory, const std::string& disk_path) {
  vmm::Fd fd(::open(disk_path.c_str(), O_RDWR | O_CLOEXEC));
  if (!fd.valid()) return vmm::ErrnoStatus(absl::StrCat("open disk image ", disk_path));
  struct stat st;
  if (::fstat(fd.get(), &st) != 0) return vmm::ErrnoStatus(absl::StrCat("stat ", disk_path));
  auto store = std::unique_ptr<ReplicaStore>(new ReplicaStore(
      std::move(memory), std::move(fd), disk_path, static_cast<uint64_t>(st.st_size)));
  store->seeded_ = true;
  return store;
}

absl::StatusOr<ReplicaStore::ResolvedRun> ReplicaStore::Resolve(const PageRun& run,
                                                                const std::string& what) const {
  size_t n = run.gfns.size();
  if (run.hashes.size() != n || run.pages.size() != n * vmm::kPageSize) {
    return absl::DataLossError(
        absl::StrCat(what, " rejected: page count, hash count and page bytes disagree"));
  }
  ResolvedRun r;
  r.ref_pages.resize(run.refs.size() * vmm::kPageSize);
  r.page.resize(n);
  r.content.resize(n);
  // A reference may name a page earlier in the same run, which is not applied yet.
  absl::flat_hash_map<ContentHash, size_t> earlier;
  const uint8_t* held = staging_ ? staging_->memory->data() : memory_->data();
  size_t k = 0;
  for (size_t i = 0; i < n; i++) {
    if (k < run.refs.size() && run.refs[k].index == i) {
      const ContentHash& h = run.refs[k].hash;
      uint8_t* out = r.ref_pages.data() + k * vmm::kPageSize;
      std::optional<uint64_t> base_page;
      if (auto e = earlier.find(h); e != earlier.end()) {
        std::memcpy(out, r.page[e->second], vmm::kPageSize);
      } else if (auto gfn = index_.Find(h)) {
        std::memcpy(out, held + *gfn * vmm::kPageSize, vmm::kPageSize);
      } else if (base_ && (base_page = base_->Find(h))) {
        // The file is shared: what it holds now must still be what was indexed.
        if (auto s = base_->Read(*base_page, out); !s.ok() || HashPage(out) != h) {
          return absl::DataLossError(absl::StrCat(what, " rejected: page ", run.gfns[i],
                                                  " refers to base image page ", *base_page,
                                                  ", which changed since it was indexed"));
        }
      } else {
        return absl::DataLossError(absl::StrFormat(
            "%s rejected: page %u refers to content this replica does not hold (xxh3-128 "
            "%016x%016x)",
            what, run.gfns[i], h.hi, h.lo));
      }
      r.page[i] = out;
      r.content[i] = h;
      k++;
    } else {
      r.page[i] = run.pages.data() + i * vmm::kPageSize;
      r.content[i] = HashPage(r.page[i]);
    }
    if (!run.refs.empty()) earlier.try_emplace(r.content[i], i);
  }
  if (k != run.refs.size()) {
    return absl::DataLossError(absl::StrCat(what, " rejected: references out of order"));
  }
  return r;
}

void ReplicaStore::Record(const PageRun& run, const ResolvedRun& r) {
  for (size_t i = 0; i < run.gfns.size(); i++) index_.Record(run.gfns[i], r.content[i]);
}

absl::Status ReplicaStore::Verify(const Checkpoint& c, const ResolvedRun& r) const {
  auto bad = [&](const std::string& why) {
    return absl::DataLossError(absl::StrCat("checkpoint ", c.epoch, " rejected: ", why));
  };
  uint64_t pages = memory_->pages();
  if (c.epoch > kMaxEpoch) return bad(absl::StrCat("epoch beyond ", kMaxEpoch));
  if (sequence_reset_ || committed_epoch_ < 0) {
    if (!c.full) return bad("a full checkpoint is needed first");
  } else if (c.full ? static_cast<int64_t>(c.epoch) <= committed_epoch_
                    : static_cast<int64_t>(c.epoch) != committed_epoch_ + 1) {
    return absl::FailedPreconditionError(
        absl::StrCat("checkpoint ", c.epoch, " rejected: expected epoch ", committed_epoch_ + 1,
                     " (replayed or out of order)"));
  }
  if (c.hashes.size() != c.gfns.size() || c.pages.size() != c.gfns.size() * vmm::kPageSize) {
    return bad("page count, hash count and page bytes disagree");
  }
  for (size_t i = 0; i < c.gfns.size(); i++) {
    if (c.gfns[i] >= pages || (i > 0 && c.gfns[i] <= c.gfns[i - 1])) {
      return bad(absl::StrCat("page number ", c.gfns[i], " out of range or out of order"));
    }
    if (XXH3_64bits(r.page[i], vmm::kPageSize) != c.hashes[i]) {
      return bad(absl::StrCat("page ", c.gfns[i], " does not match its hash"));
    }
  }
  uint64_t sectors = disk_bytes_ / RML_SECTOR_SIZE;
  for (const DiskWrite& w : c.disk_writes) {
    uint64_t n = w.data.size() / RML_SECTOR_SIZE;
    if (w.data.empty() || w.data.size() % RML_SECTOR_SIZE || w.sector >= sectors ||
        n > sectors - w.sector) {
      return bad(absl::StrCat("disk write at sector ", w.sector, " of ", w.data.size(),
                              " bytes does not fit the disk"));
    }
  }
  if (c.state.format_version() != vmm::kSnapshotFormatVersion ||
      c.state.memory_bytes() != memory_->size() || c.state.disk_bytes() != disk_bytes_ ||
      c.state.vcpus_size() != 1) {
    return bad("VM state does not match this replica (version, sizes or vCPUs)");
  }
  uint64_t sync = c.full && staging_ ? staging_->digest.value() : 0;
  if (CheckpointDigest(c, sync) != c.digest) {
    return bad(c.full ? "checkpoint digest mismatch (over the pre-copy stream and the checkpoint)"
                      : "checkpoint digest mismatch");
  }
  return absl::OkStatus();
}

absl::Status ReplicaStore::Apply(const Checkpoint& c) {
  trees_.reset();
  if (staging_) staging_->holdings.reset();
  auto r = Resolve(c, absl::StrCat("checkpoint ", c.epoch));
  absl::Status s = r.ok() ? Verify(c, *r) : r.status();
  if (s.ok() && c.full) s = CommitStaging(c, *r);
  if (c.full) staging_.reset();  // a synchronisation ends with its full checkpoint, good or bad
  if (s.ok()) {
    Record(c, *r);
  } else if (c.full) {
    index_.Clear();  // it indexed the staging copy, which is gone
  }
  if (!s.ok() || c.full) return s;
  for (size_t i = 0; i < c.gfns.size(); i++) {
    std::memcpy(memory_->data() + c.gfns[i] * vmm::kPageSize, r->page[i], vmm::kPageSize);
  }
  // A host I/O failure, not bad input.
  if (auto s = WriteDiskWrites(disk_.get(), c.disk_writes, "write replica disk"); !s.ok()) return s;
  state_ = c.state;
  committed_epoch_ = static_cast<int64_t>(c.epoch);
  sequence_reset_ = false;
  return absl::OkStatus();
}

absl::Status ReplicaStore::StartStaging() {
  if (staging_) return absl::OkStatus();
  auto st = std::make_unique<Staging>();
  auto mem = vmm::GuestMemory::CreateMemfd(memory_->size());
  if (!mem.ok()) return mem.status();
  st->memory = std::move(*mem);
  std::string path = disk_path_ + ".sync";
  if (auto s = vmm::BlockDevice::CreateImage(path, disk_bytes_); !s.ok()) return s;
  st->disk = vmm::Fd(::open(path.c_str(), O_RDWR | O_CLOEXEC));
  if (!st->disk.valid()) return vmm::ErrnoStatus(absl::StrCat("open staging disk ", path));
  st->pages = st->same_pages = st->kept_pages = vmm::DirtyBitmap(memory_->pages());
  st->chunks = st->same_chunks = st->kept_chunks =
      vmm::DirtyBitmap((disk_bytes_ + kDiskChunk - 1) / kDiskChunk);
  st->page_hashes.assign(memory_->pages(), 0);
  st->chunk_hashes.assign(st->chunks.pages(), 0);
  staging_ = std::move(st);
  index_.Clear();  // a synchronisation begins: what it indexes lies in the staging copy
  return absl::OkStatus();
}

absl::Status ReplicaStore::StageSyncPages(const PageRun& run) {
  if (auto s = StartStaging(); !s.ok()) return s;
  auto bad = [](const std::string& why) {
    return absl::DataLossError(absl::StrCat("pre-copy rejected: ", why));
  };
  // Check the whole run before writing any of it.
  for (size_t i = 0; i < run.gfns.size(); i++) {
    if (run.gfns[i] >= memory_->pages()) {
      return bad(absl::StrCat("page number ", run.gfns[i], " out of range"));
    }
  }
  auto r = Resolve(run, "pre-copy");
  if (!r.ok()) return r.status();
  for (size_t i = 0; i < run.gfns.size(); i++) {
    if (XXH3_64bits(r->page[i], vmm::kPageSize) != run.hashes[i]) {
      return bad(absl::StrCat("page ", run.gfns[i], " does not match its hash"));
    }
  }
  Record(run, *r);
  for (size_t i = 0; i < run.gfns.size(); i++) {
    std::memcpy(staging_->memory->data() + run.gfns[i] * vmm::kPageSize, r->page[i],
                vmm::kPageSize);
    staging_->pages.Set(run.gfns[i]);
    staging_->page_hashes[run.gfns[i]] = run.hashes[i];
    staging_->digest.AddPage(run.gfns[i], run.hashes[i]);
  }
  return absl::OkStatus();
}

absl::Status ReplicaStore::StageSyncDisk(uint64_t offset, uint64_t length, const std::string* data,
                                         uint64_t hash) {
  if (auto s = StartStaging(); !s.ok()) return s;
  if (offset % kDiskChunk || offset >= disk_bytes_ ||
      length != std::min(kDiskChunk, disk_bytes_ - offset) || (data && data->size() != length)) {
    return absl::DataLossError(absl::StrCat("pre-copy rejected: disk chunk at ", offset, " of ",
                                            length, " bytes does not fit the disk"));
  }
  // A zero chunk needs no write: the staging disk starts out zero.
  static const std::string kZeroChunk(kDiskChunk, '\0');
  uint64_t actual = XXH3_64bits(data ? data->data() : kZeroChunk.data(), length);
  if (actual != hash) {
    return absl::DataLossError(
        absl::StrCat("pre-copy rejected: disk chunk at ", offset, " does not match its hash"));
  }
  if (data && ::pwrite(staging_->disk.get(), data->data(), length, static_cast<off_t>(offset)) !=
                  static_cast<ssize_t>(length)) {
    return vmm::ErrnoStatus("write staging disk");
  }
  staging_->chunks.Set(offset / kDiskChunk);
  staging_->chunk_hashes[offset / kDiskChunk] = hash;
  staging_->digest.AddDisk(offset, length, hash);
  return absl::OkStatus();
}

void ReplicaStore::SuspendSync() {
  index_.Clear();
  if (!staging_) return;
  Staging& st = *staging_;
  st.kept_pages.Merge(st.pages);
  st.kept_chunks.Merge(st.chunks);
  st.pages = st.same_pages = vmm::DirtyBitmap(st.pages.pages());
  st.chunks = st.same_chunks = vmm::DirtyBitmap(st.chunks.pages());
  st.digest = SyncDigest();
  st.holdings.reset();
}

absl::Status ReplicaStore::CommitStaging(const Checkpoint& c, const ResolvedRun& r) {
  if (auto s = StartStaging(); !s.ok()) return s;
  Staging& st = *staging_;
  for (size_t i = 0; i < c.gfns.size(); i++) {
    std::memcpy(st.memory->data() + c.gfns[i] * vmm::kPageSize, r.page[i], vmm::kPageSize);
    st.pages.Set(c.gfns[i]);
  }
  if (auto s = WriteDiskWrites(st.disk.get(), c.disk_writes, "write staging disk"); !s.ok()) {
    return s;
  }
  for (const DiskWrite& w : c.disk_writes) {
    uint64_t off = w.sector * RML_SECTOR_SIZE;
    if (off % kDiskChunk == 0 && w.data.size() == std::min(kDiskChunk, disk_bytes_ - off)) {
      st.chunks.Set(off / kDiskChunk);
    }
  }
  vmm::DirtyBitmap pages = st.pages, chunks = st.chunks;
  pages.Merge(st.same_pages);
  chunks.Merge(st.same_chunks);
  if (pages.Count() != memory_->pages() || chunks.Count() != chunks.pages()) {
    return absl::DataLossError(absl::StrCat(
        "checkpoint ", c.epoch, " rejected: the synchronisation covered ", pages.Count(), " of ",
        memory_->pages(), " pages and ", chunks.Count(), " of ", chunks.pages(), " disk chunks"));
  }
  // Everything verified: the staging copy becomes the replica, or when the replica held some of
  // it already, what was received is written over it (which costs what differed, not the size).
  if (st.same_pages.Count() + st.same_chunks.Count() == 0) {
    if (::rename((disk_path_ + ".sync").c_str(), disk_path_.c_str()) != 0) {
      return vmm::ErrnoStatus(absl::StrCat("replace replica disk ", disk_path_));
    }
    memory_ = std::move(st.memory);
    disk_ = std::move(st.disk);
  } else if (auto s = CopyReceivedIntoReplica(st, c); !s.ok()) {
    return s;  // a host I/O failure, not bad input
  }
  seeded_ = false;
  state_ = c.state;
  committed_epoch_ = static_cast<int64_t>(c.epoch);
  sequence_reset_ = false;
  return absl::OkStatus();
}

absl::Status ReplicaStore::CopyReceivedIntoReplica(const Staging& st, const Checkpoint& c) {
  for (uint64_t gfn = 0; gfn < memory_->pages(); gfn++) {
    if (st.pages.Test(gfn)) {
      std::memcpy(memory_->data() + gfn * vmm::kPageSize, st.memory->data() + gfn * vmm::kPageSize,
                  vmm::kPageSize);
    }
  }
  std::string chunk(kDiskChunk, '\0');
  for (uint64_t i = 0; i < st.chunks.pages(); i++) {
    if (!st.chunks.Test(i)) continue;
    uint64_t off = i * kDiskChunk, n = std::min(kDiskChunk, disk_bytes_ - off);
    if (::pread(st.disk.get(), chunk.data(), n, static_cast<off_t>(off)) !=
            static_cast<ssize_t>(n) ||
        ::pwrite(disk_.get(), chunk.data(), n, static_cast<off_t>(off)) !=
            static_cast<ssize_t>(n)) {
      return vmm::ErrnoStatus("write replica disk");
    }
  }
  // The full checkpoint's writes may fall in chunks that were the same: they go over those too.
  if (auto s = WriteDiskWrites(disk_.get(), c.disk_writes, "write replica disk"); !s.ok()) return s;
  ::unlink((disk_path_ + ".sync").c_str());
  return absl::OkStatus();
}

absl::StatusOr<uint64_t> ReplicaStore::DiskDigest() const {
  return vmm::FileDigest(disk_.get(), disk_bytes_);
}

absl::StatusOr<vmm::SnapshotInfo> ReplicaStore::SaveSnapshot(const std::string& dir) const {
  if (committed_epoch_ < 0) return absl::FailedPreconditionError("no checkpoint committed yet");
  vmm::SnapshotInfo info;
  std::memcpy(&info.guest, memory_->data() + RML_BOOT_GPA + offsetof(rml_boot, status),
              sizeof(info.guest));
  if (auto s = vmm::WriteSnapshot(dir, state_, *memory_, disk_.get(), &info); !s.ok()) return s;
  return info;
}

absl::Status ReplicaStore::Seed(const std::string& dir) {
  trees_.reset();
  staging_.reset();  // what it kept was kept over other contents
  index_.Clear();
  if (auto s = vmm::LoadSnapshotContents(dir, *memory_, disk_bytes_, disk_path_); !s.ok()) {
    return s;
  }
  vmm::Fd disk(::open(disk_path_.c_str(), O_RDWR | O_CLOEXEC));
  if (!disk.valid()) return vmm::ErrnoStatus(absl::StrCat("open replica disk ", disk_path_));
  disk_ = std::move(disk);
  seeded_ = true;
  return absl::OkStatus();
}

absl::StatusOr<const ReplicaTrees*> ReplicaStore::CommittedTrees() {
  if (!has_contents()) return absl::FailedPreconditionError("the replica holds nothing yet");
  return ContentTrees();
}

absl::StatusOr<const ReplicaTrees*> ReplicaStore::HoldingsTrees() {
  bool kept = staging_ && (staging_->kept_pages.Count() + staging_->kept_chunks.Count() > 0);
  if (!kept) return CommittedTrees();
  if (staging_->holdings) return staging_->holdings.get();
  // The replica's own contents count where nothing was kept over them, committed or not: the
  // primary's claims are checked against these hashes, so they are true of what lies here.
  auto trees = ContentTrees();
  if (!trees.ok()) return trees.status();
  std::vector<uint64_t> pages = (*trees)->pages.leaves(), chunks = (*trees)->chunks.leaves();
  staging_->kept_pages.ForEach([&](uint64_t gfn) { pages[gfn] = staging_->page_hashes[gfn]; });
  staging_->kept_chunks.ForEach([&](uint64_t i) { chunks[i] = staging_->chunk_hashes[i]; });
  staging_->holdings = std::make_unique<ReplicaTrees>(
      ReplicaTrees{HashTree(std::move(pages)), HashTree(std::move(chunks))});
  return staging_->holdings.get();
}

absl::StatusOr<const ReplicaTrees*> ReplicaStore::ContentTrees() {
  if (!trees_) {
    auto chunks = HashTree::OverDisk(disk_.get(), disk_bytes_);
    if (!chunks.ok()) return chunks.status();
    trees_ = std::make_unique<ReplicaTrees>(
        ReplicaTrees{HashTree::OverPages(*memory_), std::move(*chunks)});
  }
  return trees_.get();
}

absl::Status ReplicaStore::StageSamePages(size_t level, uint64_t node, uint64_t hash) {
  auto trees = HoldingsTrees();
  if (!trees.ok()) return absl::DataLossError("pre-copy refers to pages this replica lacks");
  const HashTree& t = (*trees)->pages;
  if (level > t.top() || node >= t.width(level) || t.node(level, node) != hash) {
    return absl::DataLossError(absl::StrCat("pre-copy rejected: pages under node ", node,
                                            " of level ", level, " differ from this replica's"));
  }
  if (auto s = StartStaging(); !s.ok()) return s;
  auto [first, end] = t.Leaves(level, node);
  for (uint64_t gfn = first; gfn < end; gfn++) {
    (staging_->kept_pages.Test(gfn) ? staging_->pages : staging_->same_pages).Set(gfn);
  }
  staging_->digest.AddSamePages(level, node, hash);
  return absl::OkStatus();
}

absl::Status ReplicaStore::StageSameDisk(uint64_t offset, uint64_t length, uint64_t hash) {
  auto trees = HoldingsTrees();
  if (!trees.ok()) return absl::DataLossError("pre-copy refers to a disk chunk this replica lacks");
  const std::vector<uint64_t>& chunks = (*trees)->chunks.leaves();
  if (offset % kDiskChunk || offset >= disk_bytes_ ||
      length != std::min(kDiskChunk, disk_bytes_ - offset) || chunks[offset / kDiskChunk] != hash) {
    return absl::DataLossError(absl::StrCat("pre-copy rejected: disk chunk at ", offset, " of ",
                                            length, " bytes is not this replica's"));
  }
  if (auto s = StartStaging(); !s.ok()) return s;
  uint64_t i = offset / kDiskChunk;
  (staging_->kept_chunks.Test(i) ? staging_->chunks : staging_->same_chunks).Set(i);
  staging_->digest.AddDisk(offset, length, hash);
  return absl::OkStatus();
}

absl::StatusOr<ReplicaStore::Committed> ReplicaStore::TakeCommitted() {
  if (committed_epoch_ < 0 || memory_ == nullptr) {
    return absl::FailedPreconditionError("no checkpoint committed yet: nothing to resume");
  }
  staging_.reset();
  trees_.reset();
  index_.Clear();
  disk_ = vmm::Fd();  // the VM opens the image itself
  return Committed{std::move(memory_), state_, committed_epoch_, disk_path_};
}

}  // namespace romulus::checkpoint
