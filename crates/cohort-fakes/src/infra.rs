//! [`ScriptedInfrastructure`]: runs whose exit, and whose answer to a stop, the test decides.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cohort_infra::{
    BoxFuture, Infrastructure, Job, KillError, Map, PrepareError, RunSpec, Started,
};
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// How a scripted run answers a graceful stop.
#[derive(Debug, Clone, Copy)]
pub enum OnStop {
    /// Exits with this code at once.
    Exit(i64),
    /// Ignores it: only the forced stop after the grace ends it (-9).
    Ignore,
}

/// What the test holds of a scripted run.
#[derive(Clone)]
pub struct Script {
    /// Send `Some(code)` to make the run exit.
    pub exit: watch::Sender<Option<i64>>,
    /// The grace of every stop asked of it.
    pub stops: Arc<Mutex<Vec<Duration>>>,
}

impl Script {
    fn new() -> Script {
        Script {
            exit: watch::channel(None).0,
            stops: Arc::default(),
        }
    }

    /// Makes the run exit with `code`.
    pub fn exit(&self, code: i64) {
        self.exit.send_replace(Some(code));
    }
}

/// A job whose run the test drives through its [`Script`], identified as `scripted:1`;
/// `cancels_itself` as a container's engine does.
pub fn scripted_job(on_stop: OnStop, cancels_itself: bool) -> (Box<dyn Job>, Script) {
    let script = Script::new();
    let job = ScriptedJob {
        identifier: "scripted:1".into(),
        script: script.clone(),
        on_stop,
        launch_error: None,
        cancels_itself,
        launches: None,
    };
    (Box::new(job), script)
}

/// A job that fails to launch with this message.
pub fn failing_job(message: &str) -> Box<dyn Job> {
    Box::new(ScriptedJob {
        identifier: "scripted:1".into(),
        script: Script::new(),
        on_stop: OnStop::Exit(0),
        launch_error: Some(message.to_owned()),
        cancels_itself: false,
        launches: None,
    })
}

/// How [`Infrastructure::kill`] answers, after how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KillAnswer {
    Stopped,
    NotFound,
    /// The infrastructure cannot be reached now.
    Unavailable,
    /// The default: this infrastructure cannot kill by identifier.
    Unsupported,
}

/// An infrastructure of scripted runs (`worker_type` `scripted`): every run prepared gets a
/// [`Script`] the test takes with [`ScriptedInfrastructure::script`]; [`Self::adoptable`]
/// leaves a run for [`Infrastructure::adopt`] to find, as after a worker's restart.
#[derive(Default)]
pub struct ScriptedInfrastructure {
    prepared: Mutex<HashMap<Uuid, Script>>,
    prepared_changed: Notify,
    launches: Arc<Mutex<Vec<Uuid>>>,
    adoptable: Mutex<HashMap<Uuid, Script>>,
    forgotten: Mutex<Vec<Uuid>>,
    /// What `kill` answers and how long it takes; `None`: unsupported.
    kill: Mutex<Option<(KillAnswer, Duration)>>,
    killed: Mutex<Vec<(String, Duration)>>,
}

impl ScriptedInfrastructure {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// The script of the run prepared for `flow_run`, once it is.
    pub async fn script(&self, flow_run: Uuid) -> Script {
        loop {
            let changed = self.prepared_changed.notified();
            if let Some(script) = self.prepared.lock().unwrap().get(&flow_run) {
                return script.clone();
            }
            changed.await;
        }
    }

    /// The runs launched, in order.
    pub fn launches(&self) -> Vec<Uuid> {
        self.launches.lock().unwrap().clone()
    }

    /// The runs the worker told it to forget.
    pub fn forgotten(&self) -> Vec<Uuid> {
        self.forgotten.lock().unwrap().clone()
    }

    /// Makes `kill` answer `answer` after `takes`.
    pub fn answer_kills(&self, answer: KillAnswer, takes: Duration) {
        *self.kill.lock().unwrap() = Some((answer, takes));
    }

    /// Every `kill`: the identifier and the grace.
    pub fn killed(&self) -> Vec<(String, Duration)> {
        self.killed.lock().unwrap().clone()
    }

    /// Leaves a started run for `adopt` to find; returns its script.
    pub fn adoptable(&self, flow_run: Uuid) -> Script {
        let script = Script::new();
        self.adoptable
            .lock()
            .unwrap()
            .insert(flow_run, script.clone());
        script
    }
}

impl Infrastructure for ScriptedInfrastructure {
    fn worker_type(&self) -> &'static str {
        "scripted"
    }

    fn default_base_job_template(&self) -> serde_json::Value {
        serde_json::json!({"job_configuration": {"command": "{{ command }}"},
                           "variables": {"type": "object", "properties": {"command": {"type": "string"}}}})
    }

    fn prepare(&self, _config: &Map, spec: RunSpec) -> Result<Box<dyn Job>, PrepareError> {
        let script = Script::new();
        self.prepared
            .lock()
            .unwrap()
            .insert(spec.flow_run_id, script.clone());
        self.prepared_changed.notify_waiters();
        Ok(Box::new(ScriptedJob {
            identifier: format!("scripted:{}", spec.flow_run_id),
            script,
            on_stop: OnStop::Exit(-15),
            launch_error: None,
            cancels_itself: false,
            launches: Some((spec.flow_run_id, self.launches.clone())),
        }))
    }

    fn adopt<'a>(
        &'a self,
        flow_run: Uuid,
        _legacy_status: Option<&'a Path>,
        _configuration: Option<&'a Map>,
    ) -> BoxFuture<'a, Option<Box<dyn Started>>> {
        let script = self.adoptable.lock().unwrap().remove(&flow_run);
        Box::pin(async move {
            script.map(|script| {
                Box::new(ScriptedRun {
                    identifier: format!("scripted:{flow_run}"),
                    exit: script.exit.subscribe(),
                    script,
                    on_stop: OnStop::Exit(-15),
                    cancels_itself: false,
                }) as Box<dyn Started>
            })
        })
    }

    fn forget(&self, flow_run: Uuid) {
        self.forgotten.lock().unwrap().push(flow_run);
    }

    fn kill<'a>(
        &'a self,
        identifier: &'a str,
        _configuration: Option<&'a Map>,
        grace: Duration,
    ) -> BoxFuture<'a, Result<(), KillError>> {
        self.killed
            .lock()
            .unwrap()
            .push((identifier.to_owned(), grace));
        let answer = *self.kill.lock().unwrap();
        Box::pin(async move {
            let Some((answer, takes)) = answer else {
                return Err(KillError::Unsupported);
            };
            tokio::time::sleep(takes).await;
            match answer {
                KillAnswer::Stopped => Ok(()),
                KillAnswer::NotFound => Err(KillError::NotFound),
                KillAnswer::Unavailable => Err(KillError::Unavailable("scripted".into())),
                KillAnswer::Unsupported => Err(KillError::Unsupported),
            }
        })
    }
}

struct ScriptedJob {
    identifier: String,
    script: Script,
    on_stop: OnStop,
    launch_error: Option<String>,
    cancels_itself: bool,
    /// Where an infrastructure's job records its launch.
    launches: Option<(Uuid, Arc<Mutex<Vec<Uuid>>>)>,
}

struct ScriptedRun {
    identifier: String,
    exit: watch::Receiver<Option<i64>>,
    script: Script,
    on_stop: OnStop,
    cancels_itself: bool,
}

impl Job for ScriptedJob {
    fn launch(self: Box<Self>) -> BoxFuture<'static, Result<Box<dyn Started>, String>> {
        Box::pin(async move {
            if let Some(e) = self.launch_error {
                return Err(e);
            }
            if let Some((id, launches)) = &self.launches {
                launches.lock().unwrap().push(*id);
            }
            Ok(Box::new(ScriptedRun {
                identifier: self.identifier,
                exit: self.script.exit.subscribe(),
                script: self.script,
                on_stop: self.on_stop,
                cancels_itself: self.cancels_itself,
            }) as Box<dyn Started>)
        })
    }
}

impl Started for ScriptedRun {
    fn identifier(&self) -> String {
        self.identifier.clone()
    }

    fn wait(&mut self) -> BoxFuture<'_, std::io::Result<i64>> {
        Box::pin(async move {
            let code = self
                .exit
                .wait_for(Option::is_some)
                .await
                .map_err(|_| std::io::Error::other("script dropped"))?;
            Ok(code.expect("some"))
        })
    }

    fn stop(
        &mut self,
        grace: Duration,
        hurry: CancellationToken,
    ) -> BoxFuture<'_, std::io::Result<i64>> {
        self.script.stops.lock().unwrap().push(grace);
        Box::pin(async move {
            let code = match self.on_stop {
                OnStop::Exit(code) => code,
                OnStop::Ignore => {
                    tokio::select! {
                        _ = tokio::time::sleep(grace) => {}
                        _ = hurry.cancelled() => {}
                    }
                    -9
                }
            };
            self.script.exit.send_replace(Some(code));
            Ok(code)
        })
    }

    fn cancels_itself(&self) -> bool {
        self.cancels_itself
    }

    fn crashed_message(&self, code: i64) -> String {
        format!("scripted run exited with {code}")
    }

    fn crash_resolution(&self, _code: i64) -> Option<String> {
        Some("scripted resolution".into())
    }
}
