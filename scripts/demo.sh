#!/usr/bin/env bash
# Run the main job end to end: a local Prefect 3.8.8 server, the Cohort process worker,
# the example flows deployed and run through it, then the worker's events read back.
#
#   1. ensure the Prefect venv (scripts/prefect-venv.sh) and `cargo build --release`
#   2. start `prefect server start` (SQLite, 127.0.0.1, a free port, temporary PREFECT_HOME)
#   3. start `cohort worker start --pool demo-pool --type process --name "Demo Worker"`
#      (the pool does not exist yet: the worker creates it)
#   4. deploy examples/flows (hello, fail, a tagged hello), create one run each, wait for
#      their final states and print them
#   5. print the worker's events from POST /api/events/filter
#   6. SIGTERM the worker, print its `prefect.worker.stopped` event
#   7. when a Docker Engine is reachable: build the Prefect test image locally
#      (scripts/docker-test-images.sh prefect, 2-3 minutes the first time), start
#      `cohort worker start --pool demo-docker-pool --type docker`, run hello and fail in
#      containers, print the worker's and the containers' events; otherwise say why not
#   8. when a Docker Engine is reachable: start the Kubernetes API emulator the tests use
#      (no cluster can be had here; its pods run as containers on the local Engine), start
#      `cohort worker start --pool demo-k8s-pool --type kubernetes` on it, run hello and
#      fail as Jobs (Prefect's image with examples/flows baked in, built locally), print the
#      worker's and the pods' events
#   9. stop the server
#
#   COHORT_DEMO_WORKER=python  run Prefect's own `prefect worker start` instead (same steps,
#                              to compare; skips the cargo build)
#   COHORT_PREFECT_VENV        Prefect venv location (default: $HOME/.cache/cohort/prefect-3.8.8)
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"

pool=demo-pool
worker_name="Demo Worker"
worker_kind="${COHORT_DEMO_WORKER:-cohort}"

step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }
die() { printf 'demo.sh: error: %s\n' "$*" >&2; exit 1; }

case $worker_kind in
    cohort | python) ;;
    *) die "COHORT_DEMO_WORKER=$worker_kind: expected cohort or python" ;;
esac

step "Prefect 3.8.8 venv"
venv="$("$repo_root/scripts/prefect-venv.sh" </dev/null | tail -n1)"
echo "$venv"
python="$venv/bin/python"
client=("$python" "$repo_root/scripts/demo_client.py")

if [[ $worker_kind == cohort ]]; then
    step "cargo build --release"
    cargo build --release -p cohort
    cohort="${CARGO_TARGET_DIR:-$repo_root/target}/release/cohort"
    [[ -x $cohort ]] || die "no binary at $cohort"
    worker_cmd=("$cohort" worker start)
else
    worker_cmd=("$venv/bin/prefect" worker start)
fi

work="$(mktemp -d "${TMPDIR:-/tmp}/cohort-demo.XXXXXX")"
server_pid=""
worker_pid=""
emulator_pid=""

# SIGTERM a child and reap it, SIGKILLing it after `secs` seconds; the exit status of the
# child is left in $stopped_status.
stopped_status=0
stop_pid() {
    local pid=$1 secs=$2 watchdog
    kill -TERM "$pid" 2>/dev/null || true
    { sleep "$secs" && echo "pid $pid did not stop within ${secs}s: SIGKILL" >&2 &&
        kill -KILL "$pid"; } >/dev/null 2>&1 &
    watchdog=$!
    disown "$watchdog" 2>/dev/null || true # no job-control notice when it is killed
    stopped_status=0
    wait "$pid" 2>/dev/null || stopped_status=$?
    kill "$watchdog" 2>/dev/null || true
}

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    [[ -n $worker_pid ]] && stop_pid "$worker_pid" 30
    # The emulator removes its pods' containers when it stops (SIGINT).
    if [[ -n $emulator_pid ]]; then
        kill -INT "$emulator_pid" 2>/dev/null || true
        wait "$emulator_pid" 2>/dev/null || true
    fi
    if [[ -n $server_pid ]]; then
        echo "stopping the Prefect server (pid $server_pid)"
        stop_pid "$server_pid" 15
    fi
    if ((rc != 0)); then
        for f in server.log worker.log docker-worker.log k8s-worker.log emulator.log; do
            [[ -s $work/$f ]] || continue
            printf '\n----- last lines of %s -----\n' "$f" >&2
            tail -n 40 "$work/$f" >&2
        done
    fi
    rm -rf "$work"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Nothing from the caller's Prefect profile may leak into the demo.
while IFS= read -r var; do unset "$var"; done < <(env | sed -n 's/^\(PREFECT_[A-Za-z0-9_]*\)=.*/\1/p')

# Job control: background jobs get their own process group and keep default SIGINT
# handling (a non-interactive shell would start them with SIGINT ignored, and Prefect's
# worker turns SIGTERM into SIGINT to stop gracefully).
set -m

port="$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
api="http://127.0.0.1:$port/api"

step "Prefect server on $api"
mkdir -p "$work/server-home" "$work/worker-home"
PREFECT_HOME="$work/server-home" \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    PREFECT_UI_ENABLED=false \
    PREFECT_SERVER_LOGGING_LEVEL=WARNING \
    "$venv/bin/prefect" server start --host 127.0.0.1 --port "$port" \
    </dev/null >"$work/server.log" 2>&1 &
server_pid=$!
"${client[@]}" wait-health --api "$api" --timeout 120
echo "healthy (pid $server_pid)"

step "worker: ${worker_cmd[*]} --pool $pool --type process --name \"$worker_name\""
# PREFECT_WORKER_QUERY_SECONDS=5: poll every 5 s instead of 10 so the demo is quicker.
PREFECT_API_URL="$api" \
    PREFECT_HOME="$work/worker-home" \
    PREFECT_WORKER_QUERY_SECONDS=5 \
    PYTHONDONTWRITEBYTECODE=1 \
    PATH="$venv/bin:$PATH" \
    "${worker_cmd[@]}" --pool "$pool" --type process --name "$worker_name" \
    </dev/null >"$work/worker.log" 2>&1 &
worker_pid=$!
echo "pid $worker_pid, log $work/worker.log"

step "deploy examples/flows and run them"
"${client[@]}" run --api "$api" --pool "$pool" --flows-dir "$repo_root/examples/flows" --timeout 300

resource_id="prefect.worker.process.demo-worker"
step "worker events (POST /api/events/filter, resource $resource_id)"
# started + 3 submitted + 3 executed
"${client[@]}" events --api "$api" --resource-id "$resource_id" --min-count 7

step "SIGTERM the worker"
stop_pid "$worker_pid" 60
status=$stopped_status
worker_pid=""
echo "worker exited with status $status"
"${client[@]}" events --api "$api" --resource-id "$resource_id" --expect prefect.worker.stopped

step "worker log (last 15 lines)"
tail -n 15 "$work/worker.log"

((status == 0)) || die "the worker exited with status $status after SIGTERM"

# --- the same flows in containers --------------------------------------------------------
docker_pool=demo-docker-pool
docker_worker_name="Demo Docker Worker"
step "Docker work pool"
if [[ $worker_kind != cohort ]]; then
    echo "skipped: Prefect's Docker worker (prefect-docker) is not in the demo's Prefect venv"
elif ! command -v docker >/dev/null 2>&1; then
    echo "skipped: the docker CLI is not installed, so no Docker Engine to run containers on"
elif ! docker info >/dev/null 2>&1; then
    echo "skipped: no Docker Engine is reachable (\`docker info\` failed); the process pool above ran"
else
    # No registry is needed: the image is built from the Debian mirror and PyPI.
    echo "building the Prefect image locally (scripts/docker-test-images.sh prefect)"
    image="$(bash "$repo_root/scripts/docker-test-images.sh" prefect | awk '$1 == "prefect" { print $2 }')"
    [[ -n $image ]] || die "scripts/docker-test-images.sh printed no prefect image"
    echo "image $image"

    step "worker: ${worker_cmd[*]} --pool $docker_pool --type docker --name \"$docker_worker_name\""
    mkdir -p "$work/docker-worker-home"
    PREFECT_API_URL="$api" \
        PREFECT_HOME="$work/docker-worker-home" \
        PREFECT_WORKER_QUERY_SECONDS=5 \
        "${worker_cmd[@]}" --pool "$docker_pool" --type docker --name "$docker_worker_name" \
        </dev/null >"$work/docker-worker.log" 2>&1 &
    worker_pid=$!
    echo "pid $worker_pid, log $work/docker-worker.log"

    step "run hello and fail in containers"
    # The flows reach the container through a read-only bind mount at the same path; a
    # loopback API URL puts the container on the host's network (as prefect-docker does).
    flows="$repo_root/examples/flows"
    "${client[@]}" run --api "$api" --pool "$docker_pool" --flows-dir "$flows" \
        --only hello-demo fail-demo --suffix=-docker \
        --job-variables "{\"image\": \"$image\", \"volumes\": [\"$flows:$flows:ro\"]}" \
        --timeout 300

    docker_resource="prefect.worker.docker.demo-docker-worker"
    step "Docker worker events (resource $docker_resource)"
    # started + 2 submitted + 2 executed
    "${client[@]}" events --api "$api" --resource-id "$docker_resource" --min-count 5
    step "container events (prefect.docker.container.*)"
    # created, running, exited for each of the two runs
    "${client[@]}" events --api "$api" --prefix prefect.docker.container. --min-count 6

    step "SIGTERM the Docker worker"
    stop_pid "$worker_pid" 60
    status=$stopped_status
    worker_pid=""
    echo "worker exited with status $status"
    ((status == 0)) || die "the Docker worker exited with status $status after SIGTERM"

    # --- the same flows as Kubernetes Jobs, on the emulated cluster -------------------------
    if [[ $worker_kind == cohort ]]; then
        step "Kubernetes work pool (on the Kubernetes API emulator; no real cluster)"
        cargo build --release -p cohort-kube-fake --example serve
        serve="${CARGO_TARGET_DIR:-$repo_root/target}/release/examples/serve"
        mkdir -p "$work/emulator"
        "$serve" "$work/emulator" docker </dev/null >"$work/emulator.log" 2>&1 &
        emulator_pid=$!
        for _ in $(seq 1 100); do
            [[ -s $work/emulator/kubeconfig ]] && break
            sleep 0.1
        done
        [[ -s $work/emulator/kubeconfig ]] || die "the emulator wrote no kubeconfig"
        echo "emulator pid $emulator_pid: $(head -n1 "$work/emulator.log")"

        # A Kubernetes user ships flow code in the image: Prefect's, with examples/flows at the
        # same path the deployments name.
        flows_image="cohort-demo/prefect-flows:$(cat "$flows/flows.py" <(echo "$image $flows") | sha256sum | cut -c1-12)"
        if ! docker image inspect "$flows_image" >/dev/null 2>&1; then
            printf 'FROM %s\nCOPY . %s/\n' "$image" "$flows" |
                docker build -q -t "$flows_image" -f- "$flows" >/dev/null
        fi
        echo "image $flows_image"

        k8s_worker_name="Demo Kubernetes Worker"
        step "worker: ${worker_cmd[*]} --pool demo-k8s-pool --type kubernetes --name \"$k8s_worker_name\""
        mkdir -p "$work/k8s-worker-home"
        PREFECT_API_URL="$api" \
            PREFECT_HOME="$work/k8s-worker-home" \
            PREFECT_WORKER_QUERY_SECONDS=5 \
            KUBECONFIG="$work/emulator/kubeconfig" \
            "${worker_cmd[@]}" --pool demo-k8s-pool --type kubernetes --name "$k8s_worker_name" \
            </dev/null >"$work/k8s-worker.log" 2>&1 &
        worker_pid=$!
        echo "pid $worker_pid, log $work/k8s-worker.log"

        step "run hello and fail as Kubernetes Jobs"
        "${client[@]}" run --api "$api" --pool demo-k8s-pool --flows-dir "$flows" \
            --only hello-demo fail-demo --suffix=-k8s \
            --job-variables "{\"image\": \"$flows_image\"}" \
            --timeout 300

        k8s_resource="prefect.worker.kubernetes.demo-kubernetes-worker"
        step "Kubernetes worker events (resource $k8s_resource)"
        # started + 2 submitted + 2 executed (when each Job ended, with its exit code)
        "${client[@]}" events --api "$api" --resource-id "$k8s_resource" --min-count 5
        step "pod events (prefect.kubernetes.pod.*)"
        # pending, running, succeeded for each of the two runs
        "${client[@]}" events --api "$api" --prefix prefect.kubernetes.pod. --min-count 6

        step "SIGTERM the Kubernetes worker"
        stop_pid "$worker_pid" 60
        status=$stopped_status
        worker_pid=""
        echo "worker exited with status $status"
        ((status == 0)) || die "the Kubernetes worker exited with status $status after SIGTERM"
    fi
fi
step "done"
