#!/usr/bin/env bash
# Instructions per replicated write and per session create, counted with valgrind's callgrind:
# a figure that does not depend on the machine's load, to compare before and after a change.
#
#   scripts/bench-instructions.sh [-n COUNT]
#
# For each figure the bench binary runs twice under callgrind, once doing nothing after its
# fixed set-up and warm-up (COUNT = 0) and once doing COUNT operations one after another; the
# difference divided by COUNT is the cost of one operation, everything in the process counted:
#   replicated write  `cargo bench --bench ha -- count`: SessionPut over master A's Unix socket,
#                     HA ack mode, SQLite FULL; both masters and the client run in the process,
#                     so the figure is A + B + client for one write applied on both.
#   create            `cargo bench --bench broker -- count`: a login that creates a session on a
#                     no-op agent through one master; master, agent and client in the process.
# Timers that run while the process runs (heartbeats, reconciliation) are counted too; they add
# a little per wall-clock second, and a run under callgrind is some 50 times slower than without.
# Needs valgrind and jq. Prints one line per figure; results go in docs/benchmarks.md.
set -euo pipefail

N=2000
while getopts "n:h" opt; do
    case $opt in
        n) N=$OPTARG ;;
        *) sed -n '2,19p' "$0"; exit 2 ;;
    esac
done
cd "$(dirname "$0")/.."
command -v valgrind >/dev/null || { echo "bench-instructions: valgrind is missing (apt-get install valgrind)" >&2; exit 1; }
command -v jq >/dev/null || { echo "bench-instructions: jq is missing (apt-get install jq)" >&2; exit 1; }

bin_of() {
    cargo bench --no-run --bench "$1" --message-format=json 2>/dev/null |
        jq -r "select(.reason == \"compiler-artifact\" and .target.name == \"$1\" and .executable != null) | .executable" |
        tail -1
}

TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

# total_ir BIN COUNT: instructions executed by the whole process.
total_ir() {
    local bin=$1 n=$2 out=$TMP/cg.$RANDOM
    VSM_BENCH_COUNT=$n valgrind --tool=callgrind --callgrind-out-file="$out" "$bin" count --bench \
        >"$TMP/log" 2>&1 || { cat "$TMP/log" >&2; echo "bench-instructions: $bin failed" >&2; exit 1; }
    awk '/^(summary|totals):/ { print $2; exit }' "$out"
}

for spec in "ha:replicated write" "broker:create"; do
    bench=${spec%%:*} what=${spec#*:}
    bin=$(bin_of "$bench")
    [ -x "$bin" ] || { echo "bench-instructions: no bench binary for $bench" >&2; exit 1; }
    base=$(total_ir "$bin" 0)
    full=$(total_ir "$bin" "$N")
    per=$(( (full - base) / N ))
    printf '%s: %d instructions each (%d operations; %d with them, %d without)\n' "$what" "$per" "$N" "$full" "$base"
done
