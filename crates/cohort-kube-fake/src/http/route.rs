//! Which resource a request path names.

use crate::kind::Kind;

/// A path the emulator serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Route {
    /// `/version`
    Version,
    /// `/api`
    CoreVersions,
    /// `/apis`
    Groups,
    /// `/apis/<group>`
    Group(&'static str),
    /// `/api/v1`, `/apis/<group>/v1`
    Resources(&'static str),
    /// A collection: all namespaces (`namespace: None`) or one.
    Collection {
        kind: Kind,
        namespace: Option<String>,
    },
    /// One object (`namespace` empty for cluster-scoped kinds).
    Object {
        kind: Kind,
        namespace: String,
        name: String,
    },
    /// An object's `status` subresource.
    Status {
        kind: Kind,
        namespace: String,
        name: String,
    },
    /// `/openapi/v3`
    OpenApiRoot,
    /// `/openapi/v3/<group-version path>`
    OpenApi(String),
    /// A pod's `log` subresource.
    Log { namespace: String, name: String },
}

const GROUPS: [&str; 4] = [
    "batch",
    "apiextensions.k8s.io",
    "apps",
    "rbac.authorization.k8s.io",
];

/// The route for a path, if the emulator serves it.
pub(crate) fn parse(path: &str) -> Option<Route> {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    match segments.as_slice() {
        ["version"] => Some(Route::Version),
        ["api"] => Some(Route::CoreVersions),
        ["apis"] => Some(Route::Groups),
        ["openapi", "v3"] => Some(Route::OpenApiRoot),
        ["openapi", "v3", rest @ ..] => Some(Route::OpenApi(rest.join("/"))),
        ["api", "v1"] => Some(Route::Resources("")),
        ["apis", group] => GROUPS.iter().find(|g| *g == group).map(|g| Route::Group(g)),
        ["apis", group, "v1"] => GROUPS
            .iter()
            .find(|g| *g == group)
            .map(|g| Route::Resources(g)),
        ["api", "v1", rest @ ..] => resource_route("", rest),
        ["apis", group, "v1", rest @ ..] => resource_route(group, rest),
        _ => None,
    }
}

fn resource_route(group: &str, rest: &[&str]) -> Option<Route> {
    let kind = |plural: &str| Kind::from_route(group, "v1", plural);
    match rest {
        ["namespaces", ns, plural, tail @ ..] if kind(plural).is_some_and(Kind::namespaced) => {
            let kind = kind(plural)?;
            let namespace = (*ns).to_owned();
            match tail {
                [] => Some(Route::Collection {
                    kind,
                    namespace: Some(namespace),
                }),
                [name] => Some(Route::Object {
                    kind,
                    namespace,
                    name: (*name).to_owned(),
                }),
                [name, "status"] => Some(Route::Status {
                    kind,
                    namespace,
                    name: (*name).to_owned(),
                }),
                [name, "log"] if kind == Kind::Pod => Some(Route::Log {
                    namespace,
                    name: (*name).to_owned(),
                }),
                _ => None,
            }
        }
        [plural] => Some(Route::Collection {
            kind: kind(plural)?,
            namespace: None,
        }),
        [plural, name] if kind(plural).is_some_and(|k| !k.namespaced()) => Some(Route::Object {
            kind: kind(plural)?,
            namespace: String::new(),
            name: (*name).to_owned(),
        }),
        [plural, name, "status"] if kind(plural).is_some_and(|k| !k.namespaced()) => {
            Some(Route::Status {
                kind: kind(plural)?,
                namespace: String::new(),
                name: (*name).to_owned(),
            })
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        assert_eq!(
            parse("/apis/batch/v1/namespaces/prefect/jobs"),
            Some(Route::Collection {
                kind: Kind::Job,
                namespace: Some("prefect".into())
            })
        );
        assert_eq!(
            parse("/api/v1/pods"),
            Some(Route::Collection {
                kind: Kind::Pod,
                namespace: None
            })
        );
        assert_eq!(
            parse("/api/v1/namespaces/default"),
            Some(Route::Object {
                kind: Kind::Namespace,
                namespace: String::new(),
                name: "default".into()
            })
        );
        assert_eq!(
            parse("/api/v1/namespaces/default/status"),
            Some(Route::Status {
                kind: Kind::Namespace,
                namespace: String::new(),
                name: "default".into()
            })
        );
        assert_eq!(
            parse("/api/v1/namespaces/x/pods/p/log"),
            Some(Route::Log {
                namespace: "x".into(),
                name: "p".into()
            })
        );
        assert_eq!(parse("/apis/batch/v1/namespaces/x/pods"), None);
        assert_eq!(parse("/apis/networking.k8s.io/v1"), None);
        assert_eq!(parse("/api/v1/namespaces/x/jobs"), None);
    }
}
