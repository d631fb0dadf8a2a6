#!/usr/bin/env bash
# The nemesis (nemesis/nemesis.h): a witness, a proxy and two hosts of one VM as `romulus`
# processes under ledger load, and a seeded random schedule of faults, round after round. Prints
# the schedule, a table of rounds and a last line
#   nemesis: N rounds, V violations, U unrecovered, seed S, platform P
# and exits non-zero when V > 0. The same seed draws the same schedule.
#   scripts/nemesis.sh --rounds N --seed S --platform kvm|process [romulus_nemesis options]
# Needs root for its network namespace (partitions); without, it runs with --no-network.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh >&2
# A fresh tree is made as the test command makes it (Ninja, libraries as unity builds); an
# existing one keeps its generator.
fresh=()
[[ -f build-release/CMakeCache.txt ]] || fresh=(-G Ninja -DROMULUS_UNITY_BUILD=ON)
cmake -S . -B build-release "${fresh[@]}" -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build build-release -j"$(nproc)" --target romulus romulus_nemesis >/dev/null
extra=()
[[ $(id -u) -eq 0 ]] || extra=(--no-network)
exec build-release/nemesis/romulus_nemesis "${extra[@]}" "$@"
