"""Reads what a served deployment needs from a flow's entrypoint, with Prefect's own loaders.

Input: one JSON argument {"entrypoint", "cron", "interval", "rrule", "timezone", "anchor_date"}.
Output (stdout, one JSON object): {"flow_name", "description", "parameter_openapi_schema",
"schedules"}. On bad input: a one-line message on stderr and exit status 2.
"""

import json
import sys


def fail(message: str) -> None:
    print(" ".join(message.split()), file=sys.stderr)
    sys.exit(2)


def describe(exc: Exception) -> str:
    """One readable line: pydantic's own messages rather than its multi-line report."""
    errors = getattr(exc, "errors", None)
    if callable(errors):
        try:
            return "; ".join(str(e.get("msg", "")) for e in errors())
        except Exception:  # noqa: BLE001 - not a pydantic error after all
            pass
    return str(exc)


def main() -> None:
    spec = json.loads(sys.argv[1])
    try:
        from prefect import Flow
        from prefect.client.schemas.schedules import construct_schedule
        from prefect.utilities.callables import parameter_schema
        from prefect.utilities.importtools import import_object
    except Exception as exc:  # noqa: BLE001 - any import problem is the user's environment
        fail(f"cannot import Prefect with this Python ({sys.executable}): {exc}")

    schedules = []
    if spec.get("cron") or spec.get("interval") or spec.get("rrule"):
        try:
            schedule = construct_schedule(
                cron=spec.get("cron"),
                interval=spec.get("interval"),
                rrule=spec.get("rrule"),
                timezone=spec.get("timezone"),
                anchor_date=spec.get("anchor_date"),
            )
        except Exception as exc:  # noqa: BLE001 - pydantic and ValueError alike
            fail(f"invalid schedule: {describe(exc)}")
        schedules.append({"schedule": schedule.model_dump(mode="json"), "active": True})

    # Import the file for real: Prefect's `load_flow_from_entrypoint` falls back to reading the
    # source when the import raises, which would register a flow whose every run then crashes.
    entrypoint = spec["entrypoint"]
    path, _, name = entrypoint.rpartition(":")
    if not path or not name:
        fail(f"{entrypoint!r} is not an entrypoint of the form 'path/to/file.py:flow_function'")
    try:
        flow = import_object(entrypoint)
    except AttributeError:
        fail(f"cannot load a flow from {entrypoint!r}: {path!r} has no object named {name!r}")
    except Exception as exc:  # noqa: BLE001 - missing file, import errors
        fail(f"cannot load a flow from {entrypoint!r}: {describe(exc)}")
    if not isinstance(flow, Flow):
        fail(f"{entrypoint!r} is not a flow: decorate {name!r} with @flow")

    print(
        json.dumps(
            {
                "flow_name": flow.name,
                "description": flow.description,
                "parameter_openapi_schema": parameter_schema(flow).model_dump_for_openapi(),
                "schedules": schedules,
            }
        )
    )


if __name__ == "__main__":
    main()
