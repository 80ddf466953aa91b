//! Emitter behaviour against the in-process fake events server: ordering, handshakes,
//! checkpointing, resend after a dropped connection, flush and close, auth rejection.
//!
//! These use real sockets, so they run on real (but short) time: tokio's paused clock
//! auto-advances whenever the runtime waits on I/O, which would fire timeouts spuriously.

use std::time::Duration;

use super::fake_events_server::{AfterAuth, AuthAnswer, FakeEventsServer, Script};
use super::*;
use crate::event::{Event, Resource};

fn tuning() -> Tuning {
    Tuning {
        checkpoint_every: 700,
        checkpoint_interval: Duration::from_secs(3600),
        pong_timeout: Duration::from_secs(20),
        connect_timeout: Duration::from_secs(5),
        write_timeout: Duration::from_secs(5),
        backoff_base: Duration::from_millis(20),
        backoff_cap: Duration::from_millis(200),
        healthy_after: Duration::from_secs(10),
        close_grace: Duration::from_secs(2),
    }
}

fn config(api_url: url::Url, auth: EventsAuth) -> EmitterConfig {
    EmitterConfig {
        api_url,
        auth,
        user_agent: "cohort-test/1.0".to_owned(),
    }
}

fn numbered(n: usize) -> Event {
    Event::new(
        "cohort.test.numbered",
        Resource::new(format!("cohort.test.{n}")),
        vec![],
    )
}

fn ids(events: &[Event]) -> Vec<String> {
    events.iter().map(|e| e.id.to_string()).collect()
}

async fn eventually(what: &str, condition: impl Fn() -> bool) {
    for _ in 0..500 {
        if condition() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test]
async fn events_arrive_in_order_after_prefects_handshake() {
    let server = FakeEventsServer::start(|_| Script::serve()).await;
    let (emitter, _task) =
        Emitter::spawn_with(config(server.api_url(), EventsAuth::Token(None)), tuning());

    let events: Vec<Event> = (0..25).map(numbered).collect();
    for event in &events {
        emitter.emit(event.clone());
    }
    emitter.flush(Duration::from_secs(5)).await.expect("flush");

    let connections = server.connections();
    assert_eq!(connections.len(), 1);
    let connection = &connections[0];
    assert_eq!(connection.path, "/api/events/in");
    assert_eq!(connection.subprotocol.as_deref(), Some("prefect"));
    assert_eq!(connection.user_agent.as_deref(), Some("cohort-test/1.0"));
    assert_eq!(connection.authorization, None);
    assert_eq!(
        connection.auth_frame.as_deref(),
        Some(r#"{"type":"auth","token":null}"#)
    );
    let expected: Vec<String> = events.iter().map(|e| e.to_wire_json().unwrap()).collect();
    assert_eq!(connection.events, expected, "exact frames, in emit order");
    assert_eq!(emitter.unconfirmed(), 0);
    assert!(emitter.is_connected());
}

#[tokio::test]
async fn token_auth_sends_the_token_frame_and_a_basic_header() {
    let server = FakeEventsServer::start(|_| Script::serve()).await;
    let auth = EventsAuth::Token(Some("user:pass".to_owned()));
    let (emitter, _task) = Emitter::spawn_with(config(server.api_url(), auth), tuning());
    emitter.emit(numbered(1));
    emitter.flush(Duration::from_secs(5)).await.expect("flush");

    let connection = &server.connections()[0];
    assert_eq!(
        connection.auth_frame.as_deref(),
        Some(r#"{"type":"auth","token":"user:pass"}"#)
    );
    assert_eq!(
        connection.authorization.as_deref(),
        Some("Basic dXNlcjpwYXNz")
    );
    assert_eq!(connection.events.len(), 1);
}

#[tokio::test]
async fn cloud_bearer_auth_uses_the_header_and_no_auth_frame() {
    let server = FakeEventsServer::start(|_| Script::serve()).await;
    let auth = EventsAuth::Bearer("pnu_key".to_owned());
    let (emitter, _task) = Emitter::spawn_with(config(server.api_url(), auth), tuning());
    let event = numbered(1);
    emitter.emit(event.clone());
    emitter.flush(Duration::from_secs(5)).await.expect("flush");

    let connection = &server.connections()[0];
    assert_eq!(connection.subprotocol, None);
    assert_eq!(connection.authorization.as_deref(), Some("bearer pnu_key"));
    assert_eq!(connection.auth_frame, None);
    assert_eq!(connection.events, vec![event.to_wire_json().unwrap()]);
}

#[tokio::test]
async fn fake_events_server_drops_connection_and_every_unconfirmed_event_is_resent() {
    let server = FakeEventsServer::start(|n| match n {
        0 => Script {
            auth: AuthAnswer::Success,
            after_auth: AfterAuth::DropAfter(3),
        },
        _ => Script::serve(),
    })
    .await;
    let (emitter, _task) =
        Emitter::spawn_with(config(server.api_url(), EventsAuth::Token(None)), tuning());
    emitter
        .flush(Duration::from_secs(5))
        .await
        .expect("nothing to flush yet");
    eventually("the first connection", || emitter.is_connected()).await;

    let events: Vec<Event> = (0..10).map(numbered).collect();
    for event in &events {
        emitter.emit(event.clone());
    }
    emitter
        .flush(Duration::from_secs(5))
        .await
        .expect("flush after reconnect");

    let connections = server.connections();
    assert!(connections.len() >= 2, "reconnected: {connections:?}");
    assert_eq!(
        connections[0].event_ids(),
        ids(&events[..3]),
        "first socket dropped after 3"
    );
    // Nothing was confirmed before the drop (no pong came back), so the new socket carries
    // all ten, in emit order, before anything else.
    let last = connections.last().unwrap();
    assert_eq!(last.event_ids(), ids(&events));
    assert_eq!(
        last.auth_frame.as_deref(),
        Some(r#"{"type":"auth","token":null}"#)
    );
    assert_eq!(emitter.unconfirmed(), 0);
}

#[tokio::test]
async fn events_emitted_while_disconnected_are_sent_after_reconnect_in_order() {
    let server = FakeEventsServer::start(|n| match n {
        0 => Script {
            auth: AuthAnswer::Success,
            after_auth: AfterAuth::DropAfter(1),
        },
        _ => Script::serve(),
    })
    .await;
    let mut slow = tuning();
    slow.backoff_base = Duration::from_millis(300);
    slow.backoff_cap = Duration::from_millis(300);
    let (emitter, _task) =
        Emitter::spawn_with(config(server.api_url(), EventsAuth::Token(None)), slow);

    let first = numbered(0);
    emitter.emit(first.clone());
    eventually("the drop", || {
        !emitter.is_connected() && server.connections().len() == 1
    })
    .await;
    let later: Vec<Event> = (1..5).map(numbered).collect();
    for event in &later {
        emitter.emit(event.clone());
    }
    emitter.flush(Duration::from_secs(5)).await.expect("flush");

    let mut all = vec![first];
    all.extend(later);
    assert_eq!(server.connections().last().unwrap().event_ids(), ids(&all));
}

#[tokio::test]
async fn flush_resolves_once_the_pong_confirms_and_clears_the_buffer() {
    let server = FakeEventsServer::start(|_| Script::serve()).await;
    let (emitter, _task) =
        Emitter::spawn_with(config(server.api_url(), EventsAuth::Token(None)), tuning());
    for n in 0..3 {
        emitter.emit(numbered(n));
    }
    emitter.flush(Duration::from_secs(5)).await.expect("flush");
    assert_eq!(emitter.unconfirmed(), 0);
    // One ping to connect, one forced by the flush.
    assert_eq!(server.connections()[0].pings, 2);

    // Nothing pending: no ping needed, still Ok.
    emitter
        .flush(Duration::from_secs(5))
        .await
        .expect("empty flush");
    assert_eq!(server.connections()[0].pings, 2);
}

#[tokio::test]
async fn count_based_checkpoint_pings_every_n_events() {
    let server = FakeEventsServer::start(|_| Script::serve()).await;
    let mut every_five = tuning();
    every_five.checkpoint_every = 5;
    let (emitter, _task) = Emitter::spawn_with(
        config(server.api_url(), EventsAuth::Token(None)),
        every_five,
    );

    for n in 0..5 {
        emitter.emit(numbered(n));
    }
    eventually("the count checkpoint", || emitter.unconfirmed() == 0).await;
    for n in 5..8 {
        emitter.emit(numbered(n));
    }
    eventually("three events on the wire", || {
        server.connections()[0].events.len() == 8
    })
    .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        emitter.unconfirmed(),
        3,
        "below the count, no checkpoint yet"
    );
    assert_eq!(
        server.connections()[0].pings,
        2,
        "connect ping + one checkpoint"
    );
}

#[tokio::test]
async fn time_based_checkpoint_confirms_idle_events() {
    let server = FakeEventsServer::start(|_| Script::serve()).await;
    let mut often = tuning();
    often.checkpoint_interval = Duration::from_millis(100);
    let (emitter, _task) =
        Emitter::spawn_with(config(server.api_url(), EventsAuth::Token(None)), often);
    emitter.emit(numbered(1));
    eventually("the time checkpoint", || emitter.unconfirmed() == 0).await;
}

#[tokio::test]
async fn flush_times_out_clearly_when_the_server_never_answers_pings() {
    let server = FakeEventsServer::start(|_| Script {
        auth: AuthAnswer::Success,
        after_auth: AfterAuth::Stall,
    })
    .await;
    let (emitter, _task) =
        Emitter::spawn_with(config(server.api_url(), EventsAuth::Token(None)), tuning());
    emitter.emit(numbered(1));
    emitter.emit(numbered(2));

    let error = emitter.flush(Duration::from_millis(300)).await.unwrap_err();
    match &error {
        FlushError::Timeout {
            unconfirmed,
            connection,
            last_error,
            ..
        } => {
            assert_eq!(*unconfirmed, 2);
            assert_eq!(*connection, "connected");
            assert!(last_error.is_none());
        }
        other => panic!("expected a timeout, got {other:?}"),
    }
    assert_eq!(
        error.to_string(),
        "2 event(s) not confirmed by the events server after 300ms (connected)"
    );
}

#[tokio::test]
async fn an_unanswered_ping_counts_as_a_dead_connection_and_events_are_resent() {
    let server = FakeEventsServer::start(|n| match n {
        0 => Script {
            auth: AuthAnswer::Success,
            after_auth: AfterAuth::Stall,
        },
        _ => Script::serve(),
    })
    .await;
    let mut impatient = tuning();
    impatient.pong_timeout = Duration::from_millis(200);
    let (emitter, _task) =
        Emitter::spawn_with(config(server.api_url(), EventsAuth::Token(None)), impatient);
    let events: Vec<Event> = (0..3).map(numbered).collect();
    for event in &events {
        emitter.emit(event.clone());
    }
    emitter
        .flush(Duration::from_secs(5))
        .await
        .expect("flush on the second connection");
    let connections = server.connections();
    assert_eq!(connections.len(), 2);
    assert_eq!(connections[1].event_ids(), ids(&events));
}

#[tokio::test]
async fn auth_rejection_is_a_clear_error_and_is_not_retried_in_a_hot_loop() {
    let server = FakeEventsServer::start(|_| Script {
        auth: AuthAnswer::ClosePolicy("Invalid token"),
        after_auth: AfterAuth::Serve,
    })
    .await;
    let mut paced = tuning();
    paced.backoff_cap = Duration::from_secs(2);
    let auth = EventsAuth::Token(Some("wrong".to_owned()));
    let (emitter, _task) = Emitter::spawn_with(config(server.api_url(), auth), paced);
    emitter.emit(numbered(1));

    let error = emitter.flush(Duration::from_millis(500)).await.unwrap_err();
    let FlushError::Timeout {
        unconfirmed,
        connection,
        last_error: Some(cause),
        ..
    } = &error
    else {
        panic!("expected a timeout carrying the auth failure, got {error:?}");
    };
    assert_eq!((*unconfirmed, *connection), (1, "disconnected"));
    assert!(cause.is_auth_rejection(), "{cause:?}");
    let url = format!(
        "ws://127.0.0.1:{}/api/events/in",
        server.api_url().port().unwrap()
    );
    assert_eq!(
        cause.to_string(),
        format!("events websocket {url} rejected authentication: 1008 \"Invalid token\"")
    );
    assert!(
        error
            .to_string()
            .contains("rejected authentication: 1008 \"Invalid token\""),
        "{error}"
    );
    assert!(
        std::error::Error::source(&error).is_some(),
        "the cause is chained"
    );
    assert!(emitter.last_error().is_some_and(|e| e.is_auth_rejection()));

    // The next attempt waits at least half the cap (1 s), not the 20 ms base.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(server.connections().len(), 1);
}

#[tokio::test]
async fn invalid_events_are_dropped_and_never_sent() {
    let server = FakeEventsServer::start(|_| Script::serve()).await;
    let (emitter, _task) =
        Emitter::spawn_with(config(server.api_url(), EventsAuth::Token(None)), tuning());
    emitter.emit(Event::new("cohort.test.bad", Resource::default(), vec![]));
    let good = numbered(1);
    emitter.emit(good.clone());
    emitter.flush(Duration::from_secs(5)).await.expect("flush");
    assert_eq!(server.connections()[0].event_ids(), ids(&[good]));
}

#[tokio::test]
async fn close_confirms_pending_events_then_ends_the_task() {
    let server = FakeEventsServer::start(|_| Script::serve()).await;
    let (emitter, task) =
        Emitter::spawn_with(config(server.api_url(), EventsAuth::Token(None)), tuning());
    let events: Vec<Event> = (0..3).map(numbered).collect();
    for event in &events {
        emitter.emit(event.clone());
    }
    emitter.close();
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("task ends")
        .expect("no panic");
    assert_eq!(server.connections()[0].event_ids(), ids(&events));
    assert_eq!(emitter.unconfirmed(), 0);
    assert!(matches!(
        emitter.flush(Duration::from_secs(1)).await,
        Err(FlushError::Closed)
    ));
}

#[tokio::test]
async fn close_gives_up_after_the_grace_period_when_the_server_is_unreachable() {
    // A port nothing listens on.
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let api_url = url::Url::parse(&format!("http://127.0.0.1:{port}/api")).unwrap();
    let mut short = tuning();
    short.close_grace = Duration::from_millis(200);
    let (emitter, task) = Emitter::spawn_with(config(api_url, EventsAuth::Token(None)), short);
    emitter.emit(numbered(1));
    let error = emitter.flush(Duration::from_millis(100)).await.unwrap_err();
    assert!(
        error
            .to_string()
            .contains("(disconnected); last connection error: events websocket"),
        "{error}"
    );
    emitter.close();
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("task ends")
        .expect("no panic");
}

#[tokio::test]
async fn dropping_every_handle_ends_the_task() {
    let server = FakeEventsServer::start(|_| Script::serve()).await;
    let (emitter, task) =
        Emitter::spawn_with(config(server.api_url(), EventsAuth::Token(None)), tuning());
    emitter.emit(numbered(1));
    drop(emitter);
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("task ends")
        .expect("no panic");
    assert_eq!(server.connections()[0].events.len(), 1);
}

#[tokio::test]
async fn wss_against_a_plain_tcp_server_fails_without_panicking() {
    // Exercises the rustls client set-up (a missing crypto provider would panic here).
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            drop(socket);
        }
    });
    let api_url = url::Url::parse(&format!("https://127.0.0.1:{port}/api")).unwrap();
    let (emitter, task) = Emitter::spawn_with(config(api_url, EventsAuth::Token(None)), tuning());
    emitter.emit(numbered(1));
    eventually("a connection error", || emitter.last_error().is_some()).await;
    let error = emitter.last_error().unwrap();
    assert!(
        matches!(*error, ConnectError::Websocket { .. }),
        "{error:?}"
    );
    assert!(error.to_string().starts_with(&format!(
        "events websocket wss://127.0.0.1:{port}/api/events/in"
    )));
    assert!(!task.is_finished());
}
