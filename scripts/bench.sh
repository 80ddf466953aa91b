#!/usr/bin/env bash
# Benchmark Prefect's Python workers (process, Docker with prefect-docker 0.7.4, Kubernetes with
# prefect-kubernetes 0.8.0 on an emulated cluster) against Cohort's on identical workloads,
# against one local Prefect 3.8.8 server, and write BENCHMARKS.md and bench-results/<date>.json.
#
#   bash scripts/bench.sh [--quick] [--postgres] [driver flags…]
#
#   --quick      small counts, one repetition (a few minutes); default: the full suite
#   --postgres   run the Prefect server on PostgreSQL (a throwaway cluster on a loopback
#                port, installed from Debian packages if missing) instead of SQLite, so
#                the worker rather than the server is the bottleneck
#   other flags go to the driver (crates/cohort-bench), e.g. `--reps 5`,
#   `--scenarios idle,burst`, `--scale-reps 0`, `--docker-runs 20`, `--kubernetes-runs 100`,
#   `--keep-logs DIR` (each worker's stdout and stderr, kept when it stops)
#
# Installs what it needs: the pinned Prefect venvs (scripts/prefect-venv.sh; the second,
# with prefect-docker, for the Docker scenario; the third, with prefect-kubernetes, for the
# Kubernetes scenario), and for --postgres the `postgresql` package; the Docker scenario builds
# its image locally (scripts/docker-test-images.sh).
# Builds `cohort` and the driver in release mode.
#   COHORT_PREFECT_VENV         Prefect venv (default: $HOME/.cache/cohort/prefect-3.8.8)
#   COHORT_PREFECT_DOCKER_VENV  the one with prefect-docker (default: …/prefect-3.8.8-docker)
#   COHORT_PREFECT_KUBERNETES_VENV  the one with prefect-kubernetes
#                               (default: …/prefect-3.8.8-kubernetes)
#   CARGO_TARGET_DIR     honoured, as by cargo (default: ./target)
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"

log() { printf '\n==> %s\n' "$*" >&2; }
die() { printf 'bench.sh: error: %s\n' "$*" >&2; exit 1; }

quick=0
postgres=0
driver_args=()
for arg in "$@"; do
    case $arg in
        --quick) quick=1 ;;
        --postgres) postgres=1 ;;
        -h | --help) sed -n '2,25p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) driver_args+=("$arg") ;;
    esac
done

as_root() {
    if [[ $(id -u) -eq 0 ]]; then
        "$@"
    else
        command -v sudo >/dev/null 2>&1 || die "need root for: $* (no sudo)"
        sudo -n "$@"
    fi
}

# --- Prefect venv and the binaries ----------------------------------------------------------
log "Prefect 3.8.8 venv"
COHORT_PREFECT_VENV="$("$repo_root/scripts/prefect-venv.sh" </dev/null | tail -n1)"
export COHORT_PREFECT_VENV
printf '%s\n' "$COHORT_PREFECT_VENV" >&2
log "Prefect 3.8.8 + prefect-docker 0.7.4 venv"
COHORT_PREFECT_DOCKER_VENV="$("$repo_root/scripts/prefect-venv.sh" docker </dev/null | tail -n1)"
export COHORT_PREFECT_DOCKER_VENV
printf '%s\n' "$COHORT_PREFECT_DOCKER_VENV" >&2
log "Prefect 3.8.8 + prefect-kubernetes 0.8.0 venv"
COHORT_PREFECT_KUBERNETES_VENV="$("$repo_root/scripts/prefect-venv.sh" kubernetes </dev/null | tail -n1)"
export COHORT_PREFECT_KUBERNETES_VENV
printf '%s\n' "$COHORT_PREFECT_KUBERNETES_VENV" >&2

log "cargo build --release -p cohort -p cohort-bench"
cargo build --release -p cohort -p cohort-bench </dev/null
target_dir="${CARGO_TARGET_DIR:-$repo_root/target}"
cohort="$target_dir/release/cohort"
bench="$target_dir/release/cohort-bench"
[[ -x $cohort && -x $bench ]] || die "no binaries in $target_dir/release"

# Scenario 5 runs 1,000 flow processes under one worker: each holds pipes.
hard="$(ulimit -Hn)"
if [[ $hard == unlimited ]]; then hard=1048576; fi
ulimit -n "$hard" 2>/dev/null || ulimit -n 65536 2>/dev/null || true
log "open files limit: $(ulimit -n)"

# --- PostgreSQL (optional) ------------------------------------------------------------------
pg_dir=""
pg_bin=""
pg_user=""
run_pg() {
    if [[ -n $pg_user ]]; then
        runuser -u "$pg_user" -- "$@"
    else
        "$@"
    fi
}
stop_postgres() {
    if [[ -n $pg_dir && -f $pg_dir/data/postmaster.pid ]]; then
        run_pg "$pg_bin/pg_ctl" -D "$pg_dir/data" -m immediate -w stop >/dev/null 2>&1 || true
    fi
    [[ -n $pg_dir ]] && rm -rf "$pg_dir"
    pg_dir=""
}
trap stop_postgres EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

db_args=()
if ((postgres)); then
    log "PostgreSQL"
    if ! compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null; then
        command -v apt-get >/dev/null 2>&1 || die "--postgres needs apt-get to install postgresql"
        as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq </dev/null
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql </dev/null
    fi
    pg_bin="$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n1)"
    [[ -x $pg_bin/initdb ]] || die "no initdb under /usr/lib/postgresql"
    # PostgreSQL refuses to run as root: a throwaway cluster owned by `postgres` (the
    # package creates that user), or by the caller when not root.
    pg_dir="$(mktemp -d "${TMPDIR:-/tmp}/cohort-bench-pg.XXXXXX")"
    if [[ $(id -u) -eq 0 ]]; then
        pg_user=postgres
        id "$pg_user" >/dev/null 2>&1 || die "no postgres user to run the cluster as"
        chown "$pg_user" "$pg_dir"
    fi
    pg_port="$("$COHORT_PREFECT_VENV/bin/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
    run_pg "$pg_bin/initdb" -D "$pg_dir/data" -U postgres -A trust --no-sync -E UTF8 >"$pg_dir/initdb.log" 2>&1 ||
        { cat "$pg_dir/initdb.log" >&2; die "initdb failed"; }
    # Durability off: the database is not what is measured, and this cluster is deleted
    # when the run ends.
    run_pg "$pg_bin/pg_ctl" -D "$pg_dir/data" -l "$pg_dir/server.log" -w -t 60 \
        -o "-p $pg_port -k $pg_dir -c listen_addresses=127.0.0.1 -c max_connections=200 -c fsync=off -c synchronous_commit=off -c full_page_writes=off" \
        start >/dev/null || { cat "$pg_dir/server.log" >&2; die "PostgreSQL did not start"; }
    run_pg "$pg_bin/createdb" -h 127.0.0.1 -p "$pg_port" -U postgres prefect
    db_args=(--database-url "postgresql+asyncpg://postgres@127.0.0.1:$pg_port/prefect")
    echo "PostgreSQL $("$pg_bin/postgres" --version | awk '{print $3}') on 127.0.0.1:$pg_port" >&2
fi

# --- run -----------------------------------------------------------------------------------
mode_args=()
((quick)) && mode_args=(--quick)
flags=""
(($#)) && flags="$(printf ' %s' "$@")"
log "cohort-bench${flags}"
"$bench" "${mode_args[@]}" "${db_args[@]}" "${driver_args[@]}" \
    --repo "$repo_root" --cohort "$cohort" --venv "$COHORT_PREFECT_VENV" \
    --flags="$flags" </dev/null
