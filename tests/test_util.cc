#include "tests/test_util.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>
#include <thread>

namespace romulus::testing {
namespace {

// ctest reads a test's output through a pipe, where stdout is fully buffered: a test killed at
// its timeout would show nothing it printed. Line by line, a hang shows how far it got.
[[maybe_unused]] const bool kStdoutLineBuffered = [] {
  return std::setvbuf(stdout, nullptr, _IOLBF, 0) == 0;
}();

}  // namespace

std::string ReadFile(const std::string& path) {
  std::ifstream in(path);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

TempDir::TempDir() {
  std::string tmpl = (std::filesystem::temp_directory_path() / "romulus-test-XXXXXX").string();
  char* p = ::mkdtemp(tmpl.data());
  if (!p) std::abort();
  path_ = p;
}

TempDir::~TempDir() {
  std::error_code ec;
  std::filesystem::remove_all(path_, ec);
}

std::vector<pb::Platform> TestPlatforms() {
  std::vector<pb::Platform> all = vmm::AvailablePlatforms();
  if (all.empty()) all.push_back(pb::PLATFORM_UNSPECIFIED);
  return all;
}

std::string PlatformTestName(const ::testing::TestParamInfo<pb::Platform>& info) {
  return info.param == pb::PLATFORM_UNSPECIFIED ? "none"
                                                : std::string(vmm::PlatformName(info.param));
}

double TimeScale() {
  static const double scale = [] {
    const char* env = std::getenv("ROMULUS_TEST_TIME_SCALE");
    double s = env ? std::atof(env) : 0;
    if (s > 0) return s;
#ifdef ROMULUS_SANITIZED
    return 4.0;
#else
    return 1.0;
#endif
  }();
  return scale;
}

std::string HandmadeImage(const std::string& code, uint64_t image_end) {
  rml_image_header h{};
  h.magic = RML_IMAGE_MAGIC;
  h.abi_version = RML_ABI_VERSION;
  h.header_bytes = sizeof(h);
  h.entry = RML_IMAGE_GPA + sizeof(h);
  h.image_end = image_end ? image_end : RML_IMAGE_GPA + sizeof(h) + code.size();
  return std::string(reinterpret_cast<const char*>(&h), sizeof(h)) + code;
}

void PlatformTest::SetUp() {
  if (GetParam() == pb::PLATFORM_UNSPECIFIED) {
    auto chosen = vmm::ChoosePlatform();
    GTEST_SKIP() << "needs a platform that runs VMs: " << chosen.status().message();
  }
}

int PlatformTest::LongRunHere(int n) const {
  std::vector<pb::Platform> all = vmm::AvailablePlatforms();
  bool beside_process =
      GetParam() == pb::KVM && std::find(all.begin(), all.end(), pb::PROCESS) != all.end();
  int rounds = LongRun(n);
  return beside_process ? std::max(rounds / 5, 1) : rounds;
}

std::unique_ptr<vmm::Vm> BootTestVm(pb::Platform platform, const TempDir& dir,
                                    vmm::WorkloadConfig workload) {
  vmm::VmConfig config;
  config.platform = platform;
  config.memory_bytes = 64ull << 20;
  config.disk_path = dir.File("disk.img");
  config.workload = workload;
  config.progress_ms = 0;
  config.max_accounts = 1024;
  EXPECT_TRUE(vmm::BlockDevice::CreateImage(config.disk_path, 8ull << 20).ok());
  auto vm = vmm::Vm::Boot(config);
  EXPECT_TRUE(vm.ok()) << vm.status();
  return vm.ok() ? std::move(*vm) : nullptr;
}

void RunGuestUntil(vmm::Vm& vm, uint64_t pages, double seconds) {
  auto deadline = std::chrono::steady_clock::now() + Scaled(seconds);
  while (vm.guest_status().workload_pages < pages && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(2));  // polling the guest's counter
  }
  ASSERT_GE(vm.guest_status().workload_pages, pages);
  ASSERT_TRUE(vm.Pause().ok());
}

Child::Child(const std::vector<std::string>& args) {
  auto p = cli::Process::Start(ROMULUS_BINARY, args);
  if (!p.ok()) {
    std::fprintf(stderr, "cannot start %s: %s\n", ROMULUS_BINARY,
                 std::string(p.status().message()).c_str());
    std::abort();
  }
  process_ = std::move(*p);
}

std::string Child::WaitForLine(const std::string& needle, double seconds) {
  auto line = process_->WaitForLine(
      needle, std::chrono::duration_cast<std::chrono::milliseconds>(Scaled(seconds)));
  if (line.ok()) return *line;
  ADD_FAILURE() << line.status().message() << "; output:\n" << process_->output();
  return "";
}

int Child::Wait(double seconds) {
  auto code =
      process_->Wait(std::chrono::duration_cast<std::chrono::milliseconds>(Scaled(seconds)));
  return code ? *code : -1;
}

std::string WaitForRestore(Child& vm, const std::string& platform, double seconds) {
  return vm.WaitForLine("romulus vm: platform " + platform + ": restored ", seconds);
}

std::string ProcStatusField(pid_t pid, const std::string& key) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/status");
  for (std::string line; std::getline(in, line);) {
    if (line.rfind(key + ":", 0) == 0) {
      size_t v = line.find_first_not_of(" \t", key.size() + 1);
      return v == std::string::npos ? "" : line.substr(v);
    }
  }
  return "";
}

DescriptorLimit::DescriptorLimit(pid_t pid) : pid_(pid) {
  std::set<int> open;
  std::error_code ec;
  for (const auto& e :
       std::filesystem::directory_iterator("/proc/" + std::to_string(pid) + "/fd", ec)) {
    open.insert(std::atoi(e.path().filename().c_str()));
  }
  EXPECT_FALSE(ec) << "cannot list the descriptors of " << pid << ": " << ec.message();
  while (open.count(limit_)) limit_++;
  struct rlimit low {};
  if (::prlimit(pid, RLIMIT_NOFILE, nullptr, &saved_) != 0) {
    ADD_FAILURE() << "prlimit " << pid << ": " << std::strerror(errno);
    return;
  }
  low.rlim_cur = static_cast<rlim_t>(limit_);
  low.rlim_max = saved_.rlim_max;
  if (::prlimit(pid, RLIMIT_NOFILE, &low, nullptr) != 0) {
    ADD_FAILURE() << "prlimit " << pid << ": " << std::strerror(errno);
    return;
  }
  lowered_ = true;
}

void DescriptorLimit::Restore() {
  if (!lowered_) return;
  lowered_ = false;
  EXPECT_EQ(::prlimit(pid_, RLIMIT_NOFILE, &saved_, nullptr), 0) << std::strerror(errno);
}

std::string Field(const std::string& line, const std::string& key) {
  std::string k = " " + key + "=";
  size_t at = line.find(k);
  if (at == std::string::npos) return "";
  at += k.size();
  return line.substr(at, line.find(' ', at) - at);
}

uint64_t UintField(const std::string& line, const std::string& key) {
  std::string v = Field(line, key);
  EXPECT_FALSE(v.empty()) << "no " << key << "= in: " << line;
  return v.empty() ? 0 : std::stoull(v);
}

uint16_t ListeningPort(const std::string& line) {
  size_t colon = line.rfind(':');
  EXPECT_NE(colon, std::string::npos) << line;
  return colon == std::string::npos ? 0 : static_cast<uint16_t>(std::stoi(line.substr(colon + 1)));
}

void PauseDigests::Watch(checkpoint::EpochEngine& engine, vmm::CheckpointableVm& vm,
                         uint64_t disk_bytes) {
  engine.SetPauseHook([this, &vm, disk_bytes](const checkpoint::Checkpoint& c) {
    uint64_t m = vm.memory().Digest();
    uint64_t d = *vmm::FileDigest(vm.disk().fd(), disk_bytes);
    std::lock_guard<std::mutex> lock(mu_);
    at_pause_[c.epoch] = {m, d};
  });
}

void PauseDigests::ExpectReplicaMatches(replicator::Mirror& mirror) {
  uint64_t memory = 0, disk = 0;
  int64_t epoch = -1;
  mirror.WithReplica([&](checkpoint::ReplicaStore& r) {
    epoch = r.committed_epoch();
    memory = r.MemoryDigest();
    disk = *r.DiskDigest();
  });
  ASSERT_GE(epoch, 0);
  std::lock_guard<std::mutex> lock(mu_);
  auto it = at_pause_.find(static_cast<uint64_t>(epoch));
  ASSERT_NE(it, at_pause_.end());
  EXPECT_EQ(memory, it->second.first) << "epoch " << epoch;
  EXPECT_EQ(disk, it->second.second) << "epoch " << epoch;
}

uint16_t FreePort(int type) {
  auto port = cli::FreePort(type);
  EXPECT_TRUE(port.ok()) << port.status();
  return port.ok() ? *port : 0;
}

pb::LedgerRequest LedgerRequest(uint64_t client, uint64_t id, pb::LedgerOp op, uint32_t account,
                                int64_t amount) {
  pb::LedgerRequest q;
  q.set_client_id(client);
  q.set_request_id(id);
  q.set_op(op);
  q.set_account(account);
  q.set_amount(amount);
  return q;
}

}  // namespace romulus::testing
