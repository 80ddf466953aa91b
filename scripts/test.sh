#!/usr/bin/env bash
# The project's test command: formatting, lints, and every test — unit tests and the
# end-to-end tests that run workers against a real Prefect 3.8.8 server.
#
# Installs what it needs: the pinned Prefect venv (scripts/prefect-venv.sh) and, on
# Debian/Ubuntu, python3 + python3-venv when missing. Non-interactive (CI=true, no stdin).
#
#   COHORT_PREFECT_VENV  where the Prefect venv lives (default: $HOME/.cache/cohort/prefect-3.8.8)
#   COHORT_PREFECT_KUBERNETES_VENV  the same with prefect-kubernetes 0.8.0 (scripts/prefect-venv.sh)
#   extra arguments      passed to `cargo test` (e.g. `scripts/test.sh -p cohort --test worker`)
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"

log() { printf '\n==> %s\n' "$*" >&2; }
die() { printf 'test.sh: error: %s\n' "$*" >&2; exit 1; }

# --- system packages ---------------------------------------------------------------------
python_ok() {
    command -v "${PYTHON:-python3}" >/dev/null 2>&1 &&
        "${PYTHON:-python3}" -c 'import sys, venv, ensurepip; sys.exit(0 if sys.version_info >= (3, 10) else 1)' \
            >/dev/null 2>&1
}

# Debian packages, as root or through sudo; `what` names them in the error.
apt_install() {
    local what=$1
    shift
    command -v apt-get >/dev/null 2>&1 || return 0
    local sudo=""
    if [[ $(id -u) -ne 0 ]]; then
        command -v sudo >/dev/null 2>&1 || die "$what is missing and apt-get needs root (no sudo)"
        sudo="sudo -n"
    fi
    log "installing $* (apt-get)"
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq </dev/null
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "$@" </dev/null
}

if ! python_ok; then
    apt_install "python3 with venv" python3 python3-venv
    python_ok || die "need Python >= 3.10 with the venv module (set PYTHON=/path/to/python3.x)"
fi

# The metrics tests scrape the worker with a real Prometheus and lint with promtool.
prometheus_ok() { command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1; }
if ! prometheus_ok; then
    apt_install prometheus prometheus
    prometheus_ok || die "prometheus and promtool are missing (install Prometheus 2.x)"
fi

command -v cargo >/dev/null 2>&1 || die "cargo not found: install Rust (https://rustup.rs)"
if command -v rustup >/dev/null 2>&1; then
    for component in rustfmt clippy; do
        rustup component list --installed 2>/dev/null | grep -q "^$component" ||
            rustup component add "$component" </dev/null
    done
fi

# --- Prefect venv --------------------------------------------------------------------------
log "Prefect 3.8.8 venv"
COHORT_PREFECT_VENV="$("$repo_root/scripts/prefect-venv.sh" </dev/null | tail -n1)"
export COHORT_PREFECT_VENV
printf '%s\n' "$COHORT_PREFECT_VENV" >&2
log "Prefect 3.8.8 + prefect-kubernetes 0.8.0 venv (Kubernetes goldens)"
COHORT_PREFECT_KUBERNETES_VENV="$("$repo_root/scripts/prefect-venv.sh" kubernetes </dev/null | tail -n1)"
export COHORT_PREFECT_KUBERNETES_VENV
printf '%s\n' "$COHORT_PREFECT_KUBERNETES_VENV" >&2
log "Prefect 3.9.1 venv (the newest server)"
prefect_3_9_venv="$("$repo_root/scripts/prefect-venv.sh" 3.9.1 </dev/null | tail -n1)"
printf '%s\n' "$prefect_3_9_venv" >&2

# --- checks --------------------------------------------------------------------------------
log "cargo fmt --all -- --check"
cargo fmt --all -- --check

log "cargo clippy --workspace --all-targets -- -D warnings"
cargo clippy --workspace --all-targets -- -D warnings

# `cargo test`, not nextest: the end-to-end tests of a binary share one Prefect server,
# which needs all of them in one process. They mostly wait (on Python start-up, polls,
# event persistence), so run more of them at once than the default of one per CPU.
export RUST_TEST_THREADS="${RUST_TEST_THREADS:-6}"
# Tests must leave nothing in the tree: what is untracked (and not ignored) after the run
# but was not before fails the run, whatever the tests said.
untracked() { git -C "$repo_root" ls-files --others --exclude-standard | LC_ALL=C sort; }
untracked_before="$(untracked)"
# Nor containers: what carries Prefect's run label, or is a pod of the Kubernetes emulator,
# after the run but did not before fails the run too (every Docker test removes what it kept,
# every Kubernetes test deletes its Jobs).
containers() {
    command -v docker >/dev/null 2>&1 || return 0
    {
        docker ps -aq --no-trunc --filter label=io.prefect.flow-run-id 2>/dev/null
        docker ps -aq --no-trunc --filter label=cohort-kube-fake.emulator 2>/dev/null
    } | LC_ALL=C sort -u
}
containers_before="$(containers)"
log "cargo test --workspace --no-run"
cargo test --workspace --no-run </dev/null
# The fault trials run one at a time and mostly wait (on outages, restarts, Python); they
# run beside the other tests, then the wheel's test (`install`: maturin packages the binary
# built here, and pip installs it), then the end-to-end worker, cancel and runner tests again
# against a Prefect 3.9.1 server, then the server-load tests (one at a time too). That lane's binaries run directly, resolved first; its
# output is printed when it is done.
test_binary() {
    # The test target's own artifact: the `cohort` binary the tests run is reported too, in
    # no fixed order.
    cargo test -p cohort --test "$1" --no-run --message-format=json </dev/null 2>/dev/null |
        grep -F "\"kind\":[\"test\"]" | grep -F "\"name\":\"$1\"" |
        sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -n1
}
# Resolved before anything runs: cargo's lock is held while `cargo test` runs its tests.
trials_bin="$(test_binary fault_trials)"
install_bin="$(test_binary install)"
worker_bin="$(test_binary worker)"
cancel_bin="$(test_binary cancel_and_serve)"
load_bin="$(test_binary server_load)"
[[ -x $trials_bin && -x $install_bin && -x $worker_bin && -x $cancel_bin && -x $load_bin ]] ||
    die "cannot find the test binaries"
lane_log="$(mktemp)"
trap 'rm -f "$lane_log"' EXIT
(
    # Where cargo runs a test binary.
    cd crates/cohort
    status=0
    printf '\n==> fault trials\n'
    "$trials_bin" </dev/null || status=1
    printf '\n==> install\n'
    "$install_bin" </dev/null || status=1
    for binary in "$worker_bin" "$cancel_bin"; do
        printf '\n==> %s against Prefect 3.9.1\n' "$(basename "$binary")"
        COHORT_PREFECT_VENV="$prefect_3_9_venv" "$binary" </dev/null || status=1
    done
    printf '\n==> server load\n'
    "$load_bin" </dev/null || status=1
    exit "$status"
) >"$lane_log" 2>&1 &
lane=$!
log "cargo test --workspace (the fault trials beside it)"
tests_status=0
other_tests=()
for file in crates/cohort/tests/*.rs; do
    name="$(basename "$file" .rs)"
    [[ $name == fault_trials || $name == install || $name == server_load ]] ||
        other_tests+=(--test "$name")
done
cargo test --workspace --exclude cohort --no-fail-fast "$@" </dev/null || tests_status=$?
cargo test -p cohort --bins "${other_tests[@]}" --no-fail-fast "$@" </dev/null || tests_status=$?
lane_status=0
wait "$lane" || lane_status=$?
cat "$lane_log"
if [[ $lane_status -ne 0 ]]; then
    printf 'test.sh: error: the fault trials, the wheel, the Prefect 3.9.1 run or the server-load tests failed (above)\n' >&2
    tests_status=1
fi
left="$(LC_ALL=C comm -13 <(printf '%s\n' "$untracked_before") <(printf '%s\n' "$(untracked)") | sed '/^$/d')"
if [[ -n $left ]]; then
    printf 'test.sh: error: the tests left files in the tree:\n%s\n' "$left" >&2
    exit 1
fi
leaked="$(LC_ALL=C comm -13 <(printf '%s\n' "$containers_before") <(printf '%s\n' "$(containers)") | sed '/^$/d')"
if [[ -n $leaked ]]; then
    printf 'test.sh: error: the tests left containers behind:\n' >&2
    docker ps -a --no-trunc --filter label=io.prefect.flow-run-id >&2
    docker ps -a --no-trunc --filter label=cohort-kube-fake.emulator >&2
    exit 1
fi
exit "$tests_status"
