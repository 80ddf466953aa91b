#!/usr/bin/env bash
# Ensure the pinned Prefect 3.8.8 virtualenv exists and print its path as the last line of stdout.
#
#   COHORT_PREFECT_VENV  where the venv lives (default: $HOME/.cache/cohort/prefect-3.8.8)
#   PYTHON               interpreter used to create it (default: python3; Prefect 3.8.8 needs >= 3.10)
#
# Idempotent: the venv records the sha256 of constraints/prefect-3.8.8.txt it was installed
# with; when that matches and `prefect` is present, nothing is done. Everything but the final
# path goes to stderr, so callers can use `venv=$(scripts/prefect-venv.sh | tail -n1)`.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
constraints="$repo_root/constraints/prefect-3.8.8.txt"
venv="${COHORT_PREFECT_VENV:-$HOME/.cache/cohort/prefect-3.8.8}"
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
"$python" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)' ||
    die "$python is $("$python" -V 2>&1); Prefect 3.8.8 needs Python >= 3.10 (set PYTHON=...)"

if [[ ! -x $venv/bin/python ]]; then
    log "creating $venv"
    if ! "$python" -m venv "$venv" >&2; then
        rm -rf "$venv"
        die "'$python -m venv' failed; on Debian/Ubuntu install python3-venv (apt-get install python3-venv)"
    fi
fi

log "installing prefect==3.8.8 with $constraints"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
"$venv/bin/python" -m pip install --quiet -c "$constraints" prefect==3.8.8 >&2
got="$("$venv/bin/python" -c 'import prefect; print(prefect.__version__)')" ||
    die "prefect does not import in $venv"
[[ $got == 3.8.8 ]] || die "$venv has prefect $got, expected 3.8.8"
printf '%s\n' "$want" >"$marker"
log "ready: $venv"
printf '%s\n' "$venv"
