//! The event model: resources, related resources and events, serialized exactly as Prefect's
//! client serializes them (`prefect/events/schemas/events.py`), and the checks that keep a
//! server from dropping our websocket over a bad event.

use std::fmt;

use chrono::{DateTime, TimeDelta, Utc};
use indexmap::IndexMap;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::labels;

/// `follows` is only recorded when the two events are closer than this
/// (`prefect/events/utilities.py: TIGHT_TIMING`).
pub const TIGHT_TIMING: TimeDelta = TimeDelta::minutes(5);
/// `PREFECT_EVENTS_MAXIMUM_LABELS_PER_RESOURCE`.
pub const MAX_LABELS_PER_RESOURCE: usize = 500;
/// `PREFECT_EVENTS_MAXIMUM_RELATED_RESOURCES`.
pub const MAX_RELATED_RESOURCES: usize = 100;
/// `PREFECT_SERVER_EVENTS_MAXIMUM_SIZE_BYTES`, checked on the serialized event.
pub const MAX_EVENT_SIZE_BYTES: usize = 1_500_000;
/// `PREFECT_SERVER_EVENTS_MAXIMUM_EVENT_NAME_LENGTH`, in characters.
pub const MAX_EVENT_NAME_LENGTH: usize = 1024;

/// An observable object: a flat, insertion-ordered `label -> value` map whose
/// `prefect.resource.id` label names it. Serializes as a plain JSON object.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Resource(IndexMap<String, String>);

/// A resource with a role in an event: a [`Resource`] that also carries
/// `prefect.resource.role`. Serializes as a plain JSON object.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct RelatedResource(IndexMap<String, String>);

macro_rules! label_map_methods {
    ($ty:ident) => {
        impl $ty {
            /// Sets `label` to `value`; an existing label keeps its position.
            pub fn insert(&mut self, label: impl Into<String>, value: impl Into<String>) {
                self.0.insert(label.into(), value.into());
            }

            /// Builder form of [`Self::insert`].
            #[must_use]
            pub fn with(mut self, label: impl Into<String>, value: impl Into<String>) -> Self {
                self.insert(label, value);
                self
            }

            /// The value of `label`, if present.
            pub fn get(&self, label: &str) -> Option<&str> {
                self.0.get(label).map(String::as_str)
            }

            /// The `prefect.resource.id` label, or `""` when absent.
            pub fn id(&self) -> &str {
                self.get(labels::RESOURCE_ID).unwrap_or_default()
            }

            /// The `prefect.resource.name` label, if present.
            pub fn name(&self) -> Option<&str> {
                self.get(labels::RESOURCE_NAME)
            }

            /// Number of labels.
            pub fn len(&self) -> usize {
                self.0.len()
            }

            /// True when there are no labels at all.
            pub fn is_empty(&self) -> bool {
                self.0.is_empty()
            }

            /// Labels in insertion (= wire) order.
            pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
                self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
            }
        }

        impl<K: Into<String>, V: Into<String>> FromIterator<(K, V)> for $ty {
            fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
                Self(
                    iter.into_iter()
                        .map(|(k, v)| (k.into(), v.into()))
                        .collect(),
                )
            }
        }
    };
}

label_map_methods!(Resource);
label_map_methods!(RelatedResource);

impl Resource {
    /// A resource with only its id.
    pub fn new(id: impl Into<String>) -> Self {
        Self::default().with(labels::RESOURCE_ID, id)
    }

    /// This resource in `role`, the role label appended last (as
    /// `prefect/workers/base.py: BaseWorker._event_related_resources(include_self=True)` does).
    pub fn into_related(self, role: impl Into<String>) -> RelatedResource {
        RelatedResource(self.0).with(labels::RESOURCE_ROLE, role)
    }
}

impl RelatedResource {
    /// A related resource with its id and role, in that order.
    pub fn new(id: impl Into<String>, role: impl Into<String>) -> Self {
        Self::default()
            .with(labels::RESOURCE_ID, id)
            .with(labels::RESOURCE_ROLE, role)
    }

    /// The `prefect.resource.role` label, or `""` when absent.
    pub fn role(&self) -> &str {
        self.get(labels::RESOURCE_ROLE).unwrap_or_default()
    }
}

/// One event, with fields in the order Prefect's `Event.model_dump_json()` writes them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// When it happened, from the sender's clock.
    #[serde(with = "occurred_format")]
    pub occurred: DateTime<Utc>,
    /// Event name, e.g. `prefect.worker.started`.
    pub event: String,
    /// The resource the event is about.
    pub resource: Resource,
    /// Other resources involved, in a meaningful order.
    #[serde(default)]
    pub related: Vec<RelatedResource>,
    /// Always `{}` for worker and runner events; must be a JSON object.
    #[serde(default = "empty_object")]
    pub payload: serde_json::Value,
    /// Client-chosen id; the server de-duplicates re-sent events by it.
    pub id: Uuid,
    /// Id of an event known to have happened just before this one.
    #[serde(default)]
    pub follows: Option<Uuid>,
}

fn empty_object() -> serde_json::Value {
    serde_json::Value::Object(serde_json::Map::new())
}

impl Event {
    /// A new event happening now, with a fresh UUIDv7 id, `payload: {}` and no `follows`.
    pub fn new(
        event: impl Into<String>,
        resource: Resource,
        related: Vec<RelatedResource>,
    ) -> Self {
        Self {
            occurred: now_micros(),
            event: event.into(),
            resource,
            related,
            payload: empty_object(),
            id: Uuid::now_v7(),
            follows: None,
        }
    }

    /// Records that this event follows `previous`, but only when the two occurred less than
    /// five minutes apart, either way; otherwise `follows` is cleared. This is Prefect's rule
    /// (`prefect/events/utilities.py: emit_event`), so a worker that ran for an hour sends
    /// `stopped` with `follows: null`.
    #[must_use]
    pub fn follow(mut self, previous: &Event) -> Self {
        let apart = self.occurred - previous.occurred;
        self.follows = (-TIGHT_TIMING < apart && apart < TIGHT_TIMING).then_some(previous.id);
        self
    }

    /// Same event with another `occurred` (truncated to microseconds, the wire precision).
    #[must_use]
    pub fn with_occurred(mut self, occurred: DateTime<Utc>) -> Self {
        self.occurred = truncate_to_micros(occurred);
        self
    }

    /// Same event with another id.
    #[must_use]
    pub fn with_id(mut self, id: Uuid) -> Self {
        self.id = id;
        self
    }

    /// Checks what Prefect's client and server models check, except the size (see
    /// [`Event::to_wire_json`]). The server drops the whole connection on an invalid event,
    /// so an event that fails here must never be sent.
    pub fn validate(&self) -> Result<(), EventError> {
        let length = self.event.chars().count();
        if length > MAX_EVENT_NAME_LENGTH {
            return Err(EventError::NameTooLong {
                length,
                max: MAX_EVENT_NAME_LENGTH,
            });
        }
        check_labels(Location::Resource, self.resource.id(), self.resource.len())?;
        if self.related.len() > MAX_RELATED_RESOURCES {
            return Err(EventError::TooManyRelated {
                count: self.related.len(),
                max: MAX_RELATED_RESOURCES,
            });
        }
        for (index, related) in self.related.iter().enumerate() {
            let location = Location::Related(index);
            check_labels(location, related.id(), related.len())?;
            if related.role().is_empty() {
                return Err(EventError::MissingLabel {
                    location,
                    label: labels::RESOURCE_ROLE,
                });
            }
        }
        if !self.payload.is_object() {
            return Err(EventError::PayloadNotObject);
        }
        Ok(())
    }

    /// The exact text frame sent on `/api/events/in`, after [`Event::validate`] and the
    /// client-side size check of `prefect/events/utilities.py: emit_event`.
    pub fn to_wire_json(&self) -> Result<String, EventError> {
        self.validate()?;
        let json = serde_json::to_string(self).map_err(EventError::Serialize)?;
        if json.len() > MAX_EVENT_SIZE_BYTES {
            return Err(EventError::TooLarge {
                size: json.len(),
                max: MAX_EVENT_SIZE_BYTES,
            });
        }
        Ok(json)
    }
}

fn check_labels(location: Location, id: &str, count: usize) -> Result<(), EventError> {
    if count > MAX_LABELS_PER_RESOURCE {
        return Err(EventError::TooManyLabels {
            location,
            count,
            max: MAX_LABELS_PER_RESOURCE,
        });
    }
    if id.is_empty() {
        return Err(EventError::MissingLabel {
            location,
            label: labels::RESOURCE_ID,
        });
    }
    Ok(())
}

/// Where in an event a problem is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Location {
    /// The primary `resource`.
    Resource,
    /// `related[i]`.
    Related(usize),
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Location::Resource => f.write_str("resource"),
            Location::Related(i) => write!(f, "related[{i}]"),
        }
    }
}

/// Why an event cannot be sent. None of these is retryable: the event itself is wrong.
#[derive(Debug, thiserror::Error)]
pub enum EventError {
    /// The event name is longer than the server accepts.
    #[error("event name is {length} characters long; the server accepts at most {max}")]
    NameTooLong {
        /// Characters in the name.
        length: usize,
        /// The server's limit.
        max: usize,
    },
    /// A mandatory label (`prefect.resource.id`, or `prefect.resource.role` on a related
    /// resource) is missing or empty.
    #[error("{location} has no (or an empty) `{label}` label")]
    MissingLabel {
        /// Which resource.
        location: Location,
        /// Which label.
        label: &'static str,
    },
    /// A resource has more labels than Prefect allows.
    #[error("{location} has {count} labels; at most {max} are allowed")]
    TooManyLabels {
        /// Which resource.
        location: Location,
        /// Its label count.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// More related resources than Prefect allows.
    #[error("event has {count} related resources; at most {max} are allowed")]
    TooManyRelated {
        /// Related resources in the event.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// The payload is not a JSON object.
    #[error("event payload must be a JSON object")]
    PayloadNotObject,
    /// The serialized event is larger than the server accepts.
    #[error("event is {size} bytes serialized; the server accepts at most {max}")]
    TooLarge {
        /// Serialized size in bytes.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// The event could not be serialized (not expected with these types).
    #[error("event could not be serialized")]
    Serialize(#[source] serde_json::Error),
}

/// Now, at the microsecond precision the wire carries, so an event compares equal to itself
/// after a round trip.
fn now_micros() -> DateTime<Utc> {
    truncate_to_micros(Utc::now())
}

fn truncate_to_micros(t: DateTime<Utc>) -> DateTime<Utc> {
    let excess = t.timestamp_subsec_nanos() % 1_000;
    t - TimeDelta::nanoseconds(i64::from(excess))
}

/// pydantic's datetime JSON form for UTC: `2026-11-23T19:27:38.293365Z`, and without the
/// fraction when it is zero (`2021-02-03T04:05:06Z`), as `Event.model_dump_json()` writes it.
mod occurred_format {
    use chrono::{DateTime, Utc};
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
        let format = if t.timestamp_subsec_micros() == 0 {
            "%Y-%m-%dT%H:%M:%SZ"
        } else {
            "%Y-%m-%dT%H:%M:%S%.6fZ"
        };
        s.collect_str(&t.format(format))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<DateTime<Utc>, D::Error> {
        let text = String::deserialize(d)?;
        DateTime::parse_from_rfc3339(&text)
            .map(|t| t.with_timezone(&Utc))
            .map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text)
            .unwrap()
            .with_timezone(&Utc)
    }

    fn sample() -> Event {
        Event::new(
            "prefect.worker.started",
            Resource::new("prefect.worker.process.w1").with("prefect.resource.name", "w1"),
            vec![RelatedResource::new("prefect.work-pool.p", "work-pool")
                .with("prefect.resource.name", "p")],
        )
    }

    #[test]
    fn new_events_get_a_fresh_uuid7_the_current_time_and_an_empty_payload() {
        let before = Utc::now();
        let (a, b) = (sample(), sample());
        let after = Utc::now();
        assert_eq!(a.id.get_version_num(), 7);
        assert_ne!(a.id, b.id);
        assert!(a.id < b.id, "UUIDv7 ids sort by creation");
        assert!(before - TimeDelta::microseconds(1) <= a.occurred && a.occurred <= after);
        assert_eq!(
            a.occurred.timestamp_subsec_nanos() % 1_000,
            0,
            "microsecond precision"
        );
        assert_eq!(a.payload, serde_json::json!({}));
        assert_eq!(a.follows, None);
    }

    #[test]
    fn json_has_prefects_exact_shape_and_key_order() {
        let previous = Uuid::parse_str("01a209e6-a07e-7141-8b5d-abe42ca8d7d2").unwrap();
        let mut event = sample()
            .with_occurred(at("2021-02-03T04:05:06.000007Z"))
            .with_id(Uuid::parse_str("01a209e7-3834-7267-84fb-ab5324e4f382").unwrap());
        event.follows = Some(previous);
        assert_eq!(
            serde_json::to_string(&event).unwrap(),
            concat!(
                r#"{"occurred":"2021-02-03T04:05:06.000007Z","event":"prefect.worker.started","#,
                r#""resource":{"prefect.resource.id":"prefect.worker.process.w1","prefect.resource.name":"w1"},"#,
                r#""related":[{"prefect.resource.id":"prefect.work-pool.p","prefect.resource.role":"work-pool","prefect.resource.name":"p"}],"#,
                r#""payload":{},"id":"01a209e7-3834-7267-84fb-ab5324e4f382","follows":"01a209e6-a07e-7141-8b5d-abe42ca8d7d2"}"#
            )
        );
    }

    #[test]
    fn occurred_drops_a_zero_fraction_and_follows_null_is_written() {
        // pydantic writes whole seconds without a fraction; both keys are always present.
        let event = Event::new("x", Resource::new("a"), vec![])
            .with_occurred(at("2021-02-03T04:05:06Z"))
            .with_id(Uuid::nil());
        assert_eq!(
            serde_json::to_string(&event).unwrap(),
            r#"{"occurred":"2021-02-03T04:05:06Z","event":"x","resource":{"prefect.resource.id":"a"},"related":[],"payload":{},"id":"00000000-0000-0000-0000-000000000000","follows":null}"#
        );
        let nanos = event.with_occurred(at("2021-02-03T04:05:06.123456789Z"));
        assert!(serde_json::to_string(&nanos)
            .unwrap()
            .contains(r#""occurred":"2021-02-03T04:05:06.123456Z""#));
    }

    #[test]
    fn events_round_trip_through_json() {
        let event = sample().follow(&sample());
        let text = serde_json::to_string(&event).unwrap();
        let back: Event = serde_json::from_str(&text).unwrap();
        assert_eq!(back, event);
        // The server's extra `received` is ignored on the way in.
        let mut value: serde_json::Value = serde_json::from_str(&text).unwrap();
        value["received"] = "2026-11-23T19:34:37.882126Z".into();
        assert_eq!(serde_json::from_value::<Event>(value).unwrap(), event);
    }

    fn apart(minutes: i64, seconds: i64) -> (Event, Event) {
        let first = sample().with_occurred(at("2026-11-23T19:00:00Z"));
        let offset = TimeDelta::minutes(minutes) + TimeDelta::seconds(seconds);
        let second = sample().with_occurred(first.occurred + offset);
        (first, second)
    }

    #[test]
    fn follows_is_set_only_when_under_five_minutes_apart() {
        for (minutes, seconds, tight) in [
            (0, 0, true),
            (0, 1, true),
            (4, 59, true),
            (5, 0, false),
            (10, 0, false),
            (60, 0, false),
            (0, -1, true),
            (-4, -59, true),
            (-5, 0, false),
            (-10, 0, false),
        ] {
            let (first, second) = apart(minutes, seconds);
            let followed = second.follow(&first);
            let want = tight.then_some(first.id);
            assert_eq!(followed.follows, want, "{minutes} min {seconds} s apart");
        }
    }

    #[test]
    fn follow_replaces_an_earlier_follows() {
        let (first, second) = apart(10, 0);
        let mut second = second;
        second.follows = Some(Uuid::nil());
        assert_eq!(second.follow(&first).follows, None);
    }

    #[test]
    fn validation_accepts_prefects_limits_exactly() {
        let mut event = sample();
        for i in 0..(MAX_LABELS_PER_RESOURCE - event.resource.len()) {
            event.resource.insert(format!("label.{i}"), "v");
        }
        event.related = (0..MAX_RELATED_RESOURCES)
            .map(|i| RelatedResource::new(format!("r.{i}"), "role"))
            .collect();
        event.event = "e".repeat(MAX_EVENT_NAME_LENGTH);
        assert_eq!(event.resource.len(), 500);
        event.to_wire_json().expect("at the limits is fine");
    }

    fn error_of(event: &Event) -> String {
        event.to_wire_json().unwrap_err().to_string()
    }

    #[test]
    fn validation_rejects_what_the_server_would_choke_on() {
        let without_id = Event::new(
            "x",
            Resource::default().with("prefect.resource.name", "n"),
            vec![],
        );
        assert_eq!(
            error_of(&without_id),
            "resource has no (or an empty) `prefect.resource.id` label"
        );
        let empty_id = Event::new("x", Resource::new(""), vec![]);
        assert!(matches!(
            empty_id.validate(),
            Err(EventError::MissingLabel {
                location: Location::Resource,
                label: "prefect.resource.id"
            })
        ));

        let mut related = sample();
        related
            .related
            .push(RelatedResource::default().with("prefect.resource.id", "a"));
        assert_eq!(
            error_of(&related),
            "related[1] has no (or an empty) `prefect.resource.role` label"
        );
        let mut empty_role = sample();
        empty_role.related.push(RelatedResource::new("a", ""));
        assert!(matches!(
            empty_role.validate(),
            Err(EventError::MissingLabel {
                location: Location::Related(1),
                ..
            })
        ));
        let mut related_without_id = sample();
        related_without_id
            .related
            .insert(0, RelatedResource::new("", "tag"));
        assert_eq!(
            error_of(&related_without_id),
            "related[0] has no (or an empty) `prefect.resource.id` label"
        );

        let mut many_labels = sample();
        for i in 0..MAX_LABELS_PER_RESOURCE {
            many_labels.resource.insert(format!("label.{i}"), "v");
        }
        assert_eq!(
            error_of(&many_labels),
            "resource has 502 labels; at most 500 are allowed"
        );

        let mut many_related = sample();
        many_related.related = (0..=MAX_RELATED_RESOURCES)
            .map(|i| RelatedResource::new(format!("r.{i}"), "role"))
            .collect();
        assert_eq!(
            error_of(&many_related),
            "event has 101 related resources; at most 100 are allowed"
        );

        let mut long_name = sample();
        long_name.event = "é".repeat(MAX_EVENT_NAME_LENGTH + 1);
        assert_eq!(
            error_of(&long_name),
            "event name is 1025 characters long; the server accepts at most 1024"
        );

        let mut not_object = sample();
        not_object.payload = serde_json::json!([1]);
        assert_eq!(error_of(&not_object), "event payload must be a JSON object");

        let mut huge = sample();
        huge.resource
            .insert("big", "x".repeat(MAX_EVENT_SIZE_BYTES));
        assert!(matches!(
            huge.to_wire_json(),
            Err(EventError::TooLarge { max: 1_500_000, .. })
        ));
        assert!(
            huge.validate().is_ok(),
            "size is only checked on the serialized form"
        );
    }

    #[test]
    fn labels_keep_insertion_order_and_overwrites_keep_position() {
        let resource = Resource::new("id")
            .with("b", "1")
            .with("a", "2")
            .with("b", "3");
        let labels: Vec<(&str, &str)> = resource.iter().collect();
        assert_eq!(
            labels,
            [("prefect.resource.id", "id"), ("b", "3"), ("a", "2")]
        );
        let related = resource.into_related("worker");
        assert_eq!(related.role(), "worker");
        assert_eq!(
            related.iter().last(),
            Some(("prefect.resource.role", "worker"))
        );
        assert_eq!(related.id(), "id");
        let collected: Resource = [("prefect.resource.id", "x")].into_iter().collect();
        assert_eq!(collected, Resource::new("x"));
    }
}
