#!/usr/bin/env bash
# Restores a backup made by ops/backup.sh into an empty database, then
# proves the restored ledger unchanged against the digest signed before
# the backup (`agentledger verify --digest`).
#
#   ops/restore.sh [--unverified] BACKUP.dump TARGET_URL
#
# TARGET_URL: an empty database (create it first: createdb NAME), as the
# role that is to own the schema (the deployment's owner role, the one
# AGENTLEDGER_ADMIN_DATABASE_URL names), which must also be able to create
# the role agentledger_service if the cluster lacks it (CREATEROLE).
#
# Environment:
#   AGENTLEDGER_BIN         the agentledger binary (default: on PATH)
#   AGENTLEDGER_PUBLIC_KEY  the deployment's digest key (hex, from a copy kept
#                           outside the system): the digest is checked against
#                           it instead of the keys inside the dump, so that a
#                           dump, digest and sums forged together are refused
#
# The dump's .sha256 and .digest.json must lie beside it; --unverified
# restores without them (and says so).
#
# Afterwards point the service's DATABASE_URL at the restored database as
# agentledger_service, and give that role its password again if the
# cluster is new.
set -euo pipefail

unverified=false
if [[ ${1:-} == --unverified ]]; then
    unverified=true
    shift
fi
dump=${1:?usage: ops/restore.sh [--unverified] BACKUP.dump TARGET_URL}
url=${2:?usage: ops/restore.sh [--unverified] BACKUP.dump TARGET_URL}
bin=${AGENTLEDGER_BIN:-agentledger}
base=${dump%.dump}
command -v pg_restore >/dev/null || { echo "restore: pg_restore is not installed" >&2; exit 2; }
command -v "$bin" >/dev/null || { echo "restore: $bin not found (set AGENTLEDGER_BIN)" >&2; exit 2; }

for beside in "$base.sha256" "$base.digest.json"; do
    if [[ ! -f $beside ]] && ! $unverified; then
        echo "restore: $beside is missing: the dump cannot be checked (--unverified restores anyway)" >&2
        exit 1
    fi
done
if [[ -f $base.sha256 ]]; then
    echo "restore: checking $base.sha256"
    (cd "$(dirname "$base")" && sha256sum --check --quiet "$(basename "$base").sha256")
else
    echo "restore: WARNING: restoring without checking the dump's sums (--unverified)" >&2
fi

has_events=$(psql "$url" -XAtqc "SELECT to_regclass('public.events') IS NOT NULL")
if [[ $has_events == t ]]; then
    echo "restore: the target already holds a ledger (table events); restore into an empty database" >&2
    exit 1
fi

# The service role is cluster-wide; the dump's grants name it.
psql "$url" -Xqv ON_ERROR_STOP=1 <<'SQL'
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'agentledger_service') THEN
        CREATE ROLE agentledger_service LOGIN;
    END IF;
END
$$;
SQL

echo "restore: restoring $dump"
started=$SECONDS
# One transaction: a failure leaves the target as empty as it was. Objects
# belong to the restoring role (the owner); grants to the service role are
# kept. The service role owns subject_keys (it must VACUUM it when a
# subject is forgotten), which no grant in the dump says: hand it over as
# the migration did.
pg_restore --exit-on-error --single-transaction --no-owner --dbname="$url" "$dump"
psql "$url" -Xqv ON_ERROR_STOP=1 -c "ALTER TABLE subject_keys OWNER TO agentledger_service"
echo "restore: restored in $((SECONDS - started)) s"

if [[ -f $base.digest.json ]]; then
    echo "restore: verifying the ledger against $base.digest.json"
    key=()
    if [[ -n ${AGENTLEDGER_PUBLIC_KEY:-} ]]; then
        key=(--public-key "$AGENTLEDGER_PUBLIC_KEY")
    else
        echo "restore: AGENTLEDGER_PUBLIC_KEY is not set: the digest is checked against the keys inside the dump" >&2
    fi
    DATABASE_URL=$url "$bin" verify --digest "$base.digest.json" "${key[@]}"
else
    echo "restore: WARNING: no digest beside the dump (--unverified); checking the chains only" >&2
    DATABASE_URL=$url "$bin" verify
fi
