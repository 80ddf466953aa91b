//! The HTTP client: one `reqwest::Client`, Prefect's headers and auth, and retries for the
//! answers a busy or restarting server gives.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;
use serde_json::{json, Value};
use uuid::Uuid;

use crate::error::ApiError;
use crate::models::*;
use crate::retry::{jittered, Backoff, Retry};
use crate::settings::{Settings, SettingsError};

/// How to reach and authenticate with the Prefect API. Its `Debug` leaves the credentials out.
#[derive(Clone)]
pub struct ClientConfig {
    /// e.g. `http://127.0.0.1:4200/api`
    pub api_url: url::Url,
    /// Prefect Cloud key: `Authorization: Bearer`.
    pub api_key: Option<String>,
    /// Self-hosted basic auth (`user:pass`): `Authorization: Basic`.
    pub auth_string: Option<String>,
    /// Retries of one request on a transient failure (`PREFECT_CLIENT_MAX_RETRIES`).
    pub max_retries: u32,
    /// Per-request deadline.
    pub request_timeout: Duration,
    /// First retry delay; doubled each retry, capped at 30 s.
    pub retry_base_delay: Duration,
}

impl std::fmt::Debug for ClientConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let redacted = |secret: &Option<String>| secret.as_ref().map(|_| "<redacted>");
        f.debug_struct("ClientConfig")
            .field("api_url", &self.api_url.as_str())
            .field("api_key", &redacted(&self.api_key))
            .field("auth_string", &redacted(&self.auth_string))
            .field("max_retries", &self.max_retries)
            .field("request_timeout", &self.request_timeout)
            .field("retry_base_delay", &self.retry_base_delay)
            .finish()
    }
}

impl ClientConfig {
    pub fn from_settings(settings: &Settings) -> Result<Self, SettingsError> {
        Ok(Self {
            api_url: settings.api_url()?,
            api_key: settings.api_key().map(str::to_owned),
            auth_string: settings.auth_string().map(str::to_owned),
            max_retries: settings.u64("PREFECT_CLIENT_MAX_RETRIES", 5)? as u32,
            request_timeout: settings
                .seconds("PREFECT_API_REQUEST_TIMEOUT", Duration::from_secs(60))?,
            retry_base_delay: Duration::from_secs(1),
        })
    }
}

/// A cheap-to-clone Prefect API client.
#[derive(Clone)]
pub struct PrefectClient {
    http: reqwest::Client,
    config: Arc<ClientConfig>,
    /// Connection errors are retried only after the server has answered once, so a wrong URL
    /// fails fast while a restarting server is ridden out (`prefect/client/base.py:
    /// PrefectHttpxAsyncClient.send`, `_has_connected`).
    has_connected: Arc<AtomicBool>,
    /// Requests on the wire at once, at most [`MAX_IN_FLIGHT`].
    in_flight: Arc<tokio::sync::Semaphore>,
    /// Writes on the wire at once, at most [`MAX_WRITES_IN_FLIGHT`].
    writes: Arc<tokio::sync::Semaphore>,
}

/// Writes one at a time. A Prefect server on SQLite serializes writes anyway, and answers 503
/// ("database is locked") to a write whose transaction read first and then finds another
/// writer ahead (SQLite does not wait on a lock upgrade: `PATCH /flow_runs/{id}/labels` reads
/// the run, then updates it, `prefect/server/models/flow_runs.py: update_flow_run_labels`).
/// Concurrent writes of one worker's runs mostly collided with each other, each 503 costing a
/// retry; on PostgreSQL, one writer at a time costs nothing the server would not serialize.
const MAX_WRITES_IN_FLIGHT: usize = 1;

/// After a write answered 503 this client sends no other write for about this long (the retry
/// itself waits longer). A 503 on a write means another client's write held the database
/// (SQLite); this worker's next write, sent at once, mostly met the same writer. With 4
/// workers on one pool the labels endpoint's 503s went from 0.7–1.3 to 0.4–0.5 per run
/// (BENCHMARKS.md §6), with no later pickup.
const CONTENTION_PAUSE: Duration = Duration::from_millis(250);

/// How long one write holds the others back: a server that hangs one request must not stall
/// every run's writes until the request times out.
const WRITE_HOLD_MAX: Duration = Duration::from_secs(2);

/// Whether a request changes the server's state: every `PATCH`/`PUT`/`DELETE`, and every
/// `POST` but Prefect's read-only ones (filters, counts, `get_scheduled_flow_runs`).
fn is_write(method: &Method, segments: &[&str]) -> bool {
    match *method {
        Method::GET | Method::HEAD | Method::OPTIONS => false,
        Method::POST => !matches!(
            segments.last().copied(),
            Some("filter" | "count" | "paginate" | "get_scheduled_flow_runs")
        ),
        _ => true,
    }
}

/// Concurrent requests per client: plenty for a server whose database serializes writes.
const MAX_IN_FLIGHT: usize = 32;

impl std::fmt::Debug for PrefectClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PrefectClient")
            .field("api_url", &self.config.api_url.as_str())
            .finish()
    }
}

struct Response {
    status: StatusCode,
    body: bytes::Bytes,
}

impl PrefectClient {
    pub fn new(config: ClientConfig) -> Result<Self, ApiError> {
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert(
            "X-PREFECT-API-VERSION",
            reqwest::header::HeaderValue::from_static(crate::API_VERSION),
        );
        if let Some(auth) = authorization(&config) {
            let mut value = reqwest::header::HeaderValue::from_str(&auth).map_err(|_| {
                ApiError::InvalidUrl {
                    url: config.api_url.to_string(),
                    reason:
                        "the API key or auth string contains characters not allowed in a header"
                            .into(),
                }
            })?;
            value.set_sensitive(true);
            headers.insert(reqwest::header::AUTHORIZATION, value);
        }
        let http = reqwest::Client::builder()
            .user_agent(user_agent())
            .default_headers(headers)
            .timeout(config.request_timeout)
            .connect_timeout(Duration::from_secs(5))
            .build()
            .map_err(|e| ApiError::Transport {
                method: "(client setup)".into(),
                url: config.api_url.to_string(),
                source: e,
            })?;
        Ok(Self {
            http,
            config: Arc::new(config),
            has_connected: Arc::new(AtomicBool::new(false)),
            in_flight: Arc::new(tokio::sync::Semaphore::new(MAX_IN_FLIGHT)),
            writes: Arc::new(tokio::sync::Semaphore::new(MAX_WRITES_IN_FLIGHT)),
        })
    }

    pub fn api_url(&self) -> &url::Url {
        &self.config.api_url
    }

    pub fn config(&self) -> &ClientConfig {
        &self.config
    }

    /// Prefect Cloud's URL shape (`prefect/settings: PREFECT_CLOUD_API_URL`).
    pub fn is_cloud(&self) -> bool {
        self.config
            .api_url
            .host_str()
            .is_some_and(|h| h.ends_with("prefect.cloud"))
    }

    fn url(&self, segments: &[&str]) -> url::Url {
        let mut url = self.config.api_url.clone();
        {
            let mut path = url
                .path_segments_mut()
                .expect("http(s) URLs always have a path");
            path.pop_if_empty();
            path.extend(segments);
        }
        url
    }

    async fn send(
        &self,
        method: Method,
        segments: &[&str],
        body: Option<&Value>,
        retry: Retry,
    ) -> Result<Response, ApiError> {
        // Boxed: a request in flight (reqwest's future, the retry loop) is a few KiB, and
        // every caller that awaits one — each supervised run's task — would carry that much
        // for its whole life.
        Box::pin(self.send_query(method, segments, &[], body, retry)).await
    }

    /// One request, sent again after a transient failure as far as `retry` allows.
    async fn send_query(
        &self,
        method: Method,
        segments: &[&str],
        query: &[(&str, &str)],
        body: Option<&Value>,
        retry: Retry,
    ) -> Result<Response, ApiError> {
        let mut url = self.url(segments);
        if !query.is_empty() {
            url.query_pairs_mut().extend_pairs(query);
        }
        let path = url.path().to_owned();
        let endpoint = cohort_metrics::endpoint(segments);
        let metrics = cohort_metrics::metrics();
        let write = is_write(&method, segments);
        let mut backoff = Backoff::new(self.config.retry_base_delay, Duration::from_secs(30));
        loop {
            let mut req = self.http.request(method.clone(), url.clone());
            if let Some(body) = body {
                req = req.json(body);
            }
            let retries_left = backoff.attempts() < self.config.max_retries;
            // At most `MAX_IN_FLIGHT` requests at once (not counting retry waits): a burst of
            // launches would otherwise open a connection per run, each with its buffers, on a
            // server that serializes its writes anyway.
            let mut write_permit = match write {
                true => Some(self.writes.acquire().await.expect("never closed")),
                false => None,
            };
            let permit = self.in_flight.acquire().await.expect("never closed");
            tracing::trace!(%method, %path, ?retry, "sending request");
            let sent = {
                let send = req.send();
                tokio::pin!(send);
                tokio::select! {
                    r = &mut send => r,
                    // A write the server is slow to answer (or never answers) stops holding
                    // the others back.
                    _ = tokio::time::sleep(WRITE_HOLD_MAX), if write_permit.is_some() => {
                        write_permit = None;
                        send.await
                    }
                }
            };
            let permit = (write_permit, permit);
            match sent {
                Err(source) => {
                    drop(permit);
                    metrics.api_request(method.as_str(), &endpoint, None);
                    let may_retry = (self.has_connected.load(Ordering::Relaxed)
                        || source.is_timeout())
                        && retry.retries_unanswered(source.is_connect());
                    let err = ApiError::Transport {
                        method: method.to_string(),
                        url: url.to_string(),
                        source,
                    };
                    if !(may_retry && retries_left) {
                        return Err(err);
                    }
                    let delay = backoff.next_delay();
                    metrics.api_retry(method.as_str(), &endpoint);
                    tracing::warn!(%method, %path, error = %err, retry_in = ?delay, "request failed; retrying");
                    tokio::time::sleep(delay).await;
                }
                Ok(resp) => {
                    self.has_connected.store(true, Ordering::Relaxed);
                    let status = resp.status();
                    metrics.api_request(method.as_str(), &endpoint, Some(status.as_u16()));
                    let retry_after = retry_after(resp.headers());
                    let body = resp.bytes().await.map_err(|source| ApiError::Transport {
                        method: method.to_string(),
                        url: url.to_string(),
                        source,
                    })?;
                    if write && status == StatusCode::SERVICE_UNAVAILABLE {
                        tokio::time::sleep(jittered(CONTENTION_PAUSE, 0.5)).await;
                    }
                    drop(permit);
                    if status.is_success() {
                        return Ok(Response { status, body });
                    }
                    let err = ApiError::Status {
                        method: method.to_string(),
                        path: path.clone(),
                        status,
                        body: String::from_utf8_lossy(&body).chars().take(500).collect(),
                    };
                    if !(retry.retries_status(status) && retries_left) {
                        return Err(err);
                    }
                    let backoff_delay = backoff.next_delay();
                    metrics.api_retry(method.as_str(), &endpoint);
                    // Wait at least what the server asked for (`Retry-After`).
                    let delay = retry_after
                        .map(|d| jittered(d, 0.2).max(d))
                        .unwrap_or(backoff_delay);
                    tracing::warn!(%method, %path, %status, retry_in = ?delay, "busy server; retrying");
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    async fn json<T: DeserializeOwned>(
        &self,
        method: Method,
        segments: &[&str],
        body: Option<&Value>,
        retry: Retry,
    ) -> Result<T, ApiError> {
        let resp = self.send(method, segments, body, retry).await?;
        serde_json::from_slice(&resp.body).map_err(|source| ApiError::Decode {
            path: segments.join("/"),
            source,
        })
    }

    /// `GET /admin/version`: the server's Prefect version, e.g. `3.8.8`.
    pub async fn server_version(&self) -> Result<String, ApiError> {
        self.json(Method::GET, &["admin", "version"], None, Retry::Idempotent)
            .await
    }

    /// `GET /work_pools/{name}`; `None` when it does not exist.
    pub async fn read_work_pool(&self, name: &str) -> Result<Option<WorkPool>, ApiError> {
        match self
            .json(Method::GET, &["work_pools", name], None, Retry::Idempotent)
            .await
        {
            Ok(pool) => Ok(Some(pool)),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// `POST /work_pools/`; a concurrent creation (409) reads the winner's pool instead. So
    /// does a retry whose first copy created the pool before its answer was lost: the create is
    /// idempotent through that read-back.
    pub async fn create_work_pool(
        &self,
        name: &str,
        pool_type: &str,
        base_job_template: Option<&Value>,
    ) -> Result<WorkPool, ApiError> {
        let mut body = json!({"name": name, "type": pool_type});
        if let Some(t) = base_job_template {
            body["base_job_template"] = t.clone();
        }
        match self
            .json(
                Method::POST,
                &["work_pools", ""],
                Some(&body),
                Retry::Idempotent,
            )
            .await
        {
            Ok(pool) => Ok(pool),
            Err(e) if e.status() == Some(StatusCode::CONFLICT) => {
                self.read_work_pool(name).await?.ok_or(e)
            }
            Err(e) => Err(e),
        }
    }

    /// `PATCH /work_pools/{name}` with a new base job template.
    pub async fn update_work_pool_template(
        &self,
        name: &str,
        base_job_template: &Value,
    ) -> Result<(), ApiError> {
        self.send(
            Method::PATCH,
            &["work_pools", name],
            Some(&json!({"base_job_template": base_job_template})),
            Retry::Idempotent,
        )
        .await
        .map(drop)
    }

    /// `POST /work_pools/{name}/queues/filter`.
    pub async fn read_work_queues(&self, pool: &str) -> Result<Vec<WorkQueue>, ApiError> {
        self.json(
            Method::POST,
            &["work_pools", pool, "queues", "filter"],
            Some(&json!({})),
            Retry::Idempotent,
        )
        .await
    }

    /// `POST /work_pools/{pool}/get_scheduled_flow_runs`. A missing pool reads as no runs, as in
    /// Prefect's worker.
    pub async fn get_scheduled_flow_runs(
        &self,
        pool: &str,
        work_queue_names: &[String],
        scheduled_before: DateTime<Utc>,
    ) -> Result<Vec<ScheduledFlowRun>, ApiError> {
        let body = json!({
            "work_queue_names": work_queue_names,
            "scheduled_before": python_datetime(scheduled_before),
        });
        match self
            .json(
                Method::POST,
                &["work_pools", pool, "get_scheduled_flow_runs"],
                Some(&body),
                Retry::Idempotent,
            )
            .await
        {
            Err(e) if e.is_not_found() && work_queue_names.is_empty() => Ok(Vec::new()),
            other => other,
        }
    }

    /// `POST /work_pools/{pool}/workers/filter`: the pool's workers the server sees online.
    pub async fn read_online_workers(&self, pool: &str) -> Result<Vec<PoolWorker>, ApiError> {
        self.json(
            Method::POST,
            &["work_pools", pool, "workers", "filter"],
            Some(&json!({"workers": {"status": {"any_": ["ONLINE"]}}})),
            Retry::Idempotent,
        )
        .await
    }

    /// `POST /work_pools/{pool}/workers/heartbeat` (the REST fallback of the worker channel).
    pub async fn worker_heartbeat(
        &self,
        pool: &str,
        worker_name: &str,
        heartbeat_interval_seconds: u64,
    ) -> Result<(), ApiError> {
        let body =
            json!({"name": worker_name, "heartbeat_interval_seconds": heartbeat_interval_seconds});
        self.send(
            Method::POST,
            &["work_pools", pool, "workers", "heartbeat"],
            Some(&body),
            Retry::Idempotent,
        )
        .await
        .map(drop)
    }

    pub async fn read_deployment(&self, id: Uuid) -> Result<Option<Deployment>, ApiError> {
        match self
            .json(
                Method::GET,
                &["deployments", &id.to_string()],
                None,
                Retry::Idempotent,
            )
            .await
        {
            Ok(d) => Ok(Some(d)),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub async fn read_flow(&self, id: Uuid) -> Result<Flow, ApiError> {
        self.json(
            Method::GET,
            &["flows", &id.to_string()],
            None,
            Retry::Idempotent,
        )
        .await
    }

    pub async fn read_flow_run(&self, id: Uuid) -> Result<FlowRun, ApiError> {
        self.json(
            Method::GET,
            &["flow_runs", &id.to_string()],
            None,
            Retry::Idempotent,
        )
        .await
    }

    /// `POST /flow_runs/{id}/set_state`. A WAIT answer is honoured and re-proposed, as
    /// `prefect/utilities/engine: propose_state` does.
    ///
    /// Each proposal carries a fresh `transition_id`, repeated by its retries. An orchestrated
    /// proposal (`force: false`) whose first copy was accepted before its answer was lost is
    /// REJECTed on the repeat, with the state the first copy made
    /// (`prefect/server/orchestration/core_policy.py: PreventDuplicateTransitions`): that
    /// answer is read as the ACCEPT it stands for, so a claim (Pending) is neither lost nor
    /// made twice. A forced proposal skips orchestration, so it is repeated only after a
    /// read-back of the run shows its transition did not happen.
    pub async fn set_flow_run_state(
        &self,
        id: Uuid,
        state: &StateCreate,
        force: bool,
    ) -> Result<OrchestrationResult, ApiError> {
        let segments = ["flow_runs", &id.to_string(), "set_state"];
        loop {
            let transition_id = Uuid::new_v4();
            let body = json!({"state": state.to_json(id, transition_id), "force": force});
            let result = if force {
                self.propose_forced(id, &body, transition_id).await?
            } else {
                self.json::<OrchestrationResult>(
                    Method::POST,
                    &segments,
                    Some(&body),
                    Retry::Idempotent,
                )
                .await?
                .acknowledging(transition_id)
            };
            match (result.status, result.delay_seconds()) {
                (SetStateStatus::Wait, Some(delay)) => {
                    tokio::time::sleep(Duration::from_secs_f64(delay.clamp(0.0, 300.0))).await;
                }
                _ => return Ok(result),
            }
        }
    }

    /// A forced `set_state`: sent again only when the server cannot have acted
    /// ([`Retry::UnlessActed`]) or when a read-back of the run shows that it did not.
    async fn propose_forced(
        &self,
        id: Uuid,
        body: &Value,
        transition_id: Uuid,
    ) -> Result<OrchestrationResult, ApiError> {
        let segments = ["flow_runs", &id.to_string(), "set_state"];
        let mut backoff = Backoff::new(self.config.retry_base_delay, Duration::from_secs(30));
        loop {
            match self
                .json::<OrchestrationResult>(
                    Method::POST,
                    &segments,
                    Some(body),
                    Retry::UnlessActed,
                )
                .await
            {
                Err(e) if e.is_transient() && backoff.attempts() < self.config.max_retries => {
                    let delay = backoff.next_delay();
                    tracing::warn!(error = %e, retry_in = ?delay, "forced state proposal got no answer; reading the run back before repeating it");
                    tokio::time::sleep(delay).await;
                    let run = self.read_flow_run(id).await?;
                    if let Some(state) = run
                        .state
                        .filter(|s| s.transition_id() == Some(transition_id))
                    {
                        return Ok(OrchestrationResult::accepted(state));
                    }
                }
                other => return other,
            }
        }
    }

    /// `POST /flow_runs/filter`: which of `ids` are in one of `states` (the polling fallback of
    /// cancellation, `prefect/_internal/observers.py`).
    pub async fn flow_runs_in_states(
        &self,
        ids: &[Uuid],
        states: &[StateType],
    ) -> Result<Vec<FlowRun>, ApiError> {
        let body = json!({
            "flow_runs": {"id": {"any_": ids}, "state": {"type": {"any_": states}}},
        });
        self.json(
            Method::POST,
            &["flow_runs", "filter"],
            Some(&body),
            Retry::Idempotent,
        )
        .await
    }

    /// `POST /flows/`: the flow's id, creating the flow when it does not exist.
    pub async fn create_flow(&self, name: &str) -> Result<Uuid, ApiError> {
        let flow: Flow = self
            .json(
                Method::POST,
                &["flows", ""],
                Some(&json!({"name": name})),
                Retry::Idempotent,
            )
            .await?;
        Ok(flow.id)
    }

    /// `GET /deployments/name/{flow}/{deployment}`; `None` when it does not exist.
    pub async fn read_deployment_by_name(
        &self,
        flow_name: &str,
        deployment_name: &str,
    ) -> Result<Option<Deployment>, ApiError> {
        match self
            .json(
                Method::GET,
                &["deployments", "name", flow_name, deployment_name],
                None,
                Retry::Idempotent,
            )
            .await
        {
            Ok(d) => Ok(Some(d)),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// `POST /deployments/` (the server upserts by flow and name); returns the id.
    pub async fn create_deployment(&self, body: &Value) -> Result<Uuid, ApiError> {
        let d: Deployment = self
            .json(
                Method::POST,
                &["deployments", ""],
                Some(body),
                Retry::Idempotent,
            )
            .await?;
        Ok(d.id)
    }

    /// `PATCH /deployments/{id}`.
    pub async fn update_deployment(&self, id: Uuid, body: &Value) -> Result<(), ApiError> {
        self.send(
            Method::PATCH,
            &["deployments", &id.to_string()],
            Some(body),
            Retry::Idempotent,
        )
        .await
        .map(drop)
    }

    /// `POST /deployments/get_scheduled_flow_runs`: what a runner polls.
    pub async fn get_scheduled_flow_runs_for_deployments(
        &self,
        deployment_ids: &[Uuid],
        scheduled_before: DateTime<Utc>,
    ) -> Result<Vec<FlowRun>, ApiError> {
        let body = json!({
            "deployment_ids": deployment_ids,
            "scheduled_before": python_datetime(scheduled_before),
        });
        self.json(
            Method::POST,
            &["deployments", "get_scheduled_flow_runs"],
            Some(&body),
            Retry::Idempotent,
        )
        .await
    }

    /// `POST /deployments/{id}/create_flow_run` with `body` (a `DeploymentFlowRunCreate`);
    /// the new run. Each call is one logical create: it carries an `idempotency_key` (a fresh
    /// one unless `body` has its own) that every retry repeats, and the server answers a repeat
    /// with the run the first copy created (`prefect/server/models/flow_runs.py:
    /// create_flow_run`, unique on flow and idempotency key), so a create whose answer was lost
    /// still makes one run.
    pub async fn create_flow_run_from_deployment(
        &self,
        id: Uuid,
        body: &Value,
    ) -> Result<FlowRun, ApiError> {
        let mut body = body.clone();
        if let Some(fields) = body.as_object_mut() {
            fields
                .entry("idempotency_key")
                .or_insert_with(|| Value::String(Uuid::new_v4().to_string()));
        }
        self.json(
            Method::POST,
            &["deployments", &id.to_string(), "create_flow_run"],
            Some(&body),
            Retry::Idempotent,
        )
        .await
    }

    /// `PATCH /flow_runs/{id}/labels`.
    pub async fn update_flow_run_labels(&self, id: Uuid, labels: &Map) -> Result<(), ApiError> {
        self.send(
            Method::PATCH,
            &["flow_runs", &id.to_string(), "labels"],
            Some(&Value::Object(labels.clone())),
            Retry::Idempotent,
        )
        .await
        .map(drop)
    }

    /// `PATCH /flow_runs/{id}` `{"infrastructure_pid": …}`.
    pub async fn set_infrastructure_pid(&self, id: Uuid, pid: &str) -> Result<(), ApiError> {
        self.send(
            Method::PATCH,
            &["flow_runs", &id.to_string()],
            Some(&json!({"infrastructure_pid": pid})),
            Retry::Idempotent,
        )
        .await
        .map(drop)
    }

    /// `GET /variables/name/{name}`; `None` when unset.
    pub async fn read_variable(&self, name: &str) -> Result<Option<Value>, ApiError> {
        match self
            .json::<Value>(
                Method::GET,
                &["variables", "name", name],
                None,
                Retry::Idempotent,
            )
            .await
        {
            Ok(v) => Ok(v.get("value").cloned()),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// A block document's `data`, by id (`GET /block_documents/{id}`), secrets included, as
    /// Prefect's templating resolves `{"$ref": {"block_document_id": …}}`.
    pub async fn read_block_document_data(&self, id: &str) -> Result<Option<Map>, ApiError> {
        self.block_data(&["block_documents", id]).await
    }

    /// A block document's `data`, by type slug and name
    /// (`GET /block_types/slug/{slug}/block_documents/name/{name}`).
    pub async fn read_block_document_data_by_name(
        &self,
        block_type_slug: &str,
        name: &str,
    ) -> Result<Option<Map>, ApiError> {
        self.block_data(&[
            "block_types",
            "slug",
            block_type_slug,
            "block_documents",
            "name",
            name,
        ])
        .await
    }

    async fn block_data(&self, segments: &[&str]) -> Result<Option<Map>, ApiError> {
        let resp = match self
            .send_query(
                Method::GET,
                segments,
                &[("include_secrets", "true")],
                None,
                Retry::Idempotent,
            )
            .await
        {
            Ok(r) => r,
            Err(e) if e.is_not_found() => return Ok(None),
            Err(e) => return Err(e),
        };
        let doc: Value = serde_json::from_slice(&resp.body).map_err(|source| ApiError::Decode {
            path: segments.join("/"),
            source,
        })?;
        Ok(doc.get("data").and_then(Value::as_object).cloned())
    }

    /// `POST /logs/`: flow-run logs the worker writes, as Prefect's `APILogHandler` does.
    pub async fn create_logs(&self, logs: &[Value]) -> Result<(), ApiError> {
        self.send(
            Method::POST,
            &["logs", ""],
            Some(&Value::Array(logs.to_vec())),
            // The server stores every copy (`prefect/server/models/logs.py: create_logs` has
            // no key to tell a repeat): a lost line is preferred to a doubled one.
            Retry::UnlessActed,
        )
        .await
        .map(drop)
    }

    /// An arbitrary JSON request, for callers with needs this client has no method for; the
    /// caller says what a repeat of it would do.
    pub async fn request_json(
        &self,
        method: Method,
        segments: &[&str],
        body: Option<&Value>,
        retry: Retry,
    ) -> Result<Value, ApiError> {
        let resp = self.send(method, segments, body, retry).await?;
        if resp.status == StatusCode::NO_CONTENT || resp.body.is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_slice(&resp.body).map_err(|source| ApiError::Decode {
            path: segments.join("/"),
            source,
        })
    }
}

/// `User-Agent`. The server reads a `prefect/<version>` prefix for compatibility shims and treats
/// anything else as the current client (`prefect/server/api/dependencies.py`), so Cohort names
/// itself honestly.
pub fn user_agent() -> String {
    format!(
        "cohort/{} (API {})",
        env!("CARGO_PKG_VERSION"),
        crate::API_VERSION
    )
}

/// The `Authorization` header value, if any: Cloud key wins over a self-hosted auth string.
pub fn authorization(config: &ClientConfig) -> Option<String> {
    use base64::Engine as _;
    if let Some(key) = &config.api_key {
        return Some(format!("Bearer {key}"));
    }
    config.auth_string.as_ref().map(|s| {
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(s)
        )
    })
}

/// Python's `str(datetime)` for an aware UTC datetime, which is what Prefect's worker sends as
/// `scheduled_before` (space separator, `+00:00`).
pub fn python_datetime(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%d %H:%M:%S%.6f+00:00").to_string()
}

fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let v = headers.get(reqwest::header::RETRY_AFTER)?.to_str().ok()?;
    if let Ok(secs) = v.trim().parse::<f64>() {
        return (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs.min(600.0)));
    }
    let at = DateTime::parse_from_rfc2822(v.trim()).ok()?;
    (at.with_timezone(&Utc) - Utc::now()).to_std().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_are_told_from_writes() {
        for (method, path) in [
            (Method::GET, "flow_runs/x"),
            (Method::POST, "work_pools/p/get_scheduled_flow_runs"),
            (Method::POST, "work_pools/p/workers/filter"),
            (Method::POST, "flow_runs/count"),
        ] {
            let segments: Vec<&str> = path.split('/').collect();
            assert!(!is_write(&method, &segments), "{method} {path}");
        }
        for (method, path) in [
            (Method::POST, "flow_runs/x/set_state"),
            (Method::PATCH, "flow_runs/x/labels"),
            (Method::POST, "logs/"),
            (Method::POST, "work_pools/p/workers/heartbeat"),
            (Method::DELETE, "flow_runs/x"),
        ] {
            let segments: Vec<&str> = path.split('/').collect();
            assert!(is_write(&method, &segments), "{method} {path}");
        }
    }

    /// A fake server (a hang the real one cannot be made to produce on demand): it never
    /// answers a request for `/hang`, answers one for `/locked` with 503 (as a SQLite server
    /// whose database another write holds), and any other with 204.
    async fn fake_server_hanging_one_path() -> std::net::SocketAddr {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (mut socket, _) = listener.accept().await.unwrap();
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match socket.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    if String::from_utf8_lossy(&head).contains("/hang ") {
                        std::future::pending::<()>().await;
                    }
                    if String::from_utf8_lossy(&head).contains("/locked ") {
                        let _ = socket
                            .write_all(
                                b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
                            )
                            .await;
                        return;
                    }
                    let _ = socket
                        .write_all(b"HTTP/1.1 204 No Content\r\nconnection: close\r\n\r\n")
                        .await;
                });
            }
        });
        addr
    }

    /// A client of the fake server at `addr` that does not retry.
    fn client_of(addr: std::net::SocketAddr) -> PrefectClient {
        PrefectClient::new(ClientConfig {
            api_url: format!("http://{addr}/api").parse().unwrap(),
            api_key: None,
            auth_string: None,
            max_retries: 0,
            request_timeout: Duration::from_secs(30),
            retry_base_delay: Duration::from_millis(1),
        })
        .unwrap()
    }

    /// A PATCH of `path` sent in the background, given `lead` to reach the server first.
    async fn write_first(
        client: &PrefectClient,
        path: &'static str,
        lead: Duration,
    ) -> tokio::task::JoinHandle<Result<Response, ApiError>> {
        let client = client.clone();
        let write = tokio::spawn(async move {
            client
                .send(Method::PATCH, &[path], None, Retry::Idempotent)
                .await
        });
        tokio::time::sleep(lead).await;
        write
    }

    /// Another PATCH, which the fake server answers 204.
    async fn write_other(client: &PrefectClient) {
        let other = client
            .send(Method::PATCH, &["other"], None, Retry::Idempotent)
            .await
            .expect("the other write is answered");
        assert_eq!(other.status, StatusCode::NO_CONTENT);
    }

    #[tokio::test]
    async fn a_hung_write_holds_the_other_writes_back_only_briefly() {
        let addr = fake_server_hanging_one_path().await;
        let client = client_of(addr);
        let hung = write_first(&client, "hang", Duration::from_millis(100)).await;
        let started = tokio::time::Instant::now();
        write_other(&client).await;
        let waited = started.elapsed();
        assert!(
            waited >= WRITE_HOLD_MAX - Duration::from_millis(300)
                && waited < Duration::from_secs(10),
            "the other write waited {waited:?}"
        );
        assert!(!hung.is_finished(), "the hung write was answered");
        hung.abort();
    }

    #[tokio::test]
    async fn after_a_write_answered_503_the_next_write_waits_a_moment() {
        let addr = fake_server_hanging_one_path().await;
        let client = client_of(addr);
        let started = tokio::time::Instant::now();
        let locked = write_first(&client, "locked", Duration::from_millis(20)).await;
        write_other(&client).await;
        let waited = started.elapsed();
        assert!(
            waited >= CONTENTION_PAUSE / 2 && waited < Duration::from_secs(5),
            "the other write was answered after {waited:?}"
        );
        let Err(locked) = locked.await.unwrap() else {
            panic!("the locked write was answered");
        };
        assert_eq!(locked.status(), Some(StatusCode::SERVICE_UNAVAILABLE));
    }

    #[test]
    fn python_datetime_matches_str_of_aware_datetime() {
        let t = DateTime::parse_from_rfc3339("2026-11-23T19:34:09.039854Z")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(python_datetime(t), "2026-11-23 19:34:09.039854+00:00");
    }

    #[test]
    fn url_segments_are_encoded() {
        let client = PrefectClient::new(ClientConfig {
            api_url: "http://127.0.0.1:4200/api".parse().unwrap(),
            api_key: None,
            auth_string: None,
            max_retries: 0,
            request_timeout: Duration::from_secs(1),
            retry_base_delay: Duration::from_millis(1),
        })
        .unwrap();
        assert_eq!(
            client
                .url(&["work_pools", "my pool/x", "get_scheduled_flow_runs"])
                .as_str(),
            "http://127.0.0.1:4200/api/work_pools/my%20pool%2Fx/get_scheduled_flow_runs"
        );
        assert_eq!(
            client.url(&["logs", ""]).as_str(),
            "http://127.0.0.1:4200/api/logs/"
        );
    }

    #[test]
    fn debug_of_the_config_leaves_credentials_out() {
        let c = ClientConfig {
            api_url: "http://x/api".parse().unwrap(),
            api_key: Some("pnu_s3cret".into()),
            auth_string: Some("admin:s3cret".into()),
            max_retries: 0,
            request_timeout: Duration::from_secs(1),
            retry_base_delay: Duration::from_millis(1),
        };
        let printed = format!("{c:?}");
        assert!(!printed.contains("s3cret"), "{printed}");
        assert!(printed.contains("<redacted>"), "{printed}");
    }

    #[test]
    fn auth_header_prefers_key() {
        let mut c = ClientConfig {
            api_url: "http://x/api".parse().unwrap(),
            api_key: None,
            auth_string: Some("admin:pass".into()),
            max_retries: 0,
            request_timeout: Duration::from_secs(1),
            retry_base_delay: Duration::from_millis(1),
        };
        assert_eq!(authorization(&c).unwrap(), "Basic YWRtaW46cGFzcw==");
        c.api_key = Some("pnu_x".into());
        assert_eq!(authorization(&c).unwrap(), "Bearer pnu_x");
    }
}
