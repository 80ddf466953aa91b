//! Prefect's event model, the `/api/events/in` websocket emitter and the `/api/events/out`
//! subscriber, for Cohort's worker and runner.
//!
//! * [`event`]: [`Event`], [`Resource`], [`RelatedResource`], serialized byte-for-byte like
//!   Prefect 3.8.8's client, with the validation that keeps a poison event off the wire.
//! * [`related`]: the exact resources and related lists of the worker and runner events.
//! * [`emitter`]: one task owning the websocket, with Prefect's ping/pong checkpointing and
//!   resend-after-reconnect.
//! * [`subscriber`]: one task owning a `/api/events/out` subscription (how workers and runners
//!   hear of cancellations), resubscribing from a cursor and de-duplicating the backfill.
//! * [`EventSink`]: the seam producers use; [`RecordingSink`] records for tests.
#![forbid(unsafe_code)]

mod backoff;
mod connect;
pub mod emitter;
pub mod event;
pub mod labels;
pub mod names;
pub mod related;
pub mod sink;
pub mod slug;
pub mod subscriber;

pub use connect::ws_config;
pub use emitter::{
    ConnectError, Emitter, EmitterConfig, EventsAuth, FlushError, Outbox, OutboxError,
    OutboxOptions, Tuning,
};
pub use event::{Event, EventError, RelatedResource, Resource};
pub use sink::{Emitted, EventSink, RecordingSink};
pub use subscriber::{
    subscribe, subscribe_with, SubscribeError, SubscriberConfig, SubscriberTuning, Subscription,
};
