"""The Prefect events prefect-kubernetes 0.8.0's observer emits for pod states.

Reads a JSON list of cases from stdin, each {"type": "ADDED"|"MODIFIED"|"DELETED", "pod":
{"metadata": {...}, "status": {...}}}, feeds each to the observer's pod handler
(`prefect_kubernetes.observer._replicate_pod_event`) with a recording events client and no
Prefect API client (so no InfrastructurePending proposal and no start-up dedupe query), and
prints, per case, the list of events it emitted as JSON.

Run with the venv of `scripts/prefect-venv.sh kubernetes`.
"""

import asyncio
import json
import logging
import sys

import prefect_kubernetes.observer as observer


class Recorder:
    def __init__(self):
        self.events = []

    async def emit(self, event):
        self.events.append(json.loads(event.model_dump_json()))


async def main() -> None:
    cases = json.load(sys.stdin)
    observer.orchestration_client = None
    logging.disable(logging.CRITICAL)
    out = []
    for case in cases:
        recorder = Recorder()
        observer.events_client = recorder
        observer._last_event_cache.clear()
        pod = case["pod"]
        meta = pod["metadata"]
        raw = {"type": case["type"], "object": {"metadata": meta}}
        await observer._replicate_pod_event(
            event=raw,
            uid=meta["uid"],
            name=meta["name"],
            namespace=meta["namespace"],
            labels=meta.get("labels", {}),
            status=pod["status"],
            logger=logging.getLogger("pod-events"),
        )
        out.append(recorder.events)
    json.dump(out, sys.stdout)


asyncio.run(main())
