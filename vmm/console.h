// Console device: the guest hands over a buffer of bytes; complete lines go to a sink, through
// the output gate when there is one (a line is output the outside world sees).
#ifndef ROMULUS_VMM_CONSOLE_H_
#define ROMULUS_VMM_CONSOLE_H_

#include <functional>
#include <string>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "proto/romulus.pb.h"
#include "vmm/guest_memory.h"
#include "vmm/output_gate.h"

namespace romulus::vmm {

class Console {
 public:
  using LineSink = std::function<void(absl::string_view line)>;
  explicit Console(LineSink sink, OutputGate* gate = nullptr)
      : sink_(std::move(sink)), gate_(gate) {}
  // The guest wrote `len` bytes at RML_CONSOLE_GPA.
  absl::Status OnOut(const GuestMemory& mem, uint32_t len);
  pb::ConsoleState Save() const;
  void Restore(const pb::ConsoleState& state) { bytes_written_ = state.bytes_written(); }

 private:
  static constexpr size_t kMaxLine = 4096;
  void Emit();
  LineSink sink_;
  OutputGate* gate_;
  std::string partial_;
  uint64_t bytes_written_ = 0;
};

}  // namespace romulus::vmm

#endif  // ROMULUS_VMM_CONSOLE_H_
