//! Errors the emulated apiserver answers with, and their `Status` bodies, worded as the real
//! apiserver words them because clients (and Prefect's hints) read `reason` and `message`.

use serde_json::{json, Map, Value};

use crate::kind::Kind;

/// A failed API call: an HTTP status code with a Kubernetes `Status` body. None of these is
/// retryable by itself except `ServiceUnavailable`, `TooManyRequests` and `InternalError`,
/// which only come from injected faults.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{code} {reason}: {message}")]
pub struct ApiError {
    /// HTTP status code (`404`).
    pub code: u16,
    /// `Status.reason` (`NotFound`); empty for a plain failure.
    pub reason: &'static str,
    /// `Status.message`.
    pub message: String,
    /// `Status.details`, when the apiserver sends some.
    pub details: Option<Box<Value>>,
}

/// One cause of an `Invalid` error: the field and what is wrong with it.
#[derive(Debug, Clone)]
pub struct Cause {
    /// `FieldValueRequired`, `FieldValueInvalid`, …
    pub reason: &'static str,
    /// The field path (`spec.template.spec.containers`).
    pub field: String,
    /// What is wrong (`Required value`).
    pub message: String,
}

impl ApiError {
    pub(crate) fn new(
        code: u16,
        reason: &'static str,
        message: impl Into<String>,
        details: Option<Value>,
    ) -> Self {
        Self {
            code,
            reason,
            message: message.into(),
            details: details.map(Box::new),
        }
    }

    fn details(kind: Kind, name: &str) -> Value {
        let mut d = Map::new();
        d.insert("name".into(), json!(name));
        if !kind.group().is_empty() {
            d.insert("group".into(), json!(kind.group()));
        }
        d.insert("kind".into(), json!(kind.plural()));
        Value::Object(d)
    }

    /// 404 for an object that does not exist: `jobs.batch "x" not found`.
    pub fn not_found(kind: Kind, name: &str) -> Self {
        Self::new(
            404,
            "NotFound",
            format!("{} \"{name}\" not found", kind.qualified()),
            Some(Self::details(kind, name)),
        )
    }

    /// 404 for a create in a namespace that does not exist: `namespaces "x" not found`.
    pub fn namespace_not_found(namespace: &str) -> Self {
        Self::not_found(Kind::Namespace, namespace)
    }

    /// 404 for a path the emulator does not serve.
    pub fn no_route() -> Self {
        Self::new(
            404,
            "NotFound",
            "the server could not find the requested resource",
            Some(json!({})),
        )
    }

    /// 409 for a create whose name is taken.
    pub fn already_exists(kind: Kind, name: &str) -> Self {
        Self::new(
            409,
            "AlreadyExists",
            format!("{} \"{name}\" already exists", kind.qualified()),
            Some(Self::details(kind, name)),
        )
    }

    /// 409 for a write whose `resourceVersion` (or uid precondition) is stale.
    pub fn conflict(kind: Kind, name: &str) -> Self {
        Self::new(
            409,
            "Conflict",
            format!(
                "Operation cannot be fulfilled on {} \"{name}\": the object has been modified; \
                 please apply your changes to the latest version and try again",
                kind.qualified()
            ),
            Some(Self::details(kind, name)),
        )
    }

    /// 422 for an object that fails validation.
    pub fn invalid(kind: Kind, name: &str, causes: Vec<Cause>) -> Self {
        let text: Vec<String> = causes
            .iter()
            .map(|c| format!("{}: {}", c.field, c.message))
            .collect();
        let joined = match text.as_slice() {
            [one] => one.clone(),
            many => format!("[{}]", many.join(", ")),
        };
        let mut details = Map::new();
        details.insert("name".into(), json!(name));
        if !kind.group().is_empty() {
            details.insert("group".into(), json!(kind.group()));
        }
        details.insert("kind".into(), json!(kind.name()));
        details.insert(
            "causes".into(),
            Value::Array(
                causes
                    .iter()
                    .map(|c| json!({"reason": c.reason, "message": c.message, "field": c.field}))
                    .collect(),
            ),
        );
        Self::new(
            422,
            "Invalid",
            format!("{} \"{name}\" is invalid: {joined}", kind.qualified_kind()),
            Some(Value::Object(details)),
        )
    }

    /// 400 for a malformed request.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, "BadRequest", message, None)
    }

    /// 405 for a verb the resource does not support.
    pub fn method_not_supported(kind: Kind, verb: &str) -> Self {
        Self::new(
            405,
            "MethodNotAllowed",
            format!(
                "{verb} is not supported on resources of kind {:?}",
                kind.qualified()
            ),
            Some(json!({"group": kind.group(), "kind": kind.plural()})),
        )
    }

    /// 415 for a patch type the emulator does not implement (server-side apply).
    pub fn unsupported_media_type(content_type: &str) -> Self {
        Self::new(
            415,
            "UnsupportedMediaType",
            format!("the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/strategic-merge-patch+json (got {content_type:?})"),
            None,
        )
    }

    /// 401 for a request without the service account's token, as the real API server words it.
    pub fn unauthorized() -> Self {
        Self::new(401, "Unauthorized", "Unauthorized", None)
    }

    /// 410 for a watch or list continuation from a compacted `resourceVersion`.
    pub fn expired(message: impl Into<String>) -> Self {
        Self::new(410, "Expired", message, None)
    }

    /// An error with any status code, as an injected fault answers, with the reason the real
    /// apiserver gives that code.
    pub fn injected(code: u16) -> Self {
        let reason = match code {
            400 => "BadRequest",
            401 => "Unauthorized",
            403 => "Forbidden",
            404 => "NotFound",
            405 => "MethodNotAllowed",
            409 => "Conflict",
            410 => "Expired",
            415 => "UnsupportedMediaType",
            422 => "Invalid",
            429 => "TooManyRequests",
            500 => "InternalError",
            503 => "ServiceUnavailable",
            504 => "Timeout",
            _ => "",
        };
        Self::new(
            code,
            reason,
            format!("injected fault: the emulator was told to answer {code}"),
            None,
        )
    }

    /// The `Status` object sent as the response body (or inside a watch `ERROR` event).
    pub fn to_status(&self) -> Value {
        let mut s = Map::new();
        s.insert("kind".into(), json!("Status"));
        s.insert("apiVersion".into(), json!("v1"));
        s.insert("metadata".into(), json!({}));
        s.insert("status".into(), json!("Failure"));
        s.insert("message".into(), json!(self.message));
        if !self.reason.is_empty() {
            s.insert("reason".into(), json!(self.reason));
        }
        if let Some(d) = &self.details {
            s.insert("details".into(), (**d).clone());
        }
        s.insert("code".into(), json!(self.code));
        Value::Object(s)
    }
}

/// The `Status` a successful delete answers with for kinds whose registry does not return
/// the deleted object (Jobs, Secrets, Events).
pub fn success_status(kind: Kind, name: &str, uid: &str) -> Value {
    let mut details = Map::new();
    details.insert("name".into(), json!(name));
    if !kind.group().is_empty() {
        details.insert("group".into(), json!(kind.group()));
    }
    details.insert("kind".into(), json!(kind.plural()));
    details.insert("uid".into(), json!(uid));
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Success",
        "details": Value::Object(details),
    })
}
