#include "tests/soft_vm.h"

#include <chrono>
#include <cstring>
#include <vector>

#include "guest/abi.h"

namespace romulus::testing {
namespace {

uint64_t Next(uint64_t& x) {  // xorshift64
  x ^= x << 13;
  x ^= x >> 7;
  x ^= x << 17;
  return x;
}

}  // namespace

std::unique_ptr<SoftVm> SoftVm::Create(const std::string& disk_path, Options options) {
  std::unique_ptr<SoftVm> vm(new SoftVm());
  vm->options_ = std::move(options);
  auto mem = vm->options_.memory_path.empty()
                 ? vmm::GuestMemory::CreateMemfd(vm->options_.memory_bytes)
                 : vmm::GuestMemory::MapFileShared(vm->options_.memory_path,
                                                   vm->options_.memory_bytes, /*fresh=*/true);
  if (!mem.ok()) return nullptr;
  vm->memory_ = std::move(*mem);
  if (!vmm::BlockDevice::CreateImage(disk_path, vm->options_.disk_bytes).ok()) return nullptr;
  auto disk = vmm::BlockDevice::Open(disk_path);
  if (!disk.ok()) return nullptr;
  vm->disk_ = std::move(*disk);
  return vm;
}

std::unique_ptr<SoftVm> SoftVm::Adopt(std::unique_ptr<vmm::GuestMemory> memory,
                                      const std::string& disk_path, Options options) {
  std::unique_ptr<SoftVm> vm(new SoftVm());
  vm->options_ = std::move(options);
  vm->options_.memory_bytes = memory->size();
  vm->writes_ = WritesIn(memory->data());
  vm->memory_ = std::move(memory);
  auto disk = vmm::BlockDevice::Open(disk_path);
  if (!disk.ok()) return nullptr;
  vm->disk_ = std::move(*disk);
  return vm;
}

SoftVm::~SoftVm() { StopWriter(); }

void SoftVm::StopWriter() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
}

std::unique_ptr<vmm::GuestMemory> SoftVm::TakeMemory() {
  StopWriter();
  return std::move(memory_);
}

absl::Status SoftVm::Start() {
  thread_ = std::thread([this] { Run(); });
  return absl::OkStatus();
}

void SoftVm::FillWithNoise() {
  std::vector<uint8_t> noise(memory_->size() - vmm::kPageSize);
  uint64_t x = 0x9e3779b97f4a7c15ull;
  for (size_t i = 0; i + 8 <= noise.size(); i += 8) {
    Next(x);
    std::memcpy(noise.data() + i, &x, sizeof(x));
  }
  // Between two of the writer's writes, as a guest's own writes would be: the block device it
  // drives reads the pages this overwrites.
  std::lock_guard<std::mutex> lock(mu_);
  memory_->Write(vmm::kPageSize, noise.data(), noise.size());
}

void SoftVm::WriteAsGuest(uint64_t gpa, const void* src, uint64_t len) {
  std::unique_lock<std::mutex> lock(mu_);
  cv_.wait(lock, [this] { return !paused_ || stop_; });
  memory_->Write(gpa, src, len);
}

uint64_t SoftVm::WritesIn(const uint8_t* memory) {
  uint64_t n;
  std::memcpy(&n, memory, sizeof(n));
  return n;
}

void SoftVm::Run() {
  uint64_t rng = options_.seed | 1;
  auto next = std::chrono::steady_clock::now();
  std::unique_lock<std::mutex> lock(mu_);
  while (!stop_) {
    for (uint64_t i = 0; i < options_.writes_per_ms && !stop_; i++) {
      cv_.wait(lock, [this] { return !paused_ || stop_; });
      if (!stop_) WriteOnce(rng);
    }
    next += std::chrono::milliseconds(1);
    cv_.wait_until(lock, next, [this] { return stop_; });  // paces the workload
  }
}

void SoftVm::WriteOnce(uint64_t& rng) {
  uint64_t n = writes_.load() + 1;
  uint64_t page = RML_WORKLOAD_GPA / vmm::kPageSize + Next(rng) % options_.working_set_pages;
  uint64_t offset = (Next(rng) % (vmm::kPageSize / 8)) * 8;
  memory_->Write(page * vmm::kPageSize + offset, &n, sizeof(n));
  if (options_.disk_write_every && n % options_.disk_write_every == 0) {
    uint64_t sectors = disk_->sectors();
    rml_block_cmd cmd{RML_BLOCK_WRITE, 1, Next(rng) % sectors, 0, 0};
    uint8_t sector[RML_SECTOR_SIZE];
    std::memset(sector, static_cast<int>(n & 0xff), sizeof(sector));
    std::memcpy(sector, &n, sizeof(n));
    memory_->Write(RML_BLOCK_BUF_GPA, sector, sizeof(sector));
    memory_->Write(RML_BLOCK_CMD_GPA, &cmd, sizeof(cmd));
    if (!disk_->OnDoorbell(*memory_).ok()) std::abort();  // a host I/O failure in a test
  }
  memory_->Write(0, &n, sizeof(n));
  writes_.store(n);
  if (options_.output_every && n % options_.output_every == 0 && options_.output) {
    options_.output(n);
  }
}

absl::Status SoftVm::Pause() {
  std::lock_guard<std::mutex> lock(mu_);  // the writer is between two writes
  paused_ = true;
  return absl::OkStatus();
}

absl::Status SoftVm::Resume() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    paused_ = false;
  }
  cv_.notify_all();
  return absl::OkStatus();
}

absl::StatusOr<vmm::DirtyBitmap> SoftVm::HarvestDirty() { return memory_->TakeMonitorDirty(); }

absl::StatusOr<pb::VmSnapshot> SoftVm::SaveState() {
  pb::VmSnapshot s;
  s.set_format_version(vmm::kSnapshotFormatVersion);
  s.set_memory_bytes(memory_->size());
  s.set_disk_bytes(disk_->sectors() * RML_SECTOR_SIZE);
  uint64_t n = writes_.load();
  s.add_vcpus();  // no platform: a software VM cannot be resumed by a monitor
  s.mutable_devices()->mutable_idle()->set_idle_exits(n);
  *s.mutable_devices()->mutable_block() = disk_->Save();
  return s;
}

}  // namespace romulus::testing
