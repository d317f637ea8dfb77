//! A fake [`Backend`]: deploys anything (or nothing), answers every call with a FunctionError,
//! and times the calls. For tests that drive the queue and the scheduler with paused time.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use dispatch_core::{Envelope, ErrorObject, Logs};
use dispatch_runtime::backend::{
    Backend, BaseImageCheck, BoxFuture, BuildError, DeployedFunction, ExecutionRequest,
    FunctionDeploy, FunctionHandle, GcKeep, ImageBuild, InvokeError, Removed,
};
use dispatch_runtime::{CallOutcome, Progress};
use serde_json::value::RawValue;
use tokio::time::Instant;

/// Deploys anything (or nothing, when `deploy_fails`); every call fails with a FunctionError
/// and is timed.
#[derive(Default)]
pub struct FakeBackend {
    pub deploy_fails: bool,
    pub calls: Arc<Mutex<Vec<Instant>>>,
    /// Leadership as a Kubernetes Lease would report it; `None`: always the leader.
    pub leader: Option<tokio::sync::watch::Receiver<bool>>,
    /// Job executions asked for as the backend's objects would be (the test holds the
    /// sender); taken when the server starts.
    pub requests: Mutex<Option<tokio::sync::mpsc::Receiver<ExecutionRequest>>>,
    /// Every execution change the server reported, in order.
    pub reported: Arc<Mutex<Vec<dispatch_core::JobExecution>>>,
    /// A step each deploy reports, after which it waits for the test's go-ahead.
    pub deploy_step: Option<(String, Arc<tokio::sync::Notify>)>,
}

impl Backend for FakeBackend {
    fn name(&self) -> &'static str {
        "fake"
    }
    fn validate_image(&self, _: &ImageBuild) -> Result<(), dispatch_core::ValidationError> {
        Ok(())
    }
    fn check_base_image<'a>(
        &'a self,
        _: &'a BaseImageCheck,
    ) -> BoxFuture<'a, Result<(), BuildError>> {
        Box::pin(async { Ok(()) })
    }
    fn build_image<'a>(
        &'a self,
        _: &'a str,
        _: &'a ImageBuild,
        _: Progress,
    ) -> BoxFuture<'a, Result<(), BuildError>> {
        Box::pin(async { Ok(()) })
    }
    fn build_log<'a>(&'a self, _: &'a str) -> BoxFuture<'a, Option<String>> {
        Box::pin(async { None })
    }
    fn gc<'a>(&'a self, _: &'a GcKeep, _: Duration) -> BoxFuture<'a, Vec<Removed>> {
        Box::pin(async { Vec::new() })
    }
    fn deploy_function(
        &self,
        d: FunctionDeploy,
    ) -> BoxFuture<'_, Result<FunctionHandle, BuildError>> {
        let fails = self.deploy_fails;
        let handle = self.function("", "");
        let step = self.deploy_step.clone();
        Box::pin(async move {
            if let Some((step, go)) = step {
                d.steps.say(&step);
                go.notified().await;
            }
            match handle {
                Some(h) if !fails => Ok(h),
                _ => Err(BuildError::Unsupported("this fake never deploys".into())),
            }
        })
    }
    fn function(&self, _: &str, _: &str) -> Option<FunctionHandle> {
        Some(Arc::new(FakeFunction {
            calls: self.calls.clone(),
        }))
    }
    fn remove_function<'a>(&'a self, _: &'a str, _: &'a str) -> BoxFuture<'a, ()> {
        Box::pin(async {})
    }
    fn leadership(&self) -> Option<tokio::sync::watch::Receiver<bool>> {
        self.leader.clone()
    }
    fn shutdown(&self) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }
    fn execution_requests(&self) -> Option<tokio::sync::mpsc::Receiver<ExecutionRequest>> {
        self.requests.lock().unwrap().take()
    }
    fn execution_changed(&self, job: &dispatch_core::JobExecution) {
        self.reported.lock().unwrap().push(job.clone());
    }
}

/// Every deployed function of the fake: fails each call, timed.
struct FakeFunction {
    calls: Arc<Mutex<Vec<Instant>>>,
}

impl DeployedFunction for FakeFunction {
    fn invoke<'a>(
        &'a self,
        _: &'a RawValue,
        _: &'a RawValue,
        _: std::time::Instant,
    ) -> BoxFuture<'a, Result<CallOutcome, InvokeError>> {
        self.calls.lock().unwrap().push(Instant::now());
        Box::pin(async {
            Ok(CallOutcome {
                envelope: Envelope::error(ErrorObject::function("boom"), Logs::default()),
                cold: false,
                cold_start: None,
                timings: Default::default(),
                timed_out: false,
                stream: None,
                cancelled: false,
            })
        })
    }
}
