//! Cohort's manifest against prefect-kubernetes 0.8.0's for every case of
//! `goldens/render-matrix.json` (written by `goldens/render.py` from Prefect's own code), and the
//! matrix itself against a fresh run of that script, so it cannot go stale.

mod util;

use std::collections::BTreeMap;
use std::process::Command;

use cohort_kube_manifest::{
    prepare, ManifestError, ManifestSettings, Map, RunInputs, BASE_JOB_TEMPLATE,
    SERVER_BUNDLED_TEMPLATE,
};
use serde_json::Value;
use uuid::Uuid;

fn matrix() -> Value {
    let text = std::fs::read_to_string(util::crate_dir().join("goldens/render-matrix.json"))
        .expect("goldens/render-matrix.json");
    serde_json::from_str(&text).expect("the matrix is JSON")
}

fn template(case: &Value) -> Value {
    let package: Value = serde_json::from_str(BASE_JOB_TEMPLATE).unwrap();
    match &case["template"] {
        Value::String(s) if s == "package" => package,
        Value::String(s) if s == "server" => serde_json::from_str(SERVER_BUNDLED_TEMPLATE).unwrap(),
        Value::Object(custom) => {
            let mut template = custom.clone();
            template.insert("variables".into(), package["variables"].clone());
            Value::Object(template)
        }
        other => panic!("unknown template {other}"),
    }
}

fn string_map(value: &Value) -> BTreeMap<String, String> {
    value
        .as_object()
        .expect("an object")
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().expect("a string").to_owned()))
        .collect()
}

/// Exact JSON, key order included (`Value`'s own equality ignores object key order).
fn same(a: &Value, b: &Value) -> bool {
    a == b && serde_json::to_string(a).unwrap() == serde_json::to_string(b).unwrap()
}

/// Name templates that only use what Cohort knows without the API's flow run and flow objects
/// (`id` and `name` of both).
const WITHOUT_API_OBJECTS: &[&str] = &["name-template", "name-template-whole", "name-template-id"];

/// What went wrong with one case, or nothing. `api_objects`: whether the flow run and flow are
/// given for `{{ ctx.* }}` in the name.
fn check_case(doc: &Value, case: &Value, api_objects: bool) -> Option<String> {
    let fixed = &doc["fixed"];
    let inputs = &case["inputs"];
    let config = case["config"].as_object().expect("every case renders");
    let env = string_map(&inputs["env"]);
    let labels = string_map(&inputs["labels"]);
    let process_env = string_map(&fixed["process_env"]);
    let lookup = |name: &str| process_env.get(name).cloned();
    let mut run = RunInputs::new(
        fixed["flow_run_id"].as_str().unwrap().parse().unwrap(),
        inputs["flow_run_name"].as_str().unwrap(),
        &env,
        &labels,
    );
    run.worker_id = inputs["worker_id"]
        .as_str()
        .map(|id| id.parse::<Uuid>().unwrap());
    run.default_image = fixed["default_image"].as_str().unwrap();
    run.env_secret_suffix = fixed["env_secret_suffix"].as_str().unwrap().to_owned();
    if api_objects {
        run.flow_run = inputs["ctx"]["flow_run"].as_object();
        run.flow = inputs["ctx"]["flow"].as_object();
    }
    run.process_env = Some(&lookup);
    let settings_env = case
        .get("kubernetes_settings")
        .map(string_map)
        .unwrap_or_default();
    let settings = ManifestSettings::from_env(&|name| settings_env.get(name).cloned()).unwrap();

    let ours = prepare(config, &run, &settings);
    match (&case["result"], &case["error"], ours) {
        (Value::Object(want), Value::Null, Ok(got)) => {
            let secrets: Vec<Value> = got
                .secrets
                .iter()
                .map(|s| serde_json::json!({"namespace": s.namespace, "body": s.body}))
                .collect();
            let fields = [
                ("namespace", Value::String(got.namespace.clone())),
                ("manifest", got.manifest.clone()),
                (
                    "cluster_config",
                    got.cluster_config.clone().unwrap_or(Value::Null),
                ),
                ("stream_output", Value::Bool(got.stream_output)),
                (
                    "pod_watch_timeout_seconds",
                    got.pod_watch_timeout_seconds.into(),
                ),
                (
                    "job_watch_timeout_seconds",
                    got.job_watch_timeout_seconds.into(),
                ),
                ("secrets", Value::Array(secrets)),
                ("warnings", serde_json::json!(got.warnings)),
            ];
            let wrong: Vec<String> = fields
                .iter()
                .filter(|(key, value)| !same(&want[*key], value))
                .map(|(key, value)| {
                    format!(
                        "  {key}:\n    prefect: {}\n    cohort:  {}",
                        serde_json::to_string(&want[*key]).unwrap(),
                        serde_json::to_string(value).unwrap()
                    )
                })
                .collect();
            (!wrong.is_empty()).then(|| wrong.join("\n"))
        }
        (Value::Null, Value::Object(want), Err(got)) => check_error(want, &got),
        (_, _, Ok(got)) => Some(format!(
            "  prefect fails with {}, cohort made {}",
            case["error"],
            serde_json::to_string(&got.manifest).unwrap()
        )),
        (_, _, Err(got)) => Some(format!("  prefect succeeds, cohort fails: {got}")),
    }
}

fn check_error(want: &Map, got: &ManifestError) -> Option<String> {
    let kind = want["type"].as_str().unwrap();
    let first = want.get("errors").map_or(&Value::Null, |errors| &errors[0]);
    let same_error = kind == got.prefect_exception()
        && match (kind, got) {
            ("ValidationError", ManifestError::InvalidField { field, .. }) => {
                // pydantic's own type errors: the same field is refused (in Cohort's words).
                first["type"] != "value_error" && first["loc"][0].as_str() == Some(field)
            }
            ("ValidationError", _) => {
                first["type"] == "value_error"
                    && first["message"].as_str() == Some(&got.to_string())
            }
            _ => want["message"].as_str() == Some(&got.to_string()),
        };
    (!same_error).then(|| format!("  prefect: {want:?}\n  cohort:  {got:?} ({got})"))
}

#[test]
fn cohort_prepares_every_case_as_prefect_does() {
    let doc = matrix();
    let cases = doc["cases"].as_array().unwrap();
    assert!(cases.len() > 100, "the matrix lost its cases");
    let failures: Vec<String> = cases
        .iter()
        .filter_map(|case| {
            check_case(&doc, case, true)
                .map(|why| format!("{}:\n{why}", case["name"].as_str().unwrap()))
        })
        .collect();
    assert!(
        failures.is_empty(),
        "{} of {} cases differ from Prefect:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

/// Rendering is `cohort-template`'s; it must give the configuration Prefect gives
/// `KubernetesWorkerJobConfiguration`.
#[test]
fn simple_name_templates_need_no_api_objects() {
    let doc = matrix();
    let mut checked = 0;
    for case in doc["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        if WITHOUT_API_OBJECTS
            .iter()
            .any(|n| name.ends_with(&format!("/{n}")))
        {
            assert_eq!(check_case(&doc, case, false), None, "{name}");
            checked += 1;
        }
    }
    assert_eq!(checked, 2 * WITHOUT_API_OBJECTS.len());
}

#[test]
fn cohort_template_renders_the_configuration_prefect_renders() {
    let doc = matrix();
    let mut failures = Vec::new();
    for case in doc["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let values = case["job_variables"].as_object().unwrap();
        let rendered = cohort_template::render(&template(case), values, &|_| None);
        match rendered {
            Ok(config) if same(&Value::Object(config.clone()), &case["config"]) => {}
            Ok(config) => failures.push(format!(
                "{name}:\n  prefect: {}\n  cohort:  {}",
                case["config"],
                Value::Object(config)
            )),
            Err(e) => failures.push(format!("{name}: {e}")),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn the_shared_captures_are_what_prefect_and_cohort_render() {
    let doc = matrix();
    for (file, case_name) in [
        ("k8s-rendered-default-0.8.0.json", "capture/default-0.8.0"),
        ("k8s-rendered-vars-0.8.0.json", "capture/vars-0.8.0"),
        (
            "k8s-rendered-server-bundled-3.8.8.json",
            "capture/server-bundled-3.8.8",
        ),
    ] {
        let capture: Value = serde_json::from_str(
            &std::fs::read_to_string(util::crate_dir().join("goldens/captures").join(file))
                .unwrap(),
        )
        .unwrap();
        let case = doc["cases"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == case_name)
            .unwrap();
        let result = &case["result"];
        assert!(
            same(&result["manifest"], &capture["job_manifest"]),
            "{file}: manifest"
        );
        for key in [
            "namespace",
            "stream_output",
            "pod_watch_timeout_seconds",
            "job_watch_timeout_seconds",
        ] {
            assert!(same(&result[key], &capture[key]), "{file}: {key}");
        }
        assert_eq!(check_case(&doc, case, true), None, "{file}");
    }
}

#[test]
fn the_embedded_settings_order_is_prefects() {
    let doc = matrix();
    let order: Vec<&str> = doc["settings_env_order"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    let embedded =
        std::fs::read_to_string(util::crate_dir().join("src/prefect-settings-env-order.txt"))
            .unwrap();
    assert_eq!(embedded.lines().collect::<Vec<_>>(), order);
}

#[test]
fn the_golden_matrix_is_what_prefect_renders_today() {
    let python = util::kubernetes_python();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("render-matrix.json");
    let run = Command::new(&python)
        .arg(util::crate_dir().join("goldens/render.py"))
        .arg(&out)
        .output()
        .expect("cannot run goldens/render.py");
    assert!(
        run.status.success(),
        "goldens/render.py failed ({}):\n{}",
        run.status,
        String::from_utf8_lossy(&run.stderr)
    );
    let fresh = std::fs::read_to_string(&out).unwrap();
    let committed =
        std::fs::read_to_string(util::crate_dir().join("goldens/render-matrix.json")).unwrap();
    if fresh != committed {
        let fresh: Value = serde_json::from_str(&fresh).unwrap();
        let committed: Value = serde_json::from_str(&committed).unwrap();
        let stale: Vec<String> = fresh["cases"]
            .as_array()
            .unwrap()
            .iter()
            .zip(committed["cases"].as_array().unwrap())
            .filter(|(a, b)| !same(a, b))
            .map(|(a, _)| a["name"].as_str().unwrap_or("?").to_owned())
            .collect();
        panic!(
            "goldens/render-matrix.json is stale (regenerate it with goldens/render.py); \
             cases that differ: {stale:?}"
        );
    }
}
