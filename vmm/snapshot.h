// The snapshot directory: state.pb (pb::VmSnapshot), memory.bin (raw guest RAM) and disk.img.
// Written to a temporary directory and renamed into place, so a snapshot is whole or absent.
#ifndef ROMULUS_VMM_SNAPSHOT_H_
#define ROMULUS_VMM_SNAPSHOT_H_

#include <string>

#include "absl/status/statusor.h"
#include "proto/romulus.pb.h"
#include "vmm/guest_memory.h"
#include "vmm/vmm.h"

namespace romulus::vmm {

std::string SnapshotMemoryPath(const std::string& dir);
// Reads and checks state.pb (version, sizes, shape). File contents are checked by the caller.
absl::StatusOr<pb::VmSnapshot> ReadSnapshot(const std::string& dir);
// The same without the shape of the vCPU state: for using only the memory and disk contents.
absl::StatusOr<pb::VmSnapshot> ReadSnapshotState(const std::string& dir);
// Verifies disk.img against its digest and copies it to `disk_path`.
absl::Status RestoreSnapshotDisk(const std::string& dir, const pb::VmSnapshot& state,
                                 const std::string& disk_path);

}  // namespace romulus::vmm

#endif  // ROMULUS_VMM_SNAPSHOT_H_
