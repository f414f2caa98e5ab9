#!/usr/bin/env bash
# Re-fetches the GraphiQL page's third-party assets from the npm registry into
# api/assets/graphiql/, where the binary embeds them (the page loads nothing
# from elsewhere). The versions are pinned here; SHA256SUMS records what was
# fetched, so a reviewer can check the committed files against the registry:
#
#   ops/vendor-graphiql.sh           # fetch, copy, rewrite SHA256SUMS
#   ops/vendor-graphiql.sh --check   # fetch and compare; changes nothing
set -euo pipefail
cd "$(dirname "$0")/.."

graphiql=3.8.3
react=18.3.1
dest=api/assets/graphiql

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
(cd "$work" && npm pack --silent "graphiql@$graphiql" "react@$react" "react-dom@$react" >/dev/null)
for pkg in "graphiql-$graphiql" "react-$react" "react-dom-$react"; do
    mkdir -p "$work/$pkg" && tar xzf "$work/$pkg.tgz" -C "$work/$pkg"
done
fetched="$work/out"
mkdir -p "$fetched"
cp "$work/graphiql-$graphiql/package/graphiql.min.js" "$work/graphiql-$graphiql/package/graphiql.min.css" "$fetched/"
cp "$work/react-$react/package/umd/react.production.min.js" "$fetched/"
cp "$work/react-dom-$react/package/umd/react-dom.production.min.js" "$fetched/"
cp "$work/graphiql-$graphiql/package/LICENSE" "$fetched/LICENSE.graphiql"
cp "$work/react-$react/package/LICENSE" "$fetched/LICENSE.react"
cp "$work/react-dom-$react/package/LICENSE" "$fetched/LICENSE.react-dom"
(cd "$fetched" && sha256sum -- * > SHA256SUMS)

if [ "${1:-}" = "--check" ]; then
    diff -u "$dest/SHA256SUMS" "$fetched/SHA256SUMS"
    (cd "$dest" && sha256sum --check --quiet SHA256SUMS)
    echo "api/assets/graphiql matches graphiql@$graphiql, react@$react and react-dom@$react from the registry"
else
    cp "$fetched"/* "$dest/"
    echo "fetched graphiql@$graphiql, react@$react and react-dom@$react into $dest"
fi
