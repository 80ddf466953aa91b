"""Small Prefect flows used by the Cohort demo and end-to-end tests.

Each flow has an explicit name so deployments can refer to it by a stable name.
Deployments point at them with the entrypoint ``flows.py:<function>`` and a
``set_working_directory`` pull step to this directory.
"""

import atexit
import json
import os
import signal
import time

from prefect import flow

# Environment variables `print_env` reports by default: the flow-run env contract of a
# process worker (see prefect/workers/base.py: BaseJobConfiguration.prepare_for_flow_run).
DEFAULT_ENV_NAMES = [
    "PREFECT_API_URL",
    "PREFECT__FLOW_RUN_ID",
    "PREFECT__FLOW_ID",
    "PREFECT__FLOW_NAME",
    "PREFECT__DEPLOYMENT_ID",
    "PREFECT__DEPLOYMENT_NAME",
    "PREFECT__WORKER_NAME",
]


@flow(name="hello")
def hello(name: str = "world") -> str:
    """Return (and print) a greeting."""
    greeting = f"Hello, {name}!"
    print(greeting)
    return greeting


@flow(name="fail")
def fail() -> None:
    """Raise: the run ends Failed, and the engine still exits 0."""
    raise ValueError("this flow fails on purpose")


@flow(name="crash")
def crash() -> None:
    """Exit the process without reporting a final state: the run ends Crashed."""
    os._exit(3)


@flow(name="sleepy")
def sleepy(seconds: float = 30) -> float:
    """Sleep `seconds` seconds (used for cancellation and shutdown scenarios)."""
    time.sleep(seconds)
    return seconds


@flow(name="lingering")
def lingering(seconds: float = 1, linger: float = 10) -> float:
    """Finish after `seconds`, then keep the process alive `linger` seconds more on its way
    out (an atexit handler): a run already Completed whose process is still exiting, the
    race a stop or a cancellation must not turn into Cancelled."""
    atexit.register(time.sleep, linger)
    time.sleep(seconds)
    return seconds


@flow(name="stubborn")
def stubborn(seconds: float = 600) -> float:
    """Ignore SIGTERM, then sleep: only SIGKILL stops it (a flow with a careless signal
    handler), so stopping it takes the whole termination grace."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    time.sleep(seconds)
    return seconds


@flow(name="print_env", log_prints=True)
def print_env(names: list[str] | None = None) -> dict[str, str | None]:
    """Print selected environment variables, one `ENV <name>=<value>` line each.

    `log_prints` also sends the lines to the API as flow-run logs, so tests can read
    them back with `POST /api/logs/filter`; the last line is `ENV-JSON {...}`.
    """
    selected = {name: os.environ.get(name) for name in (names or DEFAULT_ENV_NAMES)}
    for name, value in selected.items():
        print(f"ENV {name}={'<unset>' if value is None else value}")
    print("ENV-JSON " + json.dumps(selected, sort_keys=True))
    return selected
