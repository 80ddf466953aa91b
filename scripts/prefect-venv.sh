#!/usr/bin/env bash
# Ensure a pinned Prefect virtualenv exists and print its path as the last line of stdout.
#
#   bash scripts/prefect-venv.sh           prefect==3.8.8 (constraints/prefect-3.8.8.txt)
#   bash scripts/prefect-venv.sh docker    prefect==3.8.8 and prefect-docker==0.7.4, Prefect's
#                                          own Docker worker, for the benchmarks' side by side
#                                          (constraints/prefect-3.8.8-integrations.txt: the
#                                          same pins plus the integration's)
#   bash scripts/prefect-venv.sh kubernetes
#                                          prefect==3.8.8 and prefect-kubernetes==0.8.0: the
#                                          Kubernetes goldens (rendering, slugs, pod events) are
#                                          checked against its code, and its worker is the
#                                          oracle on the emulator (same constraints file)
#   bash scripts/prefect-venv.sh 3.9.1     prefect==3.9.1 (constraints/prefect-3.9.1.txt): the
#                                          newest server, which the end-to-end worker, cancel
#                                          and runner tests also run against
#
#   COHORT_PREFECT_VENV         the first venv (default: $HOME/.cache/cohort/prefect-3.8.8)
#   COHORT_PREFECT_DOCKER_VENV  the second (default: $HOME/.cache/cohort/prefect-3.8.8-docker)
#   COHORT_PREFECT_KUBERNETES_VENV  the third (default: $HOME/.cache/cohort/prefect-3.8.8-kubernetes)
#   COHORT_PREFECT_3_9_VENV     the fourth (default: $HOME/.cache/cohort/prefect-3.9.1)
#   PYTHON                      interpreter used to create it (default: python3; >= 3.10)
#
# Separate venvs, not one: Prefect's server and its worker CLI import every installed integration
# at start (`prefect.plugins.load_prefect_collections`), so prefect-docker in the tests' venv
# would change the server the tests and the process benchmarks run against.
#
# Idempotent: the venv records the sha256 of the constraints it was installed with; when that
# matches and `prefect` is present, nothing is done. Everything but the final path goes to
# stderr, so callers can use `venv=$(scripts/prefect-venv.sh | tail -n1)`.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
flavour="${1:-prefect}"
case $flavour in
    prefect)
        constraints="$repo_root/constraints/prefect-3.8.8.txt"
        venv="${COHORT_PREFECT_VENV:-$HOME/.cache/cohort/prefect-3.8.8}"
        packages=(prefect==3.8.8)
        version=3.8.8
        min_python=10
        ;;
    docker)
        constraints="$repo_root/constraints/prefect-3.8.8-integrations.txt"
        venv="${COHORT_PREFECT_DOCKER_VENV:-$HOME/.cache/cohort/prefect-3.8.8-docker}"
        packages=(prefect==3.8.8 prefect-docker==0.7.4)
        version=3.8.8
        min_python=10
        ;;
    kubernetes)
        constraints="$repo_root/constraints/prefect-3.8.8-integrations.txt"
        venv="${COHORT_PREFECT_KUBERNETES_VENV:-$HOME/.cache/cohort/prefect-3.8.8-kubernetes}"
        packages=(prefect==3.8.8 prefect-kubernetes==0.8.0)
        version=3.8.8
        min_python=10
        ;;
    3.9.1)
        constraints="$repo_root/constraints/prefect-3.9.1.txt"
        venv="${COHORT_PREFECT_3_9_VENV:-$HOME/.cache/cohort/prefect-3.9.1}"
        packages=(prefect==3.9.1)
        version=3.9.1
        min_python=11
        ;;
    *)
        echo "prefect-venv: unknown flavour '$flavour' (expected prefect, docker, kubernetes or 3.9.1)" >&2
        exit 2
        ;;
esac
python="${PYTHON:-python3}"
marker="$venv/.cohort-constraints.sha256"

log() { printf 'prefect-venv: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

[[ -f $constraints ]] || die "missing $constraints"
want="$(sha256sum "$constraints" | cut -d' ' -f1)"

is_ready() {
    [[ -x $venv/bin/prefect && -x $venv/bin/python && -f $marker ]] &&
        [[ "$(cat "$marker")" == "$want" ]]
}

if is_ready; then
    printf '%s\n' "$venv"
    exit 0
fi

# Serialize concurrent installs (test.sh and demo.sh may race for the same venv).
mkdir -p "$(dirname "$venv")"
exec 9>"$venv.lock"
if command -v flock >/dev/null 2>&1; then
    flock 9
fi
if is_ready; then
    printf '%s\n' "$venv"
    exit 0
fi

command -v "$python" >/dev/null 2>&1 || die "$python not found; install Python >= 3.10 (e.g. apt-get install python3 python3-venv)"
"$python" -c "import sys; sys.exit(0 if sys.version_info >= (3, $min_python) else 1)" ||
    die "$python is $("$python" -V 2>&1); Prefect $version needs Python >= 3.$min_python (set PYTHON=...)"

if [[ ! -x $venv/bin/python ]]; then
    log "creating $venv"
    if ! "$python" -m venv "$venv" >&2; then
        rm -rf "$venv"
        die "'$python -m venv' failed; on Debian/Ubuntu install python3-venv (apt-get install python3-venv)"
    fi
fi

log "installing ${packages[*]} with $constraints"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
"$venv/bin/python" -m pip install --quiet -c "$constraints" "${packages[@]}" >&2
got="$("$venv/bin/python" -c 'import prefect; print(prefect.__version__)')" ||
    die "prefect does not import in $venv"
[[ $got == "$version" ]] || die "$venv has prefect $got, expected $version"
printf '%s\n' "$want" >"$marker"
log "ready: $venv"
printf '%s\n' "$venv"
