//! Self-test of the fault-injecting proxy (`tests/util/fault_proxy.rs`) against a tiny local
//! upstream started here, not a Prefect server: the proxy's own behaviour must be trusted before
//! worker tests lean on it.

#[path = "util/fault_proxy.rs"]
mod fault_proxy;

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use fault_proxy::FaultProxy;
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{CONNECTION, HOST, UPGRADE};
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

/// The stand-in upstream: `GET /api/hello` answers JSON, any other request echoes its body and
/// reports what it received in `x-*` headers, and any websocket upgrade is an echo socket.
/// Keeps its runtime alive for as long as the test holds it.
struct Upstream {
    url: String,
    _runtime: tokio::runtime::Runtime,
}

fn start_upstream() -> Upstream {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let listener = runtime.block_on(TcpListener::bind("127.0.0.1:0")).unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    runtime.spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service_fn(route))
                    .with_upgrades()
                    .await;
            });
        }
    });
    Upstream {
        url,
        _runtime: runtime,
    }
}

async fn route(mut request: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let wants_websocket = request
        .headers()
        .get(UPGRADE)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"));
    if wants_websocket {
        let key = request.headers()["sec-websocket-key"].clone();
        let upgrade = hyper::upgrade::on(&mut request);
        tokio::spawn(async move {
            let Ok(upgraded) = upgrade.await else { return };
            let mut ws =
                WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
            while let Some(Ok(message)) = ws.next().await {
                if (message.is_text() || message.is_binary()) && ws.send(message).await.is_err() {
                    break;
                }
            }
        });
        let response = Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header(UPGRADE, "websocket")
            .header(CONNECTION, "Upgrade")
            .header(
                "sec-websocket-accept",
                derive_accept_key(key.as_bytes()).as_str(),
            )
            .body(Full::default())
            .unwrap();
        return Ok(response);
    }

    if request.uri().path() == "/api/hello" {
        let response = Response::builder()
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from_static(br#"{"hello":"world"}"#)))
            .unwrap();
        return Ok(response);
    }

    if request.uri().path() == ACTED_PATH {
        ACTED.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
    let path = request.uri().to_string();
    let method = request.method().to_string();
    let host = request.headers().get(HOST).cloned();
    let probe = request.headers().get("x-probe").cloned();
    let body = request.into_body().collect().await.unwrap().to_bytes();
    let mut response = Response::builder()
        .status(StatusCode::CREATED)
        .header("x-path", path)
        .header("x-method", method);
    if let Some(host) = host {
        response = response.header("x-host", host);
    }
    if let Some(probe) = probe {
        response = response.header("x-probe", probe);
    }
    Ok(response.body(Full::new(body)).unwrap())
}

/// Requests to [`ACTED_PATH`] the upstream received (one test uses that path).
static ACTED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
const ACTED_PATH: &str = "/api/acted";

fn new_client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap()
}

fn get_status(client: &reqwest::blocking::Client, url: &str) -> u16 {
    client.get(url).send().unwrap().status().as_u16()
}

#[test]
fn forwards_requests_over_one_keep_alive_connection() {
    let upstream = start_upstream();
    let proxy = FaultProxy::start(&upstream.url);
    let api = format!("{}/api", proxy.url());
    let client = new_client();

    for _ in 0..3 {
        let response = client.get(format!("{api}/hello")).send().unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(
            response.headers()["content-type"],
            "application/json",
            "upstream headers pass through"
        );
        assert_eq!(response.text().unwrap(), r#"{"hello":"world"}"#);
    }

    let response = client
        .post(format!("{api}/echo?limit=5&offset=1"))
        .header("x-probe", "kept")
        .body(r#"{"name":"pool"}"#)
        .send()
        .unwrap();
    assert_eq!(response.status(), 201);
    assert_eq!(response.headers()["x-path"], "/api/echo?limit=5&offset=1");
    assert_eq!(response.headers()["x-method"], "POST");
    assert_eq!(response.headers()["x-probe"], "kept");
    let upstream_host = upstream.url.trim_start_matches("http://");
    assert_eq!(
        response.headers()["x-host"],
        upstream_host,
        "Host names upstream"
    );
    assert_eq!(response.text().unwrap(), r#"{"name":"pool"}"#);

    let stats = proxy.stats();
    assert_eq!(stats.forwarded, 4);
    assert_eq!(stats.failed, 0);
    assert_eq!(stats.connections, 1, "client kept its connection alive");
}

#[test]
fn fail_next_after_forwarding_answers_the_failure_once_upstream_acted() {
    let upstream = start_upstream();
    let proxy = FaultProxy::start(&upstream.url);
    let api = format!("{}/api", proxy.url());
    let client = new_client();

    proxy.fail_next_after_forwarding(2, 504, Some("/acted"));
    for expected_acts in 1..=2 {
        let response = client
            .post(format!("{api}/acted"))
            .body("x")
            .send()
            .unwrap();
        assert_eq!(response.status(), 504);
        assert_eq!(response.headers()["x-fault-proxy"], "injected");
        assert_eq!(
            ACTED.load(std::sync::atomic::Ordering::SeqCst),
            expected_acts,
            "the request reached upstream before the 504"
        );
    }
    let response = client
        .post(format!("{api}/acted"))
        .body("x")
        .send()
        .unwrap();
    assert_eq!(response.status(), 201, "the rule is used up");
    assert_eq!(ACTED.load(std::sync::atomic::Ordering::SeqCst), 3);
    let stats = proxy.stats();
    assert_eq!((stats.forwarded, stats.failed), (1, 2));
}

#[test]
fn fail_next_counts_matches_paths_and_sets_retry_after() {
    let upstream = start_upstream();
    let proxy = FaultProxy::start(&upstream.url);
    let api = format!("{}/api", proxy.url());
    let client = new_client();

    proxy.fail_next(2, 503, Some("/hello"));
    assert_eq!(
        client.post(format!("{api}/echo")).send().unwrap().status(),
        201,
        "non-matching path is forwarded"
    );
    for _ in 0..2 {
        let response = client.get(format!("{api}/hello")).send().unwrap();
        assert_eq!(response.status(), 503);
        assert_eq!(response.headers()["content-type"], "application/json");
        assert_eq!(
            response.text().unwrap(),
            r#"{"exception_message":"Service Unavailable"}"#
        );
    }
    assert_eq!(get_status(&client, &format!("{api}/hello")), 200);

    proxy.fail_next(1, 429, None);
    let response = client.post(format!("{api}/echo")).body("x").send().unwrap();
    assert_eq!(response.status(), 429);
    assert_eq!(response.headers()["retry-after"], "1");
    assert_eq!(
        response.text().unwrap(),
        r#"{"exception_message":"Too Many Requests"}"#
    );
    assert_eq!(get_status(&client, &format!("{api}/hello")), 200);

    proxy.fail_next(1, 503, Some("POST /api/echo"));
    assert_ne!(
        get_status(&client, &format!("{api}/echo")),
        503,
        "another method is forwarded"
    );
    assert_eq!(
        client.post(format!("{api}/echo")).send().unwrap().status(),
        503,
        "the rule names the method and the path"
    );

    let stats = proxy.stats();
    assert_eq!(stats.failed, 4);
    assert_eq!(stats.forwarded, 4);
    assert_eq!(
        stats.connections, 1,
        "injected failures keep the connection"
    );
}

#[test]
fn fail_randomly_follows_probability() {
    let upstream = start_upstream();
    let proxy = FaultProxy::start(&upstream.url);
    let url = format!("{}/api/hello", proxy.url());
    let client = new_client();

    proxy.fail_randomly(1.0, 500);
    assert!((0..5).all(|_| get_status(&client, &url) == 500));
    proxy.fail_randomly(0.0, 500);
    assert!((0..5).all(|_| get_status(&client, &url) == 200));

    proxy.fail_randomly(0.5, 502);
    let failed = (0..200)
        .filter(|_| get_status(&client, &url) == 502)
        .count();
    assert!((50..=150).contains(&failed), "{failed} of 200 failed");
    assert_eq!(proxy.stats().failed, 5 + failed as u64);
}

#[test]
fn set_down_refuses_connections_until_back_up() {
    let upstream = start_upstream();
    let proxy = FaultProxy::start(&upstream.url);
    let url = format!("{}/api/hello", proxy.url());
    let client = new_client();
    assert_eq!(get_status(&client, &url), 200);

    proxy.set_down(true);
    let error = new_client()
        .get(&url)
        .send()
        .expect_err("a down proxy refuses connections");
    assert!(error.is_connect(), "refused, not answered: {error:?}");
    // The pooled keep-alive connection was dropped too, so reusing the client fails as well.
    assert!(client.get(&url).send().is_err());

    proxy.set_down(false);
    assert_eq!(get_status(&client, &url), 200, "same URL works again");
    assert_eq!(proxy.stats().forwarded, 2);
}

#[test]
fn websockets_pass_through_and_can_be_dropped() {
    let upstream = start_upstream();
    let proxy = FaultProxy::start(&upstream.url);
    let ws_url = format!(
        "{}/api/events/in",
        proxy.url().replacen("http://", "ws://", 1)
    );
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let (mut ws, _) = tokio_tungstenite::connect_async(&ws_url).await.unwrap();
        ws.send(Message::text("ping")).await.unwrap();
        let echoed = tokio::time::timeout(Duration::from_secs(2), ws.next())
            .await
            .expect("echo arrives")
            .expect("socket open")
            .unwrap();
        assert_eq!(echoed.to_text().unwrap(), "ping");
        assert_eq!(proxy.stats().websockets, 1);

        proxy.drop_websockets();
        let after = tokio::time::timeout(Duration::from_secs(2), ws.next())
            .await
            .expect("drop is noticed at once");
        assert!(
            matches!(after, None | Some(Err(_))),
            "socket closed: {after:?}"
        );

        // Going down drops websockets too, and refuses new ones until back up.
        let (mut ws, _) = tokio_tungstenite::connect_async(&ws_url).await.unwrap();
        proxy.set_down(true);
        let after = tokio::time::timeout(Duration::from_secs(2), ws.next())
            .await
            .expect("down is noticed at once");
        assert!(
            matches!(after, None | Some(Err(_))),
            "socket closed: {after:?}"
        );
        assert!(tokio_tungstenite::connect_async(&ws_url).await.is_err());
        proxy.set_down(false);
        let (mut ws, _) = tokio_tungstenite::connect_async(&ws_url).await.unwrap();
        ws.send(Message::text("again")).await.unwrap();
        let echoed = ws.next().await.unwrap().unwrap();
        assert_eq!(echoed.to_text().unwrap(), "again");
    });
    assert_eq!(proxy.stats().websockets, 3);
}

#[test]
fn refused_websocket_paths_get_an_http_error_and_others_pass() {
    let upstream = start_upstream();
    let proxy = FaultProxy::start(&upstream.url);
    proxy.refuse_websockets("/workers/connect", 404);
    let ws_base = proxy.url().replacen("http://", "ws://", 1);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let refused =
            tokio_tungstenite::connect_async(format!("{ws_base}/api/work_pools/p/workers/connect"))
                .await
                .expect_err("the upgrade is refused");
        match refused {
            tokio_tungstenite::tungstenite::Error::Http(response) => {
                assert_eq!(response.status(), 404);
                assert_eq!(
                    response.body().as_deref(),
                    Some(&br#"{"detail":"Not Found"}"#[..])
                );
            }
            other => panic!("expected an HTTP answer, got {other:?}"),
        }
        let (mut ws, _) = tokio_tungstenite::connect_async(format!("{ws_base}/api/events/in"))
            .await
            .unwrap();
        ws.send(Message::text("ping")).await.unwrap();
        let echoed = ws.next().await.unwrap().unwrap();
        assert_eq!(echoed.to_text().unwrap(), "ping");
    });
    let stats = proxy.stats();
    assert_eq!((stats.websockets, stats.refused_websockets), (2, 1));
    // Plain HTTP on the same path is not affected.
    let client = new_client();
    let response = client
        .post(format!("{}/api/work_pools/p/workers/connect", proxy.url()))
        .send()
        .unwrap();
    assert_eq!(response.status(), 201);
}

#[test]
fn hold_next_holds_one_matching_request_until_released() {
    let upstream = start_upstream();
    let proxy = FaultProxy::start(&upstream.url);
    let api = format!("{}/api", proxy.url());
    proxy.hold_next("/set_state", "Submitting");
    let client = new_client();
    // Same path, other body: forwarded at once.
    let response = client
        .post(format!("{api}/flow_runs/1/set_state"))
        .body(r#"{"state":{"name":"Pending"}}"#)
        .send()
        .unwrap();
    assert_eq!(response.status(), 201);
    assert!(!proxy.wait_until_held(Duration::from_millis(200)));

    let held = std::thread::spawn({
        let url = format!("{api}/flow_runs/1/set_state");
        move || {
            new_client()
                .post(url)
                .body(r#"{"state":{"name":"Submitting"}}"#)
                .send()
                .unwrap()
                .text()
                .unwrap()
        }
    });
    assert!(proxy.wait_until_held(Duration::from_secs(5)));
    // Others pass while one is held; the rule caught one request only.
    let response = client
        .post(format!("{api}/flow_runs/2/set_state"))
        .body(r#"{"state":{"name":"Submitting"}}"#)
        .send()
        .unwrap();
    assert_eq!(response.status(), 201);
    assert!(!held.is_finished(), "the held request was answered");
    proxy.release_held();
    assert_eq!(held.join().unwrap(), r#"{"state":{"name":"Submitting"}}"#);
    assert_eq!(proxy.stats().held, 1);
    assert_eq!(proxy.stats().forwarded, 3);
}
