# shellcheck shell=bash
# Services the annotation tests need: Debian chromium for the Playwright browser
# tests and a PostgreSQL server for the API suite on a real database.
#
# Usage (as root on a fresh Debian machine):   source .ci/services.sh
# Afterwards ALIGN_TEST_DATABASE_URL is exported when PostgreSQL came up. Nothing here fails
# hard: without apt or without a working server the browser / PostgreSQL tests skip with a reason.
# Idempotent: a second `source` finds the packages installed and the server running.

_align_services() {
    local pkgs=() db=align_test role=align_test pass=align_test port=5432
    command -v chromium >/dev/null 2>&1 || pkgs+=(chromium)
    command -v pg_ctlcluster >/dev/null 2>&1 || pkgs+=(postgresql)
    if [ ${#pkgs[@]} -gt 0 ]; then
        if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
            echo "services.sh: installing ${pkgs[*]}"
            export DEBIAN_FRONTEND=noninteractive
            { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${pkgs[@]}"; } >/tmp/align-services-apt.log 2>&1 \
                || echo "services.sh: apt-get install ${pkgs[*]} failed (see /tmp/align-services-apt.log); dependent tests will skip"
        else
            echo "services.sh: apt-get unavailable or not root; browser/PostgreSQL tests will skip"
        fi
    fi

    if ! command -v pg_ctlcluster >/dev/null 2>&1; then
        echo "services.sh: no PostgreSQL; ALIGN_TEST_DATABASE_URL not set"
        return 0
    fi
    # Debian's postgresql package creates cluster <version>/main; start it if it is down.
    local ver
    ver=$(pg_lsclusters -h 2>/dev/null | awk 'NR==1 {print $1}')
    if [ -z "$ver" ]; then
        ver=$(ls /usr/lib/postgresql 2>/dev/null | sort -n | tail -1)
        [ -n "$ver" ] && pg_createcluster "$ver" main >/dev/null 2>&1
    fi
    if [ -z "$ver" ]; then
        echo "services.sh: no PostgreSQL cluster could be created; ALIGN_TEST_DATABASE_URL not set"
        return 0
    fi
    port=$(pg_lsclusters -h | awk -v v="$ver" '$1 == v && $2 == "main" {print $3}')
    if ! pg_lsclusters -h | awk -v v="$ver" '$1 == v && $2 == "main" {print $4}' | grep -q online; then
        pg_ctlcluster "$ver" main start >/dev/null 2>&1 || {
            echo "services.sh: pg_ctlcluster $ver main start failed; ALIGN_TEST_DATABASE_URL not set"
            return 0
        }
    fi
    local i
    for i in $(seq 1 30); do
        su postgres -c "psql -p $port -qAtc 'select 1'" >/dev/null 2>&1 && break
        sleep 0.5
    done
    su postgres -c "psql -p $port -qAtc \"select 1 from pg_roles where rolname='$role'\"" | grep -q 1 \
        || su postgres -c "psql -p $port -qc \"create role $role login password '$pass'\"" >/dev/null
    su postgres -c "psql -p $port -qAtc \"select 1 from pg_database where datname='$db'\"" | grep -q 1 \
        || su postgres -c "createdb -p $port -O $role $db" >/dev/null
    export ALIGN_TEST_DATABASE_URL="postgresql+psycopg://$role:$pass@127.0.0.1:$port/$db"
    echo "services.sh: PostgreSQL $ver on port $port; ALIGN_TEST_DATABASE_URL=$ALIGN_TEST_DATABASE_URL"
}
# Run with errexit/nounset/pipefail off (a failed step must not end the sourcing script),
# then put the caller's shell options back.
_align_flags=$-
_align_pipefail=0
[[ -o pipefail ]] && _align_pipefail=1
set +e +u +o pipefail
_align_services
[[ $_align_flags == *e* ]] && set -e
[[ $_align_flags == *u* ]] && set -u
[[ $_align_pipefail == 1 ]] && set -o pipefail
unset -f _align_services
unset _align_flags _align_pipefail
