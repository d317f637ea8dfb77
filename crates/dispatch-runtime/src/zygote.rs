//! Zygotes (DESIGN §5): per image, one Python process that has imported the bootstrap and
//! the image's modules, and forks a new worker on request. A fork costs a few milliseconds
//! where a new interpreter costs tens, and the workers share the zygote's pages
//! (copy-on-write).
//!
//! The request goes over the zygote's control socket (its fd 0) as one frame, with three
//! file descriptors attached (SCM_RIGHTS): the worker's protocol socket and the write ends of
//! its stdout and stderr pipes. The frame says which function to load and the worker's whole
//! environment; the zygote answers `{"pid"}`. The child makes itself a process group, takes
//! the declared environment instead of the zygote's, and then serves like a spawned worker:
//! the host waits for its hello on the protocol socket as usual.
//!
//! A zygote is started lazily, on the first cold start that needs it, and restarted when it
//! has died. Workers do not depend on their zygote: each watches its own protocol socket.

use std::io::IoSlice;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
use serde::Deserialize;
use tokio::io::{AsyncWriteExt, Interest};
use tokio::net::UnixStream;
use tokio::process::Child;

use crate::protocol;
use crate::sandbox::Jail;
use crate::worker::{StartError, Worker, WorkerSpec, base_environment, sandboxed, socket_pair};

/// How long a zygote may take to import its preload list, and to answer a fork.
const ZYGOTE_READY: Duration = Duration::from_secs(60);
const FORK_ANSWER: Duration = Duration::from_secs(10);

/// What a zygote imports before it forks: `None` = "auto" (the top-level modules of the
/// interpreter's virtual environment, i.e. an image's dependencies), or a list.
pub type Preload = Option<Vec<String>>;

/// Why a fork did not give a worker.
#[derive(Debug, thiserror::Error)]
pub enum ForkError {
    /// The zygote itself could not start or answer (callers may spawn instead).
    #[error("zygote: {0}")]
    Zygote(StartError),
    /// The forked worker did not become ready (its handler did not load, say).
    #[error(transparent)]
    Worker(StartError),
}

#[derive(Deserialize)]
struct ZygoteHello {
    ready: bool,
    #[serde(default)]
    failed: Vec<String>,
}

#[derive(Deserialize)]
struct ForkAnswer {
    #[serde(default)]
    pid: Option<i32>,
    #[serde(default)]
    error: Option<String>,
}

struct Running {
    child: Child,
    sock: UnixStream,
    /// The sandbox's cgroup (the launcher and the zygote; workers get their own).
    _cgroup: Option<crate::sandbox::Cgroup>,
}

pub struct Zygote {
    program: PathBuf,
    bootstrap: PathBuf,
    preload: Preload,
    label: String,
    running: tokio::sync::Mutex<Option<Running>>,
    starts: AtomicU64,
    /// The sandbox the zygote and its workers live in (one function's code, DESIGN §9).
    jail: Option<Arc<Jail>>,
}

impl Zygote {
    /// A zygote of interpreter `program` running `bootstrap` (not started yet).
    pub fn new(program: PathBuf, bootstrap: PathBuf, preload: Preload, label: String) -> Self {
        Zygote {
            program,
            bootstrap,
            preload,
            label,
            running: tokio::sync::Mutex::new(None),
            starts: AtomicU64::new(0),
            jail: None,
        }
    }

    /// The zygote (and so every worker it forks) runs in a sandbox of `jail`.
    pub fn in_jail(mut self, jail: Option<Arc<Jail>>) -> Self {
        self.jail = jail;
        self
    }

    /// How many times the zygote process was started (tests: restarts after a death).
    pub fn starts(&self) -> u64 {
        self.starts.load(Ordering::Relaxed)
    }

    /// The zygote's pid, while it runs.
    pub async fn pid(&self) -> Option<i32> {
        let g = self.running.lock().await;
        g.as_ref().and_then(|r| r.child.id()).map(|p| p as i32)
    }

    async fn start(&self) -> Result<Running, StartError> {
        let (mut sock, child_end) = socket_pair()?;
        let spawn_err = |source| StartError::Spawn {
            program: self.program.display().to_string(),
            source,
        };
        let preload = match &self.preload {
            None => "\"auto\"".to_string(),
            Some(list) => serde_json::to_string(list).unwrap_or_else(|_| "[]".into()),
        };
        let home = self.bootstrap.parent().unwrap_or(std::path::Path::new("/"));
        let args = [
            "-u".to_string(),
            self.bootstrap.display().to_string(),
            "--zygote".into(),
            preload,
        ];
        let (mut cmd, cgroup) =
            sandboxed(self.jail.as_deref(), &self.program, &args, home).map_err(spawn_err)?;
        let mut child = cmd
            .current_dir(home)
            .env_clear()
            .envs(base_environment(home))
            .process_group(0)
            .kill_on_drop(true)
            .stdin(Stdio::from(OwnedFd::from(child_end)))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(spawn_err)?;
        crate::worker::expendable(child.id());
        self.starts.fetch_add(1, Ordering::Relaxed);
        let stderr = child.stderr.take();
        let hello = tokio::time::timeout(ZYGOTE_READY, protocol::read_frame(&mut sock)).await;
        let hello = match hello {
            Err(_) => return Err(StartError::Timeout(ZYGOTE_READY)),
            Ok(Err(e)) => return Err(StartError::Protocol(e.to_string())),
            Ok(Ok(None)) => {
                let mut tail = String::new();
                if let Some(mut e) = stderr {
                    use tokio::io::AsyncReadExt;
                    let _ = tokio::time::timeout(
                        Duration::from_secs(2),
                        (&mut e).take(4096).read_to_string(&mut tail),
                    )
                    .await;
                }
                return Err(StartError::Exited(
                    tail.lines().map(str::to_string).collect(),
                ));
            }
            Ok(Ok(Some(f))) => serde_json::from_slice::<ZygoteHello>(&f)
                .map_err(|e| StartError::Protocol(e.to_string()))?,
        };
        if !hello.ready {
            return Err(StartError::Protocol("the zygote did not say ready".into()));
        }
        for f in &hello.failed {
            tracing::warn!(zygote = %self.label, "preload skipped {f}");
        }
        if let Some(e) = stderr {
            // The zygote itself prints nothing once ready; keep its pipe drained anyway.
            tokio::spawn(async move {
                let mut e = e;
                let _ = tokio::io::copy(&mut e, &mut tokio::io::sink()).await;
            });
        }
        Ok(Running {
            child,
            sock,
            _cgroup: cgroup,
        })
    }

    /// Forks a worker of `spec` and waits until its handler is loaded.
    pub async fn fork(
        &self,
        spec: &WorkerSpec,
        ready_within: Duration,
    ) -> Result<Worker, ForkError> {
        let t0 = Instant::now();
        let (pid, sock, outputs, cgroup) = {
            let mut guard = self.running.lock().await;
            let mut attempt = 0;
            loop {
                attempt += 1;
                if guard
                    .as_mut()
                    .is_none_or(|r| !matches!(r.child.try_wait(), Ok(None)))
                {
                    *guard = None;
                    *guard = Some(self.start().await.map_err(ForkError::Zygote)?);
                }
                let running = guard.as_mut().expect("started above");
                match request(running, spec).await {
                    Ok((pid, sock, outputs)) => match self.host_side(running, pid) {
                        Ok((pid, cg)) => break (pid, sock, outputs, cg),
                        Err(e) => return Err(ForkError::Worker(e)),
                    },
                    Err(e) => {
                        // A dead or confused zygote: start a new one, once.
                        *guard = None;
                        if attempt >= 2 {
                            return Err(ForkError::Zygote(e));
                        }
                    }
                }
            }
        };
        Worker::forked(pid, sock, outputs, spec, cgroup)
            .handshake(ready_within, t0)
            .await
            .map_err(ForkError::Worker)
    }

    /// A forked worker as the server sees it: its host pid (a sandboxed zygote answers with
    /// the pid of its own PID namespace) and the cgroup that holds its limits.
    /// None for the pid: the worker has exited and been reaped already (its handler did not
    /// load, say); the handshake then tells why.
    fn host_side(
        &self,
        running: &Running,
        pid: i32,
    ) -> Result<(Option<i32>, Option<crate::sandbox::Cgroup>), StartError> {
        let Some(jail) = &self.jail else {
            return Ok((Some(pid), None));
        };
        let lost = |what: String| StartError::Protocol(format!("sandboxed fork: {what}"));
        let launcher = running
            .child
            .id()
            .ok_or_else(|| lost("the zygote has exited".into()))?;
        // Not among the zygote's children: it exited and was reaped between the fork and
        // this look-up (a handler whose import fails does, in a few milliseconds). Its pid
        // in the sandbox must not be used on the host (pid 2 there is another process).
        let Some(host) = crate::sandbox::host_pid(launcher, pid) else {
            return Ok((None, None));
        };
        match jail.adopt(host) {
            Ok(cg) => Ok((Some(host), cg)),
            // It exited already (its handler did not load, say): the handshake tells why.
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => Ok((Some(host), None)),
            Err(e) => Err(lost(format!("cgroup: {e}"))),
        }
    }

    /// Stops the zygote (with a sandbox, its workers end with it: they share its PID
    /// namespace; without one they live on until their pools drop them).
    pub async fn stop(&self) {
        if let Some(mut r) = self.running.lock().await.take() {
            let _ = r.child.start_kill();
        }
    }
}

type Forked = (i32, UnixStream, [tokio::net::unix::pipe::Receiver; 2]);

/// One fork request on a running zygote.
async fn request(z: &mut Running, spec: &WorkerSpec) -> Result<Forked, StartError> {
    let io_err = |e: std::io::Error| StartError::Protocol(e.to_string());
    let (sock, child_end) = socket_pair()?;
    let (out_r, out_w) = std::io::pipe().map_err(io_err)?;
    let (err_r, err_w) = std::io::pipe().map_err(io_err)?;
    let handler = spec.handler_args.first().cloned().unwrap_or_default();
    let body = serde_json::to_vec(&serde_json::json!({
        "dir": spec.dir,
        "handler": handler,
        "env": spec.environment(),
    }))
    .map_err(|e| StartError::Protocol(e.to_string()))?;
    let mut frame = Vec::with_capacity(4 + body.len());
    frame.extend_from_slice(&(body.len() as u32).to_be_bytes());
    frame.extend_from_slice(&body);
    let fds = [child_end.as_raw_fd(), out_w.as_raw_fd(), err_w.as_raw_fd()];
    let raw = z.sock.as_raw_fd();
    let sent = z
        .sock
        .async_io(Interest::WRITABLE, || {
            sendmsg::<()>(
                raw,
                &[IoSlice::new(&frame)],
                &[ControlMessage::ScmRights(&fds)],
                MsgFlags::empty(),
                None,
            )
            .map_err(std::io::Error::from)
        })
        .await
        .map_err(io_err)?;
    if sent < frame.len() {
        z.sock.write_all(&frame[sent..]).await.map_err(io_err)?;
    }
    // The zygote holds its own copies now.
    drop((child_end, out_w, err_w));
    let answer = match tokio::time::timeout(FORK_ANSWER, protocol::read_frame(&mut z.sock)).await {
        Err(_) => return Err(StartError::Timeout(FORK_ANSWER)),
        Ok(Err(e)) => return Err(io_err(e)),
        Ok(Ok(None)) => return Err(StartError::Exited(Vec::new())),
        Ok(Ok(Some(f))) => serde_json::from_slice::<ForkAnswer>(&f)
            .map_err(|e| StartError::Protocol(e.to_string()))?,
    };
    let pid = match (answer.pid, answer.error) {
        (Some(pid), _) => pid,
        (None, e) => {
            return Err(StartError::Protocol(
                e.unwrap_or_else(|| "the zygote answered without a pid".into()),
            ));
        }
    };
    let recv = |r: std::io::PipeReader| {
        tokio::net::unix::pipe::Receiver::from_owned_fd(OwnedFd::from(r)).map_err(io_err)
    };
    Ok((pid, sock, [recv(out_r)?, recv(err_r)?]))
}

/// Node's counterpart of a zygote: generic workers of one image (interpreter + NODE_PATH),
/// started ahead of need, that load a function when one is taken (`{"load": …}`). Node has no
/// safe fork, but most of its start-up is the runtime itself, which a spare has done already.
pub struct Spares {
    spec: WorkerSpec,
    keep: usize,
    idle: parking_lot::Mutex<Vec<Worker>>,
    refilling: std::sync::atomic::AtomicBool,
}

impl Spares {
    /// Spares of interpreter `program` running `bootstrap` with `env` (NODE_PATH), keeping
    /// `keep` generic workers ready once the first one was taken.
    pub fn new(
        program: PathBuf,
        bootstrap: PathBuf,
        env: std::collections::BTreeMap<String, String>,
        keep: usize,
        label: String,
    ) -> Self {
        let dir = bootstrap
            .parent()
            .map(std::path::Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("/"));
        Spares {
            spec: WorkerSpec {
                program,
                prefix_args: vec![bootstrap.display().to_string(), "--generic".into()],
                dir,
                handler_args: Vec::new(),
                env,
                label,
                jail: None,
                max_output_bytes: 0,
                container: None,
                stream_stdout: false,
            },
            keep,
            idle: parking_lot::Mutex::new(Vec::new()),
            refilling: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Generic workers start in sandboxes of `jail` (one function's: its code is the only
    /// one they can load).
    pub fn in_jail(mut self, jail: Option<Arc<Jail>>) -> Self {
        self.spec.jail = jail;
        self
    }

    fn idle(&self) -> parking_lot::MutexGuard<'_, Vec<Worker>> {
        self.idle.lock()
    }

    /// Generic workers ready now.
    pub fn ready(&self) -> usize {
        self.idle().len()
    }

    /// Takes a generic worker (or starts one), has it load `spec`'s function and waits until
    /// it is ready; starts a replacement in the background.
    pub async fn take(
        self: &std::sync::Arc<Self>,
        spec: &WorkerSpec,
        ready_within: Duration,
    ) -> Result<Worker, StartError> {
        let t0 = Instant::now();
        let spare = self.idle().pop();
        let mut w = match spare {
            Some(w) => w,
            None => Worker::start(&self.spec, ready_within).await?,
        };
        self.refill();
        let load = serde_json::to_vec(&serde_json::json!({"load": {
            "dir": spec.dir,
            "module": spec.handler_args.first(),
            "export": spec.handler_args.get(1),
            "env": spec.environment(),
        }}))
        .map_err(|e| StartError::Protocol(e.to_string()))?;
        w.send(&load)
            .await
            .map_err(|e| StartError::Protocol(e.to_string()))?;
        w.cold_start.method = dispatch_core::StartMethod::Specialize;
        w.handshake(ready_within, t0).await
    }

    /// Starts generic workers in the background until `keep` are ready.
    fn refill(self: &std::sync::Arc<Self>) {
        if self.refilling.swap(true, Ordering::AcqRel) {
            return;
        }
        let me = std::sync::Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                let Some(s) = me.upgrade() else { return };
                if s.ready() >= s.keep {
                    s.refilling.store(false, Ordering::Release);
                    return;
                }
                match Worker::start(&s.spec, Duration::from_secs(30)).await {
                    Ok(w) => s.idle().push(w),
                    Err(e) => {
                        tracing::warn!(spares = %s.spec.label, "failed to start a generic worker: {e}");
                        s.refilling.store(false, Ordering::Release);
                        return;
                    }
                }
            }
        });
    }

    /// Kills the generic workers waiting.
    pub fn stop(&self) {
        self.idle().clear();
    }
}
