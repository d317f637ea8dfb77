//! One worker process and its end of the worker protocol.
//!
//! A worker is started with the protocol socket as its fd 0 (a `Stdio` made from one end of
//! a Unix socket pair: no `unsafe` fd juggling), in its own process group, with a clean
//! environment, cwd = the function directory. Its process-level stdout/stderr (output outside
//! calls) are drained into a short tail used in crash messages.

use parking_lot::Mutex;
use std::collections::{BTreeMap, VecDeque};
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dispatch_core::envelope::null_raw;
use dispatch_core::{ColdStart, Envelope, ErrorObject, StartMethod};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use serde_json::value::RawValue;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::net::UnixStream;
use tokio::process::{Child, Command};

use crate::protocol::{self, Hello, Request, Response};
use crate::stream::{Chunk, Inbound, Sink, is_log, log_of, message_frame, raw_chunk, raw_data};
use dispatch_core::StreamStats;

/// How a call's exchange with its worker ended.
enum Exchange {
    Answer(Vec<u8>),
    Closed,
    /// The stream's reader went away.
    Gone,
    Malformed(String),
    /// Chunks beyond the answer's limit (nobody streaming).
    TooLarge(usize),
    /// Nothing for longer than the stream's idle timeout between two chunks.
    Idle(Duration),
}

/// What a streamed call sent so far, and the part of it kept.
#[derive(Default)]
struct Streamed {
    stats: StreamStats,
    kept: Vec<u8>,
}

impl Streamed {
    fn keep(&mut self, chunk: &[u8], cap: usize) {
        let room = cap.saturating_sub(self.kept.len());
        if chunk.len() > room {
            self.stats.truncated = true;
        }
        self.kept.extend_from_slice(&chunk[..chunk.len().min(room)]);
    }
}

/// The reading side of one call: chunks (to its sink, or kept as the answer) until the
/// answer frame.
struct Reading<'s> {
    id: u64,
    started: Instant,
    max_output: usize,
    sink: Option<&'s Sink>,
    idle: Option<Duration>,
    streamed: Streamed,
}

impl Reading<'_> {
    async fn answer<R: AsyncRead + Unpin>(&mut self, sock: &mut R) -> std::io::Result<Exchange> {
        loop {
            // Between chunks, the stream's idle timeout (the first chunk may take the call's).
            let next = match self.idle.filter(|_| self.streamed.stats.chunks > 0) {
                None => protocol::read_frame(sock).await?,
                Some(idle) => match tokio::time::timeout(idle, protocol::read_frame(sock)).await {
                    Ok(f) => f?,
                    Err(_) => return Ok(Exchange::Idle(idle)),
                },
            };
            let Some(frame) = next else {
                return Ok(Exchange::Closed);
            };
            // A raw chunk frame: a kind byte (0 text, 1 bytes), the call's id, the data — no
            // JSON either side (JSON frames start with `{`).
            if let Some((binary, id)) = raw_chunk(&frame) {
                if id != self.id {
                    return Ok(Exchange::Malformed(format!(
                        "a chunk of request {id} during request {}",
                        self.id
                    )));
                }
                if let Some(end) = self.chunk(raw_data(frame.into()), binary).await {
                    return Ok(end);
                }
                continue;
            }
            // A live log line says so in its first bytes; an answer is parsed once, by the
            // caller.
            if !is_log(&frame) {
                return Ok(Exchange::Answer(frame));
            }
            match log_of(&frame) {
                Err(e) => return Ok(Exchange::Malformed(e)),
                Ok(Some((id, line))) if id == Some(self.id) => {
                    if let Some(s) = self.sink {
                        s.log(line);
                    }
                }
                Ok(_) => return Ok(Exchange::Answer(frame)),
            }
        }
    }

    /// One chunk: to the sink (waiting while its reader is behind), or kept as the answer.
    /// `Some` ends the exchange (the reader went away, or the answer grew past its limit).
    async fn chunk(&mut self, data: bytes::Bytes, binary: bool) -> Option<Exchange> {
        let streamed = &mut self.streamed;
        if streamed.stats.chunks == 0 {
            streamed.stats.first_byte_ms = self.started.elapsed().as_secs_f64() * 1e3;
        }
        streamed.stats.chunks += 1;
        streamed.stats.bytes += data.len() as u64;
        match self.sink.filter(|s| s.streams()) {
            // Whoever reads the stream sets the pace: a full channel holds this loop, the
            // socket fills and the handler's next yield waits (back-pressure).
            Some(s) => {
                streamed.keep(&data, dispatch_core::run::STREAM_RECORD_BYTES);
                if s.send(Chunk { data, binary }).await.is_err() {
                    return Some(Exchange::Gone);
                }
            }
            // Nobody streams: the chunks are the answer, within the answer's limit.
            None => {
                if streamed.kept.len() + data.len() > self.max_output {
                    return Some(Exchange::TooLarge(streamed.kept.len() + data.len()));
                }
                streamed.keep(&data, usize::MAX);
            }
        }
        None
    }
}

/// Writes a session's messages to its worker as they come, then its end (the connection
/// closed); never returns after that but with an error.
async fn feed<W: tokio::io::AsyncWrite + Unpin>(
    wr: &mut W,
    mut inbox: tokio::sync::mpsc::Receiver<Inbound>,
    id: u64,
) -> std::io::Result<()> {
    while let Some(m) = inbox.recv().await {
        protocol::write_frame(wr, &message_frame(id, Some(m))).await?;
    }
    protocol::write_frame(wr, &message_frame(id, None)).await?;
    std::future::pending().await
}

fn too_large(n: usize, limit: usize) -> ErrorObject {
    ErrorObject::system(format!(
        "the answer ({}) is larger than the function's limit of {} (spec.resources.maxOutputBytes)",
        crate::sandbox::cgroup::human_bytes(n as u64),
        crate::sandbox::cgroup::human_bytes(limit as u64)
    ))
}
use crate::sandbox::Cgroup;

/// Lines of process-level output kept for crash messages.
const TAIL_LINES: usize = 20;

/// Everything needed to start a worker of one function build.
#[derive(Debug, Clone)]
pub struct WorkerSpec {
    /// The interpreter (Python, Node) or, for exec, the handler program itself.
    pub program: PathBuf,
    /// Arguments before the handler arguments (the bootstrap script; empty for exec).
    pub prefix_args: Vec<String>,
    /// The function directory; the bootstrap's first argument and the cwd.
    pub dir: PathBuf,
    /// Handler arguments (see [`crate::handler::ResolvedHandler`]).
    pub handler_args: Vec<String>,
    /// Declared environment; nothing else of the server's environment leaks in but PATH.
    pub env: BTreeMap<String, String>,
    /// `namespace/name`, for logs.
    pub label: String,
    /// The sandbox its processes start in (DESIGN §9); `None`: on the host, as the server.
    pub jail: Option<Arc<crate::sandbox::Jail>>,
    /// Largest answer frame accepted from a worker of this spec.
    pub max_output_bytes: usize,
    /// The container tier: each process of this spec starts in a new container of this
    /// template instead (`jail` is then `None`).
    pub container: Option<Arc<ContainerWorker>>,
    /// exec handlers (`spec.stream`): stdout is streamed as it is written.
    pub stream_stdout: bool,
}

/// Workers in containers (DESIGN §9, `spec.isolation: container`): the function's base image,
/// its code and the runner shown read-only, `dispatch runner --worker` as the process (it
/// execs the language's bootstrap, which speaks the worker protocol on stdin).
#[derive(Clone)]
pub struct ContainerWorker {
    pub engine: Arc<crate::container::Engine>,
    /// The base image (kept from gc while the function is deployed).
    pub image: Arc<crate::container::Ready>,
    pub template: crate::container::Container,
    /// Container ids start with it.
    pub prefix: String,
}

impl std::fmt::Debug for ContainerWorker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ContainerWorker")
            .field("image", &self.image.digest)
            .field("prefix", &self.prefix)
            .finish()
    }
}

/// How much more likely than the server a process of user code is to be picked by the
/// kernel's OOM killer (the server lowers its own score at start: `serve.rs`).
pub const WORKER_OOM_SCORE_ADJ: &str = "500";

/// Makes a process of user code the OOM killer's first choice over the server (its
/// children inherit it; the sandbox launcher also sets it on itself before it forks).
/// Raising one's own or a child's score needs no privilege; a failure changes nothing else.
pub fn expendable(pid: Option<u32>) {
    if let Some(pid) = pid {
        let _ = std::fs::write(format!("/proc/{pid}/oom_score_adj"), WORKER_OOM_SCORE_ADJ);
    }
}

/// The environment every worker process starts from (nothing else of the server's leaks in):
/// PATH, LANG and the interpreters' settings; HOME is the function directory.
pub fn base_environment(home: &std::path::Path) -> BTreeMap<String, String> {
    let path = std::env::var("PATH").unwrap_or_else(|_| "/usr/local/bin:/usr/bin:/bin".into());
    BTreeMap::from([
        ("PATH".to_string(), path),
        ("HOME".to_string(), home.display().to_string()),
        ("LANG".to_string(), "C.UTF-8".to_string()),
        ("PYTHONUNBUFFERED".to_string(), "1".to_string()),
        ("PYTHONDONTWRITEBYTECODE".to_string(), "1".to_string()),
    ])
}

impl WorkerSpec {
    /// The whole environment of a worker of this spec: the base plus the declared variables.
    pub fn environment(&self) -> BTreeMap<String, String> {
        let mut env = base_environment(&self.dir);
        env.extend(self.env.iter().map(|(k, v)| (k.clone(), v.clone())));
        env
    }

    /// A process of this spec in a new container, with `env` added to the container's; with
    /// `protocol_fd` its stdin (a worker's protocol socket) reaches it as fd 3, else stdin is
    /// piped through (an exec handler's payload).
    pub(crate) fn container_command(
        &self,
        env: Vec<(String, String)>,
        protocol_fd: bool,
    ) -> std::io::Result<(
        Command,
        Option<Cgroup>,
        Option<crate::container::engine::Running>,
    )> {
        let c = self
            .container
            .as_ref()
            .ok_or_else(|| std::io::Error::other("not a container worker"))?;
        let with_env;
        let template = if env.is_empty() {
            &c.template
        } else {
            let mut t = c.template.clone();
            t.env.extend(env);
            with_env = t;
            &with_env
        };
        let (mut cmd, running) =
            crate::container::engine::Running::prepare(&c.engine, &c.prefix, template, protocol_fd)
                .map_err(std::io::Error::other)?;
        cmd.env_clear().process_group(0).kill_on_drop(true);
        Ok((cmd, None, Some(running)))
    }

    /// The command that starts a process of this spec (in its sandbox or container, when it
    /// has one), the cgroup that holds its limits, and its container.
    pub(crate) fn command(
        &self,
        with_dir_arg: bool,
    ) -> std::io::Result<(
        Command,
        Option<Cgroup>,
        Option<crate::container::engine::Running>,
    )> {
        if self.container.is_some() {
            // A protocol worker's stdin is its socket (fd 3 inside); an exec handler's is its
            // payload, piped by the runtime.
            return self.container_command(Vec::new(), with_dir_arg);
        }
        let mut args = self.prefix_args.clone();
        if with_dir_arg {
            args.push(self.dir.display().to_string());
        }
        args.extend(self.handler_args.iter().cloned());
        let (mut cmd, cg) = sandboxed(self.jail.as_deref(), &self.program, &args, &self.dir)?;
        cmd.current_dir(&self.dir)
            .env_clear()
            .envs(self.environment())
            .process_group(0)
            .kill_on_drop(true);
        Ok((cmd, cg, None))
    }
}

/// `program args` run in `cwd`: in a new sandbox of `jail`, or directly without one.
pub fn sandboxed(
    jail: Option<&crate::sandbox::Jail>,
    program: &std::path::Path,
    args: &[String],
    cwd: &std::path::Path,
) -> std::io::Result<(Command, Option<Cgroup>)> {
    match jail {
        Some(j) => j.command(program, args, cwd),
        None => {
            let mut cmd = Command::new(program);
            cmd.args(args);
            Ok((cmd, None))
        }
    }
}

/// The message of a worker that died: over its memory limit when its cgroup says so.
pub(crate) fn death_message(cg: Option<&Cgroup>, otherwise: String) -> String {
    match cg {
        Some(cg) if cg.oom_killed() => format!(
            "the worker was killed: it went over its memory limit of {} (spec.resources.memory)",
            crate::sandbox::cgroup::human_bytes(cg.memory_limit)
        ),
        _ => otherwise,
    }
}

impl WorkerSpec {
    /// A spec's answer limit, the protocol's when unset.
    pub(crate) fn max_output(&self) -> usize {
        if self.max_output_bytes == 0 {
            protocol::MAX_FRAME_BYTES
        } else {
            self.max_output_bytes.min(protocol::MAX_FRAME_BYTES)
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("failed to start {program}: {source}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{}", .0.message)]
    HandlerLoad(ErrorObject),
    #[error("worker exited before it was ready{}", tail_suffix(.0))]
    Exited(Vec<String>),
    #[error("worker did not become ready within {0:?}")]
    Timeout(Duration),
    #[error("worker spoke an unknown protocol: {0}")]
    Protocol(String),
    /// No room in the server's worker budget before the call's deadline.
    #[error(transparent)]
    OverBudget(#[from] crate::budget::BudgetFull),
}

fn tail_suffix(tail: &[String]) -> String {
    if tail.is_empty() {
        String::new()
    } else {
        format!(": {}", tail.join("\n"))
    }
}

impl StartError {
    /// The error a call answers when its worker could not start.
    pub fn to_error_object(&self) -> ErrorObject {
        match self {
            StartError::HandlerLoad(e) => e.clone(),
            other => ErrorObject::system(other.to_string()),
        }
    }
}

pub(crate) type Tail = Arc<Mutex<VecDeque<String>>>;

/// A protocol socket pair: the host's end (async) and the end a worker gets as an fd.
pub(crate) fn socket_pair() -> Result<(UnixStream, std::os::unix::net::UnixStream), StartError> {
    let pair = || -> std::io::Result<_> {
        let (host, child) = std::os::unix::net::UnixStream::pair()?;
        host.set_nonblocking(true)?;
        Ok((UnixStream::from_std(host)?, child))
    };
    pair().map_err(|source| StartError::Spawn {
        program: "a socket pair".into(),
        source,
    })
}

pub struct Worker {
    /// The process, when this host spawned it (a forked worker is the zygote's child).
    child: Option<Child>,
    pid: Option<Pid>,
    sock: UnixStream,
    next_id: u64,
    tail: Tail,
    /// When the worker was last handed back idle (for the reaper).
    pub last_used: Instant,
    /// How the worker started and how long that took (`first_call_ms` is the pool's to fill).
    pub cold_start: ColdStart,
    /// The cgroup that holds its limits (sandboxed workers).
    pub(crate) cgroup: Option<Cgroup>,
    /// Largest answer accepted.
    max_output: usize,
    /// Its container (the container tier): deleted when the worker goes (held for its drop).
    _container: Option<crate::container::engine::Running>,
}

fn ms_f(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

impl Worker {
    /// Starts a protocol worker and waits for its hello frame.
    pub async fn start(spec: &WorkerSpec, ready_within: Duration) -> Result<Worker, StartError> {
        let t0 = Instant::now();
        let (sock, child_end) = socket_pair()?;
        let spawn_err = |source| StartError::Spawn {
            program: spec.program.display().to_string(),
            source,
        };
        let (mut cmd, cgroup, container) = spec.command(true).map_err(spawn_err)?;
        let mut child = cmd
            .stdin(Stdio::from(OwnedFd::from(child_end)))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(spawn_err)?;
        expendable(child.id());
        let pid = child.id().map(|p| Pid::from_raw(p as i32));
        let tail: Tail = Arc::default();
        if let Some(out) = child.stdout.take() {
            drain(out, tail.clone(), spec.label.clone());
        }
        if let Some(err) = child.stderr.take() {
            drain(err, tail.clone(), spec.label.clone());
        }
        let w = Worker {
            child: Some(child),
            pid,
            sock,
            next_id: 0,
            tail,
            last_used: Instant::now(),
            cold_start: ColdStart::default(),
            cgroup,
            max_output: spec.max_output(),
            _container: container,
        };
        w.handshake(ready_within, t0).await
    }

    /// A worker forked by a zygote: its pid, its protocol socket and its output pipes.
    pub(crate) fn forked(
        pid: Option<i32>,
        sock: UnixStream,
        outputs: [tokio::net::unix::pipe::Receiver; 2],
        spec: &WorkerSpec,
        cgroup: Option<Cgroup>,
    ) -> Worker {
        let label = &spec.label;
        let tail: Tail = Arc::default();
        for r in outputs {
            drain(r, tail.clone(), label.to_string());
        }
        Worker {
            child: None,
            pid: pid.map(Pid::from_raw),
            sock,
            next_id: 0,
            tail,
            last_used: Instant::now(),
            cold_start: ColdStart {
                method: StartMethod::Fork,
                ..ColdStart::default()
            },
            cgroup,
            max_output: spec.max_output(),
            _container: None,
        }
    }

    /// Waits for the hello frame of a worker started at `t0`: ready, or why its handler did
    /// not load. Records the split of the start (the worker reports its import time).
    pub(crate) async fn handshake(
        mut self,
        ready_within: Duration,
        t0: Instant,
    ) -> Result<Worker, StartError> {
        let w = &mut self;
        let hello =
            match tokio::time::timeout(ready_within, protocol::read_frame(&mut w.sock)).await {
                Err(_) => return Err(StartError::Timeout(ready_within)),
                Ok(Err(e)) => return Err(StartError::Protocol(e.to_string())),
                Ok(Ok(None)) => return Err(StartError::Exited(w.wait_tail().await)),
                Ok(Ok(Some(frame))) => serde_json::from_slice::<Hello>(&frame)
                    .map_err(|e| StartError::Protocol(e.to_string()))?,
            };
        if !hello.ready {
            return Err(StartError::HandlerLoad(hello.error.unwrap_or_else(|| {
                ErrorObject::function("handler failed to load")
            })));
        }
        let total = ms_f(t0.elapsed());
        let import = hello.import_ms.unwrap_or(0.0).clamp(0.0, total);
        self.cold_start.import_ms = import;
        self.cold_start.spawn_ms = total - import;
        self.cold_start.total_ms = total;
        Ok(self)
    }

    /// Sends a frame that is not a call (a generic worker's `load`).
    pub(crate) async fn send(&mut self, frame: &[u8]) -> std::io::Result<()> {
        protocol::write_frame(&mut self.sock, frame).await
    }

    /// Sends one call and waits at most `timeout` for the answer (`configured` is the
    /// function's timeout, named in the message).
    ///
    /// `Ok` is the function's envelope (which may carry an InputError or FunctionError; the
    /// worker stays usable). `Err` is a SystemError after which the worker must be dropped:
    /// it crashed, timed out (its process group is killed) or broke the protocol.
    pub async fn call(
        &mut self,
        context: &RawValue,
        payload: &RawValue,
        timeout: Duration,
        configured: Duration,
        sink: Option<&Sink>,
    ) -> Result<(Envelope, Option<StreamStats>), CallFailure> {
        self.next_id += 1;
        let id = self.next_id;
        // A session's messages: taken once, here (the request says it is one).
        let inbox = sink.and_then(Sink::take_inbox);
        let session = inbox.is_some();
        let frame = serde_json::to_vec(&Request {
            id,
            context,
            payload,
            session,
            live: sink.is_some_and(Sink::wants_logs),
        })
        .map_err(|e| ErrorObject::system(format!("failed to encode the request: {e}")))?;
        let started = Instant::now();
        let mut read = Reading {
            id,
            started,
            max_output: self.max_output,
            sink,
            idle: sink.and_then(Sink::idle),
            streamed: Streamed::default(),
        };
        let sock = &mut self.sock;
        let exchange = async {
            let Some(inbox) = inbox else {
                protocol::write_frame(sock, &frame).await?;
                return read.answer(sock).await;
            };
            // A session: its messages are written to the worker while its chunks are read.
            let (mut rd, mut wr) = sock.split();
            protocol::write_frame(&mut wr, &frame).await?;
            let feed = feed(&mut wr, inbox, id);
            tokio::pin!(feed);
            let answer = read.answer(&mut rd);
            tokio::pin!(answer);
            // `feed` ends only when writing fails (the worker went away): the reading side
            // says how.
            tokio::select! {
                a = &mut answer => a,
                _ = &mut feed => answer.await,
            }
        };
        let answer = match tokio::time::timeout(timeout, exchange).await {
            Err(_) => {
                self.kill();
                return Err(CallFailure::timeout(configured));
            }
            Ok(Ok(Exchange::Idle(idle))) => {
                self.kill();
                return Err(CallFailure {
                    error: ErrorObject::system(format!(
                        "the stream sent nothing for {} (spec.idleTimeout)",
                        dispatch_core::duration::format_duration(idle)
                    )),
                    timed_out: true,
                    cancelled: false,
                });
            }
            // A reset is a worker that went away with our request unread: it exited.
            Ok(Err(e))
                if !matches!(
                    e.kind(),
                    std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
                ) =>
            {
                self.kill();
                return Err(ErrorObject::system(format!("worker protocol error: {e}")).into());
            }
            Ok(Err(_)) | Ok(Ok(Exchange::Closed)) => {
                let tail = self.wait_tail().await;
                return Err(ErrorObject::system(death_message(
                    self.cgroup.as_ref(),
                    format!("worker process exited unexpectedly{}", tail_suffix(&tail)),
                ))
                .into());
            }
            Ok(Ok(Exchange::Gone)) => {
                // The handler is stopped where it is: nobody reads what it yields.
                self.kill();
                return Err(CallFailure {
                    error: ErrorObject::system(
                        "the caller disconnected from the stream: the call was cancelled",
                    ),
                    timed_out: false,
                    cancelled: true,
                });
            }
            Ok(Ok(Exchange::Malformed(e))) => {
                self.kill();
                return Err(
                    ErrorObject::system(format!("worker sent a malformed chunk: {e}")).into(),
                );
            }
            Ok(Ok(Exchange::TooLarge(n))) => {
                self.kill();
                return Err(too_large(n, self.max_output).into());
            }
            Ok(Ok(Exchange::Answer(frame))) => frame,
        };
        if answer.len() > self.max_output {
            self.kill();
            return Err(too_large(answer.len(), self.max_output).into());
        }
        let resp: Response = serde_json::from_slice(&answer).map_err(|e| {
            self.kill();
            ErrorObject::system(format!("worker sent a malformed answer: {e}"))
        })?;
        if resp.id != id {
            self.kill();
            return Err(ErrorObject::system(format!(
                "worker answered request {} to request {id}",
                resp.id
            ))
            .into());
        }
        if session {
            // What the handler left unread of its messages is in the socket: a session's
            // worker serves no other call.
            self.kill();
        }
        let streamed = read.streamed;
        if streamed.stats.chunks > 0 {
            // The answer of a streamed call is what it streamed (as text; the record's copy).
            let text = String::from_utf8_lossy(&streamed.kept);
            let payload = serde_json::value::to_raw_value(&text).unwrap_or_else(|_| null_raw());
            return Ok((
                Envelope {
                    context: resp.context,
                    payload,
                },
                Some(streamed.stats),
            ));
        }
        Ok((
            Envelope {
                context: resp.context,
                payload: resp.payload.unwrap_or_else(null_raw),
            },
            None,
        ))
    }

    /// Kills the worker's whole process group (grandchildren too).
    pub fn kill(&mut self) {
        if let Some(pid) = self.pid.take() {
            let _ = killpg(pid, Signal::SIGKILL);
        }
        if let Some(c) = self.child.as_mut() {
            let _ = c.start_kill();
        }
    }

    /// After the worker closed its socket: give it a moment to exit, so that the exit status
    /// and its last output can go into the error message.
    async fn wait_tail(&mut self) -> Vec<String> {
        let status = match self.child.as_mut() {
            Some(c) => Some(tokio::time::timeout(Duration::from_secs(2), c.wait()).await),
            None => None, // a forked worker: its zygote reaps it
        };
        self.kill();
        // Let the drain tasks read what is left in the pipes.
        tokio::task::yield_now().await;
        let mut tail: Vec<String> = self.tail.lock().iter().cloned().collect();
        if let Some(Ok(Ok(st))) = status {
            tail.push(format!("(exit {st})"));
        }
        tail
    }

    /// Whether it was killed during its call (a session's worker serves no other).
    pub fn spent(&self) -> bool {
        self.pid.is_none()
    }

    /// OS process id, while running.
    pub fn pid(&self) -> Option<i32> {
        self.pid.map(|p| p.as_raw())
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.kill();
    }
}

fn drain(r: impl AsyncRead + Unpin + Send + 'static, tail: Tail, label: String) {
    tokio::spawn(async move {
        let mut lines = BufReader::new(r).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            tracing::debug!(worker = %label, "{line}");
            let mut t = tail.lock();
            if t.len() == TAIL_LINES {
                t.pop_front();
            }
            t.push_back(line);
        }
    });
}

/// A call that ended without the function's own answer: a SystemError for the envelope, and
/// whether the function ran out of time (a run's TIMEOUT status comes from this, never from
/// the message).
#[derive(Debug)]
pub struct CallFailure {
    pub error: ErrorObject,
    pub timed_out: bool,
    /// The caller went away from a stream (the call was stopped, not failed).
    pub cancelled: bool,
}

impl CallFailure {
    /// The function used all of `limit` (its configured timeout).
    pub fn timeout(limit: Duration) -> CallFailure {
        CallFailure {
            error: ErrorObject::system(format!(
                "function timed out after {}",
                dispatch_core::duration::format_duration(limit)
            )),
            timed_out: true,
            cancelled: false,
        }
    }
}

impl From<ErrorObject> for CallFailure {
    fn from(error: ErrorObject) -> Self {
        CallFailure {
            error,
            timed_out: false,
            cancelled: false,
        }
    }
}
