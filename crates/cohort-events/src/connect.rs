//! Opening an events socket (`/api/events/in` for the emitter, `/api/events/out` for the
//! subscriber): URL derivation, the upgrade request, the first ping/pong and the auth
//! handshake (`prefect/events/clients.py: events_in_socket_from_api_url`,
//! `events_out_socket_from_api_url`, `PrefectEventsClient._reconnect`, `_auth_handshake`,
//! `PrefectEventSubscriber._reconnect`; server side
//! `prefect/server/utilities/subscriptions.py: accept_prefect_socket`).

use std::time::Duration;

use base64::Engine as _;
use futures_util::{SinkExt as _, StreamExt as _};
use serde::{Deserialize, Serialize};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{self, Bytes, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use url::Url;

use crate::emitter::{EmitterConfig, EventsAuth};

/// An authenticated events socket.
pub(crate) type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Why a connection attempt failed. All are retried (with backoff); an authentication
/// rejection is retried at the slowest pace, since only a configuration change fixes it.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The API URL has no `http`, `https`, `ws` or `wss` scheme.
    #[error("cannot derive the events websocket URL from API URL `{api_url}`: {reason}")]
    InvalidUrl {
        /// The configured API URL.
        api_url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A header value (user agent, credentials) is not valid in HTTP.
    #[error("cannot build the upgrade request for {url}: invalid `{header}` header value")]
    InvalidHeader {
        /// The socket URL.
        url: Url,
        /// Which header.
        header: &'static str,
    },
    /// TCP, TLS, the HTTP upgrade or a frame failed.
    #[error("events websocket {url}: {source}")]
    Websocket {
        /// The socket URL.
        url: Url,
        /// What tungstenite reported.
        #[source]
        source: tungstenite::Error,
    },
    /// The whole handshake did not finish in time.
    #[error("events websocket {url}: handshake not finished within {timeout:?}")]
    Timeout {
        /// The socket URL.
        url: Url,
        /// The budget that ran out.
        timeout: Duration,
    },
    /// The server refused our credentials: close code 1008 during authentication, a reply
    /// other than `auth_success`, or HTTP 401/403 on the upgrade.
    #[error("events websocket {url} rejected authentication: {reason}")]
    AuthRejected {
        /// The socket URL.
        url: Url,
        /// The server's reason.
        reason: String,
    },
    /// The server closed the socket during the handshake for another reason.
    #[error("events websocket {url} closed during the handshake: {reason}")]
    Closed {
        /// The socket URL.
        url: Url,
        /// Close code and reason, if any.
        reason: String,
    },
}

impl ConnectError {
    /// True when the server refused our credentials.
    pub fn is_auth_rejection(&self) -> bool {
        matches!(self, ConnectError::AuthRejected { .. })
    }
}

/// `…/api` → `ws(s)://…/api/events/in`: `https://` → `wss://`, `http://` → `ws://`, trailing
/// `/` stripped, then `/events/in` (`events_in_socket_from_api_url`).
pub fn events_in_url(api_url: &Url) -> Result<Url, ConnectError> {
    events_socket_url(api_url, "/events/in")
}

/// `…/api` → `ws(s)://…/api/events/out`, by the same rules as [`events_in_url`]
/// (`events_out_socket_from_api_url`).
pub fn events_out_url(api_url: &Url) -> Result<Url, ConnectError> {
    events_socket_url(api_url, "/events/out")
}

fn events_socket_url(api_url: &Url, endpoint: &str) -> Result<Url, ConnectError> {
    let invalid = |reason: String| ConnectError::InvalidUrl {
        api_url: api_url.to_string(),
        reason,
    };
    let text = api_url.as_str();
    let ws = match api_url.scheme() {
        "https" => format!("wss://{}", &text["https://".len()..]),
        "http" => format!("ws://{}", &text["http://".len()..]),
        "ws" | "wss" => text.to_owned(),
        other => return Err(invalid(format!("unsupported scheme `{other}`"))),
    };
    let socket = format!("{}{endpoint}", ws.trim_end_matches('/'));
    Url::parse(&socket).map_err(|e| invalid(e.to_string()))
}

/// How one socket opens: what the upgrade request carries and whether an auth frame follows.
/// Built by [`Handshake::events_in`] or [`Handshake::events_out`], which differ for Cloud.
#[derive(Clone)]
pub(crate) struct Handshake {
    pub(crate) url: Url,
    pub(crate) user_agent: String,
    /// The `Authorization` header of the upgrade request, if any.
    authorization: Option<String>,
    /// `Some(token)`: offer the `prefect` subprotocol, then send
    /// `{"type":"auth","token":token}` and expect `auth_success`. `None`: neither.
    auth_frame: Option<Option<String>>,
}

impl std::fmt::Debug for Handshake {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print credentials.
        f.debug_struct("Handshake")
            .field("url", &self.url.as_str())
            .field("user_agent", &self.user_agent)
            .field(
                "authorization",
                &self.authorization.as_ref().map(|_| "<redacted>"),
            )
            .field(
                "auth_frame",
                &self
                    .auth_frame
                    .as_ref()
                    .map(|t| t.as_ref().map(|_| "<redacted>")),
            )
            .finish()
    }
}

impl Handshake {
    /// `/api/events/in` (`PrefectEventsClient`, `PrefectCloudEventsClient`): a token goes in
    /// the auth frame and, for proxies that want basic auth before the upgrade, also as
    /// `Authorization: Basic …` (`PrefectEventsClient.__init__`, `_basic_auth_token`); Prefect
    /// Cloud takes `Authorization: bearer <key>` on the upgrade and no auth frame.
    pub(crate) fn events_in(url: Url, config: &EmitterConfig) -> Self {
        let (authorization, auth_frame) = match &config.auth {
            EventsAuth::Token(token) => {
                let basic = token.as_deref().filter(|t| !t.is_empty()).map(|token| {
                    let encoded = base64::engine::general_purpose::STANDARD.encode(token);
                    format!("Basic {encoded}")
                });
                (basic, Some(token.clone()))
            }
            EventsAuth::Bearer(key) => (Some(format!("bearer {key}")), None),
        };
        Handshake {
            url,
            user_agent: config.user_agent.clone(),
            authorization,
            auth_frame,
        }
    }

    /// `/api/events/out` (`PrefectEventSubscriber`, `PrefectCloudEventSubscriber`): always the
    /// `prefect` subprotocol and the auth frame, carrying the Cloud API key or the auth string;
    /// no `Authorization` header in either case.
    pub(crate) fn events_out(url: Url, user_agent: &str, auth: &EventsAuth) -> Self {
        let token = match auth {
            EventsAuth::Token(token) => token.clone(),
            EventsAuth::Bearer(key) => Some(key.clone()),
        };
        Handshake {
            url,
            user_agent: user_agent.to_owned(),
            authorization: None,
            auth_frame: Some(token),
        }
    }
}

/// Opens, checks and authenticates one socket within `timeout`.
pub(crate) async fn open(handshake: &Handshake, timeout: Duration) -> Result<Socket, ConnectError> {
    match tokio::time::timeout(timeout, open_unbounded(handshake)).await {
        Ok(result) => result,
        Err(_) => Err(ConnectError::Timeout {
            url: handshake.url.clone(),
            timeout,
        }),
    }
}

/// Websocket settings for Cohort's sockets: 16 KiB read buffers instead of tungstenite's
/// 128 KiB (a worker holds four sockets for its whole life, and their frames — events,
/// heartbeats — are small; a larger frame still arrives, in more reads).
pub fn ws_config() -> tokio_tungstenite::tungstenite::protocol::WebSocketConfig {
    tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default().read_buffer_size(16 * 1024)
}

async fn open_unbounded(handshake: &Handshake) -> Result<Socket, ConnectError> {
    let url = &handshake.url;
    if url.scheme() == "wss" {
        // rustls needs a process-wide crypto provider; it can only pick one by itself when
        // exactly one provider feature is compiled in, which the rest of the build may change.
        // Installing fails harmlessly when someone already did.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
    let request = upgrade_request(handshake)?;
    let (mut socket, _response) =
        tokio_tungstenite::connect_async_with_config(request, Some(ws_config()), false)
            .await
            .map_err(|source| upgrade_error(url, source))?;
    let ws_error = |source| ConnectError::Websocket {
        url: url.clone(),
        source,
    };

    // Prefect pings first "to make sure we have actually connected".
    socket
        .send(Message::Ping(Bytes::from_static(b"cohort-connect")))
        .await
        .map_err(ws_error)?;
    loop {
        match socket.next().await {
            Some(Ok(Message::Pong(_))) => break,
            Some(Ok(Message::Close(frame))) => return Err(closed(url, frame.as_ref(), false)),
            Some(Ok(_)) => continue,
            Some(Err(source)) => return Err(ws_error(source)),
            None => return Err(closed(url, None, false)),
        }
    }

    let Some(token) = &handshake.auth_frame else {
        // Prefect Cloud's events/in authenticates on the upgrade request
        // (`PrefectCloudEventsClient`).
        return Ok(socket);
    };
    let frame = serde_json::to_string(&AuthFrame {
        kind: "auth",
        token: token.as_deref(),
    })
    .expect("a struct of strings serializes");
    socket.send(Message::text(frame)).await.map_err(ws_error)?;
    loop {
        match socket.next().await {
            Some(Ok(Message::Text(reply))) => {
                return check_auth_reply(url, reply.as_str()).map(|()| socket)
            }
            Some(Ok(Message::Close(frame))) => return Err(closed(url, frame.as_ref(), true)),
            Some(Ok(_)) => continue,
            Some(Err(source)) => return Err(ws_error(source)),
            None => return Err(closed(url, None, true)),
        }
    }
}

/// The auth frame, keys in Prefect's order: `{"type":"auth","token":…}`.
#[derive(Serialize)]
struct AuthFrame<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    token: Option<&'a str>,
}

#[derive(Deserialize)]
struct AuthReply {
    #[serde(rename = "type")]
    kind: Option<String>,
    reason: Option<String>,
}

fn check_auth_reply(url: &Url, reply: &str) -> Result<(), ConnectError> {
    match serde_json::from_str::<AuthReply>(reply) {
        Ok(AuthReply {
            kind: Some(kind), ..
        }) if kind == "auth_success" => Ok(()),
        Ok(AuthReply {
            reason: Some(reason),
            ..
        }) => Err(ConnectError::AuthRejected {
            url: url.clone(),
            reason,
        }),
        _ => Err(ConnectError::AuthRejected {
            url: url.clone(),
            reason: format!("unexpected reply to the auth frame: {reply}"),
        }),
    }
}

fn upgrade_request(handshake: &Handshake) -> Result<http::Request<()>, ConnectError> {
    let url = &handshake.url;
    let mut request =
        url.as_str()
            .into_client_request()
            .map_err(|source| ConnectError::Websocket {
                url: url.clone(),
                source,
            })?;
    let headers = request.headers_mut();
    let value = |header: &'static str, text: String| {
        http::HeaderValue::try_from(text).map_err(|_| ConnectError::InvalidHeader {
            url: url.clone(),
            header,
        })
    };
    headers.insert(
        http::header::USER_AGENT,
        value("User-Agent", handshake.user_agent.clone())?,
    );
    if handshake.auth_frame.is_some() {
        headers.insert(
            http::header::SEC_WEBSOCKET_PROTOCOL,
            http::HeaderValue::from_static("prefect"),
        );
    }
    if let Some(authorization) = &handshake.authorization {
        headers.insert(
            http::header::AUTHORIZATION,
            value("Authorization", authorization.clone())?,
        );
    }
    Ok(request)
}

fn upgrade_error(url: &Url, source: tungstenite::Error) -> ConnectError {
    if let tungstenite::Error::Http(response) = &source {
        let status = response.status();
        if status == http::StatusCode::UNAUTHORIZED || status == http::StatusCode::FORBIDDEN {
            return ConnectError::AuthRejected {
                url: url.clone(),
                reason: format!("HTTP {status} on the upgrade request"),
            };
        }
    }
    ConnectError::Websocket {
        url: url.clone(),
        source,
    }
}

/// A close during the handshake; 1008 (policy violation) while authenticating is how the
/// Prefect server says "Invalid token" / "Auth required but no token provided".
fn closed(url: &Url, frame: Option<&CloseFrame>, authenticating: bool) -> ConnectError {
    let reason = describe_close(frame);
    match frame {
        Some(frame) if authenticating && frame.code == CloseCode::Policy => {
            ConnectError::AuthRejected {
                url: url.clone(),
                reason,
            }
        }
        _ => ConnectError::Closed {
            url: url.clone(),
            reason,
        },
    }
}

/// `1008 "Invalid token"`, or `no close frame`.
pub(crate) fn describe_close(frame: Option<&CloseFrame>) -> String {
    match frame {
        Some(frame) => format!("{} {:?}", u16::from(frame.code), frame.reason.as_str()),
        None => "no close frame".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ws(api: &str) -> String {
        events_in_url(&Url::parse(api).unwrap())
            .unwrap()
            .to_string()
    }

    #[test]
    fn socket_url_follows_prefect_rules() {
        assert_eq!(
            ws("http://127.0.0.1:4200/api"),
            "ws://127.0.0.1:4200/api/events/in"
        );
        assert_eq!(
            ws("http://127.0.0.1:4200/api/"),
            "ws://127.0.0.1:4200/api/events/in"
        );
        assert_eq!(
            ws("https://api.prefect.cloud/api/accounts/a/workspaces/w"),
            "wss://api.prefect.cloud/api/accounts/a/workspaces/w/events/in"
        );
        assert_eq!(ws("http://host:4200/"), "ws://host:4200/events/in");
        assert_eq!(
            events_out_url(&Url::parse("https://host/api/").unwrap())
                .unwrap()
                .as_str(),
            "wss://host/api/events/out"
        );
        let err = events_in_url(&Url::parse("ftp://host/api").unwrap()).unwrap_err();
        assert!(matches!(err, ConnectError::InvalidUrl { .. }), "{err}");
    }

    #[test]
    fn auth_frame_has_prefects_key_order() {
        let frame = |token| {
            serde_json::to_string(&AuthFrame {
                kind: "auth",
                token,
            })
            .unwrap()
        };
        assert_eq!(frame(None), r#"{"type":"auth","token":null}"#);
        assert_eq!(frame(Some("s3cret")), r#"{"type":"auth","token":"s3cret"}"#);
    }

    #[test]
    fn auth_replies() {
        let url = Url::parse("ws://h/api/events/in").unwrap();
        assert!(check_auth_reply(&url, r#"{"type":"auth_success"}"#).is_ok());
        let err = check_auth_reply(&url, r#"{"type":"auth_failure","reason":"nope"}"#).unwrap_err();
        assert_eq!(
            err.to_string(),
            "events websocket ws://h/api/events/in rejected authentication: nope"
        );
        assert!(check_auth_reply(&url, "garbage")
            .unwrap_err()
            .is_auth_rejection());
    }
}
