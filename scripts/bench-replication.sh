#!/usr/bin/env bash
# Replicated-write comparison on loopback: the same small session row committed on node A and
# applied on node B before the writer is answered, for vsm (two vsmserver, HA ack mode),
# PostgreSQL 15 (synchronous standby, synchronous_commit=remote_apply) and Redis 7
# (SET + WAIT 1 0 pipelined, no persistence), all from benches/replication.rs.
#
# Also measured, for reading the figures: "echo", a 64-byte loopback TCP round trip through the
# same driver (the floor on this machine at this moment), and "pgbench", the same PostgreSQL
# upsert driven by pgbench -M prepared (libpq), to show what the driver itself costs.
#
# All systems run at the same time and the runs are interleaved (round 1: every system, every
# writer count; round 2: ...), so load from other users of the machine hits all of them alike.
#
# Usage: scripts/bench-replication.sh [--only echo,pg,redis,vsm] [--runs 3] [--writers "1 16"]
#                                     [--duration 10] [--warmup 2] [--vsm-sync "full normal"]
#                                     [--tmpdir /tmp] [--no-pgbench] [--no-install] [--keep-logs]
# --vsm-sync lists /vsmserver/db_synchronous values, one pair of masters each; an entry DB:async
# runs that pair with /HA/sync=async (answered before the peer has the write: not a replicated
# write, only for finding where the time goes; it gets no ratio). An entry DB@BINARY runs that
# pair with another vsmserver binary (a copy built from another tree), so two builds are
# compared in one interleaved run: --vsm-sync "full full@/tmp/vsmserver-before".
# --tmpdir holds every data directory (default /tmp); on a tmpfs such as /dev/shm no fsync
# reaches a disk, which takes disk noise out of the comparison (and durability with it).
# Needs root (installs Debian packages, runs PostgreSQL as the postgres user).
# Everything it starts it stops on exit; its temporary directory is removed.
# Prints every run (JSON + human line), then medians of each figure and vsm's ratio to the others.
# "cpu us" is the CPU time (user and system, all cores) the whole machine spent per write over
# the measured window, "driver" the part of it spent by the benchmark's own writer process.
set -euo pipefail

ONLY="echo,pg,redis,vsm"
RUNS=3
WRITERS="1 16"
DURATION=10
WARMUP=2
VSM_SYNC="full normal"
INSTALL=1
KEEP_LOGS=0
PGBENCH=1
TMPBASE=/tmp

while [ $# -gt 0 ]; do
    case "$1" in
        --only) ONLY="$2"; shift 2 ;;
        --runs) RUNS="$2"; shift 2 ;;
        --writers) WRITERS="$2"; shift 2 ;;
        --duration) DURATION="$2"; shift 2 ;;
        --warmup) WARMUP="$2"; shift 2 ;;
        --vsm-sync) VSM_SYNC="$2"; shift 2 ;;
        --no-install) INSTALL=0; shift ;;
        --no-pgbench) PGBENCH=0; shift ;;
        --keep-logs) KEEP_LOGS=1; shift ;;
        --tmpdir) TMPBASE="$2"; shift 2 ;;
        -h|--help) sed -n '2,28p' "$0"; exit 0 ;;
        *) echo "bench-replication: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done

want() { case ",$ONLY," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }

# Ports below 32768 (the ephemeral range may hold TIME_WAIT sockets from earlier runs).
PG_PRIMARY_PORT=15432
PG_STANDBY_PORT=15433
REDIS_MASTER_PORT=16379
REDIS_REPLICA_PORT=16380
# vsm pair number i (one per --vsm-sync value): node a API 19100+20i, HA 19101+20i, HTTP
# 19102+20i; node b API 19110+20i, HA 19111+20i, HTTP 19112+20i.
VSM_PORT_BASE=19100

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"

if [ "$(id -u)" != 0 ]; then
    echo "bench-replication: must run as root (apt-get, runuser -u postgres)" >&2
    exit 1
fi

TMP="$(mktemp -d "$TMPBASE/vsm-bench-repl.XXXXXX")"
chmod 755 "$TMP"
RESULTS="$TMP/results.jsonl"
: >"$RESULTS"
PIDS=()
PG_BIN=/usr/lib/postgresql/15/bin
PG_DIRS=()
SYSTEMS=() # "target|addr|label|extra driver flag", in run order

log() { printf '== %s\n' "$*" >&2; }

cleanup() {
    local rc=$?
    set +e
    for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
        kill "${PIDS[$i]}" 2>/dev/null
    done
    for p in "${PIDS[@]}"; do
        # Wait (bounded) for each one we started, then insist.
        for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$p" 2>/dev/null
        wait "$p" 2>/dev/null
    done
    for ((i = ${#PG_DIRS[@]} - 1; i >= 0; i--)); do
        runuser -u postgres -- "$PG_BIN/pg_ctl" -D "${PG_DIRS[$i]}" -m fast -w -t 20 stop >/dev/null 2>&1 ||
            runuser -u postgres -- "$PG_BIN/pg_ctl" -D "${PG_DIRS[$i]}" -m immediate -w stop >/dev/null 2>&1
    done
    if [ "$KEEP_LOGS" = 1 ]; then
        mkdir -p "$ROOT/target/bench-replication-logs"
        cp "$TMP"/*.log "$TMP"/pglog/*.log "$RESULTS" "$ROOT/target/bench-replication-logs/" 2>/dev/null
        echo "logs kept in target/bench-replication-logs" >&2
    fi
    rm -rf "$TMP"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# wait_for DESCRIPTION SECONDS COMMAND...: polls COMMAND every 0.1 s until it succeeds.
wait_for() {
    local what="$1" secs="$2"
    shift 2
    local deadline=$((SECONDS + secs))
    until "$@" >/dev/null 2>&1; do
        if [ "$SECONDS" -ge "$deadline" ]; then
            echo "bench-replication: timed out after ${secs}s waiting for $what" >&2
            return 1
        fi
        sleep 0.1
    done
}

# quiet LOG COMMAND...: runs COMMAND with its output in LOG; on failure shows LOG and stops.
quiet() {
    local logf="$1"
    shift
    if ! "$@" >"$logf" 2>&1; then
        cat "$logf" >&2
        echo "bench-replication: failed: $*" >&2
        exit 1
    fi
}

load1() { cut -d' ' -f1 /proc/loadavg; }

port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
ports=()
want pg && ports+=($PG_PRIMARY_PORT $PG_STANDBY_PORT)
want redis && ports+=($REDIS_MASTER_PORT $REDIS_REPLICA_PORT)
if want vsm; then
    i=0
    for _ in $VSM_SYNC; do
        b=$((VSM_PORT_BASE + 20 * i))
        ports+=($b $((b + 1)) $((b + 2)) $((b + 10)) $((b + 11)) $((b + 12)))
        i=$((i + 1))
    done
fi
for p in "${ports[@]}"; do
    if ! port_free "$p"; then
        echo "bench-replication: port $p on 127.0.0.1 is already in use" >&2
        exit 1
    fi
done

# ---------------------------------------------------------------- packages and binaries
if [ "$INSTALL" = 1 ]; then
    pkgs=()
    if want pg && [ ! -x "$PG_BIN/postgres" ]; then pkgs+=(postgresql-15); fi
    if want redis && ! command -v redis-server >/dev/null; then pkgs+=(redis-server); fi
    if ! command -v jq >/dev/null; then pkgs+=(jq); fi
    if [ ${#pkgs[@]} -gt 0 ]; then
        log "installing ${pkgs[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${pkgs[@]}" >"$TMP/apt.log" 2>&1 ||
            { cat "$TMP/apt.log" >&2; exit 1; }
    fi
fi

log "building the bench driver (release)"
BENCH_EXE="$(cargo bench --bench replication --no-run --message-format=json 2>"$TMP/build.log" |
    jq -r 'select(.reason == "compiler-artifact" and .target.name == "replication"
        and (.target.kind | index("bench"))) | .executable // empty' | tail -n 1)"
if [ -z "$BENCH_EXE" ] || [ ! -x "$BENCH_EXE" ]; then
    cat "$TMP/build.log" >&2
    echo "bench-replication: building benches/replication.rs failed" >&2
    exit 1
fi
if want vsm; then
    log "building vsmserver, tl-config, tlctl (release)"
    quiet "$TMP/vsm-build.log" cargo build --release --bin vsmserver --bin tl-config --bin tlctl
    if ! target/release/vsmserver --help | grep -q -- '--peer-addr'; then
        echo "bench-replication: vsmserver has no --peer-addr flag; two masters cannot find each other on one host" >&2
        exit 1
    fi
fi

# ---------------------------------------------------------------- PostgreSQL
pg_sync_standby() {
    [ "$(runuser -u postgres -- "$PG_BIN/psql" -h 127.0.0.1 -p $PG_PRIMARY_PORT -U postgres -Atc \
        "SELECT count(*) FROM pg_stat_replication WHERE sync_state = 'sync' AND state = 'streaming'")" -ge 1 ]
}

setup_pg() {
    local p="$TMP/pg-primary" s="$TMP/pg-standby"
    log "PostgreSQL: initdb, primary on $PG_PRIMARY_PORT, synchronous standby on $PG_STANDBY_PORT"
    install -d -m 700 -o postgres -g postgres "$p" "$s" "$TMP/pgsock" "$TMP/pglog"
    quiet "$TMP/pg-initdb.log" runuser -u postgres -- "$PG_BIN/initdb" -D "$p" -A trust -U postgres
    cat >>"$p/postgresql.conf" <<EOF
listen_addresses = '127.0.0.1'
port = $PG_PRIMARY_PORT
unix_socket_directories = '$TMP/pgsock'
wal_level = replica
max_wal_senders = 4
synchronous_commit = remote_apply
synchronous_standby_names = 'FIRST 1 (standby1)'
max_connections = 100
EOF
    PG_DIRS+=("$p")
    quiet "$TMP/pg-ctl.log" runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$p" -l "$TMP/pglog/pg-primary.log" -w start
    quiet "$TMP/pg-basebackup.log" runuser -u postgres -- "$PG_BIN/pg_basebackup" -h 127.0.0.1 \
        -p $PG_PRIMARY_PORT -U postgres -D "$s" -R -X stream
    cat >>"$s/postgresql.conf" <<EOF
port = $PG_STANDBY_PORT
cluster_name = 'standby1'
EOF
    PG_DIRS+=("$s")
    quiet "$TMP/pg-ctl.log" runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$s" -l "$TMP/pglog/pg-standby.log" -w start
    wait_for "the PostgreSQL standby to stream synchronously" 30 pg_sync_standby
    SYSTEMS+=("pg|127.0.0.1:$PG_PRIMARY_PORT|pg-remote_apply")
    [ "$PGBENCH" = 1 ] && SYSTEMS+=("pgbench|127.0.0.1:$PG_PRIMARY_PORT|pgbench-libpq")
    return 0
}

# The driver's upsert, for pgbench; ids rotate over 1000 per client like the driver's.
PGBENCH_SQL="\\set id :client_id * 1000 + random(0, 999)
INSERT INTO sessions (id, username, subcluster, agent, agent_address, display, vnc_port, status,
  created_ms, last_connect_ms, last_client_address, pid, geometry)
VALUES ('pgbench' || :id, 'user0001', 'default', 'agent2.example.org', '10.0.0.12', 42, 5942,
  'running', 1763780000000, 1763780000000, '192.0.2.17', 4042, '1920x1080')
ON CONFLICT (id) DO UPDATE SET username = EXCLUDED.username, subcluster = EXCLUDED.subcluster,
  agent = EXCLUDED.agent, agent_address = EXCLUDED.agent_address, display = EXCLUDED.display,
  vnc_port = EXCLUDED.vnc_port, status = EXCLUDED.status, created_ms = EXCLUDED.created_ms,
  last_connect_ms = EXCLUDED.last_connect_ms, last_client_address = EXCLUDED.last_client_address,
  pid = EXCLUDED.pid, geometry = EXCLUDED.geometry;"

# run_pgbench WRITERS: the same upsert through pgbench (libpq, -M prepared); latencies from its
# per-transaction log, warm-up transactions dropped. The sessions table exists: the driver's pg
# run creates it first.
run_pgbench() {
    local w="$1" dir="$TMP/pgbench" total n l0
    printf '%s\n' "$PGBENCH_SQL" >"$TMP/upsert.sql"
    total="$(awk -v a="$WARMUP" -v b="$DURATION" 'BEGIN { printf "%d", a + b + 0.999 }')"
    rm -rf "$dir"
    mkdir -p "$dir"
    l0="$(load1)"
    quiet "$TMP/pgbench.log" "$PG_BIN/pgbench" -n -M prepared -f "$TMP/upsert.sql" -c "$w" -j "$w" \
        -T "$total" -l --log-prefix "$dir/tx" -h 127.0.0.1 -p $PG_PRIMARY_PORT -U postgres postgres
    # Log columns: client, tx, latency_us, script, epoch_s, epoch_us (completion time).
    cat "$dir"/tx.* | awk '{ printf "%d.%06d %d\n", $5, $6, $3 }' | sort -g >"$dir/lat"
    awk -v warm="$WARMUP" 'NR == 1 { t0 = $1 - $2 / 1e6 } $1 - $2 / 1e6 >= t0 + warm { print $2 }' \
        "$dir/lat" | sort -n >"$dir/kept"
    n="$(wc -l <"$dir/kept")"
    if [ "$n" -eq 0 ]; then
        echo "bench-replication: pgbench logged no transaction after the warm-up" >&2
        exit 1
    fi
    pct() { awk -v q="$1" -v n="$n" 'BEGIN { k = int(q * n); if (k < q * n) k++; if (k < 1) k = 1 } NR == k { print $1; exit }' "$dir/kept"; }
    jq -cn --argjson n "$n" --argjson w "$w" --argjson d "$DURATION" --argjson warm "$WARMUP" \
        --argjson p50 "$(pct 0.5)" --argjson p99 "$(pct 0.99)" --argjson p999 "$(pct 0.999)" \
        --argjson l0 "$l0" --argjson l1 "$(load1)" \
        '{target: "pgbench", label: "pgbench-libpq", writers: $w, duration_s: $d, warmup_s: $warm,
          n: $n, writes_per_s: (($n / $d) * 10 | round / 10), p50_us: $p50, p99_us: $p99,
          p999_us: $p999, loadavg_start: $l0, loadavg_end: $l1,
          setup: "pgbench -M prepared (libpq), same upsert, same server"}' >"$TMP/run.out"
    jq -r '"pgbench writers=\(.writers)  \(.writes_per_s) writes/s  p50 \(.p50_us) us  p99 \(.p99_us) us  p999 \(.p999_us) us  n=\(.n) load \(.loadavg_start)->\(.loadavg_end)"' \
        "$TMP/run.out" >>"$TMP/run.out"
    rm -rf "$dir"
}

# ---------------------------------------------------------------- Redis
redis_replicated() {
    redis-cli -h 127.0.0.1 -p $REDIS_MASTER_PORT INFO replication | grep -q '^connected_slaves:1' &&
        redis-cli -h 127.0.0.1 -p $REDIS_REPLICA_PORT INFO replication | grep -q '^master_link_status:up'
}

setup_redis() {
    log "Redis: master on $REDIS_MASTER_PORT, replica on $REDIS_REPLICA_PORT, no persistence"
    mkdir -p "$TMP/redis-master" "$TMP/redis-replica"
    local common=(--bind 127.0.0.1 --protected-mode no --save '' --appendonly no --daemonize no
        --repl-diskless-sync yes --repl-diskless-sync-delay 0)
    redis-server "${common[@]}" --port $REDIS_MASTER_PORT --dir "$TMP/redis-master" \
        >"$TMP/redis-master.log" 2>&1 &
    PIDS+=($!)
    wait_for "the Redis master" 10 redis-cli -h 127.0.0.1 -p $REDIS_MASTER_PORT PING
    redis-server "${common[@]}" --port $REDIS_REPLICA_PORT --dir "$TMP/redis-replica" \
        --replicaof 127.0.0.1 $REDIS_MASTER_PORT >"$TMP/redis-replica.log" 2>&1 &
    PIDS+=($!)
    wait_for "the Redis replica to sync" 30 redis_replicated
    SYSTEMS+=("redis|127.0.0.1:$REDIS_MASTER_PORT|redis-wait")
}

# ---------------------------------------------------------------- vsm
vsm_ready() {
    "$ROOT/target/release/tlctl" --socket "$1" ha check
}

# setup_vsm: one pair of masters per --vsm-sync value, HA in ack mode, both on this host.
setup_vsm() {
    local entry sync ha label i=0 node
    head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$TMP/ha.key"
    head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$TMP/cluster.key"
    chmod 600 "$TMP/ha.key" "$TMP/cluster.key"
    for entry in $VSM_SYNC; do
        local bin="target/release/vsmserver"
        case "$entry" in *@*) bin="${entry#*@}" entry="${entry%%@*}" ;; esac
        if [ ! -x "$bin" ]; then
            echo "bench-replication: --vsm-sync names $bin, which is not an executable file" >&2
            exit 2
        fi
        sync="${entry%%:*}" ha=ack label="vsm-sync_${entry%%:*}"
        case "$entry" in *:*) ha="${entry#*:}" label="$label-ha_$ha" ;; esac
        [ "$bin" = target/release/vsmserver ] || label="$label-bin_$(basename "$bin")"
        local base=$((VSM_PORT_BASE + 20 * i))
        for node in a b; do
            local dir="$TMP/vsm-$i-$node" api=$base peer=$((base + 11))
            if [ "$node" = b ]; then api=$((base + 10)) peer=$((base + 1)); fi
            mkdir -p "$dir/conf" "$dir/data"
            # The two masters are "vsm-a" and "vsm-b"; /HA/local_node says which one this is,
            # --peer-addr where the other one listens (both live on this host).
            quiet "$TMP/tl-config-$i-$node.log" target/release/tl-config --config-dir "$dir/conf" \
                /HA/enabled=true "/HA/nodes=vsm-a vsm-b" "/HA/local_node=vsm-$node" \
                /HA/port=$((api + 1)) "/HA/secret_file=$TMP/ha.key" "/HA/sync=$ha" \
                /vsmserver/listen_port=$api /vsmserver/http_port=$((api + 2)) \
                "/vsmserver/socket_path=$dir/vsmserver.sock" \
                "/vsmserver/data_dir=$dir/data" "/vsm/secret_file=$TMP/cluster.key" \
                "/vsmserver/db_synchronous=$sync" \
                "/vsmserver/session_startup_dir=$dir/startup.d" \
                "/vsmserver/session_reconnect_dir=$dir/reconnect.d" \
                /subclusters/default/agents=agent1.invalid
            "$bin" --config-dir "$dir/conf" --peer-addr "127.0.0.1:$peer" \
                >"$TMP/vsm-$i-$node.log" 2>&1 &
            PIDS+=($!)
        done
        log "vsm: two masters on loopback (ports $base..$((base + 12))), HA sync=$ha, db_synchronous=$sync"
        local sock="$TMP/vsm-$i-a/vsmserver.sock"
        if ! wait_for "vsm master a ($label) to be ready" 60 vsm_ready "$sock"; then
            tail -n 20 "$TMP/vsm-$i-a.log" "$TMP/vsm-$i-b.log" >&2
            exit 1
        fi
        local extra=""
        [ "$ha" = ack ] || extra=--vsm-allow-async
        SYSTEMS+=("vsm|$sock|$label|$extra")
        i=$((i + 1))
    done
}

# ---------------------------------------------------------------- runs
# run_one TARGET ADDR LABEL EXTRA WRITERS: one measured run, its JSON line appended to $RESULTS.
run_one() {
    local target="$1" addr="$2" label="$3" extra="$4" w="$5"
    if [ "$target" = pgbench ]; then
        run_pgbench "$w"
    else
        "$BENCH_EXE" --target "$target" --addr "$addr" --writers "$w" \
            --duration "$DURATION" --warmup "$WARMUP" --label "$label" ${extra:+"$extra"} >"$TMP/run.out"
    fi
    cat "$TMP/run.out"
    if ! head -n 1 "$TMP/run.out" | jq -e .writes_per_s >/dev/null 2>&1; then
        echo "bench-replication: $label printed no result line" >&2
        exit 1
    fi
    head -n 1 "$TMP/run.out" >>"$RESULTS"
}

log "machine load before starting: $(cat /proc/loadavg); data in $TMP ($(stat -f -c %T "$TMP"))"
want echo && SYSTEMS+=("echo||loopback-echo")
want pg && setup_pg
want redis && setup_redis
if want vsm; then setup_vsm; else log "vsm skipped (--only $ONLY)"; fi

for r in $(seq "$RUNS"); do
    for w in $WRITERS; do
        for s in "${SYSTEMS[@]}"; do
            IFS='|' read -r target addr label extra <<<"$s"
            log "round $r of $RUNS: $label, $w writer(s) (load: $(cut -d' ' -f1-3 /proc/loadavg))"
            run_one "$target" "$addr" "$label" "$extra" "$w"
        done
    done
done

# ---------------------------------------------------------------- medians and ratios
median() { sort -g | awk '{ v[NR] = $1 } END { if (NR == 0) print "nan"; else if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
field() { jq -r --arg l "$1" --argjson w "$2" "select(.label == \$l and .writers == \$w) | .$3" "$RESULTS"; }

echo
echo "Replicated small-row writes on loopback, median of $RUNS runs of ${DURATION}s (after ${WARMUP}s warm-up)"
printf '%-26s %7s %12s %10s %10s %10s %9s %9s %14s\n' system writers "writes/s" "p50 us" "p99 us" "p999 us" \
    "cpu us" "driver" "load (min-max)"
LABELS="$(jq -r .label "$RESULTS" | awk '!seen[$0]++')"
declare -A RATE P99
for l in $LABELS; do
    for w in $WRITERS; do
        rate="$(field "$l" "$w" writes_per_s | median)"
        [ "$rate" = nan ] && continue
        RATE["$l/$w"]="$rate"
        P99["$l/$w"]="$(field "$l" "$w" p99_us | median)"
        loads="$(jq -r --arg l "$l" --argjson w "$w" 'select(.label == $l and .writers == $w) | .loadavg_start, .loadavg_end' "$RESULTS" |
            sort -g | awk 'NR == 1 { a = $1 } { b = $1 } END { printf "%.1f-%.1f", a, b }')"
        printf '%-26s %7s %12.0f %10.1f %10.1f %10.1f %9s %9s %14s\n' "$l" "$w" "$rate" \
            "$(field "$l" "$w" p50_us | median)" "${P99[$l/$w]}" "$(field "$l" "$w" p999_us | median)" \
            "$(field "$l" "$w" 'machine_cpu_us_per_write // empty' | median)" \
            "$(field "$l" "$w" 'driver_cpu_us_per_write // empty' | median)" "$loads"
    done
done
echo
for v in $LABELS; do
    case "$v" in *async*) continue ;; vsm*) ;; *) continue ;; esac
    for o in $LABELS; do
        case "$o" in vsm* | loopback-echo) continue ;; esac
        for w in $WRITERS; do
            [ -n "${RATE[$v/$w]:-}" ] && [ -n "${RATE[$o/$w]:-}" ] || continue
            awk -v a="${RATE[$v/$w]}" -v b="${RATE[$o/$w]}" -v pa="${P99[$v/$w]}" -v pb="${P99[$o/$w]}" \
                -v v="$v" -v o="$o" -v w="$w" \
                'BEGIN { printf "ratio %s / %s, %s writer(s): %.2fx writes/s, %.2fx p99\n", v, o, w, a / b, pa / pb }'
        done
    done
done
