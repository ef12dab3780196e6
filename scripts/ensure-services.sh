#!/usr/bin/env bash
# Make sure redis-server and the PostgreSQL server binaries (initdb, pg_ctl) are installed, so the
# tests can start their own throwaway servers on 127.0.0.1. When one is missing and we are root,
# install it with apt without leaving a system service running. This script never fails the build:
# when it cannot install, the tests skip (or fail, with REQUIRE_SERVICES=1) and say why.
set -uo pipefail

say() { echo "ensure-services: $*" >&2; }

have_redis() { command -v redis-server >/dev/null 2>&1; }
have_postgres() {
    { command -v initdb && command -v pg_ctl; } >/dev/null 2>&1 && return 0
    local bin
    for bin in /usr/lib/postgresql/*/bin; do
        [[ -x $bin/initdb && -x $bin/pg_ctl ]] && return 0
    done
    return 1
}
online_pg_clusters() {  # "<ver> <name>" for each running cluster of the Debian wrapper, if any
    command -v pg_lsclusters >/dev/null 2>&1 && pg_lsclusters -h 2>/dev/null | awk '$4 == "online" { print $1, $2 }'
}

missing=()
have_redis || missing+=(redis-server)
have_postgres || missing+=(postgresql)
if [[ ${#missing[@]} -eq 0 ]]; then
    say "redis-server and PostgreSQL server binaries found"
    exit 0
fi
if [[ $EUID -ne 0 ]] || ! command -v apt-get >/dev/null 2>&1; then
    say "missing: ${missing[*]}; cannot install them (need root and apt-get)."
    say "tests that need them will be skipped (or fail with REQUIRE_SERVICES=1)."
    exit 0
fi

# Keep the packages' maintainer scripts from starting system services (Docker images ship this file).
policy=/usr/sbin/policy-rc.d
if [[ ! -e $policy ]]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 755 "$policy"
    trap 'rm -f "$policy"' EXIT
fi
redis_before=$(pgrep -x redis-server || true)
pg_before=$(online_pg_clusters || true)

say "installing ${missing[*]} with apt-get"
export DEBIAN_FRONTEND=noninteractive
if ! { apt-get update -q && apt-get install -y -q --no-install-recommends "${missing[@]}"; } </dev/null; then
    say "apt-get failed; tests that need ${missing[*]} will be skipped (or fail with REQUIRE_SERVICES=1)."
    exit 0
fi

# If a package started a system service anyway, stop the ones that were not running before.
while read -r ver name; do
    [[ -n $ver ]] || continue
    grep -qx "$ver $name" <<<"$pg_before" && continue
    say "stopping PostgreSQL cluster $ver/$name started by the package"
    pg_ctlcluster "$ver" "$name" stop || true
done < <(online_pg_clusters || true)
for pid in $(pgrep -x redis-server || true); do
    grep -qx "$pid" <<<"$redis_before" && continue
    say "stopping redis-server (pid $pid) started by the package"
    service redis-server stop >/dev/null 2>&1 || kill "$pid" 2>/dev/null || true
done

have_redis || say "redis-server is still missing after apt-get install"
have_postgres || say "PostgreSQL server binaries are still missing after apt-get install"
exit 0
