#!/usr/bin/env bash
# The project's one test command: formatting, lints and every test, against a
# real PostgreSQL. Starts PostgreSQL when it is down, runs the tests in a
# throwaway database (each test makes its own from it) and drops it after.
#
#   ops/test.sh                 # everything
#   ops/test.sh -E 'test(seam)' # extra arguments go to cargo nextest
set -euo pipefail
cd "$(dirname "$0")/.."

server="${AGENTLEDGER_TEST_SERVER:-postgres://postgres@127.0.0.1:5432/postgres}"

if ! pg_isready -q -d "$server"; then
    echo "PostgreSQL is down; starting it"
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | sort -V | tail -1)" main start
    for _ in $(seq 1 30); do pg_isready -q -d "$server" && break; sleep 1; done
    pg_isready -d "$server"
fi

# The alert rules' test needs promtool (Debian's prometheus package).
if ! command -v promtool >/dev/null 2>&1; then
    echo "promtool is missing; installing Debian's prometheus package"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null 2>&1 \
        || echo "could not install prometheus: the alert-rule test will say it skipped"
fi

# The console's browser test (tests/console.rs) drives Debian's Chromium,
# with a Korean font so Korean requests render in its screenshots.
if ! command -v chromium >/dev/null 2>&1 || ! fc-list : family 2>/dev/null | grep -i nanum >/dev/null; then
    echo "installing Chromium and a Korean font for the console's browser test"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium fonts-nanum >/dev/null 2>&1 \
        || echo "could not install chromium: the browser test will say it skipped"
fi
# The console's committed build (api/assets/console) must match its sources.
if command -v npm >/dev/null 2>&1; then
    (cd console && npm ci --no-fund --no-audit --loglevel=error && npm run --silent check)
else
    echo "npm is missing: the console's build check and browser test are skipped"
fi

run="r$$"
db="agentledger_test_${run}"
cleanup() {
    psql "$server" -qAtc "SELECT datname FROM pg_database WHERE datname LIKE 'agentledger\_t\_${run}\_%'" \
        | while read -r leftover; do psql "$server" -qc "DROP DATABASE IF EXISTS \"$leftover\" WITH (FORCE)"; done
    psql "$server" -qc "DROP DATABASE IF EXISTS $db WITH (FORCE)" || true
}
trap cleanup EXIT
psql "$server" -qc "CREATE DATABASE $db"
export DATABASE_URL="postgres://postgres@127.0.0.1:5432/${db}"
export AGENTLEDGER_TEST_RUN="$run"

cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --workspace --no-fail-fast "$@"
else
    cargo test --workspace --no-fail-fast
fi
# nextest does not run doc tests.
cargo test --workspace --doc
