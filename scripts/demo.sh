#!/usr/bin/env bash
# The main job, on this machine: the reference guest runs under the Romulus monitor and serves a
# ledger load; it is snapshotted, resumed in a fresh process, and serves again with every
# balance, sequence number and journal record intact.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cmake -S . -B build-release -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build build-release -j"$(nproc)" --target romulus >/dev/null
romulus=$PWD/build-release/cli/romulus

work=$(mktemp -d /tmp/romulus-demo.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

# Waits (at most 30 s) for the VM logging to $1 to print its ledger port.
ledger_port() {
  for _ in $(seq 300); do
    port=$(sed -n 's/.*ledger listening on 127\.0\.0\.1:\([0-9]*\).*/\1/p' "$1")
    [[ -n $port ]] && { echo "$port"; return 0; }
    sleep 0.1
  done
  echo "demo: the VM did not start; its log:" >&2; cat "$1" >&2; return 1
}

echo "== 1. boot the reference guest (256 MiB, workload 4096 pages at 20000 writes/s)"
"$romulus" vm --disk "$work/disk.img" --ledger-port 0 --snapshot-to "$work/snap" \
  >"$work/a.log" 2>&1 &
pids+=($!)
port=$(ledger_port "$work/a.log")
cat "$work/a.log"

echo "== 2. ledger load: 4 clients for 3 s"
"$romulus" load --target "127.0.0.1:$port" --clients 4 --duration-ms 3000

echo "== 3. snapshot (SIGUSR1) and stop"
kill -USR1 "${pids[0]}"
wait "${pids[0]}"
grep "snapshot" "$work/a.log"

echo "== 4. resume the snapshot in a fresh process"
"$romulus" vm --restore-from "$work/snap" --disk "$work/disk-restored.img" --ledger-port 0 \
  --progress-ms 1000 >"$work/b.log" 2>&1 &
pids+=($!)
port=$(ledger_port "$work/b.log")
grep -E "restored|listening" "$work/b.log"

echo "== 5. ledger load on the resumed VM: 4 clients for 3 s"
"$romulus" load --target "127.0.0.1:$port" --clients 4 --duration-ms 3000
kill -TERM "${pids[1]}"
wait "${pids[1]}"
grep -E "guest:|stopped" "$work/b.log" | tail -3

echo "== 6. the journal on the resumed VM's disk"
"$romulus" journal --disk "$work/disk-restored.img"
echo "demo: done"
