#!/usr/bin/env bash
# The fault trials alone (crates/cohort/tests/fault_trials.rs): Cohort against a real
# Prefect 3.8.8 server while the server is stopped and restarted (flows in processes, and in
# containers on the machine's Docker Engine), the worker is SIGKILLed and
# restarted, the server answers 503 bursts and drops websockets, flow processes are
# SIGKILLed, and PREFECT_HOME is unwritable or full. Each trial prints its figures (runs, events
# expected/stored, duplicates, orphans). `scripts/test.sh` runs them too, with everything else.
#
#   scripts/fault-trials.sh                  the trials, plus one round with random fault timing
#   scripts/fault-trials.sh --soak SECONDS   then repeat rounds with random timing that long
#
#   COHORT_PREFECT_VENV  where the Prefect venv lives (default: $HOME/.cache/cohort/prefect-3.8.8)
#   COHORT_SOAK_SEED     replay the random fault timing of an earlier soak (it prints its seed)
#   extra arguments      passed to the test binary (e.g. `trial_4` to run one trial)
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"

die() { printf 'fault-trials.sh: error: %s\n' "$*" >&2; exit 1; }

if [[ ${1:-} == --soak ]]; then
    [[ ${2:-} =~ ^[0-9]+$ ]] || die "--soak needs a number of seconds"
    export COHORT_SOAK_SECONDS="$2"
    shift 2
fi

command -v cargo >/dev/null 2>&1 || die "cargo not found: install Rust (https://rustup.rs)"
COHORT_PREFECT_VENV="$("$repo_root/scripts/prefect-venv.sh" </dev/null | tail -n1)"
export COHORT_PREFECT_VENV

# One trial at a time (they stop the shared server); the figures go to stderr as they come.
cargo test -p cohort --test fault_trials -- --nocapture --test-threads=1 "$@" </dev/null
