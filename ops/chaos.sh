#!/usr/bin/env bash
# The fault suite (tests/faults.rs) at a chosen size, repeated: real
# `agentledger serve` processes on real PostgreSQL under load, while nodes
# are killed with SIGKILL, a private PostgreSQL crashes and comes back,
# every service connection is cut, and a disk fills up. Each round prints
# what it injected and found; any loss, duplicate, gap or hang fails it.
#
#   ops/chaos.sh                          # 1,000 workflows per test, one round
#   ops/chaos.sh --workflows 200 --rounds 20   # run long: 20 rounds
#   ops/chaos.sh --cuts 10 -- -E 'test(kill)'  # after --: to cargo nextest
#
# The test command (ops/test.sh) runs the same tests with 120 workflows.
# Needs PostgreSQL at DATABASE_URL's server (default 127.0.0.1:5432,
# superuser, as for the tests), PostgreSQL's server binaries for the
# private cluster, and root for the loop-mounted full disk (the tests say
# when they skip a part). Figures of a run: docs/performance.md.
set -euo pipefail
cd "$(dirname "$0")/.."

workflows=1000
rounds=1
cuts=10
while [ $# -gt 0 ]; do
    case "$1" in
        --workflows) workflows="$2"; shift 2 ;;
        --rounds) rounds="$2"; shift 2 ;;
        --cuts) cuts="$2"; shift 2 ;;
        --) shift; break ;;
        -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
        *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
done

server="${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}"
if ! pg_isready -q -d "$server"; then
    echo "PostgreSQL is down; starting it"
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | sort -V | tail -1)" main start
    for _ in $(seq 1 30); do pg_isready -q -d "$server" && break; sleep 1; done
fi

run="chaos$$"
cleanup() {
    psql -d "$server" -Atqc "SELECT datname FROM pg_database WHERE datname LIKE 'agentledger_t_${run}_%'" \
        | while read -r db; do psql -d "$server" -qc "DROP DATABASE IF EXISTS $db WITH (FORCE)"; done
}
trap cleanup EXIT

cargo build --quiet --tests --bin agentledger
export DATABASE_URL="$server" AGENTLEDGER_TEST_RUN="$run"
export AGENTLEDGER_CHAOS_WORKFLOWS="$workflows" AGENTLEDGER_CHAOS_CUTS="$cuts"
for round in $(seq 1 "$rounds"); do
    echo "== round $round of $rounds: $workflows workflows per test, $cuts connection cuts"
    started=$(date +%s)
    # One test at a time: the figures are each fault's alone.
    cargo nextest run --test faults --test-threads 1 --no-capture --no-fail-fast "$@" 2>&1 \
        | grep --line-buffered -E '^(killed|database|connections|16 MB|a workflowProgress|[0-9]+ nodes|/ready|http)|PASS|FAIL|panicked|skipped:' \
        | grep --line-buffered -v 'WARN\|ERROR'
    status=${PIPESTATUS[0]}
    echo "== round $round: $(( $(date +%s) - started )) s, exit $status"
    [ "$status" -eq 0 ] || exit "$status"
done
