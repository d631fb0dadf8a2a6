#!/usr/bin/env bash
# The main job, on this machine: a witness and two hosts of one protected VM as `romulus`
# processes on loopback, and ledger clients. The primary is killed under load and the mirror
# takes over (act 1), the killed host returns as the mirror and is resynchronised by hash (act 2),
# and the VM migrates back to it (act 3); every answer the clients saw is checked each time.
# Options are passed to `romulus demo` (see `romulus demo --help`; --json for one JSON object).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh >&2
# A fresh tree is made as the test command makes it (Ninja, libraries as unity builds); an
# existing one keeps its generator.
fresh=()
[[ -f build-release/CMakeCache.txt ]] || fresh=(-G Ninja -DROMULUS_UNITY_BUILD=ON)
cmake -S . -B build-release "${fresh[@]}" -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build build-release -j"$(nproc)" --target romulus >/dev/null
exec build-release/cli/romulus demo "$@"
