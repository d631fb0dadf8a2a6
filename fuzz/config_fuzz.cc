// What an operator's files and command lines hand to the loaders and parsers (cli/config.h and the
// text parsers the commands use). Input: a mode byte, then the text:
//   0: a primary config file (protobuf text format), 1: a mirror config file,
//   2: one value for each text parser (ADDR:PORT, HOST:PORT, compression, size) and a key file,
//   3: a command line (arguments split at NUL bytes) for an Args with every kind of option,
//   4: a proxy config file.
#include <cstdint>
#include <fstream>
#include <string>
#include <vector>

#include "cli/args.h"
#include "cli/config.h"
#include "cli/ledger_client.h"
#include "fuzz/fuzz_util.h"
#include "replicator/replicator.h"
#include "switchover/switchover.h"

namespace romulus::fuzz {
namespace {

// The loaders read files: one, rewritten for each input.
const std::string& WriteScratch(absl::string_view text) {
  static const std::string path = ScratchDir() + "/input";
  std::ofstream(path, std::ios::trunc | std::ios::binary).write(text.data(), text.size());
  return path;
}

void ParseCommandLine(absl::string_view text) {
  std::vector<std::string> words;
  for (size_t start = 0; start <= text.size() && words.size() < 64;) {
    size_t end = std::min(text.find('\0', start), text.size());
    words.emplace_back(text.substr(start, end - start));
    start = end + 1;
  }
  std::vector<char*> argv;
  for (std::string& w : words) argv.push_back(w.data());
  std::string listen = "0.0.0.0:7300", psk;
  uint64_t lease_ms = 150, size = 1 << 20;
  double seconds = 1;
  bool flag = false;
  cli::Args args("fuzz", "every kind of option");
  args.String("listen", &listen, "a string");
  args.String("psk-file", &psk, "a string");
  args.Uint("lease-ms", &lease_ms, "a whole number");
  args.Size("size", &size, "a size");
  args.Seconds("seconds", &seconds, "seconds");
  args.Bool("flag", &flag, "a flag");
  if (args.Parse(static_cast<int>(argv.size()), argv.data()).ok()) {
    (void)switchover::ParseEndpoint(listen);
    (void)args.Help();
  }
}

void Run(const uint8_t* data, size_t size) {
  if (size == 0) return;
  absl::string_view text(reinterpret_cast<const char*>(data) + 1, size - 1);
  switch (data[0] % 5) {
    case 0:
      (void)cli::LoadPrimaryConfig(WriteScratch(text));
      break;
    case 1:
      (void)cli::LoadMirrorConfig(WriteScratch(text));
      break;
    case 2: {
      std::string s(text);
      (void)switchover::ParseEndpoint(text);
      std::string host;
      uint16_t port;
      (void)cli::ParseHostPort(s, &host, &port);
      (void)replicator::ParseCompression(text);
      uint64_t bytes;
      (void)cli::ParseSize(s, &bytes);
      (void)replicator::ReadKeyFile(WriteScratch(text));
      break;
    }
    case 3:
      ParseCommandLine(text);
      break;
    default:
      (void)cli::LoadProxyConfig(WriteScratch(text));
      break;
  }
}

}  // namespace
}  // namespace romulus::fuzz

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  romulus::fuzz::QuietProtobuf();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  romulus::fuzz::Run(data, size);
  return 0;
}
