//! Label and field selectors as the apiserver parses them from `labelSelector` and
//! `fieldSelector` (already URL-decoded), and matching objects against them.

use std::collections::BTreeSet;

use serde_json::Value;

/// A selector string the emulator cannot parse. Answered as 400 BadRequest.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unable to parse requirement: {0}")]
pub struct SelectorError(String);

/// One requirement of a label selector.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Requirement {
    Exists(String),
    NotExists(String),
    Equals(String, String),
    NotEquals(String, String),
    In(String, BTreeSet<String>),
    NotIn(String, BTreeSet<String>),
}

/// A parsed label selector: requirements joined by AND (`,`). The empty selector matches
/// everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LabelSelector {
    requirements: Vec<Requirement>,
}

impl LabelSelector {
    /// Parses `k`, `!k`, `k=v`, `k==v`, `k!=v`, `k in (a,b)`, `k notin (a,b)`, joined by `,`.
    pub fn parse(s: &str) -> Result<Self, SelectorError> {
        let mut requirements = Vec::new();
        for term in split_top_level(s) {
            let term = term.trim();
            if term.is_empty() {
                continue;
            }
            requirements.push(parse_requirement(term)?);
        }
        Ok(Self { requirements })
    }

    /// Whether an object with these labels (`metadata.labels`) is selected.
    pub fn matches(&self, labels: Option<&Value>) -> bool {
        let get = |k: &str| labels.and_then(|l| l.get(k)).and_then(Value::as_str);
        self.requirements.iter().all(|r| match r {
            Requirement::Exists(k) => get(k).is_some(),
            Requirement::NotExists(k) => get(k).is_none(),
            Requirement::Equals(k, v) => get(k) == Some(v.as_str()),
            // As in Kubernetes, `!=` and `notin` also select objects without the label.
            Requirement::NotEquals(k, v) => get(k) != Some(v.as_str()),
            Requirement::In(k, set) => get(k).is_some_and(|v| set.contains(v)),
            Requirement::NotIn(k, set) => get(k).is_none_or(|v| !set.contains(v)),
        })
    }

    /// Whether the selector selects everything.
    pub fn is_empty(&self) -> bool {
        self.requirements.is_empty()
    }
}

/// Splits on commas that are not inside a `( … )` value set.
fn split_top_level(s: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let mut depth = 0usize;
    let mut start = 0;
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                parts.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&s[start..]);
    parts
}

fn parse_requirement(term: &str) -> Result<Requirement, SelectorError> {
    let err = || SelectorError(term.to_owned());
    if let Some(key) = term.strip_prefix('!') {
        return Ok(Requirement::NotExists(key_of(key.trim(), term)?));
    }
    if let Some(open) = term.find('(') {
        let close = term.rfind(')').filter(|c| *c > open).ok_or_else(err)?;
        if !term[close + 1..].trim().is_empty() {
            return Err(err());
        }
        let head = term[..open].trim_end();
        let (key, op) = head.rsplit_once(char::is_whitespace).ok_or_else(err)?;
        let values = term[open + 1..close]
            .split(',')
            .map(|v| value_of(v.trim(), term))
            .collect::<Result<BTreeSet<_>, _>>()?;
        let key = key_of(key.trim(), term)?;
        return match op {
            "in" => Ok(Requirement::In(key, values)),
            "notin" => Ok(Requirement::NotIn(key, values)),
            _ => Err(err()),
        };
    }
    for (op, make) in [
        (
            "!=",
            Requirement::NotEquals as fn(String, String) -> Requirement,
        ),
        ("==", Requirement::Equals),
        ("=", Requirement::Equals),
    ] {
        if let Some((k, v)) = term.split_once(op) {
            return Ok(make(key_of(k.trim(), term)?, value_of(v.trim(), term)?));
        }
    }
    Ok(Requirement::Exists(key_of(term, term)?))
}

fn key_of(key: &str, term: &str) -> Result<String, SelectorError> {
    let ok = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c))
        && key.matches('/').count() <= 1;
    ok.then(|| key.to_owned())
        .ok_or_else(|| SelectorError(term.to_owned()))
}

fn value_of(value: &str, term: &str) -> Result<String, SelectorError> {
    let ok = value
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    ok.then(|| value.to_owned())
        .ok_or_else(|| SelectorError(term.to_owned()))
}

/// A parsed field selector: `path=value`, `path==value` or `path!=value`, joined by `,`.
/// Any dotted path into the object can be used (`metadata.name`, `status.phase`,
/// `involvedObject.name`); a missing field reads as the empty string, so
/// `spec.nodeName=` selects unscheduled pods as it does on a real cluster.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FieldSelector {
    requirements: Vec<(String, bool, String)>,
}

impl FieldSelector {
    /// Parses a field selector.
    pub fn parse(s: &str) -> Result<Self, SelectorError> {
        let mut requirements = Vec::new();
        for term in s.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            let (path, equal, value) = if let Some((p, v)) = term.split_once("!=") {
                (p, false, v)
            } else if let Some((p, v)) = term.split_once("==") {
                (p, true, v)
            } else if let Some((p, v)) = term.split_once('=') {
                (p, true, v)
            } else {
                return Err(SelectorError(term.to_owned()));
            };
            requirements.push((path.trim().to_owned(), equal, value.trim().to_owned()));
        }
        Ok(Self { requirements })
    }

    /// Whether the object is selected.
    pub fn matches(&self, object: &Value) -> bool {
        self.requirements.iter().all(|(path, equal, value)| {
            let found = path
                .split('.')
                .try_fold(object, |v, segment| v.get(segment));
            let text = match found {
                None | Some(Value::Null) => String::new(),
                Some(Value::String(s)) => s.clone(),
                Some(other) => other.to_string(),
            };
            (text == *value) == *equal
        })
    }

    /// The value an equality requirement on `metadata.name` asks for, if any.
    pub fn name(&self) -> Option<&str> {
        self.requirements
            .iter()
            .find(|(p, eq, _)| p == "metadata.name" && *eq)
            .map(|(_, _, v)| v.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sel(s: &str) -> LabelSelector {
        LabelSelector::parse(s).unwrap()
    }

    #[test]
    fn exists_and_not_exists() {
        let l = json!({"prefect.io/flow-run-id": "abc", "app": "x"});
        assert!(sel("prefect.io/flow-run-id").matches(Some(&l)));
        assert!(!sel("!prefect.io/flow-run-id").matches(Some(&l)));
        assert!(sel("!missing").matches(Some(&l)));
        assert!(!sel("missing").matches(None));
        assert!(sel("!missing").matches(None));
    }

    #[test]
    fn equality_forms() {
        let l = json!({"app": "web", "tier": "db"});
        assert!(sel("app=web").matches(Some(&l)));
        assert!(sel("app==web").matches(Some(&l)));
        assert!(sel("app = web").matches(Some(&l)));
        assert!(!sel("app=api").matches(Some(&l)));
        assert!(sel("app!=api").matches(Some(&l)));
        assert!(!sel("app!=web").matches(Some(&l)));
        // `!=` selects objects that lack the label.
        assert!(sel("zone!=a").matches(Some(&l)));
        assert!(sel("app=").matches(Some(&json!({"app": ""}))));
    }

    #[test]
    fn set_based() {
        let l = json!({"env": "prod"});
        assert!(sel("env in (prod, staging)").matches(Some(&l)));
        assert!(sel("env in (prod)").matches(Some(&l)));
        assert!(!sel("env in (dev,staging)").matches(Some(&l)));
        assert!(sel("env notin (dev,staging)").matches(Some(&l)));
        assert!(!sel("env notin (prod)").matches(Some(&l)));
        assert!(sel("zone notin (a)").matches(Some(&l)));
        assert!(!sel("zone in (a)").matches(Some(&l)));
    }

    #[test]
    fn comma_is_and_outside_parentheses() {
        let l = json!({"a": "1", "b": "2"});
        assert!(sel("a=1,b=2").matches(Some(&l)));
        assert!(!sel("a=1,b=3").matches(Some(&l)));
        assert!(sel("a in (1,5),b,!c").matches(Some(&l)));
        assert!(!sel("a in (4,5),b").matches(Some(&l)));
        assert!(sel("").matches(Some(&l)));
        assert!(sel("").is_empty());
    }

    #[test]
    fn rejects_garbage() {
        for bad in [
            "a=b=c d",
            "a in b",
            "a in (b",
            "=x",
            "a b",
            "a in (x) y",
            "k=v v",
        ] {
            assert!(
                LabelSelector::parse(bad).is_err(),
                "{bad:?} should not parse"
            );
        }
    }

    #[test]
    fn field_selectors() {
        let pod = json!({"metadata": {"name": "p", "namespace": "ns"}, "status": {"phase": "Running"}, "spec": {}});
        let f = |s: &str| FieldSelector::parse(s).unwrap().matches(&pod);
        assert!(f("metadata.name=p"));
        assert!(f("metadata.name==p,metadata.namespace=ns"));
        assert!(!f("metadata.name=q"));
        assert!(f("status.phase!=Pending"));
        assert!(f("spec.nodeName="));
        assert!(!f("status.phase=Pending"));
        assert_eq!(
            FieldSelector::parse("metadata.name=p").unwrap().name(),
            Some("p")
        );
        assert!(FieldSelector::parse("nonsense").is_err());
    }
}
