#!/usr/bin/env bash
# docs/grafana-dashboard.json uses only metrics that cli/metrics.cc exports (a histogram's
# _bucket, _sum and _count included), and every query in it is PromQL that promtool accepts.
# Usage: dashboard_test.sh SOURCE_DIR
set -euo pipefail
src=$1
dashboard=$src/docs/grafana-dashboard.json
fail() { echo "FAIL: $*" >&2; exit 1; }
command -v python3 >/dev/null || { echo "SKIP: needs python3"; exit 77; }
exprs=$(python3 -c 'import json,sys
d=json.load(open(sys.argv[1]))
for p in d["panels"]:
    for t in p["targets"]: print(t["expr"])' "$dashboard")
n=0
for metric in $(grep -oE 'romulus_[a-z_]+' <<<"$exprs" | sort -u); do
  base=$(sed -E 's/_(bucket|sum|count)$//' <<<"$metric")
  grep -qF "\"$metric\"" "$src/cli/metrics.cc" || grep -qF "\"$base\"" "$src/cli/metrics.cc" ||
    fail "the dashboard queries $metric, which cli/metrics.cc does not export"
  n=$((n + 1))
done
((n >= 30)) || fail "only $n metrics in the dashboard"
if command -v promtool >/dev/null; then
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  # Each query as a recording rule, the dashboard's variables matching everything.
  python3 -c 'import json,sys
d=json.load(open(sys.argv[1]))
print("groups:\n  - name: dashboard\n    rules:")
n=0
for p in d["panels"]:
    for t in p["targets"]:
        n+=1
        e=t["expr"].replace("$instance",".*").replace("$vm",".*")
        print("      - record: dashboard_query_%d\n        expr: %s" % (n, json.dumps(e)))' \
    "$dashboard" >"$work/rules.yml"
  promtool check rules "$work/rules.yml" >"$work/out" 2>&1 || { cat "$work/out"; fail "promtool refuses a query"; }
  echo "promtool: $(grep -c 'record:' "$work/rules.yml") queries parse"
else
  echo "promtool not installed: the queries' syntax was not checked"
fi
echo "the dashboard queries $n metrics, all exported by cli/metrics.cc"
echo "PASS"
