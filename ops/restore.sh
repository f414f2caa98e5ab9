#!/usr/bin/env bash
# Restores a backup made by ops/backup.sh into an empty database, then
# proves the restored ledger unchanged against the digest signed before
# the backup (`agentledger verify --digest`).
#
#   ops/restore.sh BACKUP.dump TARGET_URL
#
# TARGET_URL: an empty database (create it first: createdb NAME), as a role
# that may create objects in it and, if the cluster lacks it, the role
# agentledger_service (a superuser, or the database owner with CREATEROLE).
# Environment: AGENTLEDGER_BIN, the agentledger binary (default: on PATH).
#
# Afterwards point the service's DATABASE_URL at the restored database as
# agentledger_service, and give that role its password again if the
# cluster is new.
set -euo pipefail

dump=${1:?usage: ops/restore.sh BACKUP.dump TARGET_URL}
url=${2:?usage: ops/restore.sh BACKUP.dump TARGET_URL}
bin=${AGENTLEDGER_BIN:-agentledger}
base=${dump%.dump}
command -v pg_restore >/dev/null || { echo "restore: pg_restore is not installed" >&2; exit 2; }
command -v "$bin" >/dev/null || { echo "restore: $bin not found (set AGENTLEDGER_BIN)" >&2; exit 2; }

if [[ -f $base.sha256 ]]; then
    echo "restore: checking $base.sha256"
    (cd "$(dirname "$base")" && sha256sum --check --quiet "$(basename "$base").sha256")
else
    echo "restore: no $base.sha256 beside the dump; its integrity is not checked" >&2
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
# belong to the restoring role; grants to the service role are kept.
pg_restore --exit-on-error --single-transaction --no-owner --dbname="$url" "$dump"
echo "restore: restored in $((SECONDS - started)) s"

if [[ -f $base.digest.json ]]; then
    echo "restore: verifying the ledger against $base.digest.json"
    DATABASE_URL=$url "$bin" verify --digest "$base.digest.json"
else
    echo "restore: no digest beside the dump; run agentledger verify to check the chains" >&2
    DATABASE_URL=$url "$bin" verify
fi
