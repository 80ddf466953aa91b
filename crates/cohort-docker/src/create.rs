//! The container a run gets: labels, name, environment, network mode, limits and the user's
//! `container_create_kwargs`, as prefect-docker 0.7.4 builds them for docker-py
//! (`prefect_docker/worker.py: DockerWorkerJobConfiguration.prepare_for_flow_run`,
//! `DockerWorker._build_container_settings`), written for the Engine API directly.

use std::collections::{BTreeMap, HashMap};

use bollard::models::{ContainerCreateBody, HostConfig};
use cohort_infra::Map;
use serde_json::Value;

use crate::job::DockerJob;

/// The Prefect release whose Docker worker Cohort's stands in for (`io.prefect.version`).
pub const PREFECT_VERSION: &str = "3.8.8";
/// The image a job with none runs: `get_prefect_image_name()` of Prefect 3.8.8 on Python 3.11
/// (`prefect/utilities/dockerutils.py`); Cohort has no Python of its own to take the version from.
pub const DEFAULT_IMAGE: &str = "prefecthq/prefect:3.8.8-python3.11";
/// The command a job with none runs (`BaseJobConfiguration._base_flow_run_command`).
pub const DEFAULT_COMMAND: [&str; 3] = ["prefect", "flow-run", "execute"];

/// The container's labels: Prefect's base labels, the user's, `io.prefect.version`, then every
/// `namespace/key` turned around to `reversed.namespace.key`
/// (`DockerWorkerJobConfiguration._convert_labels_to_docker_format`).
pub fn labels(
    base: &BTreeMap<String, String>,
    user: &BTreeMap<String, String>,
) -> HashMap<String, String> {
    let mut all: BTreeMap<String, String> = base.clone();
    all.extend(user.iter().map(|(k, v)| (k.clone(), v.clone())));
    all.insert("io.prefect.version".into(), PREFECT_VERSION.into());
    all.into_iter()
        .map(|(k, v)| match k.split_once('/') {
            Some((namespace, key)) => {
                let reversed: Vec<&str> = namespace.split('.').rev().collect();
                (format!("{}.{key}", reversed.join(".")), v)
            }
            None => (k, v),
        })
        .collect()
}

/// The container name: the rendered name or the run's, slugified the way prefect-docker does
/// (`DockerWorker._slugify_container_name`: python-slugify keeping case, runs of anything but
/// `[a-zA-Z0-9_.-]` to one `-`, at most 250 characters, no leading `_`, `-` or `.`). `None`
/// lets the Engine pick one.
pub fn container_name(name: &str) -> Option<String> {
    let ascii = deunicode::deunicode(name);
    // python-slugify drops the thousands separator between digits ("1,000" → "1000").
    let chars: Vec<char> = ascii.chars().collect();
    let mut cleaned = String::with_capacity(chars.len());
    for (i, c) in chars.iter().enumerate() {
        let between_digits = *c == ','
            && i > 0
            && chars[i - 1].is_ascii_digit()
            && chars.get(i + 1).is_some_and(char::is_ascii_digit);
        if !between_digits {
            cleaned.push(*c);
        }
    }
    let mut slug = String::with_capacity(cleaned.len());
    for c in cleaned.chars() {
        if c.is_ascii_alphanumeric() || "_.".contains(c) {
            slug.push(c);
        } else if !slug.ends_with('-') {
            slug.push('-');
        }
    }
    let slug: String = slug.trim_matches('-').chars().take(250).collect();
    let slug = slug
        .trim_end_matches('-')
        .trim_start_matches(['_', '-', '.']);
    (!slug.is_empty()).then(|| slug.to_owned())
}

/// Whether the API URL is this host's loopback (`DockerWorkerJobConfiguration.get_network_mode`).
fn is_loopback_url(url: &str) -> bool {
    let host = url
        .split_once("://")
        .map_or(url, |(_, rest)| rest)
        .split(['/', '?'])
        .next()
        .unwrap_or_default();
    let host = host.rsplit_once('@').map_or(host, |(_, h)| h);
    let host = match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or_default(),
        None => host.split(':').next().unwrap_or_default(),
    };
    host == "127.0.0.1" || host == "localhost"
}

/// The network mode: the user's; else none when networks are given (the first becomes it);
/// else, on Linux, `host` for a loopback API URL so the flow reaches the server; else the
/// default bridge.
pub fn network_mode(job: &DockerJob, api_url: Option<&str>) -> String {
    if let Some(mode) = &job.network_mode {
        return mode.clone();
    }
    if let Some(first) = job.networks.first() {
        return first.clone();
    }
    if cfg!(target_os = "linux") && api_url.is_some_and(is_loopback_url) {
        return "host".into();
    }
    "default".into()
}

/// The container's environment: the run's (`PREFECT__*` and the worker's settings), with the
/// worker's loopback `PREFECT_API_URL` pointed at `host.docker.internal` unless the container
/// shares the host's network (`DockerWorkerJobConfiguration._base_environment`), then the job's
/// `env` on top (a `null` unsets).
pub fn environment(
    run_env: &BTreeMap<String, String>,
    job: &DockerJob,
    mode: &str,
) -> BTreeMap<String, String> {
    let mut env = run_env.clone();
    if mode != "host" {
        if let Some(url) = env.get_mut("PREFECT_API_URL") {
            *url = url
                .replace("localhost", "host.docker.internal")
                .replace("127.0.0.1", "host.docker.internal");
        }
    }
    cohort_template::fields::apply_env(&mut env, &job.env);
    env
}

/// docker-py's `parse_bytes`: a number with an optional `b`, `k`, `m` or `g` (powers of 1024).
pub fn parse_bytes(field: &str, value: &str) -> Result<i64, String> {
    let v = value.trim();
    if v == "-1" {
        return Ok(-1);
    }
    let (number, unit) = match v.char_indices().find(|(_, c)| c.is_ascii_alphabetic()) {
        Some((i, _)) => v.split_at(i),
        None => (v, ""),
    };
    let factor: i64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1 << 10,
        "m" | "mb" => 1 << 20,
        "g" | "gb" => 1 << 30,
        _ => return Err(format!("`{field}` has an unknown unit: {value:?}")),
    };
    let n: f64 = number
        .trim()
        .parse()
        .map_err(|_| format!("`{field}` is not a size: {value:?}"))?;
    Ok((n * factor as f64) as i64)
}

/// The docker-py `containers.create` keywords Cohort translates for `container_create_kwargs`.
pub const SUPPORTED_KWARGS: &[&str] = &[
    "cap_add",
    "cap_drop",
    "cpu_period",
    "cpu_quota",
    "cpu_shares",
    "cpuset_cpus",
    "dns",
    "domainname",
    "entrypoint",
    "extra_hosts",
    "group_add",
    "hostname",
    "init",
    "mem_reservation",
    "nano_cpus",
    "oom_kill_disable",
    "pids_limit",
    "read_only",
    "runtime",
    "security_opt",
    "shm_size",
    "stop_signal",
    "sysctls",
    "tmpfs",
    "tty",
    "user",
    "working_dir",
];

/// Job fields prefect-docker drops from `container_create_kwargs` (the job's own value wins).
const JOB_FIELDS: &[&str] = &[
    "command",
    "env",
    "labels",
    "name",
    "image",
    "registry_credentials",
    "image_pull_policy",
    "networks",
    "network_mode",
    "auto_remove",
    "volumes",
    "stream_output",
    "mem_limit",
    "memswap_limit",
    "privileged",
];

/// Everything `POST /containers/create` gets.
pub struct Create {
    pub name: Option<String>,
    pub body: ContainerCreateBody,
}

/// Builds the create request; an error is worded for the run's Crashed message.
pub fn create(
    job: &DockerJob,
    image: &str,
    env: &BTreeMap<String, String>,
    mode: &str,
    labels: HashMap<String, String>,
    name: Option<String>,
) -> Result<Create, String> {
    let command: Vec<String> = job
        .command
        .clone()
        .unwrap_or_else(|| DEFAULT_COMMAND.iter().map(|s| (*s).to_owned()).collect());
    let api_url = env.get("PREFECT_API_URL").map(String::as_str);
    let mut extra_hosts = Vec::new();
    // `DockerWorker._get_extra_hosts`: a container that may need to reach this host by name.
    if cfg!(target_os = "linux")
        && api_url.is_none_or(|u| {
            u.contains("localhost") || u.contains("127.0.0.1") || u.contains("host.docker.internal")
        })
    {
        extra_hosts.push("host.docker.internal:host-gateway".to_owned());
    }
    let mut host = HostConfig {
        network_mode: Some(mode.to_owned()),
        auto_remove: Some(job.auto_remove),
        privileged: job.privileged.then_some(true),
        binds: (!job.volumes.is_empty()).then(|| job.volumes.clone()),
        ..Default::default()
    };
    if let Some(limit) = &job.mem_limit {
        host.memory = Some(parse_bytes("mem_limit", limit)?);
    }
    if let Some(limit) = &job.memswap_limit {
        host.memory_swap = Some(parse_bytes("memswap_limit", limit)?);
    }
    let mut body = ContainerCreateBody {
        image: Some(image.to_owned()),
        cmd: Some(command),
        env: Some(env.iter().map(|(k, v)| format!("{k}={v}")).collect()),
        labels: Some(labels),
        attach_stdout: Some(true),
        attach_stderr: Some(true),
        volumes: {
            let targets: Vec<String> = job
                .volumes
                .iter()
                .filter_map(|v| {
                    let parts: Vec<&str> = v.split(':').collect();
                    match parts.as_slice() {
                        [path] => Some(path.to_string()),
                        [_, target, ..] => Some(target.to_string()),
                        [] => None,
                    }
                })
                .collect();
            (!targets.is_empty()).then_some(targets)
        },
        ..Default::default()
    };
    apply_kwargs(
        &job.container_create_kwargs,
        &mut body,
        &mut host,
        &mut extra_hosts,
    )?;
    host.extra_hosts = (!extra_hosts.is_empty()).then_some(extra_hosts);
    body.host_config = Some(host);
    Ok(Create { name, body })
}

/// Translates docker-py keyword arguments to the Engine API's fields. A key docker-py would
/// reject, or one Cohort does not translate, fails the run with the list of those it does.
fn apply_kwargs(
    kwargs: &Map,
    body: &mut ContainerCreateBody,
    host: &mut HostConfig,
    extra_hosts: &mut Vec<String>,
) -> Result<(), String> {
    fn strings(key: &str, v: &Value) -> Result<Vec<String>, String> {
        match v {
            Value::String(s) => Ok(vec![s.clone()]),
            Value::Array(items) => items
                .iter()
                .map(|i| match i {
                    Value::String(s) => Ok(s.clone()),
                    other => Ok(other.to_string()),
                })
                .collect(),
            _ => Err(format!(
                "`container_create_kwargs.{key}` must be a string or a list"
            )),
        }
    }
    fn int(key: &str, v: &Value) -> Result<i64, String> {
        v.as_i64()
            .ok_or_else(|| format!("`container_create_kwargs.{key}` must be an integer"))
    }
    fn string(key: &str, v: &Value) -> Result<String, String> {
        v.as_str()
            .map(str::to_owned)
            .ok_or_else(|| format!("`container_create_kwargs.{key}` must be a string"))
    }
    fn boolean(key: &str, v: &Value) -> Result<bool, String> {
        v.as_bool()
            .ok_or_else(|| format!("`container_create_kwargs.{key}` must be a boolean"))
    }
    fn map(key: &str, v: &Value) -> Result<HashMap<String, String>, String> {
        v.as_object()
            .map(|m| {
                m.iter()
                    .map(|(k, v)| {
                        (
                            k.clone(),
                            v.as_str().map_or_else(|| v.to_string(), str::to_owned),
                        )
                    })
                    .collect()
            })
            .ok_or_else(|| format!("`container_create_kwargs.{key}` must be an object"))
    }
    for (key, value) in kwargs {
        let key = key.as_str();
        if JOB_FIELDS.contains(&key) {
            tracing::warn!(
                key,
                "`container_create_kwargs.{key}` is ignored: the job's own `{key}` is used"
            );
            continue;
        }
        match key {
            // docker-py passes these itself: a second value is a TypeError there.
            "environment" | "network" => {
                return Err(format!(
                    "`container_create_kwargs` may not set `{key}`: use the job's `{}`",
                    if key == "environment" { "env" } else { "networks" }
                ))
            }
            "cap_add" => host.cap_add = Some(strings(key, value)?),
            "cap_drop" => host.cap_drop = Some(strings(key, value)?),
            "cpu_period" => host.cpu_period = Some(int(key, value)?),
            "cpu_quota" => host.cpu_quota = Some(int(key, value)?),
            "cpu_shares" => host.cpu_shares = Some(int(key, value)?),
            "cpuset_cpus" => host.cpuset_cpus = Some(string(key, value)?),
            "dns" => host.dns = Some(strings(key, value)?),
            "domainname" => body.domainname = Some(string(key, value)?),
            "entrypoint" => body.entrypoint = Some(strings(key, value)?),
            // Merged with the worker's own (prefect-docker #18187).
            "extra_hosts" => match value {
                Value::Object(m) => extra_hosts.extend(
                    m.iter()
                        .map(|(h, ip)| format!("{h}:{}", ip.as_str().unwrap_or_default())),
                ),
                other => extra_hosts.extend(strings(key, other)?),
            },
            "group_add" => host.group_add = Some(strings(key, value)?),
            "hostname" => body.hostname = Some(string(key, value)?),
            "init" => host.init = Some(boolean(key, value)?),
            "mem_reservation" => {
                host.memory_reservation = Some(match value {
                    Value::String(s) => parse_bytes(key, s)?,
                    other => int(key, other)?,
                })
            }
            "nano_cpus" => host.nano_cpus = Some(int(key, value)?),
            "oom_kill_disable" => host.oom_kill_disable = Some(boolean(key, value)?),
            "pids_limit" => host.pids_limit = Some(int(key, value)?),
            "read_only" => host.readonly_rootfs = Some(boolean(key, value)?),
            "runtime" => host.runtime = Some(string(key, value)?),
            "security_opt" => host.security_opt = Some(strings(key, value)?),
            "shm_size" => {
                host.shm_size = Some(match value {
                    Value::String(s) => parse_bytes(key, s)?,
                    other => int(key, other)?,
                })
            }
            "stop_signal" => body.stop_signal = Some(string(key, value)?),
            "sysctls" => host.sysctls = Some(map(key, value)?),
            "tmpfs" => {
                host.tmpfs = Some(match value {
                    Value::Array(_) | Value::String(_) => strings(key, value)?
                        .into_iter()
                        .map(|t| match t.split_once(':') {
                            Some((path, options)) => (path.to_owned(), options.to_owned()),
                            None => (t, String::new()),
                        })
                        .collect(),
                    other => map(key, other)?,
                })
            }
            "tty" => body.tty = Some(boolean(key, value)?),
            "user" => body.user = Some(string(key, value)?),
            "working_dir" => body.working_dir = Some(string(key, value)?),
            other => {
                return Err(format!(
                    "`container_create_kwargs` has the unsupported key `{other}`; the keys Cohort supports are: {}",
                    SUPPORTED_KWARGS.join(", ")
                ))
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn labels_turn_namespaces_around() {
        let base = BTreeMap::from([
            ("prefect.io/flow-run-id".to_owned(), "x".to_owned()),
            ("prefect.io/worker-name".to_owned(), "w".to_owned()),
        ]);
        let user = BTreeMap::from([
            ("a.b.c/d/e".to_owned(), "1".to_owned()),
            ("plain".to_owned(), "2".to_owned()),
        ]);
        let l = labels(&base, &user);
        assert_eq!(l["io.prefect.flow-run-id"], "x");
        assert_eq!(l["io.prefect.worker-name"], "w");
        assert_eq!(l["c.b.a.d/e"], "1");
        assert_eq!(l["plain"], "2");
        assert_eq!(l["io.prefect.version"], "3.8.8");
    }

    /// The examples measured against prefect-docker's slug (spec §2.1).
    #[test]
    fn container_names_are_slugified_like_prefect_docker() {
        for (name, slug) in [
            ("My Flow Run #1", Some("My-Flow-Run-1")),
            ("_.-leading", Some("leading")),
            ("über größe", Some("uber-grosse")),
            ("x'y\"z", Some("x-y-z")),
            ("1,000 items", Some("1000-items")),
            ("---", None),
            ("name/with:colons", Some("name-with-colons")),
            ("Ünïcödé.run_v2", Some("Unicode.run_v2")),
        ] {
            assert_eq!(container_name(name).as_deref(), slug, "{name}");
        }
        assert_eq!(container_name(&"a".repeat(300)).unwrap().len(), 250);
    }

    #[test]
    fn a_loopback_api_url_means_host_networking_on_linux() {
        let job = DockerJob::from_config(&Map::new()).unwrap();
        let expected = if cfg!(target_os = "linux") {
            "host"
        } else {
            "default"
        };
        assert_eq!(
            network_mode(&job, Some("http://127.0.0.1:4200/api")),
            expected
        );
        assert_eq!(
            network_mode(&job, Some("http://localhost:4200/api")),
            expected
        );
        assert_eq!(
            network_mode(&job, Some("http://prefect:4200/api")),
            "default"
        );
        let mut with_networks = job.clone();
        with_networks.networks = vec!["net1".into()];
        assert_eq!(
            network_mode(&with_networks, Some("http://127.0.0.1/api")),
            "net1"
        );
    }

    #[test]
    fn the_api_url_is_rewritten_off_the_host_network_and_the_job_env_wins() {
        let mut job = DockerJob::from_config(&Map::new()).unwrap();
        job.env.insert("B".into(), Some("job".into()));
        job.env.insert("GONE".into(), None);
        let run = BTreeMap::from([
            (
                "PREFECT_API_URL".to_owned(),
                "http://127.0.0.1:4200/api".to_owned(),
            ),
            ("B".to_owned(), "run".to_owned()),
            ("GONE".to_owned(), "x".to_owned()),
        ]);
        let bridged = environment(&run, &job, "default");
        assert_eq!(
            bridged["PREFECT_API_URL"],
            "http://host.docker.internal:4200/api"
        );
        assert_eq!(bridged["B"], "job");
        assert!(!bridged.contains_key("GONE"));
        assert_eq!(
            environment(&run, &job, "host")["PREFECT_API_URL"],
            "http://127.0.0.1:4200/api"
        );
    }

    #[test]
    fn sizes_parse_as_docker_py_does() {
        assert_eq!(parse_bytes("m", "512m"), Ok(512 << 20));
        assert_eq!(parse_bytes("m", "1g"), Ok(1 << 30));
        assert_eq!(parse_bytes("m", "100"), Ok(100));
        assert_eq!(parse_bytes("m", "-1"), Ok(-1));
        assert!(parse_bytes("m", "12q").is_err());
    }

    #[test]
    fn create_kwargs_are_translated_and_unknown_ones_name_the_valid_ones() {
        let mut job = DockerJob::from_config(&Map::new()).unwrap();
        job.container_create_kwargs =
            json!({"user": "1000", "working_dir": "/w", "shm_size": "64m",
            "extra_hosts": {"db": "10.0.0.2"}, "image": "ignored"})
            .as_object()
            .unwrap()
            .clone();
        let c = create(
            &job,
            "img:1",
            &BTreeMap::new(),
            "host",
            HashMap::new(),
            None,
        )
        .unwrap();
        let host = c.body.host_config.unwrap();
        assert_eq!(c.body.user.as_deref(), Some("1000"));
        assert_eq!(c.body.working_dir.as_deref(), Some("/w"));
        assert_eq!(c.body.image.as_deref(), Some("img:1"));
        assert_eq!(host.shm_size, Some(64 << 20));
        assert!(host
            .extra_hosts
            .unwrap()
            .contains(&"db:10.0.0.2".to_owned()));
        assert_eq!(
            c.body.cmd.unwrap(),
            ["prefect", "flow-run", "execute"].map(String::from)
        );

        job.container_create_kwargs = json!({"--gpus": "all"}).as_object().unwrap().clone();
        let e = create(&job, "i", &BTreeMap::new(), "host", HashMap::new(), None)
            .err()
            .unwrap();
        assert!(e.contains("`--gpus`") && e.contains("working_dir"), "{e}");
        job.container_create_kwargs = json!({"environment": {}}).as_object().unwrap().clone();
        let e = create(&job, "i", &BTreeMap::new(), "host", HashMap::new(), None)
            .err()
            .unwrap();
        assert!(e.contains("`env`"), "{e}");
    }
}
