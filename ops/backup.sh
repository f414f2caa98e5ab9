#!/usr/bin/env bash
# Backs the agentledger database up: a signed digest of the ledger taken
# first, then a pg_dump of the whole database (custom format), then the
# SHA-256 of both. Restore with ops/restore.sh, which checks all three.
#
#   ops/backup.sh [OUTPUT_DIR]          (default: the current directory)
#
# Environment:
#   AGENTLEDGER_ADMIN_DATABASE_URL  the database owner's connection (pg_dump reads
#                                   every table); else DATABASE_URL
#   AGENTLEDGER_BIN                 the agentledger binary (default: agentledger on PATH)
#
# The dump holds the deployment's signing keys and the data subjects' keys:
# keep it as you keep those (it is written readable by its owner only), and
# know that a subject forgotten after the backup is readable in it until it
# expires (docs/audit.md).
set -euo pipefail

out_dir=${1:-.}
url=${AGENTLEDGER_ADMIN_DATABASE_URL:-${DATABASE_URL:-}}
bin=${AGENTLEDGER_BIN:-agentledger}
if [[ -z $url ]]; then
    echo "backup: set AGENTLEDGER_ADMIN_DATABASE_URL (or DATABASE_URL) to the database owner's connection" >&2
    exit 2
fi
command -v pg_dump >/dev/null || { echo "backup: pg_dump is not installed" >&2; exit 2; }
command -v "$bin" >/dev/null || { echo "backup: $bin not found (set AGENTLEDGER_BIN)" >&2; exit 2; }
mkdir -p "$out_dir"
umask 077
base="$out_dir/agentledger-$(date -u +%Y%m%dT%H%M%SZ)"
if [[ -e $base.dump || -e $base.digest.json ]]; then
    echo "backup: $base.* exists already (two backups in one second?)" >&2
    exit 1
fi
# A backup that fails leaves nothing that looks like one.
done=false
cleanup() { $done || rm -f "$base.dump.partial" "$base.digest.json" "$base.sha256"; }
trap cleanup EXIT

echo "backup: signing a digest of the ledger -> $base.digest.json"
DATABASE_URL=$url "$bin" digest --output "$base.digest.json"

echo "backup: dumping the database -> $base.dump"
started=$SECONDS
pg_dump --format=custom --compress=6 --file="$base.dump.partial" --dbname="$url"
# The archive must list its contents before it counts as a backup.
pg_restore --list "$base.dump.partial" >/dev/null
mv "$base.dump.partial" "$base.dump"

(cd "$(dirname "$base")" && sha256sum "$(basename "$base").dump" "$(basename "$base").digest.json" > "$(basename "$base").sha256")
done=true
size=$(du -h "$base.dump" | cut -f1)
echo "backup: done in $((SECONDS - started)) s: $base.dump ($size), $base.digest.json, $base.sha256"
