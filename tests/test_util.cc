#include "tests/test_util.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <thread>

namespace romulus::testing {

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

std::unique_ptr<vmm::Vm> BootTestVm(const TempDir& dir, vmm::WorkloadConfig workload) {
  vmm::VmConfig config;
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

Child::Child(const std::vector<std::string>& args) {
  int fds[2];
  if (::pipe2(fds, O_CLOEXEC) != 0) std::abort();
  pid_ = ::fork();
  if (pid_ == 0) {
    ::dup2(fds[1], 1);
    ::dup2(fds[1], 2);
    std::vector<char*> argv;
    std::string bin = ROMULUS_BINARY;
    argv.push_back(bin.data());
    for (const auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
    argv.push_back(nullptr);
    ::execv(bin.c_str(), argv.data());
    ::_exit(127);
  }
  ::close(fds[1]);
  out_fd_ = fds[0];
}

Child::~Child() {
  if (pid_ > 0 && Wait(0) == -1) {
    ::kill(pid_, SIGKILL);
    ::waitpid(pid_, nullptr, 0);
  }
  if (out_fd_ >= 0) ::close(out_fd_);
}

std::string Child::WaitForLine(const std::string& needle, double seconds) {
  auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(seconds);
  for (;;) {
    size_t nl;
    while ((nl = buffer_.find('\n')) != std::string::npos) {
      std::string line = buffer_.substr(0, nl);
      buffer_.erase(0, nl + 1);
      if (line.find(needle) != std::string::npos) return line;
    }
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
        deadline - std::chrono::steady_clock::now());
    if (left.count() <= 0) break;
    pollfd p{out_fd_, POLLIN, 0};
    if (::poll(&p, 1, static_cast<int>(left.count())) <= 0) continue;
    char buf[4096];
    ssize_t n = ::read(out_fd_, buf, sizeof(buf));
    if (n <= 0) break;  // the child closed its output
    buffer_.append(buf, static_cast<size_t>(n));
    output_.append(buf, static_cast<size_t>(n));
  }
  ADD_FAILURE() << "no line with '" << needle << "' within " << seconds << " s; output:\n"
                << output_;
  return "";
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

void Child::Signal(int sig) { ::kill(pid_, sig); }

int Child::Wait(double seconds) {
  if (pid_ <= 0) return -1;
  auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(seconds);
  for (;;) {
    int status = 0;
    pid_t r = ::waitpid(pid_, &status, WNOHANG);
    if (r == pid_) {
      pid_ = -1;
      // Keep what the child printed last.
      char buf[4096];
      ssize_t n;
      while ((n = ::read(out_fd_, buf, sizeof(buf))) > 0)
        output_.append(buf, static_cast<size_t>(n));
      return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    }
    if (std::chrono::steady_clock::now() >= deadline) return -1;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));  // polling a child's exit
  }
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
  int fd = ::socket(AF_INET, type, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof(a);
  EXPECT_EQ(::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)), 0);
  EXPECT_EQ(::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len), 0);
  ::close(fd);
  return ntohs(a.sin_port);
}

}  // namespace romulus::testing
