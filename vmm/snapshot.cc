#include "vmm/snapshot.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "vmm/block_device.h"
#include "vmm/sys.h"

namespace romulus::vmm {
namespace {

constexpr uint64_t kMaxStateBytes = 16 << 20;

absl::Status WriteAll(int fd, const void* data, uint64_t len, const std::string& what) {
  const uint8_t* p = static_cast<const uint8_t*>(data);
  while (len > 0) {
    ssize_t n = ::write(fd, p, std::min<uint64_t>(len, 1 << 30));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return ErrnoStatus(absl::StrCat("write ", what));
    p += n;
    len -= static_cast<uint64_t>(n);
  }
  return absl::OkStatus();
}

absl::Status CopyFile(int in, uint64_t bytes, const std::string& out_path) {
  Fd out(::open(out_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644));
  if (!out.valid()) return ErrnoStatus(absl::StrCat("create ", out_path));
  loff_t in_off = 0;
  while (static_cast<uint64_t>(in_off) < bytes) {
    ssize_t n = ::copy_file_range(in, &in_off, out.get(), nullptr,
                                  bytes - static_cast<uint64_t>(in_off), 0);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return ErrnoStatus(absl::StrCat("copy to ", out_path));
  }
  if (::fsync(out.get()) != 0) return ErrnoStatus(absl::StrCat("fsync ", out_path));
  return absl::OkStatus();
}

}  // namespace

std::string SnapshotMemoryPath(const std::string& dir) { return dir + "/memory.bin"; }

namespace {

// What earlier saves of `dir` left behind when their process died part-way: DIR.tmp-PID of a
// process that is gone (or of this one). Nothing else is touched: another name, or the PID of a
// process that runs, may be another's save in progress.
void RemoveAbandonedSaves(const std::string& dir) {
  namespace fs = std::filesystem;
  fs::path path = fs::path(dir).lexically_normal();
  if (!path.has_filename()) path = path.parent_path();
  std::string prefix = path.filename().string() + ".tmp-";
  fs::path parent = path.has_parent_path() ? path.parent_path() : fs::path(".");
  std::vector<fs::path> abandoned;
  std::error_code ec;
  for (fs::directory_iterator it(parent, ec), end; !ec && it != end; it.increment(ec)) {
    std::string name = it->path().filename().string();
    if (name.size() <= prefix.size() || name.compare(0, prefix.size(), prefix) != 0) continue;
    std::string pid = name.substr(prefix.size());
    if (pid.size() > 9 || pid.find_first_not_of("0123456789") != std::string::npos) continue;
    pid_t owner = static_cast<pid_t>(std::stol(pid));
    if (owner == ::getpid() || (::kill(owner, 0) != 0 && errno == ESRCH)) {
      abandoned.push_back(it->path());
    }
  }
  for (const fs::path& p : abandoned) fs::remove_all(p, ec);
}

// The snapshot's three files in `tmp`, which it creates.
absl::Status WriteSnapshotFiles(const std::string& tmp, pb::VmSnapshot state,
                                const GuestMemory& mem, int disk_fd, SnapshotInfo* info) {
  namespace fs = std::filesystem;
  std::error_code ec;
  if (!fs::create_directories(tmp, ec)) {
    return absl::InternalError(absl::StrCat("create ", tmp, ": ", ec.message()));
  }
  info->memory_xxh3 = mem.Digest();
  {
    std::string path = SnapshotMemoryPath(tmp);
    Fd fd(::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644));
    if (!fd.valid()) return ErrnoStatus(absl::StrCat("create ", path));
    if (auto s = WriteAll(fd.get(), mem.data(), mem.size(), path); !s.ok()) return s;
    if (::fsync(fd.get()) != 0) return ErrnoStatus(absl::StrCat("fsync ", path));
  }
  if (::fdatasync(disk_fd) != 0) return ErrnoStatus("fdatasync disk image");
  auto disk_digest = FileDigest(disk_fd, state.disk_bytes());
  if (!disk_digest.ok()) return disk_digest.status();
  info->disk_xxh3 = *disk_digest;
  if (auto s = CopyFile(disk_fd, state.disk_bytes(), tmp + "/disk.img"); !s.ok()) return s;

  state.set_memory_xxh3(info->memory_xxh3);
  state.set_disk_xxh3(info->disk_xxh3);
  std::string bytes;
  if (!state.SerializeToString(&bytes)) return absl::InternalError("serialize snapshot state");
  std::string path = tmp + "/state.pb";
  Fd fd(::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644));
  if (!fd.valid()) return ErrnoStatus(absl::StrCat("create ", path));
  if (auto s = WriteAll(fd.get(), bytes.data(), bytes.size(), path); !s.ok()) return s;
  if (::fsync(fd.get()) != 0) return ErrnoStatus(absl::StrCat("fsync ", path));
  return absl::OkStatus();
}

}  // namespace

absl::Status WriteSnapshot(const std::string& dir, pb::VmSnapshot state, const GuestMemory& mem,
                           int disk_fd, SnapshotInfo* info) {
  namespace fs = std::filesystem;
  RemoveAbandonedSaves(dir);
  std::string tmp = absl::StrCat(dir, ".tmp-", ::getpid());
  std::error_code ec;
  // A save that fails (a full disk) leaves nothing behind: the previous snapshot stays as it was.
  if (auto s = WriteSnapshotFiles(tmp, std::move(state), mem, disk_fd, info); !s.ok()) {
    fs::remove_all(tmp, ec);
    return s;
  }
  // Replace any previous snapshot only once the new one is complete.
  std::string old = absl::StrCat(dir, ".old-", ::getpid());
  bool had_old = fs::exists(dir, ec);
  if (had_old) fs::rename(dir, old, ec);
  if (ec) {
    std::string why = ec.message();
    fs::remove_all(tmp, ec);
    return absl::InternalError(absl::StrCat("move aside ", dir, ": ", why));
  }
  fs::rename(tmp, dir, ec);
  if (ec) {
    std::string why = ec.message();
    if (had_old) fs::rename(old, dir, ec);
    fs::remove_all(tmp, ec);
    return absl::InternalError(absl::StrCat("rename ", tmp, " to ", dir, ": ", why));
  }
  if (had_old) fs::remove_all(old, ec);
  return absl::OkStatus();
}

absl::StatusOr<pb::VmSnapshot> ReadSnapshot(const std::string& dir) {
  auto snap = ReadSnapshotState(dir);
  if (snap.ok() && snap->vcpus_size() != 1) {
    return absl::DataLossError(absl::StrCat("snapshot ", dir, " has ", snap->vcpus_size(),
                                            " vCPUs; this monitor runs exactly one"));
  }
  return snap;
}

absl::StatusOr<pb::VmSnapshot> ReadSnapshotState(const std::string& dir) {
  std::string path = dir + "/state.pb";
  Fd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd.valid()) return ErrnoStatus(absl::StrCat("open snapshot ", path));
  struct stat st;
  if (::fstat(fd.get(), &st) != 0) return ErrnoStatus(absl::StrCat("stat ", path));
  if (st.st_size <= 0 || static_cast<uint64_t>(st.st_size) > kMaxStateBytes) {
    return absl::DataLossError(
        absl::StrCat("snapshot ", path, " has ", st.st_size, " bytes (expected 1 byte to 16 MiB)"));
  }
  std::string bytes(static_cast<size_t>(st.st_size), '\0');
  if (::pread(fd.get(), bytes.data(), bytes.size(), 0) != st.st_size) {
    return ErrnoStatus(absl::StrCat("read ", path));
  }
  pb::VmSnapshot snap;
  if (!snap.ParseFromString(bytes)) {
    return absl::DataLossError(absl::StrCat("snapshot ", path, " is not a valid state file"));
  }
  if (snap.format_version() != kSnapshotFormatVersion) {
    return absl::FailedPreconditionError(absl::StrCat("snapshot ", dir, " has format version ",
                                                      snap.format_version(), ", expected ",
                                                      kSnapshotFormatVersion));
  }
  if (auto s = GuestMemory::ValidateSize(snap.memory_bytes()); !s.ok()) {
    return absl::DataLossError(absl::StrCat("snapshot ", dir, ": ", s.message()));
  }
  if (snap.disk_bytes() == 0 || snap.disk_bytes() % 512 != 0 || snap.disk_bytes() > kMaxDiskBytes) {
    return absl::DataLossError(
        absl::StrCat("snapshot ", dir, ": bad disk size ", snap.disk_bytes()));
  }
  return snap;
}

absl::Status LoadSnapshotContents(const std::string& dir, GuestMemory& memory, uint64_t disk_bytes,
                                  const std::string& disk_path) {
  auto snap = ReadSnapshotState(dir);
  if (!snap.ok()) return snap.status();
  if (snap->memory_bytes() != memory.size() || snap->disk_bytes() != disk_bytes) {
    return absl::FailedPreconditionError(
        absl::StrCat("snapshot ", dir, " holds ", snap->memory_bytes(), " bytes of memory and ",
                     snap->disk_bytes(), " of disk, not ", memory.size(), " and ", disk_bytes));
  }
  std::string path = SnapshotMemoryPath(dir);
  Fd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd.valid()) return ErrnoStatus(absl::StrCat("open ", path));
  struct stat st;
  if (::fstat(fd.get(), &st) != 0) return ErrnoStatus(absl::StrCat("stat ", path));
  if (static_cast<uint64_t>(st.st_size) != memory.size()) {
    return absl::DataLossError(absl::StrCat(path, " holds ", st.st_size, " bytes, expected ",
                                            memory.size(), " (truncated or wrong file)"));
  }
  for (uint64_t off = 0; off < memory.size();) {
    ssize_t n =
        ::pread(fd.get(), memory.data() + off, memory.size() - off, static_cast<off_t>(off));
    if (n <= 0) {
      std::memset(memory.data(), 0, memory.size());
      return ErrnoStatus(absl::StrCat("read ", path));
    }
    off += static_cast<uint64_t>(n);
  }
  if (memory.Digest() != snap->memory_xxh3()) {
    std::memset(memory.data(), 0, memory.size());
    return absl::DataLossError(absl::StrCat("snapshot ", dir, ": memory.bin is corrupted"));
  }
  absl::Status s = RestoreSnapshotDisk(dir, *snap, disk_path);
  if (!s.ok()) std::memset(memory.data(), 0, memory.size());
  return s;
}

absl::Status RestoreSnapshotDisk(const std::string& dir, const pb::VmSnapshot& state,
                                 const std::string& disk_path) {
  std::string path = dir + "/disk.img";
  Fd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd.valid()) return ErrnoStatus(absl::StrCat("open ", path));
  struct stat st;
  if (::fstat(fd.get(), &st) != 0) return ErrnoStatus(absl::StrCat("stat ", path));
  if (static_cast<uint64_t>(st.st_size) != state.disk_bytes()) {
    return absl::DataLossError(absl::StrCat(path, " holds ", st.st_size, " bytes, expected ",
                                            state.disk_bytes(), " (truncated or wrong file)"));
  }
  auto digest = FileDigest(fd.get(), state.disk_bytes());
  if (!digest.ok()) return digest.status();
  if (*digest != state.disk_xxh3()) {
    return absl::DataLossError(
        absl::StrFormat("snapshot %s: disk.img is corrupted (xxh3 %016x, "
                        "recorded %016x)",
                        dir, *digest, state.disk_xxh3()));
  }
  std::error_code ec;
  if (std::filesystem::equivalent(path, disk_path, ec)) {
    return absl::InvalidArgumentError(
        "the restored VM's disk must not be the snapshot's own disk.img");
  }
  return CopyFile(fd.get(), state.disk_bytes(), disk_path);
}

}  // namespace romulus::vmm
