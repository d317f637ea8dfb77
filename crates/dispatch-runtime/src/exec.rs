//! Exec handlers (`language: exec`): any executable, one process per call — the payload on
//! its stdin, its result JSON on stdout, its stderr lines as logs, `DISPATCH_CONTEXT` in its
//! environment — in the same sandbox and limits as a worker.

use std::process::Stdio;
use std::time::Duration;

use dispatch_core::envelope::{EnvelopeContext, null_raw};
use dispatch_core::{Envelope, ErrorObject, Logs};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use serde_json::value::RawValue;

use crate::sandbox::Cgroup;
use crate::worker::{CallFailure, WorkerSpec, death_message, expendable};

/// Largest stdout an exec handler may print (its result).
const EXEC_MAX_OUTPUT: usize = 16 * 1024 * 1024;

/// Runs an exec handler once: payload JSON on stdin, result JSON on stdout, stderr lines as
/// logs; `DISPATCH_CONTEXT` holds the context JSON. Non-zero exit → FunctionError. `Err`
/// only when it ran out of time (its process group is killed).
pub async fn run_exec(
    spec: &WorkerSpec,
    context: &RawValue,
    payload: &RawValue,
    timeout: Duration,
) -> Result<Envelope, CallFailure> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // In a container the context goes into its bundle (the runtime's own environment stays
    // outside); the payload and the answer cross its piped stdio.
    let started = if spec.container.is_some() {
        spec.container_command(
            vec![("DISPATCH_CONTEXT".to_string(), context.get().to_string())],
            false,
        )
    } else {
        spec.command(false)
    };
    let (mut cmd, cgroup, _container) = match started {
        Ok(c) => c,
        Err(e) => {
            return Ok(Envelope::error(
                ErrorObject::system(format!("failed to start {}: {e}", spec.program.display())),
                Logs::default(),
            ));
        }
    };
    let max_output = spec.max_output().min(EXEC_MAX_OUTPUT);
    cmd.env("DISPATCH_CONTEXT", context.get())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = match cmd.spawn() {
        Ok(c) => {
            expendable(c.id());
            c
        }
        Err(e) => {
            return Ok(Envelope::error(
                ErrorObject::system(format!("failed to start {}: {e}", spec.program.display())),
                Logs::default(),
            ));
        }
    };
    let pid = child.id().map(|p| Pid::from_raw(p as i32));
    let mut stdin = child.stdin.take();
    let mut stdout = child.stdout.take();
    let mut stderr = child.stderr.take();
    let body = payload.get().as_bytes().to_vec();
    let run = async {
        let write = async {
            if let Some(mut s) = stdin.take() {
                // A program that does not read its input closes the pipe early: not an error.
                let _ = s.write_all(&body).await;
                let _ = s.shutdown().await;
            }
        };
        let read_out = async {
            let mut v = Vec::new();
            if let Some(s) = stdout.as_mut() {
                let _ = s.take(max_output as u64 + 1).read_to_end(&mut v).await;
            }
            v
        };
        let read_err = async {
            let mut v = Vec::new();
            if let Some(s) = stderr.as_mut() {
                let _ = s.take(EXEC_MAX_OUTPUT as u64).read_to_end(&mut v).await;
            }
            v
        };
        let ((), out, err) = tokio::join!(write, read_out, read_err);
        let status = child.wait().await;
        (out, err, status)
    };
    let (out, err, status) = match tokio::time::timeout(timeout, run).await {
        Ok(r) => r,
        Err(_) => {
            if let Some(pid) = pid {
                let _ = killpg(pid, Signal::SIGKILL);
            }
            return Err(CallFailure::timeout(timeout));
        }
    };
    let logs = Logs {
        stdout: Vec::new(),
        stderr: String::from_utf8_lossy(&err)
            .lines()
            .map(str::to_string)
            .collect(),
    };
    match status {
        Ok(st) if st.success() => {}
        Ok(st) => {
            let killed = cgroup.as_ref().is_some_and(Cgroup::oom_killed);
            let e = if killed {
                ErrorObject::system(death_message(cgroup.as_ref(), String::new()))
            } else {
                ErrorObject::function(format!("handler exited with {st}"))
            };
            return Ok(Envelope::error(e, logs));
        }
        Err(e) => {
            return Ok(Envelope::error(
                ErrorObject::system(format!("failed to wait for handler: {e}")),
                logs,
            ));
        }
    }
    if out.len() > max_output {
        return Ok(Envelope::error(
            ErrorObject::function(format!(
                "handler printed more than {} (spec.resources.maxOutputBytes)",
                crate::sandbox::cgroup::human_bytes(max_output as u64)
            )),
            logs,
        ));
    }
    let text = String::from_utf8_lossy(&out);
    let trimmed = text.trim();
    let raw = if trimmed.is_empty() {
        Ok(null_raw())
    } else {
        RawValue::from_string(trimmed.to_string())
    };
    Ok(match raw {
        Ok(payload) => Envelope {
            context: EnvelopeContext { logs, error: None },
            payload,
        },
        Err(e) => Envelope::error(
            ErrorObject::function(format!("handler printed output that is not JSON: {e}")),
            Logs {
                stdout: text.lines().map(str::to_string).collect(),
                ..logs
            },
        ),
    })
}
