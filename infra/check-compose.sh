#!/usr/bin/env bash
# Validate infra/compose.yaml the way Compose itself reads it (schema, interpolation, anchors,
# depends_on conditions): `docker compose config` where the compose plugin is installed, else
# Debian's `docker-compose` (1.29, `apt-get install docker-compose`), which checks the file against
# the Compose Specification schema it ships. Needs no engine, no image and no registry: `config`
# only reads the file. Exit 1 with one `error:` line when the file is invalid or no Compose is
# installed. CI: `bash infra/check-compose.sh`.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
file="${1:-$here/compose.yaml}"   # another file: tests check that a broken one fails

if docker compose version >/dev/null 2>&1; then
    compose=(docker compose)
elif command -v docker-compose >/dev/null 2>&1; then
    compose=(docker-compose)
else
    echo "error: no Compose to validate $file with: install the compose plugin or \`apt-get install docker-compose\`" >&2
    exit 1
fi
version="$("${compose[@]}" version --short 2>/dev/null || "${compose[@]}" version | head -1)"
if ! out="$("${compose[@]}" -f "$file" --profile tools config 2>&1 >/dev/null)"; then
    echo "error: $file is invalid (${compose[*]} $version): $(echo "$out" | tr '\n' ' ')" >&2
    exit 1
fi
services="$("${compose[@]}" -f "$file" --profile tools config --services | sort | tr '\n' ' ')"
echo "compose: $file valid with ${compose[*]} $version; services: $services"
