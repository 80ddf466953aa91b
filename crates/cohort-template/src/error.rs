//! The one error type of template rendering.
//!
//! None of these is retryable: each says the work pool's template, the job variables or
//! a referenced block is wrong, and the same input fails the same way again. Where
//! Prefect raises for the same input (a `KeyError`, `TypeError`, pydantic
//! `ValidationError` …) we return the matching variant; the worker turns it into the
//! flow run's "Failed to submit flow run to infrastructure" crash.

/// Why a base job template could not be rendered into a job configuration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TemplateError {
    /// The work pool's base job template does not have the shape Prefect requires: it is
    /// not an object, `job_configuration` or `variables` is missing or not an object,
    /// `variables.properties` (or one variable's schema) is not an object, or the
    /// `env` variable's default cannot be merged into `job_configuration.env`.
    #[error("malformed base job template: {reason}")]
    MalformedTemplate {
        /// What is wrong, naming the offending key.
        reason: String,
    },

    /// The job variables (deployment ⊕ flow run) cannot be applied: a dotted key such
    /// as `env.FOO` runs through a value that is not an object, or `env` is not an
    /// object where it must be merged into one.
    #[error("invalid job variables: {reason}")]
    InvalidVariables {
        /// What is wrong, naming the offending job variable.
        reason: String,
    },

    /// A rendered job configuration field has a type Prefect's `BaseJobConfiguration`
    /// rejects (e.g. `env` rendered to a list, a label value that is not a string).
    #[error("invalid job configuration: `{field}` {reason}")]
    InvalidJobConfiguration {
        /// The top-level job configuration field.
        field: String,
        /// What is wrong with it.
        reason: String,
    },

    /// A block reference is malformed: `{{ prefect.blocks.<slug> }}` without a block
    /// document name, a `"$ref"` that is not an object, a `block_document_id` that is not
    /// a string, a key path that does not exist in the block's data, or a block value
    /// that is an object or list embedded in surrounding text.
    #[error("invalid block reference in {template}: {reason}")]
    InvalidBlockReference {
        /// The template string (or `$ref` object) holding the reference, as JSON.
        template: String,
        /// What is wrong with it.
        reason: String,
    },

    /// A referenced block document was not among the documents handed to
    /// [`crate::resolve_blocks`] (Prefect: `ObjectNotFound`, the block was deleted).
    #[error("block not found: {reference}; it is referenced by the deployment or work pool configuration but no longer exists")]
    BlockNotFound {
        /// The reference, as [`crate::BlockReference`] displays it.
        reference: String,
    },
}

impl TemplateError {
    pub(crate) fn malformed(reason: impl Into<String>) -> Self {
        Self::MalformedTemplate {
            reason: reason.into(),
        }
    }

    pub(crate) fn invalid_variables(reason: impl Into<String>) -> Self {
        Self::InvalidVariables {
            reason: reason.into(),
        }
    }

    pub(crate) fn invalid_field(field: &str, reason: impl Into<String>) -> Self {
        Self::InvalidJobConfiguration {
            field: field.to_owned(),
            reason: reason.into(),
        }
    }
}

/// A short English name of a JSON value's type, for error messages.
pub(crate) fn json_type_name(value: &serde_json::Value) -> &'static str {
    match value {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "a list",
        serde_json::Value::Object(_) => "an object",
    }
}
