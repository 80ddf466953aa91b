//! Why a rendered configuration cannot become a Job manifest.

use cohort_infra::PrepareError;

/// A configuration prefect-kubernetes would refuse. Never retryable: the same configuration
/// fails the same way; the run is Crashed with this message.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ManifestError {
    /// The manifest lacks attributes of Prefect's base Job (JSON pointers, sorted)
    /// (`prefect_kubernetes/worker.py: KubernetesWorkerJobConfiguration._validate_job_manifest`).
    #[error("Job is missing required attributes at the following paths: {}", .0.join(", "))]
    MissingAttributes(Vec<String>),
    /// Attributes of Prefect's base Job have other values (`<pointer> must have value <repr>`,
    /// sorted); only reported when nothing is missing.
    #[error("Job has incompatible values for the following attributes: {}", .0.join(", "))]
    IncompatibleValues(Vec<String>),
    /// The first container's `args` is neither a string, a list nor absent.
    #[error("Invalid job manifest template: 'command' must be a string or list.")]
    InvalidCommand,
    /// A string command could not be split like a POSIX shell (Python's `shlex` message).
    #[error("{0}")]
    CommandSplit(&'static str),
    /// A field of the configuration has a type the job configuration model refuses.
    #[error("invalid job configuration: `{field}` {reason}")]
    InvalidField { field: &'static str, reason: String },
    /// The manifest has a shape prefect-kubernetes cannot work on (where Python fails with a
    /// `TypeError`, `KeyError` or `AttributeError` of its own).
    #[error("invalid job manifest: {0}")]
    InvalidManifest(String),
    /// The `name` rendered to a value that is not text, and a Job name had to be made from it.
    #[error("text must be str, bytes or bytearray, not {0}")]
    NameNotText(&'static str),
}

impl ManifestError {
    /// The Python exception prefect-kubernetes raises for the same configuration, which Prefect
    /// puts in front of the message in the run's Crashed state.
    pub fn prefect_exception(&self) -> &'static str {
        match self {
            Self::MissingAttributes(_)
            | Self::IncompatibleValues(_)
            | Self::InvalidField { .. } => "ValidationError",
            Self::InvalidCommand | Self::CommandSplit(_) => "ValueError",
            Self::InvalidManifest(_) | Self::NameNotText(_) => "TypeError",
        }
    }

    pub(crate) fn field(field: &'static str, reason: impl Into<String>) -> Self {
        Self::InvalidField {
            field,
            reason: reason.into(),
        }
    }

    pub(crate) fn manifest(reason: impl Into<String>) -> Self {
        Self::InvalidManifest(reason.into())
    }
}

impl From<ManifestError> for PrepareError {
    fn from(e: ManifestError) -> Self {
        PrepareError::Invalid(e.to_string())
    }
}
