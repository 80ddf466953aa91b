"""REST client side of scripts/demo.sh: deploy the example flows, run them, read events back.

Run with the Prefect venv's python (it uses httpx, which Prefect depends on). Talks plain
REST to the server so every step is visible: POST /flows/, POST /deployments/,
POST /deployments/{id}/create_flow_run, GET /flow_runs/{id}, POST /events/filter.

    demo_client.py wait-health  --api URL [--timeout S]
    demo_client.py run          --api URL --pool NAME --flows-dir DIR [--only DEPLOYMENT ...]
                                [--suffix S] [--job-variables JSON] [--timeout S]
    demo_client.py events       --api URL [--resource-id ID] [--prefix P] [--expect NAME]
                                [--min-count N] [--timeout S]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime, timedelta, timezone

import httpx

FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
RETRY_STATUS = {429, 502, 503}

# (deployment name, flow/function, deployment tags, flow-run tags, parameters)
SCENARIOS = [
    ("hello-demo", "hello", [], [], {"name": "Cohort"}),
    ("fail-demo", "fail", [], [], {}),
    ("hello-tagged", "hello", ["team-a", "env-dev"], ["run-extra", "Big Tag"], {}),
]


class Api:
    def __init__(self, base: str) -> None:
        self.base = base.rstrip("/")
        self.http = httpx.Client(timeout=30)

    def request(self, method: str, path: str, body=None, ok_statuses=()):
        """One call, retrying connection errors and 429/502/503 (SQLite "database is locked")."""
        url = path if path.startswith("http") else f"{self.base}{path}"
        delay = 0.2
        for attempt in range(12):
            try:
                resp = self.http.request(method, url, json=body)
            except httpx.TransportError as exc:
                error = str(exc)
            else:
                if resp.status_code not in RETRY_STATUS:
                    if resp.status_code in ok_statuses:
                        return resp
                    resp.raise_for_status()
                    return resp
                error = f"{resp.status_code} {resp.text}"
            time.sleep(delay)
            delay = min(delay * 2, 4)
        raise RuntimeError(f"{method} {url}: still failing after retries: {error}")

    def json(self, method: str, path: str, body=None):
        return self.request(method, path, body).json()


def wait_health(api: Api, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if api.http.get(f"{api.base}/health").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    sys.exit(f"server at {api.base} not healthy after {timeout:.0f}s")


def wait_for_pool(api: Api, pool: str, timeout: float) -> dict:
    """The worker creates the pool when it is missing: wait until it exists."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        resp = api.request("GET", f"/work_pools/{pool}", ok_statuses=(404,))
        if resp.status_code == 200 and resp.json().get("base_job_template"):
            return resp.json()
        time.sleep(0.5)
    sys.exit(f"work pool {pool!r} was not created within {timeout:.0f}s (is the worker running?)")


def run(
    api: Api,
    pool: str,
    flows_dir: str,
    only: list[str],
    suffix: str,
    job_variables: dict,
    timeout: float,
) -> int:
    work_pool = wait_for_pool(api, pool, timeout)
    print(f"work pool {pool!r} exists (type {work_pool['type']}, id {work_pool['id']})")
    runs = []
    for dep_name, function, dep_tags, run_tags, params in SCENARIOS:
        if only and dep_name not in only:
            continue
        dep_name += suffix
        flow = api.json("POST", "/flows/", {"name": function})
        dep = api.json(
            "POST",
            "/deployments/",
            {
                "name": dep_name,
                "flow_id": flow["id"],
                "entrypoint": f"flows.py:{function}",
                "path": flows_dir,
                "work_pool_name": pool,
                "pull_steps": [
                    {"prefect.deployments.steps.set_working_directory": {"directory": flows_dir}}
                ],
                "tags": dep_tags,
                "parameters": params,
                "job_variables": job_variables,
                "enforce_parameter_schema": False,
            },
        )
        flow_run = api.json(
            "POST", f"/deployments/{dep['id']}/create_flow_run", {"tags": run_tags}
        )
        runs.append((f"{function}/{dep_name}", flow_run))
        print(f"created flow run {flow_run['name']} ({flow_run['id']}) of {function}/{dep_name}")

    print(f"\nwaiting for final states (up to {timeout:.0f}s)...")
    deadline = time.monotonic() + timeout
    final = {}
    while len(final) < len(runs) and time.monotonic() < deadline:
        for label, flow_run in runs:
            if flow_run["id"] in final:
                continue
            current = api.json("GET", f"/flow_runs/{flow_run['id']}")
            if current["state"]["type"] in FINAL:
                final[flow_run["id"]] = current
        time.sleep(1)

    print()
    header = f"{'flow/deployment':<26} {'flow run':<26} {'tags':<38} {'infrastructure':<22} state"
    print(header)
    print("-" * len(header))
    for label, flow_run in runs:
        current = final.get(flow_run["id"]) or api.json("GET", f"/flow_runs/{flow_run['id']}")
        state = current["state"]
        tags = ", ".join(sorted(current["tags"]))
        pid = current.get("infrastructure_pid") or "-"
        if pid.startswith("http+docker://"):
            # The container id is 64 hex digits: its first 12, as `docker ps` shows them.
            pid = "container " + pid.rsplit(":", 1)[1][:12]
        text = state["type"]
        if state["name"].upper() != state["type"]:
            text += f" ({state['name']})"
        if state.get("message"):
            text += f": {state['message']}"
        print(f"{label:<26} {current['name']:<26} {tags:<38} {pid:<22} {text}")
    missing = len(runs) - len(final)
    if missing:
        print(f"\n{missing} flow run(s) did not finish within {timeout:.0f}s", file=sys.stderr)
        return 1
    return 0


def read_events(api: Api, resource_id: str | None, prefix: str) -> list[dict]:
    now = datetime.now(timezone.utc)
    body = {
        "filter": {
            "occurred": {
                "since": (now - timedelta(days=1)).isoformat(),
                "until": (now + timedelta(hours=1)).isoformat(),
            },
            "event": {"prefix": [prefix]},
            "order": "ASC",
        },
        "limit": 50,
    }
    if resource_id:
        body["filter"]["resource"] = {"id": [resource_id]}
    page = api.json("POST", "/events/filter", body)
    events = list(page["events"])
    while page.get("next_page"):
        page = api.json("GET", page["next_page"])
        events.extend(page["events"])
    return events


def print_event(e: dict, index: dict) -> None:
    follows = e.get("follows")
    follows_text = f"follows #{index[follows]}" if follows in index else f"follows {follows}"
    print(f"#{index[e['id']]} {e['occurred']}  {e['event']}  id={e['id']}  {follows_text}")
    print(f"    resource: {e['resource']['prefect.resource.id']}")
    extra = {k: v for k, v in e["resource"].items() if k != "prefect.resource.id"}
    print(f"              {extra}")
    for r in e["related"]:
        rest = {
            k: v
            for k, v in r.items()
            if k not in ("prefect.resource.id", "prefect.resource.role")
        }
        rest_text = f"  {rest}" if rest else ""
        print(f"    related:  {r['prefect.resource.role']:<11} {r['prefect.resource.id']}{rest_text}")


def events(
    api: Api, resource_id: str | None, prefix: str, expect: str | None, min_count: int, timeout: float
) -> int:
    # Events are persisted asynchronously (the server flushes them every few seconds).
    def complete(found: list[dict]) -> bool:
        matching = [e for e in found if expect is None or e["event"] == expect]
        return len(matching) >= max(min_count, 1 if expect else 0)

    deadline = time.monotonic() + timeout
    found = read_events(api, resource_id, prefix)
    while not complete(found) and time.monotonic() < deadline:
        time.sleep(1)
        found = read_events(api, resource_id, prefix)
    index = {e["id"]: i + 1 for i, e in enumerate(found)}
    for e in found:
        if expect is None or e["event"] == expect:
            print_event(e, index)
    if not complete(found):
        what = expect or "worker"
        print(f"expected at least {max(min_count, 1)} {what} event(s) within {timeout:.0f}s", file=sys.stderr)
        return 1
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("wait-health")
    p.add_argument("--api", required=True)
    p.add_argument("--timeout", type=float, default=120)
    p = sub.add_parser("run")
    p.add_argument("--api", required=True)
    p.add_argument("--pool", required=True)
    p.add_argument("--flows-dir", required=True)
    p.add_argument("--only", nargs="*", default=[], help="run only these deployments")
    p.add_argument("--suffix", default="", help="appended to the deployments' names")
    p.add_argument("--job-variables", default="{}", help="the deployments' job variables (JSON)")
    p.add_argument("--timeout", type=float, default=240)
    p = sub.add_parser("events")
    p.add_argument("--api", required=True)
    p.add_argument("--resource-id")
    p.add_argument("--prefix", default="prefect.worker.", help="event name prefix")
    p.add_argument("--expect", help="wait for (and print only) events with this name")
    p.add_argument("--min-count", type=int, default=0, help="wait for at least N matching events")
    p.add_argument("--timeout", type=float, default=60)
    args = parser.parse_args()

    api = Api(args.api)
    if args.command == "wait-health":
        wait_health(api, args.timeout)
        return 0
    if args.command == "run":
        return run(
            api,
            args.pool,
            args.flows_dir,
            args.only,
            args.suffix,
            json.loads(args.job_variables),
            args.timeout,
        )
    return events(api, args.resource_id, args.prefix, args.expect, args.min_count, args.timeout)


if __name__ == "__main__":
    sys.exit(main())
