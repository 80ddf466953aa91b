//! The emulated apiserver's HTTP surface, shared by the in-process service and the loopback
//! server: a request is recorded, checked against injected faults, routed and answered.

pub(crate) mod discovery;
mod openapi;
mod resources;
pub(crate) mod route;

use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Response, StatusCode};
use serde_json::Value;

use crate::body::ResponseBody;
use crate::error::ApiError;
use crate::faults::Fault;
use crate::requests::{RecordedRequest, Transport};
use crate::shared::Shared;
use route::Route;

/// The response was thrown away on purpose ([`crate::Emulator::lose_next_response`]): the
/// request took effect, and the connection is closed without an answer.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the emulator dropped the response on purpose (an injected lost-response fault)")]
pub struct ResponseLost;

/// A request, its body read.
#[derive(Debug)]
pub(crate) struct ApiRequest {
    pub method: Method,
    pub path: String,
    pub raw_query: String,
    pub query: Vec<(String, String)>,
    pub content_type: String,
    pub body: Bytes,
}

impl ApiRequest {
    pub fn new(parts: &http::request::Parts, body: Bytes) -> Self {
        let raw_query = parts.uri.query().unwrap_or_default().to_owned();
        let query = form_urlencoded::parse(raw_query.as_bytes())
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .filter(|(k, _)| !k.is_empty())
            .collect();
        let content_type = parts
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        Self {
            method: parts.method.clone(),
            path: parts.uri.path().to_owned(),
            raw_query,
            query,
            content_type,
            body,
        }
    }

    /// The first value of a query parameter.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// A boolean query parameter, read as Go's `strconv.ParseBool` reads it (Python's client
    /// sends `watch=True`).
    pub fn flag(&self, name: &str) -> bool {
        matches!(
            self.param(name),
            Some("1" | "t" | "T" | "true" | "TRUE" | "True")
        )
    }

    /// The body as JSON, when there is one.
    pub fn json(&self) -> Result<Option<Value>, ApiError> {
        if self.body.iter().all(u8::is_ascii_whitespace) {
            return Ok(None);
        }
        serde_json::from_slice(&self.body)
            .map(Some)
            .map_err(|e| ApiError::bad_request(format!("the request body is not JSON: {e}")))
    }
}

/// Serves one request.
pub(crate) async fn serve(
    shared: &Arc<Shared>,
    parts: &http::request::Parts,
    body: Bytes,
    from: Transport,
) -> Result<Response<ResponseBody>, ResponseLost> {
    let req = ApiRequest::new(parts, body);
    shared.requests.record(RecordedRequest {
        method: req.method.to_string(),
        path: req.path.clone(),
        query: req.query.clone(),
        body: serde_json::from_slice(&req.body).ok(),
        from,
    });
    let target = if req.raw_query.is_empty() {
        req.path.clone()
    } else {
        format!("{}?{}", req.path, req.raw_query)
    };
    match shared.faults.take(req.method.as_str(), &target) {
        Some(Fault::Fail(code)) => {
            let mut response = error(&ApiError::injected(code));
            if code == 429 {
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            Ok(response)
        }
        Some(Fault::LoseResponse) => {
            drop(route(shared, &req).await);
            Err(ResponseLost)
        }
        None => Ok(route(shared, &req).await),
    }
}

async fn route(shared: &Arc<Shared>, req: &ApiRequest) -> Response<ResponseBody> {
    let Some(route) = route::parse(&req.path) else {
        return error(&ApiError::no_route());
    };
    let get_only = |doc: Value| {
        if req.method == Method::GET {
            json(StatusCode::OK, &doc)
        } else {
            error(&ApiError::new(
                405,
                "MethodNotAllowed",
                "the server does not allow this method on the requested resource",
                None,
            ))
        }
    };
    let result = match route {
        Route::Version => Ok(get_only(discovery::version())),
        Route::CoreVersions => Ok(get_only(discovery::core_versions())),
        Route::Groups => Ok(get_only(discovery::groups())),
        Route::Group(g) => Ok(get_only(discovery::group(g))),
        Route::Resources(g) => Ok(get_only(discovery::resources(g))),
        Route::OpenApiRoot => Ok(get_only(openapi::root())),
        Route::OpenApi(path) => match openapi::group_version(&path) {
            Some(doc) => Ok(get_only(doc)),
            None => Err(ApiError::no_route()),
        },
        Route::Collection { kind, namespace } => {
            resources::collection(shared, req, kind, namespace.as_deref())
        }
        Route::Object {
            kind,
            namespace,
            name,
        } => resources::object(shared, req, kind, &namespace, &name, false),
        Route::Status {
            kind,
            namespace,
            name,
        } => resources::object(shared, req, kind, &namespace, &name, true),
        Route::Log { namespace, name } => {
            if req.method == Method::GET {
                crate::kubelet::logs::serve(shared, req, &namespace, &name)
                    .await
                    .map(text)
            } else {
                Err(ApiError::method_not_supported(
                    crate::Kind::Pod,
                    req.method.as_str(),
                ))
            }
        }
    };
    result.unwrap_or_else(|e| error(&e))
}

/// A JSON response.
pub(crate) fn json(status: StatusCode, doc: &Value) -> Response<ResponseBody> {
    let bytes = serde_json::to_vec(doc).expect("JSON values serialize");
    with_type(status, "application/json", ResponseBody::full(bytes))
}

/// A streamed JSON response (watch).
pub(crate) fn json_stream(body: ResponseBody) -> Response<ResponseBody> {
    with_type(StatusCode::OK, "application/json", body)
}

fn text(body: ResponseBody) -> Response<ResponseBody> {
    with_type(StatusCode::OK, "text/plain", body)
}

/// An error as a `Status` response.
pub(crate) fn error(e: &ApiError) -> Response<ResponseBody> {
    let status = StatusCode::from_u16(e.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    json(status, &e.to_status())
}

fn with_type(
    status: StatusCode,
    content_type: &'static str,
    body: ResponseBody,
) -> Response<ResponseBody> {
    let mut response = Response::new(body);
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response.headers_mut().insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("no-cache, private"),
    );
    response
}
