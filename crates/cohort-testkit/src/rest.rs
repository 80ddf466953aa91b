//! [`Rest`]: a blocking client for the Prefect server under test that rides its busy answers.

use std::thread::sleep;
use std::time::{Duration, Instant};

use reqwest::blocking::Client;
use reqwest::header::HeaderMap;
use reqwest::{Method, StatusCode};
use serde_json::Value;

/// How long [`Rest`] keeps retrying a request the server answers 429/502/503, or not at all.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// The first wait; each next one doubles …
    pub first: Duration,
    /// … up to this.
    pub cap: Duration,
    /// Give up once the request has been tried for this long.
    pub budget: Duration,
}

/// A request that kept failing.
#[derive(Debug, thiserror::Error)]
pub enum RestError {
    #[error("{method} {url}: still failing after {attempts} attempts in {elapsed:.0?}: {last}")]
    Exhausted {
        method: Method,
        url: String,
        attempts: u32,
        elapsed: Duration,
        last: String,
    },
    #[error("{method} {path} answered {status}: {body}")]
    Status {
        method: Method,
        path: String,
        status: StatusCode,
        body: Value,
    },
}

/// A retrying JSON client for one server's API.
pub struct Rest {
    http: Client,
    api_url: String,
    policy: RetryPolicy,
}

impl Rest {
    /// A client of `api_url` (`http://127.0.0.1:<port>/api`) sending `headers` with every
    /// request (an `Authorization`, say), each request given `timeout`.
    pub fn new(api_url: &str, headers: HeaderMap, timeout: Duration, policy: RetryPolicy) -> Rest {
        let http = Client::builder()
            .timeout(timeout)
            .pool_max_idle_per_host(16)
            .default_headers(headers)
            .build()
            .expect("a reqwest client");
        Rest {
            http,
            api_url: api_url.to_owned(),
            policy,
        }
    }

    pub fn api_url(&self) -> &str {
        &self.api_url
    }

    /// The underlying client (for a request that must not be retried).
    pub fn http(&self) -> &Client {
        &self.http
    }

    /// One request to `path` (under the API URL, or a whole URL such as an events page's
    /// `next_page`), retrying connection errors, timeouts and 429/502/503. Returns the final
    /// status and JSON body (`Value::Null` when empty or not JSON).
    pub fn try_request(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<(StatusCode, Value), RestError> {
        let url = if path.starts_with("http") {
            path.to_owned()
        } else {
            format!("{}{}", self.api_url, path)
        };
        let started = Instant::now();
        let mut delay = self.policy.first;
        let mut attempts = 0;
        loop {
            attempts += 1;
            let mut req = self.http.request(method.clone(), &url);
            if let Some(b) = body {
                req = req.json(b);
            }
            let last = match req.send() {
                Ok(resp) => {
                    let status = resp.status();
                    let text = resp.text().unwrap_or_default();
                    if !matches!(
                        status,
                        StatusCode::TOO_MANY_REQUESTS
                            | StatusCode::BAD_GATEWAY
                            | StatusCode::SERVICE_UNAVAILABLE
                    ) {
                        return Ok((status, serde_json::from_str(&text).unwrap_or(Value::Null)));
                    }
                    format!("{status}: {text}")
                }
                Err(e) => e.to_string(),
            };
            if started.elapsed() >= self.policy.budget {
                return Err(RestError::Exhausted {
                    method,
                    url,
                    attempts,
                    elapsed: started.elapsed(),
                    last,
                });
            }
            sleep(delay);
            delay = (delay * 2).min(self.policy.cap);
        }
    }

    /// [`Self::try_request`], and any answer but 2xx is an error.
    pub fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, RestError> {
        let (status, value) = self.try_request(method.clone(), path, body)?;
        if !status.is_success() {
            return Err(RestError::Status {
                method,
                path: path.to_owned(),
                status,
                body: value,
            });
        }
        Ok(value)
    }

    /// Every event `POST /events/filter` finds for `filter` (an `EventFilter`), following
    /// `next_page`. Events reach the database asynchronously: a fresh one may not be there yet.
    pub fn read_events(&self, filter: &Value) -> Result<Vec<Value>, RestError> {
        let mut page = self.request(
            Method::POST,
            "/events/filter",
            Some(&serde_json::json!({"filter": filter, "limit": 50})),
        )?;
        let mut events = Vec::new();
        loop {
            events.extend(page["events"].as_array().cloned().unwrap_or_default());
            match page["next_page"].as_str() {
                Some(next) if !next.is_empty() => page = self.request(Method::GET, next, None)?,
                _ => return Ok(events),
            }
        }
    }
}
