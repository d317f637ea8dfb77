//! The embedded job runner (DESIGN §7): one "pod" attempt runs each container's
//! `command` + `args` as a local process (its own process group, a clean environment plus the
//! rendered `env`), all containers at once, stdout/stderr captured line by line into a shared
//! buffer that readers can see while the job runs. Dropping the attempt (cancel) or passing
//! the deadline kills every process group, grandchildren included.

use parking_lot::Mutex;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;

use dispatch_core::Logs;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::time::Instant;

/// One container of a pod, rendered.
#[derive(Debug, Clone)]
pub struct ContainerRun {
    pub name: String,
    pub command: Vec<String>,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    /// The sandbox the container's command runs in (DESIGN §9); `None`: on the host.
    pub jail: Option<std::sync::Arc<crate::sandbox::Jail>>,
    pub working_dir: PathBuf,
    /// Run as an OCI container instead (the container tier): `command`, `args`, `env` and
    /// `jail` are then unused (the container's own hold them).
    pub oci: Option<OciRun>,
}

/// A container of the container tier: its engine, its bundle's content and its image (kept
/// from gc while it runs).
#[derive(Clone)]
pub struct OciRun {
    pub engine: Arc<crate::container::Engine>,
    pub container: crate::container::Container,
    /// Container ids start with it (an attempt counter follows).
    pub id: String,
    pub image: Arc<crate::container::Ready>,
}

impl std::fmt::Debug for OciRun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OciRun")
            .field("id", &self.id)
            .field("image", &self.image.digest)
            .finish()
    }
}

/// How one pod attempt ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PodOutcome {
    /// Every container exited 0.
    Succeeded,
    /// A container failed: its name and exit code (128 + signal when killed by one).
    Failed {
        container: String,
        exit_code: i32,
    },
    /// A container could not start.
    StartFailed {
        container: String,
        error: String,
    },
    DeadlineExceeded,
}

/// Logs shared between the runner and readers (`dispatch logs jobexecution --follow`).
pub type LiveLogs = Arc<Mutex<Logs>>;

/// Kills a process group when dropped.
struct GroupGuard(Option<Pid>);

impl Drop for GroupGuard {
    fn drop(&mut self) {
        if let Some(pid) = self.0.take() {
            let _ = killpg(pid, Signal::SIGKILL);
        }
    }
}

fn push_line(logs: &LiveLogs, stderr: bool, line: String, max_bytes: usize) {
    let mut l = logs.lock();
    let used: usize = l
        .stdout
        .iter()
        .chain(l.stderr.iter())
        .map(String::len)
        .sum();
    if used > max_bytes {
        return;
    }
    let stream = if stderr { &mut l.stderr } else { &mut l.stdout };
    if used + line.len() > max_bytes {
        stream.push(dispatch_core::envelope::TRUNCATED_MARKER.to_string());
        return;
    }
    stream.push(line);
}

/// Runs one attempt of a pod until every container exits, or until `deadline`.
pub async fn run_pod(
    containers: &[ContainerRun],
    deadline: Option<Instant>,
    logs: &LiveLogs,
    max_log_bytes: usize,
) -> PodOutcome {
    let prefix = containers.len() > 1;
    let mut guards = Vec::new();
    let mut waits = Vec::new();
    for c in containers {
        let mut container_guard = None;
        let mut cgroup = None;
        let mut cmd = if let Some(oci) = &c.oci {
            match crate::container::engine::Running::prepare(
                &oci.engine,
                &oci.id,
                &oci.container,
                false,
            ) {
                Ok((cmd, running)) => {
                    container_guard = Some(running);
                    cmd
                }
                Err(error) => {
                    return PodOutcome::StartFailed {
                        container: c.name.clone(),
                        error,
                    };
                }
            }
        } else {
            let Some((program, rest)) = c.command.split_first() else {
                return PodOutcome::StartFailed {
                    container: c.name.clone(),
                    error: "no command".into(),
                };
            };
            let args: Vec<String> = rest.iter().chain(&c.args).cloned().collect();
            let (mut cmd, cg) = match crate::worker::sandboxed(
                c.jail.as_deref(),
                std::path::Path::new(program),
                &args,
                &c.working_dir,
            ) {
                Ok(c) => c,
                Err(e) => {
                    return PodOutcome::StartFailed {
                        container: c.name.clone(),
                        error: format!("failed to prepare the sandbox of {program}: {e}"),
                    };
                }
            };
            cgroup = cg;
            let host_dir = match &c.jail {
                // The launcher starts on the host; the working dir is the sandbox's.
                Some(_) => std::path::Path::new("/"),
                None => c.working_dir.as_path(),
            };
            cmd.current_dir(host_dir)
                .env_clear()
                .envs(
                    ["PATH", "HOME", "LANG"]
                        .iter()
                        .filter_map(|k| std::env::var(k).ok().map(|v| (*k, v))),
                )
                .envs(c.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
            cmd
        };
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        let program = c
            .oci
            .as_ref()
            .map(|o| o.engine.name.clone())
            .or_else(|| c.command.first().cloned())
            .unwrap_or_default();
        let mut child = match cmd.spawn() {
            Ok(ch) => {
                crate::worker::expendable(ch.id());
                ch
            }
            Err(e) => {
                return PodOutcome::StartFailed {
                    container: c.name.clone(),
                    error: format!("failed to start {program}: {e}"),
                };
            }
        };
        guards.push(GroupGuard(
            child
                .id()
                .and_then(|p| i32::try_from(p).ok())
                .map(Pid::from_raw),
        ));
        let tag = if prefix {
            format!("[{}] ", c.name)
        } else {
            String::new()
        };
        let readers: Vec<_> = [
            child.stdout.take().map(|o| {
                (
                    false,
                    Box::new(o) as Box<dyn tokio::io::AsyncRead + Unpin + Send>,
                )
            }),
            child.stderr.take().map(|e| {
                (
                    true,
                    Box::new(e) as Box<dyn tokio::io::AsyncRead + Unpin + Send>,
                )
            }),
        ]
        .into_iter()
        .flatten()
        .map(|(is_err, r)| {
            let logs = logs.clone();
            let tag = tag.clone();
            tokio::spawn(async move {
                let mut lines = BufReader::new(r).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    push_line(&logs, is_err, format!("{tag}{line}"), max_log_bytes);
                }
            })
        })
        .collect();
        let name = c.name.clone();
        let logs = logs.clone();
        let memory = c.oci.as_ref().map(|o| o.container.limits.memory);
        waits.push(async move {
            let status = child.wait().await;
            drop(container_guard);
            for r in readers {
                let _ = r.await; // the rest of the output
            }
            if let Some(cg) = cgroup.as_ref().filter(|cg| cg.oom_killed()) {
                let said = crate::worker::death_message(Some(cg), String::new())
                    .replace("the worker", "the container");
                push_line(&logs, true, format!("dispatch: {said}"), max_log_bytes);
            }
            // runc answers 128 + the signal; the cgroup is gone with the container.
            if let (Some(limit), Ok(s)) = (memory, &status)
                && s.code() == Some(137)
            {
                push_line(
                    &logs,
                    true,
                    format!(
                        "dispatch: the container was killed (SIGKILL), most likely at its memory limit ({})",
                        dispatch_core::quantity::human_bytes(limit)
                    ),
                    max_log_bytes,
                );
            }
            (name, status)
        });
    }
    let all = wait_all(waits);
    let results = match deadline {
        Some(d) => match tokio::time::timeout_at(d, all).await {
            Ok(r) => r,
            Err(_) => return PodOutcome::DeadlineExceeded, // guards kill the groups
        },
        None => all.await,
    };
    for (name, status) in results {
        use std::os::unix::process::ExitStatusExt;
        match status {
            Ok(s) if s.success() => {}
            Ok(s) => {
                let code = s.code().unwrap_or_else(|| 128 + s.signal().unwrap_or(9));
                return PodOutcome::Failed {
                    container: name,
                    exit_code: code,
                };
            }
            Err(e) => {
                return PodOutcome::StartFailed {
                    container: name,
                    error: e.to_string(),
                };
            }
        }
    }
    PodOutcome::Succeeded
}

/// Awaits each container in turn: they run independently (output is read by spawned tasks), and
/// a pod ends when all of them have exited, as in Kubernetes.
async fn wait_all<F: std::future::Future>(futs: Vec<F>) -> Vec<F::Output> {
    let mut set = Vec::with_capacity(futs.len());
    let handles: Vec<_> = futs.into_iter().map(Box::pin).collect();
    for h in handles {
        set.push(h.await);
    }
    set
}
