//! `PREFECT_*` settings, read the way Prefect reads them: process environment first, then the
//! active profile of `$PREFECT_HOME/profiles.toml` (`prefect/settings/profiles.py`).
//!
//! This is the "raw values" phase: strings in, validated typed values out. Nothing here touches
//! the process environment except [`Settings::from_process_env`], which snapshots it once.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::time::Duration;

/// Where a setting's value came from; kept so errors can say which to fix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Environment,
    Profile { name: String, path: PathBuf },
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Environment => f.write_str("the environment"),
            Source::Profile { name, path } => {
                write!(f, "profile {name:?} in {}", path.display())
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    /// The profiles file exists but is not valid TOML of Prefect's profile schema.
    #[error("cannot read Prefect profiles from {path}: {reason}")]
    Profiles { path: PathBuf, reason: String },
    /// `PREFECT_PROFILE` (or the file's `active`) names a profile the file does not have.
    #[error("the active Prefect profile {name:?} does not exist in {path}")]
    MissingProfile { name: String, path: PathBuf },
    /// No API URL anywhere. Prefect's worker refuses to start in this case too.
    #[error("PREFECT_API_URL must be set to start a worker (in the environment or the active Prefect profile)")]
    MissingApiUrl,
    /// A setting has a value of the wrong shape.
    #[error("invalid value {value:?} for {key} (from {origin}): {reason}")]
    Invalid {
        key: String,
        value: String,
        origin: Source,
        reason: String,
    },
}

#[derive(Debug, Clone)]
struct Entry {
    value: String,
    source: Source,
}

/// The resolved `PREFECT_*` settings of this process.
#[derive(Debug, Clone, Default)]
pub struct Settings {
    entries: BTreeMap<String, Entry>,
    profile: Option<String>,
}

/// Profiles Prefect ships by default (`prefect/settings/profiles.toml`); the default active one.
const DEFAULT_PROFILE: &str = "ephemeral";

impl Settings {
    /// Snapshot the process environment and resolve against the active profile.
    pub fn from_process_env() -> Result<Self, SettingsError> {
        let env: HashMap<String, String> = std::env::vars().collect();
        Self::load(&env)
    }

    /// Resolve from an explicit environment map (tests pass their own; nothing reads the
    /// process environment behind the caller's back).
    pub fn load(env: &HashMap<String, String>) -> Result<Self, SettingsError> {
        let mut entries = BTreeMap::new();
        let mut profile_name = None;

        let path = profiles_path(env);
        if let Some(path) = path.filter(|p| p.exists()) {
            let text = std::fs::read_to_string(&path).map_err(|e| SettingsError::Profiles {
                path: path.clone(),
                reason: e.to_string(),
            })?;
            let doc: toml::Table =
                text.parse()
                    .map_err(|e: toml::de::Error| SettingsError::Profiles {
                        path: path.clone(),
                        reason: e.to_string(),
                    })?;
            let active = env
                .get("PREFECT_PROFILE")
                .cloned()
                .or_else(|| {
                    doc.get("active")
                        .and_then(|v| v.as_str())
                        .map(str::to_owned)
                })
                .unwrap_or_else(|| DEFAULT_PROFILE.to_owned());
            let profiles = doc.get("profiles").and_then(|p| p.as_table());
            match profiles.and_then(|p| p.get(&active)) {
                Some(toml::Value::Table(table)) => {
                    for (key, value) in table {
                        let value = match value {
                            toml::Value::String(s) => s.clone(),
                            other => other.to_string(),
                        };
                        entries.insert(
                            key.clone(),
                            Entry {
                                value,
                                source: Source::Profile {
                                    name: active.clone(),
                                    path: path.clone(),
                                },
                            },
                        );
                    }
                }
                Some(_) => {
                    return Err(SettingsError::Profiles {
                        path,
                        reason: format!("profile {active:?} is not a table"),
                    })
                }
                // Prefect's built-in profiles (ephemeral, local, test, cloud) need not be in the
                // user's file; an unknown one explicitly asked for is an error.
                None if env.contains_key("PREFECT_PROFILE")
                    && !["ephemeral", "local", "test", "cloud"].contains(&active.as_str()) =>
                {
                    return Err(SettingsError::MissingProfile { name: active, path });
                }
                None => {}
            }
            profile_name = Some(active);
        }

        // The environment wins over the profile (`prefect/settings/base.py` source order).
        for (key, value) in env {
            if key.starts_with("PREFECT_") && !key.starts_with("PREFECT__") {
                entries.insert(
                    key.clone(),
                    Entry {
                        value: value.clone(),
                        source: Source::Environment,
                    },
                );
            }
        }
        Ok(Self {
            entries,
            profile: profile_name,
        })
    }

    /// The active profile's name, when a profiles file was read.
    pub fn profile(&self) -> Option<&str> {
        self.profile.as_deref()
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.entries
            .get(key)
            .map(|e| e.value.as_str())
            .filter(|v| !v.is_empty())
    }

    pub fn source(&self, key: &str) -> Option<&Source> {
        self.entries.get(key).map(|e| &e.source)
    }

    /// `PREFECT_API_URL`, required for a worker.
    pub fn api_url(&self) -> Result<url::Url, SettingsError> {
        let raw = self
            .get("PREFECT_API_URL")
            .ok_or(SettingsError::MissingApiUrl)?;
        let url = url::Url::parse(raw).map_err(|e| self.invalid("PREFECT_API_URL", e))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(self.invalid("PREFECT_API_URL", "the scheme must be http or https"));
        }
        Ok(url)
    }

    pub fn api_key(&self) -> Option<&str> {
        self.get("PREFECT_API_KEY")
    }

    pub fn auth_string(&self) -> Option<&str> {
        self.get("PREFECT_API_AUTH_STRING")
    }

    /// A duration setting given in (possibly fractional) seconds.
    pub fn seconds(&self, key: &str, default: Duration) -> Result<Duration, SettingsError> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v
                .trim()
                .parse::<f64>()
                .ok()
                .filter(|s| s.is_finite() && *s >= 0.0)
                .map(Duration::from_secs_f64)
                .ok_or_else(|| self.invalid(key, "expected a number of seconds ≥ 0")),
        }
    }

    pub fn bool(&self, key: &str, default: bool) -> Result<bool, SettingsError> {
        match self.get(key).map(|v| v.trim().to_ascii_lowercase()) {
            None => Ok(default),
            Some(v) if ["1", "true", "yes", "on", "t", "y"].contains(&v.as_str()) => Ok(true),
            Some(v) if ["0", "false", "no", "off", "f", "n"].contains(&v.as_str()) => Ok(false),
            Some(_) => Err(self.invalid(key, "expected true or false")),
        }
    }

    pub fn u64(&self, key: &str, default: u64) -> Result<u64, SettingsError> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v
                .trim()
                .parse()
                .map_err(|_| self.invalid(key, "expected a whole number ≥ 0")),
        }
    }

    /// Every `PREFECT_*` setting set explicitly (environment or profile), for the flow-run
    /// process: Prefect passes `settings.to_environment_variables(exclude_unset=True)`
    /// (`prefect/workers/base.py: BaseJobConfiguration._base_environment`). Integrations'
    /// settings (`PREFECT_INTEGRATIONS_*`, e.g. prefect-kubernetes' observer's) belong to their
    /// own settings models, not Prefect's `Settings`, so they are not passed on.
    pub fn explicit(&self) -> impl Iterator<Item = (&str, &str)> {
        self.entries
            .iter()
            .filter(|(k, _)| k.starts_with("PREFECT_") && !k.starts_with("PREFECT_INTEGRATIONS_"))
            .map(|(k, e)| (k.as_str(), e.value.as_str()))
    }

    fn invalid(&self, key: &str, reason: impl std::fmt::Display) -> SettingsError {
        let entry = self.entries.get(key);
        SettingsError::Invalid {
            key: key.to_owned(),
            value: entry.map(|e| e.value.clone()).unwrap_or_default(),
            origin: entry
                .map(|e| e.source.clone())
                .unwrap_or(Source::Environment),
            reason: reason.to_string(),
        }
    }
}

/// `PREFECT_PROFILES_PATH`, else `$PREFECT_HOME/profiles.toml`, else `~/.prefect/profiles.toml`.
fn profiles_path(env: &HashMap<String, String>) -> Option<PathBuf> {
    let home = env
        .get("PREFECT_HOME")
        .map(PathBuf::from)
        .or_else(|| env.get("HOME").map(|h| PathBuf::from(h).join(".prefect")))?;
    if let Some(p) = env.get("PREFECT_PROFILES_PATH") {
        let p = p.replace("$PREFECT_HOME", &home.to_string_lossy());
        return Some(PathBuf::from(p));
    }
    Some(home.join("profiles.toml"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn home_with_profiles(text: &str) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("profiles.toml"), text).unwrap();
        dir
    }

    #[test]
    fn environment_wins_over_active_profile() {
        let home = home_with_profiles(
            "active = \"dev\"\n[profiles.dev]\nPREFECT_API_URL = \"http://profile/api\"\nPREFECT_API_KEY = \"k\"\n",
        );
        let s = Settings::load(&env(&[
            ("PREFECT_HOME", home.path().to_str().unwrap()),
            ("PREFECT_API_URL", "http://env/api"),
        ]))
        .unwrap();
        assert_eq!(s.api_url().unwrap().as_str(), "http://env/api");
        assert_eq!(s.api_key(), Some("k"));
        assert_eq!(s.profile(), Some("dev"));
        assert_eq!(
            s.source("PREFECT_API_KEY").unwrap().to_string(),
            format!(
                "profile \"dev\" in {}",
                home.path().join("profiles.toml").display()
            )
        );
    }

    #[test]
    fn prefect_profile_env_selects_profile() {
        let home = home_with_profiles(
            "active = \"a\"\n[profiles.a]\nPREFECT_API_URL = \"http://a/api\"\n[profiles.b]\nPREFECT_API_URL = \"http://b/api\"\nPREFECT_WORKER_QUERY_SECONDS = 3\n",
        );
        let s = Settings::load(&env(&[
            ("PREFECT_HOME", home.path().to_str().unwrap()),
            ("PREFECT_PROFILE", "b"),
        ]))
        .unwrap();
        assert_eq!(s.api_url().unwrap().as_str(), "http://b/api");
        assert_eq!(
            s.seconds("PREFECT_WORKER_QUERY_SECONDS", Duration::from_secs(10))
                .unwrap(),
            Duration::from_secs(3)
        );
    }

    #[test]
    fn unknown_profile_is_an_error() {
        let home = home_with_profiles("[profiles.a]\n");
        let err = Settings::load(&env(&[
            ("PREFECT_HOME", home.path().to_str().unwrap()),
            ("PREFECT_PROFILE", "nope"),
        ]))
        .unwrap_err();
        assert!(matches!(err, SettingsError::MissingProfile { .. }), "{err}");
    }

    #[test]
    fn missing_url_and_bad_values_are_clear() {
        let s = Settings::load(&env(&[("PREFECT_HOME", "/nonexistent-home")])).unwrap();
        assert!(matches!(s.api_url(), Err(SettingsError::MissingApiUrl)));
        let s = Settings::load(&env(&[
            ("PREFECT_API_URL", "ftp://x"),
            ("PREFECT_WORKER_QUERY_SECONDS", "soon"),
        ]))
        .unwrap();
        assert!(s
            .api_url()
            .unwrap_err()
            .to_string()
            .contains("http or https"));
        let err = s
            .seconds("PREFECT_WORKER_QUERY_SECONDS", Duration::from_secs(10))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("PREFECT_WORKER_QUERY_SECONDS") && err.contains("soon"),
            "{err}"
        );
    }

    #[test]
    fn malformed_profiles_file_names_the_file() {
        let home = home_with_profiles("active = [");
        let err = Settings::load(&env(&[("PREFECT_HOME", home.path().to_str().unwrap())]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("profiles.toml"), "{err}");
    }

    #[test]
    fn explicit_lists_only_prefect_settings() {
        let s = Settings::load(&env(&[
            ("PREFECT_API_URL", "http://x/api"),
            ("PREFECT__FLOW_RUN_ID", "internal"),
            (
                "PREFECT_INTEGRATIONS_KUBERNETES_OBSERVER_NAMESPACES",
                "prefect",
            ),
            ("HOME", "/nonexistent"),
        ]))
        .unwrap();
        let keys: Vec<_> = s.explicit().map(|(k, _)| k).collect();
        assert_eq!(keys, vec!["PREFECT_API_URL"]);
    }
}
