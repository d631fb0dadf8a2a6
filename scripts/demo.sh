#!/usr/bin/env bash
# The main job, on this machine: a mirror, a primary running the reference guest (ledger and a
# memory workload) replicated every epoch, and ledger clients, all on loopback. Live status, a
# summary, then the mirror's replica is resumed as a VM and checked against what clients saw.
# Options are passed to `romulus demo` (see `romulus demo --help`; --json for one JSON object).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh >&2
cmake -S . -B build-release -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build build-release -j"$(nproc)" --target romulus >/dev/null
exec build-release/cli/romulus demo "$@"
