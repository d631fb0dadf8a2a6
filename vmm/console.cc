#include "vmm/console.h"

#include "absl/strings/str_cat.h"
#include "guest/abi.h"

namespace romulus::vmm {

absl::Status Console::OnOut(const GuestMemory& mem, uint32_t len) {
  if (len > RML_PAGE_SIZE) {
    return absl::OutOfRangeError(absl::StrCat("console write of ", len, " bytes (max 4096)"));
  }
  const char* p = reinterpret_cast<const char*>(mem.data() + RML_CONSOLE_GPA);
  for (uint32_t i = 0; i < len; i++) {
    char c = p[i];
    if (c == '\n' || partial_.size() >= kMaxLine) {
      Emit();
      if (c == '\n') continue;
    }
    partial_.push_back(c >= 0x20 && c < 0x7f ? c : '?');
  }
  bytes_written_ += len;
  return absl::OkStatus();
}

void Console::Emit() {
  std::string line;
  line.swap(partial_);
  if (!sink_) return;
  if (!gate_) return sink_(line);
  gate_->Push([sink = sink_, line = std::move(line)] { sink(line); });
}

pb::ConsoleState Console::Save() const {
  pb::ConsoleState s;
  s.set_bytes_written(bytes_written_);
  return s;
}

}  // namespace romulus::vmm
