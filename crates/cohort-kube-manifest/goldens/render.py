"""Golden render matrix: prefect-kubernetes 0.8.0's Job manifest for a matrix of templates,
job variables and worker settings, produced by Prefect's own code, offline.

Usage (with the venv of `scripts/prefect-venv.sh kubernetes`):

    python render.py OUT.json

For each case this records the inputs Cohort's worker hands to `cohort_kube_manifest::prepare`
(the rendered job configuration, the run's environment and raw labels) and what Prefect makes
of them: `KubernetesWorkerJobConfiguration.from_template_and_values` then
`prepare_for_flow_run`, then the part of `KubernetesWorker._create_job` that runs before the
Job POST (API key and auth string secrets, `store_env_as_secret`), or the error raised.

Determinism:
* `PREFECT_*` variables of the caller are removed and `HOME` points at a fresh temporary
  directory before Prefect is imported; `PREFECT_API_URL` is the only setting from the
  environment (plus what a case adds through `temporary_settings`).
* Ids, names and the deployment's `updated` are fixed (as in shared/tools/k8s/k8s_render.py).
* The Kubernetes API is a recording stand-in (no cluster): a Secret read answers 404, every
  create succeeds, and the Job gets the name `<generateName>abcde`.
* `uuid.uuid4()` in `prefect_kubernetes.worker`, which names the `store_env_as_secret` Secret
  (`<generateName>-env-<8 hex>`), returns a fixed UUID whose hex starts with `ENV_SECRET_SUFFIX`.
* The default image is Prefect's for a worker on Python 3.11, whatever Python runs this script.
"""

import asyncio
import copy
import datetime
import json
import logging
import os
import shutil
import sys
import tempfile
import types
import uuid

for _key in list(os.environ):
    if _key.startswith("PREFECT_"):
        del os.environ[_key]
_HOME = tempfile.mkdtemp(prefix="cohort-k8s-goldens-")
os.environ["HOME"] = _HOME
os.environ["PREFECT_API_URL"] = "http://prefect-server.prefect.svc:4200/api"
# Read by the `{{ $NAME }}` placeholder of one `name` case.
os.environ["COHORT_GOLDEN_NAME_VAR"] = "from-env"

import prefect  # noqa: E402
import prefect.workers.base as base  # noqa: E402
import prefect_kubernetes  # noqa: E402
import prefect_kubernetes.worker as kw  # noqa: E402
import pydantic  # noqa: E402
from kubernetes_asyncio.client import ApiClient  # noqa: E402
from kubernetes_asyncio.client.exceptions import ApiException  # noqa: E402
from prefect.client.schemas.objects import Flow, FlowRun, WorkPool  # noqa: E402
from prefect.client.schemas.responses import DeploymentResponse  # noqa: E402
from prefect.settings import get_current_settings, temporary_settings  # noqa: E402
from prefect.settings.base import PrefectBaseSettings  # noqa: E402
from prefect.utilities.dockerutils import get_prefect_image_name  # noqa: E402
from prefect.workers.base import BaseJobConfiguration  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
# The templates the crate embeds (copies of the shared captures).
SRC = os.path.join(HERE, "..", "src")
PACKAGE_TEMPLATE = json.load(open(os.path.join(SRC, "base-job-template.json")))
SERVER_TEMPLATE = json.load(open(os.path.join(SRC, "server-bundled-job-template.json")))

FLOW_ID = uuid.UUID("11111111-1111-4111-8111-111111111111")
DEPLOYMENT_ID = uuid.UUID("22222222-2222-4222-8222-222222222222")
FLOW_RUN_ID = uuid.UUID("33333333-3333-4333-8333-333333333333")
POOL_ID = uuid.UUID("44444444-4444-4444-8444-444444444444")
WORKER_ID = uuid.UUID("55555555-5555-4555-8555-555555555555")
ENV_SECRET_UUID = uuid.UUID("abcdef12-3456-4789-8abc-def123456789")
ENV_SECRET_SUFFIX = ENV_SECRET_UUID.hex[:8]
WORKER_NAME = "My K8s Worker"
POOL_NAME = "k8s-pool"
DEPLOYMENT_UPDATED = datetime.datetime(2026, 10, 1, 12, 0, tzinfo=datetime.timezone.utc)
DEFAULTS = {
    "flow_run_name": "witty-otter",
    "flow_name": "My Flow_Name",
    "deployment_name": "my-dep",
    "deployment": True,
    "worker_id": True,
}


# --- the Kubernetes API stand-in ------------------------------------------------------------
class Recorder:
    def __init__(self):
        self.calls = []
        self.api_client = None

    def sanitize(self, body):
        # The JSON the client sends for a model (camelCase keys, unset fields left out).
        if self.api_client is None:
            self.api_client = ApiClient()
        return self.api_client.sanitize_for_serialization(body)


RECORDER = Recorder()


class FakeCoreV1Api:
    def __init__(self, client=None):
        pass

    async def read_namespaced_secret(self, name, namespace):
        raise ApiException(status=404, reason="Not Found")

    async def create_namespaced_secret(self, namespace, body):
        RECORDER.calls.append(
            {"call": "create_secret", "namespace": namespace, "body": RECORDER.sanitize(body)}
        )
        return body

    async def replace_namespaced_secret(self, name, namespace, body):
        raise AssertionError("a Secret read never succeeds here")

    async def patch_namespaced_secret(self, name, namespace, body):
        RECORDER.calls.append({"call": "patch_secret", "name": name, "body": body})

    async def delete_namespaced_secret(self, name, namespace):
        RECORDER.calls.append({"call": "delete_secret", "name": name})


class FakeBatchV1Api:
    def __init__(self, client=None):
        pass

    async def create_namespaced_job(self, namespace, body):
        RECORDER.calls.append(
            {"call": "create_job", "namespace": namespace, "body": copy.deepcopy(body)}
        )
        name = body["metadata"].get("generateName", "") + "abcde"
        return types.SimpleNamespace(
            metadata=types.SimpleNamespace(name=name, namespace=namespace, uid="job-uid")
        )


kw.CoreV1Api = FakeCoreV1Api
kw.BatchV1Api = FakeBatchV1Api
kw.uuid = types.SimpleNamespace(uuid4=lambda: ENV_SECRET_UUID)
DEFAULT_IMAGE = get_prefect_image_name(python_version="3.11")
kw.get_prefect_image_name = lambda: DEFAULT_IMAGE

# The rendered configuration, exactly as `from_template_and_values` hands it to the model.
_CAPTURED = {}
_resolve_variables = base.resolve_variables


async def _capturing_resolve_variables(template, client=None):
    result = await _resolve_variables(template=template, client=client)
    _CAPTURED["config"] = copy.deepcopy(result)
    return result


base.resolve_variables = _capturing_resolve_variables


class WarningCapture(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


# --- one case -------------------------------------------------------------------------------
def objects(run):
    flow = Flow(id=FLOW_ID, name=run["flow_name"])
    deployment = None
    if run["deployment"]:
        deployment = DeploymentResponse(
            id=DEPLOYMENT_ID,
            name=run["deployment_name"],
            flow_id=FLOW_ID,
            updated=DEPLOYMENT_UPDATED,
        )
    flow_run = FlowRun(
        id=FLOW_RUN_ID,
        name=run["flow_run_name"],
        flow_id=FLOW_ID,
        deployment_id=DEPLOYMENT_ID if run["deployment"] else None,
    )
    worker_id = WORKER_ID if run["worker_id"] else None
    return flow, deployment, flow_run, worker_id


def run_inputs(flow, deployment, flow_run, pool):
    """What Cohort's worker gives an infrastructure (`cohort_infra::RunSpec`): the base
    environment without the worker id, and the generic (unslugged) labels."""
    env = {
        **BaseJobConfiguration._base_environment(),
        **BaseJobConfiguration._base_flow_run_environment(flow_run),
        **BaseJobConfiguration._base_attribution_environment(
            flow_run=flow_run,
            deployment=deployment,
            flow=flow,
            worker_id=None,
            worker_name=WORKER_NAME,
        ),
    }
    labels = {
        **BaseJobConfiguration._base_flow_run_labels(flow_run),
        **BaseJobConfiguration._base_work_pool_labels(pool),
        **BaseJobConfiguration._base_worker_name_label(WORKER_NAME),
        **BaseJobConfiguration._base_flow_labels(flow),
        **BaseJobConfiguration._base_deployment_labels(deployment),
    }
    return env, labels


def describe_error(exc):
    if isinstance(exc, pydantic.ValidationError):
        errors = []
        for error in exc.errors():
            entry = {"type": error["type"], "loc": [str(p) for p in error["loc"]]}
            if error["type"] == "value_error":
                entry["message"] = str(error["ctx"]["error"])
            else:
                entry["message"] = error["msg"]
            errors.append(entry)
        return {"type": "ValidationError", "errors": errors}
    return {"type": type(exc).__name__, "message": str(exc)}


async def render_case(case):
    template = case["template"]
    if template == "package":
        template = PACKAGE_TEMPLATE
    elif template == "server":
        template = SERVER_TEMPLATE
    else:
        # A custom `job_configuration` with the package's variables.
        template = {**template, "variables": PACKAGE_TEMPLATE["variables"]}
    run = {**DEFAULTS, **case.get("run", {})}
    flow, deployment, flow_run, worker_id = objects(run)
    pool = WorkPool(id=POOL_ID, name=POOL_NAME, type="kubernetes", base_job_template=template)

    saved_env = {}
    for key, value in case.get("kubernetes_settings", {}).items():
        saved_env[key] = os.environ.get(key)
        os.environ[key] = value
    RECORDER.calls.clear()
    _CAPTURED.clear()
    warnings = WarningCapture()
    worker = kw.KubernetesWorker(work_pool_name=POOL_NAME, name=WORKER_NAME)
    worker._logger.addHandler(warnings)
    record = {"name": case["name"], "template": case["template"]}
    record["job_variables"] = case.get("job_variables", {})
    if case.get("run"):
        record["run"] = case["run"]
    if case.get("prefect_settings"):
        record["prefect_settings"] = case["prefect_settings"]
    if case.get("kubernetes_settings"):
        record["kubernetes_settings"] = case["kubernetes_settings"]
    try:
        with temporary_settings(updates=case.get("prefect_settings", {})):
            env, labels = run_inputs(flow, deployment, flow_run, pool)
            record["inputs"] = {
                "flow_run_name": flow_run.name,
                **(
                    {
                        "ctx": {
                            "flow": flow.model_dump(mode="json"),
                            "flow_run": flow_run.model_dump(mode="json"),
                        }
                    }
                    if "{{" in str(record["job_variables"].get("name"))
                    else {}
                ),
                "worker_id": str(worker_id) if worker_id else None,
                "env": env,
                "labels": labels,
            }
            try:
                cfg = await kw.KubernetesWorkerJobConfiguration.from_template_and_values(
                    template, record["job_variables"], client=object()
                )
                record["config"] = _CAPTURED["config"]
                cfg.prepare_for_flow_run(
                    flow_run,
                    deployment=deployment,
                    flow=flow,
                    work_pool=pool,
                    worker_name=WORKER_NAME,
                    worker_id=worker_id,
                )
                await worker._create_job(cfg, client=None)
            except Exception as exc:  # noqa: BLE001 - every error is a golden
                record.setdefault("config", _CAPTURED.get("config"))
                record["error"] = describe_error(exc)
                return record
    finally:
        worker._logger.removeHandler(warnings)
        for key, value in saved_env.items():
            if value is None:
                del os.environ[key]
            else:
                os.environ[key] = value

    job = [c for c in RECORDER.calls if c["call"] == "create_job"]
    assert len(job) == 1, RECORDER.calls
    record["result"] = {
        "namespace": job[0]["namespace"],
        "manifest": job[0]["body"],
        "cluster_config": (
            cfg.cluster_config.model_dump(mode="json", include={"config", "context_name"})
            if cfg.cluster_config
            else None
        ),
        "stream_output": cfg.stream_output,
        "pod_watch_timeout_seconds": cfg.pod_watch_timeout_seconds,
        "job_watch_timeout_seconds": cfg.job_watch_timeout_seconds,
        "secrets": [
            {"namespace": c["namespace"], "body": c["body"]}
            for c in RECORDER.calls
            if c["call"] == "create_secret"
        ],
        "warnings": warnings.messages,
    }
    return record


# --- the matrix -----------------------------------------------------------------------------
VALUE_FROM = {"secretKeyRef": {"name": "db", "key": "password"}}

BOTH_TEMPLATES = [
    ("no-variables", {}),
    (
        "env-dict",
        {
            "env": {
                "FOO": "bar",
                "NUM": 3,
                "FLAG": True,
                "RATIO": 1.5,
                "NESTED": {"a": [1, None]},
                "UNSET": None,
                "PREFECT_API_URL": "http://override:4200/api",
            }
        },
    ),
    (
        "env-list-with-value-from",
        {
            "env": [
                {"name": "A", "value": "1"},
                {"name": "DB_PASSWORD", "valueFrom": VALUE_FROM},
                {"name": "B", "value": "two"},
                {"name": "PREFECT__FLOW_RUN_ID", "value": "overridden"},
                {"name": "NO_VALUE"},
            ]
        },
    ),
    (
        "labels-and-annotations-needing-slugs",
        {
            "labels": {
                "Team Name": "A B",
                "example.com/Owner_": "__x__",
                "日本語": "日本語",
                "a/b/c": "d/e",
                "___": "___",
                "-lead": ".trail.",
                "prefect.io/flow-run-name": "user override!",
                "Ünïcødé flow — test": "Ünïcødé flow — test",
                "x" * 70: "y" * 70,
                ("p" * 260) + "/n": "v",
            },
            "annotations": {
                "my annotation/key!": "any value: kept as is",
                "team/owner": "data eng",
                "___": "x",
            },
        },
    ),
    ("long-unicode-name", {"name": "Ünïcødé flow — test with a very long name that goes past the cap"}),
    ("cjk-name", {"name": "日本語"}),
    ("name-slug-empty", {"name": "___"}),
    ("name-null", {"name": None}),
    ("name-empty", {"name": ""}),
    ("name-template", {"name": "{{ ctx.flow.name }}-{{ ctx.flow_run.name }}"}),
    ("name-template-whole", {"name": "{{ ctx.flow_run.name }}"}),
    ("name-template-id", {"name": "run-{{ ctx.flow_run.id }}"}),
    ("name-template-missing-whole", {"name": "{{ ctx.flow_run.nope }}"}),
    ("name-template-missing-embedded", {"name": "x-{{ ctx.flow_run.nope }}-{{ nothing }}"}),
    ("name-template-number-falsy", {"name": "{{ ctx.flow_run.run_count }}"}),
    ("name-template-env", {"name": "n-{{ $COHORT_GOLDEN_NAME_VAR }}-{{ $COHORT_GOLDEN_UNSET }}"}),
    ("name-template-nested", {"name": "{{ ctx.flow_run.empirical_policy.max_retries }}x"}),
    ("command-string", {"command": "python -m my.mod --opt 'a b' \"c d\" e\\ f \"x\\$y\""}),
    ("command-empty", {"command": ""}),
    ("command-unbalanced-quote", {"command": "echo 'oops"}),
    ("command-list-variable", {"command": ["python", "-m", "x"]}),
    (
        "cpu-and-memory",
        {"cpu_request": "250m", "cpu_limit": "1", "memory_request": "128Mi", "memory_limit": "1Gi"},
    ),
    (
        "all-plain-variables",
        {
            "image": "repo/img:1",
            "namespace": "prefect",
            "service_account_name": "prefect-sa",
            "image_pull_policy": "Always",
            "finished_job_ttl": 300,
            "stream_output": False,
            "pod_watch_timeout_seconds": "30",
            "job_watch_timeout_seconds": 10,
            "labels": {"team": "data"},
        },
    ),
    (
        "cluster-config",
        {"cluster_config": {"config": {"apiVersion": "v1", "kind": "Config"}, "context_name": "kind"}},
    ),
    ("labels-not-strings", {"labels": {"n": 1}}),
    ("namespace-not-a-string", {"namespace": 5}),
]

PACKAGE_ONLY = [
    ("backoff-limit-0", {"backoff_limit": 0}),
    ("backoff-limit-2", {"backoff_limit": 2}),
    (
        "backoff-limit-0-user-sigterm",
        {
            "backoff_limit": 0,
            "env": {"A": "1", "PREFECT_FLOW_RUN_EXECUTE_SIGTERM_BEHAVIOR": "cancel", "Z": "2"},
        },
    ),
    (
        "backoff-limit-0-user-sigterm-empty",
        {"backoff_limit": 0, "env": {"PREFECT_FLOW_RUN_EXECUTE_SIGTERM_BEHAVIOR": "", "Z": "2"}},
    ),
    (
        "backoff-limit-2-user-sigterm",
        {
            "backoff_limit": 2,
            "env": {"A": "1", "PREFECT_FLOW_RUN_EXECUTE_SIGTERM_BEHAVIOR": "reschedule", "Z": "2"},
        },
    ),
    (
        "backoff-limit-0-env-list-user-sigterm",
        {
            "backoff_limit": 0,
            "env": [
                {"name": "PREFECT_FLOW_RUN_EXECUTE_SIGTERM_BEHAVIOR", "value": "cancel"},
                {"name": "S", "valueFrom": VALUE_FROM},
            ],
        },
    ),
    (
        "backoff-limit-2-env-list-user-sigterm-value-from",
        {
            "backoff_limit": 2,
            "env": [
                {"name": "A", "value": "1"},
                {"name": "PREFECT_FLOW_RUN_EXECUTE_SIGTERM_BEHAVIOR", "valueFrom": VALUE_FROM},
            ],
        },
    ),
    ("backoff-limit-false", {"backoff_limit": False}),
    ("backoff-limit-string", {"backoff_limit": "0"}),
]


def custom(edit):
    """A pool whose `job_configuration` was edited; its variables stay the package's."""
    config = copy.deepcopy(PACKAGE_TEMPLATE["job_configuration"])
    edit(config["job_manifest"], config)
    return {"job_configuration": config}


def container(manifest):
    return manifest["spec"]["template"]["spec"]["containers"][0]


def hard_coded_env(manifest, _):
    container(manifest)["env"] = [
        {"name": "FROM_TEMPLATE", "value": "t"},
        {"name": "DB_PASSWORD", "valueFrom": VALUE_FROM},
        {"name": "PREFECT__FLOW_RUN_ID", "value": "template-duplicate"},
        {"name": "FOO", "value": "template-foo"},
    ]


def no_parallelism(manifest, _):
    del manifest["spec"]["template"]["spec"]["parallelism"]


def on_failure(manifest, _):
    manifest["spec"]["template"]["spec"]["restartPolicy"] = "OnFailure"


def missing_and_incompatible(manifest, _):
    del manifest["spec"]["template"]["spec"]["completions"]
    del manifest["apiVersion"]
    manifest["kind"] = "CronJob"


def incompatible_only(manifest, _):
    manifest["kind"] = "CronJob"
    manifest["apiVersion"] = "batch/v2"
    manifest["spec"]["template"]["spec"]["parallelism"] = 2
    container(manifest)["name"] = "main"


def args_not_string(manifest, _):
    container(manifest)["args"] = 5


def args_list(manifest, _):
    container(manifest)["args"] = ["python", "-c", "print('hi')"]


def sidecar_realistic(manifest, _):
    manifest["spec"]["template"]["spec"]["containers"].insert(
        0, {"name": "sidecar", "image": "busybox"}
    )


def sidecar_minimal(manifest, _):
    manifest["spec"]["template"]["spec"]["containers"] = [
        {"name": "sidecar", "image": "busybox"},
        {"name": "prefect-job"},
    ]


def prefect_job_in_the_middle(manifest, _):
    manifest["spec"]["template"]["spec"]["containers"] = [
        {"name": "first", "image": "a", "env": "{{ env }}"},
        {"name": "prefect-job"},
        {"name": "last", "image": "b"},
    ]


def container_without_name(manifest, _):
    del container(manifest)["name"]


def containers_empty(manifest, _):
    manifest["spec"]["template"]["spec"]["containers"] = []


def container_not_an_object(manifest, _):
    manifest["spec"]["template"]["spec"]["containers"] = ["prefect-job"]


def containers_not_a_list(manifest, _):
    manifest["spec"]["template"]["spec"]["containers"] = {"name": "prefect-job"}


def move_hides_missing_parallelism(manifest, _):
    del manifest["spec"]["template"]["spec"]["parallelism"]
    manifest["spec"]["backoffLimit"] = 1


def label_value_hides_missing_restart_policy(manifest, _):
    del manifest["spec"]["template"]["spec"]["restartPolicy"]
    manifest["metadata"]["labels"] = {"policy": "Never"}


def pod_metadata(manifest, _):
    manifest["metadata"]["labels"] = {"hard/coded key": "val ue", "team": "from-template"}
    manifest["metadata"]["annotations"] = {"job anno": "kept"}
    manifest["spec"]["template"]["metadata"] = {
        "labels": {"pod label": "x y"},
        "annotations": {"pod/anno": "v", "job anno": "pod value"},
    }


def generate_name_fixed(manifest, _):
    manifest["metadata"]["generateName"] = "custom-"


def generate_name_placeholder(manifest, _):
    manifest["metadata"]["generateName"] = "{{ ctx.flow.name }}-"


def no_backoff_limit(manifest, _):
    del manifest["spec"]["backoffLimit"]


def image_hard_coded(manifest, _):
    container(manifest)["image"] = "hard/coded:1"


def no_image_key(manifest, _):
    del container(manifest)["image"]


def no_metadata(manifest, _):
    del manifest["metadata"]


def no_spec(manifest, _):
    del manifest["spec"]


def env_dict_in_config(manifest, config):
    config["env"] = {"FROM_CONFIG": "c", "OVERRIDDEN": "config"}


def metadata_labels_not_object(manifest, _):
    manifest["metadata"]["labels"] = "nope"


CUSTOM = [
    ("hard-coded-env-list", hard_coded_env, {"env": {"FOO": "bar"}}),
    ("hard-coded-env-list-no-variables", hard_coded_env, {}),
    ("hard-coded-env-list-and-env-list-variable", hard_coded_env, {"env": [{"name": "L", "value": "1"}, {"name": "V", "valueFrom": VALUE_FROM}]}),
    ("missing-parallelism", no_parallelism, {}),
    ("restart-policy-on-failure", on_failure, {}),
    ("missing-and-incompatible", missing_and_incompatible, {}),
    ("incompatible-values", incompatible_only, {}),
    ("args-not-a-string-or-list", args_not_string, {}),
    ("args-list", args_list, {}),
    ("sidecar-first-realistic", sidecar_realistic, {}),
    ("sidecar-first-minimal-prefect-job", sidecar_minimal, {"image": "repo/img:1", "env": {"A": "1"}}),
    ("prefect-job-in-the-middle", prefect_job_in_the_middle, {"env": {"A": "1"}}),
    ("container-without-name", container_without_name, {}),
    ("containers-empty", containers_empty, {}),
    ("container-not-an-object", container_not_an_object, {}),
    ("containers-not-a-list", containers_not_a_list, {}),
    ("move-hides-missing-parallelism", move_hides_missing_parallelism, {}),
    ("label-value-hides-missing-restart-policy", label_value_hides_missing_restart_policy, {}),
    ("pod-metadata-in-template", pod_metadata, {"labels": {"team": "data"}, "annotations": {"a": "b"}}),
    ("pod-metadata-in-template-no-annotations", pod_metadata, {}),
    ("generate-name-hard-coded", generate_name_fixed, {}),
    ("generate-name-placeholder", generate_name_placeholder, {"name": "custom name"}),
    ("no-backoff-limit", no_backoff_limit, {}),
    ("no-backoff-limit-user-sigterm", no_backoff_limit, {"env": {"PREFECT_FLOW_RUN_EXECUTE_SIGTERM_BEHAVIOR": "reschedule"}}),
    ("image-hard-coded", image_hard_coded, {"image": "ignored:1"}),
    ("no-image-key", no_image_key, {"image": "ignored:1"}),
    ("no-metadata", no_metadata, {"namespace": "elsewhere"}),
    ("no-spec", no_spec, {}),
    ("env-object-in-job-configuration", env_dict_in_config, {"env": {"OVERRIDDEN": "variable"}}),
    ("metadata-labels-not-an-object", metadata_labels_not_object, {}),
]

API_KEY = {"api.key": "pnu_0123456789abcdef"}
AUTH = {"api.auth_string": "admin:pass"}
SECRET_CASES = [
    (
        "api-key-secret-name-and-key",
        "package",
        {},
        API_KEY,
        {
            "PREFECT_INTEGRATIONS_KUBERNETES_WORKER_API_KEY_SECRET_NAME": "prefect-api",
            "PREFECT_INTEGRATIONS_KUBERNETES_WORKER_API_KEY_SECRET_KEY": "key",
        },
    ),
    (
        "api-key-secret-name-without-key",
        "package",
        {},
        API_KEY,
        {"PREFECT_INTEGRATIONS_KUBERNETES_WORKER_API_KEY_SECRET_NAME": "prefect-api"},
    ),
    (
        "create-secret-for-api-key",
        "package",
        {"namespace": "prefect"},
        API_KEY,
        {"PREFECT_INTEGRATIONS_KUBERNETES_WORKER_CREATE_SECRET_FOR_API_KEY": "true"},
    ),
    (
        "create-secret-for-api-key-legacy-alias",
        "server",
        {},
        API_KEY,
        {"PREFECT_KUBERNETES_WORKER_STORE_PREFECT_API_IN_SECRET": "yes"},
    ),
    (
        "create-secret-for-api-key-without-api-key",
        "package",
        {},
        {},
        {"PREFECT_INTEGRATIONS_KUBERNETES_WORKER_CREATE_SECRET_FOR_API_KEY": "1"},
    ),
    (
        "api-key-from-job-env",
        "package",
        {"env": {"PREFECT_API_KEY": "pnu_from_job"}},
        API_KEY,
        {"PREFECT_INTEGRATIONS_KUBERNETES_WORKER_CREATE_SECRET_FOR_API_KEY": "true"},
    ),
    (
        "auth-string-secret",
        "package",
        {},
        {**API_KEY, **AUTH},
        {
            "PREFECT_INTEGRATIONS_KUBERNETES_WORKER_API_AUTH_STRING_SECRET_NAME": "auth",
            "PREFECT_INTEGRATIONS_KUBERNETES_WORKER_API_AUTH_STRING_SECRET_KEY": "string",
        },
    ),
    ("auth-string-in-manifest-warns", "package", {}, AUTH, {}),
    (
        "auth-string-secret-name-without-key-warns",
        "package",
        {},
        AUTH,
        {"PREFECT_INTEGRATIONS_KUBERNETES_WORKER_API_AUTH_STRING_SECRET_NAME": "auth"},
    ),
    (
        "store-env-as-secret",
        "package",
        {"env": [{"name": "A", "value": "1"}, {"name": "DB", "valueFrom": VALUE_FROM}]},
        API_KEY,
        {
            "PREFECT_INTEGRATIONS_KUBERNETES_WORKER_STORE_ENV_AS_SECRET": "true",
            "PREFECT_INTEGRATIONS_KUBERNETES_WORKER_CREATE_SECRET_FOR_API_KEY": "true",
        },
    ),
    (
        "store-env-as-secret-server-template",
        "server",
        {"name": "Named Run", "env": {"A": "1"}},
        {},
        {"PREFECT_INTEGRATIONS_KUBERNETES_WORKER_STORE_ENV_AS_SECRET": "on"},
    ),
    (
        "store-env-as-secret-with-template-env-from",
        custom(lambda m, _: container(m).update({"envFrom": [{"configMapRef": {"name": "cm"}}]})),
        {},
        {},
        {"PREFECT_INTEGRATIONS_KUBERNETES_WORKER_STORE_ENV_AS_SECRET": "true"},
    ),
]

# The job variables behind the shared captures `k8s-rendered-{default,vars}-0.8.0.json` and
# `k8s-rendered-server-bundled-3.8.8.json` (copied to `captures/`): the golden test checks that
# Prefect still renders them, and Cohort too.
CAPTURES = [
    ("default-0.8.0", "package", {}),
    (
        "vars-0.8.0",
        "package",
        {
            "namespace": "prefect",
            "image": "repo/img:1",
            "name": "my-flow-name-run",
            "labels": {"Team Name": "A B"},
            "annotations": {"team/owner": "data eng"},
            "env": {"FOO": "bar", "NUM": 3},
            "command": "python -m my.mod",
            "backoff_limit": 2,
            "finished_job_ttl": 300,
            "service_account_name": "prefect-sa",
            "cpu_limit": "500m",
            "memory_request": "128Mi",
        },
    ),
    ("server-bundled-3.8.8", "server", {}),
]

RUN_VARIANTS = [
    ("no-deployment", {"deployment": False}),
    ("no-worker-id", {"worker_id": False}),
    (
        "unicode-and-long-names",
        {
            "flow_run_name": "日本語のフロー run with a name well past forty-five characters",
            "flow_name": "Ünïcødé flow — test",
            "deployment_name": "Dép loy/ment",
        },
    ),
    ("no-deployment-unicode-flow", {"deployment": False, "flow_name": "x'y\"z flow"}),
    ("flow-run-name-slugs-to-nothing", {"flow_run_name": "___"}),
]


def matrix():
    cases = []
    for name, template, variables in CAPTURES:
        cases.append({"name": f"capture/{name}", "template": template, "job_variables": variables})
    for template in ("package", "server"):
        for name, variables in BOTH_TEMPLATES:
            cases.append({"name": f"{template}/{name}", "template": template, "job_variables": variables})
        for name, run in RUN_VARIANTS:
            cases.append({"name": f"{template}/run-{name}", "template": template, "run": run})
    for name, variables in PACKAGE_ONLY:
        cases.append({"name": f"package/{name}", "template": "package", "job_variables": variables})
    for name, edit, variables in CUSTOM:
        cases.append({"name": f"custom/{name}", "template": custom(edit), "job_variables": variables})
    for name, template, variables, prefect_settings, kubernetes_settings in SECRET_CASES:
        cases.append(
            {
                "name": f"secrets/{name}",
                "template": template,
                "job_variables": variables,
                "prefect_settings": prefect_settings,
                "kubernetes_settings": kubernetes_settings,
            }
        )
    return cases


def settings_env_order(settings):
    """Every setting's variable in `Settings.to_environment_variables` order (model fields,
    depth first)."""
    names = []
    for key in type(settings).model_fields:
        child = getattr(settings, key)
        if isinstance(child, PrefectBaseSettings):
            names.extend(settings_env_order(child))
        else:
            names.append(f"{settings.model_config.get('env_prefix')}{key.upper()}")
    return names


async def main():
    out_path = sys.argv[1]
    flow, _, flow_run, _ = objects(DEFAULTS)
    cases = [await render_case(case) for case in matrix()]
    if RECORDER.api_client is not None:
        await RECORDER.api_client.close()
    document = {
        "generated_by": "crates/cohort-kube-manifest/goldens/render.py",
        "versions": {
            "prefect": prefect.__version__,
            "prefect_kubernetes": prefect_kubernetes.__version__,
        },
        "fixed": {
            "flow_run_id": str(FLOW_RUN_ID),
            "worker_name": WORKER_NAME,
            "default_image": DEFAULT_IMAGE,
            "env_secret_suffix": ENV_SECRET_SUFFIX,
            "process_env": {"COHORT_GOLDEN_NAME_VAR": os.environ["COHORT_GOLDEN_NAME_VAR"]},
        },
        "settings_env_order": settings_env_order(get_current_settings()),
        "cases": cases,
    }
    with open(out_path, "w", encoding="utf-8") as f:
        json.dump(document, f, indent=1, ensure_ascii=False)
        f.write("\n")


try:
    asyncio.run(main())
finally:
    shutil.rmtree(_HOME, ignore_errors=True)
