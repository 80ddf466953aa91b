//! The resource kinds the emulator serves, and what the API says about each: its group,
//! plural, scope and whether it has a `status` subresource.

use std::fmt;

/// A kind of object in the emulator's store. Every kind is stored the same way (as JSON); the
/// kinds differ only in where they are served and in the defaults, validation and controllers
/// that apply to them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// `v1` Namespace (cluster-scoped). Objects can only be created in a namespace that exists.
    Namespace,
    /// `v1` Pod.
    Pod,
    /// `v1` Secret.
    Secret,
    /// `v1` Event. Nothing in the emulator writes any; served so listing them works.
    Event,
    /// `batch/v1` Job, driven by the emulator's Job controller.
    Job,
    /// `apiextensions.k8s.io/v1` CustomResourceDefinition: always an empty, read-only list,
    /// because kopf waits for the resource to exist before it starts.
    CustomResourceDefinition,
    /// `v1` ServiceAccount, `apps/v1` Deployment, `rbac.authorization.k8s.io/v1` Role and
    /// RoleBinding: stored and served, nothing more (no controller, no authorization), so that
    /// `kubectl apply` of the worker's own manifests can be checked.
    ServiceAccount,
    Deployment,
    Role,
    RoleBinding,
}

impl Kind {
    /// Every kind, in discovery order.
    pub const ALL: [Kind; 10] = [
        Kind::Namespace,
        Kind::Pod,
        Kind::Secret,
        Kind::Event,
        Kind::Job,
        Kind::CustomResourceDefinition,
        Kind::ServiceAccount,
        Kind::Deployment,
        Kind::Role,
        Kind::RoleBinding,
    ];

    /// The `kind` field (`Pod`).
    pub fn name(self) -> &'static str {
        match self {
            Kind::Namespace => "Namespace",
            Kind::Pod => "Pod",
            Kind::Secret => "Secret",
            Kind::Event => "Event",
            Kind::Job => "Job",
            Kind::CustomResourceDefinition => "CustomResourceDefinition",
            Kind::ServiceAccount => "ServiceAccount",
            Kind::Deployment => "Deployment",
            Kind::Role => "Role",
            Kind::RoleBinding => "RoleBinding",
        }
    }

    /// The resource name in URLs (`pods`).
    pub fn plural(self) -> &'static str {
        match self {
            Kind::Namespace => "namespaces",
            Kind::Pod => "pods",
            Kind::Secret => "secrets",
            Kind::Event => "events",
            Kind::Job => "jobs",
            Kind::CustomResourceDefinition => "customresourcedefinitions",
            Kind::ServiceAccount => "serviceaccounts",
            Kind::Deployment => "deployments",
            Kind::Role => "roles",
            Kind::RoleBinding => "rolebindings",
        }
    }

    /// The API group; empty for the core group.
    pub fn group(self) -> &'static str {
        match self {
            Kind::Job => "batch",
            Kind::CustomResourceDefinition => "apiextensions.k8s.io",
            Kind::Deployment => "apps",
            Kind::Role | Kind::RoleBinding => "rbac.authorization.k8s.io",
            _ => "",
        }
    }

    /// `apiVersion` of objects of this kind (`batch/v1`).
    pub fn api_version(self) -> &'static str {
        match self.group() {
            "" => "v1",
            "batch" => "batch/v1",
            "apps" => "apps/v1",
            "rbac.authorization.k8s.io" => "rbac.authorization.k8s.io/v1",
            _ => "apiextensions.k8s.io/v1",
        }
    }

    /// Whether objects live in a namespace.
    pub fn namespaced(self) -> bool {
        !matches!(self, Kind::Namespace | Kind::CustomResourceDefinition)
    }

    /// Whether the kind has a `status` subresource, so that writes to the main resource keep
    /// the stored status (as the real apiserver's strategies do).
    pub fn has_status(self) -> bool {
        matches!(self, Kind::Namespace | Kind::Pod | Kind::Job)
    }

    /// Short names advertised in discovery (used by kubectl, `po`, `ns`).
    pub fn short_names(self) -> &'static [&'static str] {
        match self {
            Kind::Namespace => &["ns"],
            Kind::Pod => &["po"],
            Kind::Event => &["ev"],
            Kind::CustomResourceDefinition => &["crd", "crds"],
            Kind::ServiceAccount => &["sa"],
            Kind::Deployment => &["deploy"],
            _ => &[],
        }
    }

    /// The kind's name as the apiserver writes it in messages: `pods`, `jobs.batch`.
    pub fn qualified(self) -> String {
        match self.group() {
            "" => self.plural().to_owned(),
            g => format!("{}.{g}", self.plural()),
        }
    }

    /// The kind and group as written in `Invalid` messages: `Pod`, `Job.batch`.
    pub fn qualified_kind(self) -> String {
        match self.group() {
            "" => self.name().to_owned(),
            g => format!("{}.{g}", self.name()),
        }
    }

    /// The `kind` of a list of these (`PodList`).
    pub fn list_kind(self) -> String {
        format!("{}List", self.name())
    }

    /// The kind served at `/api/v1/<plural>` or `/apis/<group>/v1/<plural>`.
    pub fn from_route(group: &str, version: &str, plural: &str) -> Option<Kind> {
        if version != "v1" {
            return None;
        }
        Kind::ALL
            .into_iter()
            .find(|k| k.group() == group && k.plural() == plural)
    }

    /// A kind by its name, plural or short name, any case (`Pod`, `pods`, `po`).
    pub fn parse(s: &str) -> Option<Kind> {
        let s = s.to_ascii_lowercase();
        Kind::ALL.into_iter().find(|k| {
            k.name().eq_ignore_ascii_case(&s) || k.plural() == s || k.short_names().contains(&&*s)
        })
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}
