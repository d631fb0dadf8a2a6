// Reading the ledger journal back from a disk image, to check it against the ledger in memory.
#ifndef ROMULUS_VMM_JOURNAL_H_
#define ROMULUS_VMM_JOURNAL_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace romulus::vmm {

struct JournalReplay {
  uint64_t journal_id = 0;
  uint64_t records = 0;
  uint64_t last_seq = 0;
  std::vector<int64_t> balances;  // by account, as the journal's transactions leave them
};

// Replays every valid record in order; stops at the first record that is not the next one.
absl::StatusOr<JournalReplay> ReplayJournal(const std::string& disk_path);

}  // namespace romulus::vmm

#endif  // ROMULUS_VMM_JOURNAL_H_
