//! Exec handlers (`language: exec`): any executable, one process per call — the payload on
//! its stdin, its result JSON on stdout, its stderr lines as logs (live, one by one, when the
//! call is followed), `DISPATCH_CONTEXT` in its environment — in the same sandbox and limits
//! as a worker.

use std::process::Stdio;
use std::time::Duration;

use dispatch_core::envelope::{EnvelopeContext, null_raw};
use dispatch_core::{Envelope, ErrorObject, Logs};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use serde_json::value::RawValue;

use crate::sandbox::Cgroup;
use crate::stream::{Chunk, Sink};
use crate::worker::{CallFailure, WorkerSpec, death_message, expendable};
use dispatch_core::StreamStats;

fn whole(e: Envelope) -> Result<(Envelope, Option<StreamStats>), CallFailure> {
    Ok((e, None))
}

/// What an exec handler printed on stdout: all of it, or (streamed) the part kept.
#[derive(Default)]
struct Output {
    kept: Vec<u8>,
    /// Set when it streamed.
    stats: Option<StreamStats>,
    /// The stream's reader went away.
    gone: bool,
}

/// Bytes read from stdout at once, at most: one chunk.
const READ_CHUNK: usize = 64 * 1024;

impl Output {
    /// Reads stdout as it is written, each read a chunk to `sink` (text when it is UTF-8; a
    /// character cut by a read waits for its rest), or kept as the answer without a sink.
    async fn stream(
        &mut self,
        s: &mut (impl tokio::io::AsyncRead + Unpin),
        sink: Option<&Sink>,
        max_output: usize,
    ) {
        use tokio::io::AsyncReadExt;
        let started = std::time::Instant::now();
        let mut stats = StreamStats::default();
        let mut buf = vec![0u8; READ_CHUNK];
        let mut pending: Vec<u8> = Vec::new();
        loop {
            let n = match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            pending.extend_from_slice(&buf[..n]);
            // Text up to a cut character; bytes that are not UTF-8 at all go as they are.
            let (upto, binary) = match std::str::from_utf8(&pending) {
                Ok(_) => (pending.len(), false),
                Err(e) if e.error_len().is_none() && e.valid_up_to() > 0 => {
                    (e.valid_up_to(), false)
                }
                Err(e) if e.error_len().is_none() && pending.len() < 4 => continue,
                Err(_) => (pending.len(), true),
            };
            let data = bytes::Bytes::from(pending.drain(..upto).collect::<Vec<u8>>());
            if stats.chunks == 0 {
                stats.first_byte_ms = started.elapsed().as_secs_f64() * 1e3;
            }
            stats.chunks += 1;
            stats.bytes += data.len() as u64;
            let room = match sink {
                Some(_) => dispatch_core::run::STREAM_RECORD_BYTES,
                None => max_output + 1,
            };
            let keep = data.len().min(room.saturating_sub(self.kept.len()));
            if keep < data.len() {
                stats.truncated = true;
            }
            self.kept.extend_from_slice(&data[..keep]);
            let stop = match sink {
                Some(sink) => {
                    let gone = sink.send(Chunk { data, binary }).await.is_err();
                    self.gone = gone;
                    gone
                }
                // Without a reader, past the answer's limit (checked by the caller).
                None => self.kept.len() > max_output,
            };
            if stop {
                break;
            }
        }
        if !pending.is_empty() {
            stats.chunks += 1;
            stats.bytes += pending.len() as u64;
            self.kept.extend_from_slice(&pending);
            if let Some(sink) = sink {
                let data = bytes::Bytes::from(pending);
                if sink.send(Chunk { data, binary: true }).await.is_err() {
                    self.gone = true;
                }
            }
        }
        self.stats = Some(stats);
    }
}

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
    sink: Option<&Sink>,
) -> Result<(Envelope, Option<StreamStats>), CallFailure> {
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
            return whole(Envelope::error(
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
            return whole(Envelope::error(
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
            let mut out = Output::default();
            match stdout.as_mut() {
                // A sink that only wants live lines takes no chunks: they are the answer.
                Some(s) if spec.stream_stdout => {
                    out.stream(s, sink.filter(|k| k.streams()), max_output)
                        .await
                }
                Some(s) => {
                    let _ = s
                        .take(max_output as u64 + 1)
                        .read_to_end(&mut out.kept)
                        .await;
                }
                None => {}
            }
            out
        };
        let read_err = async {
            let mut v = Vec::new();
            let Some(s) = stderr.as_mut() else {
                return v;
            };
            let s = s.take(EXEC_MAX_OUTPUT as u64);
            match sink.filter(|k| k.wants_logs()) {
                // Someone follows the call: each line as it is printed.
                Some(sink) => {
                    use tokio::io::AsyncBufReadExt;
                    let mut r = tokio::io::BufReader::new(s);
                    loop {
                        let from = v.len();
                        match r.read_until(b'\n', &mut v).await {
                            Ok(0) | Err(_) => break,
                            Ok(_) => {
                                let line = String::from_utf8_lossy(&v[from..]);
                                let line = line.strip_suffix('\n').unwrap_or(&line);
                                sink.log(crate::stream::LogLine {
                                    stream: "stderr",
                                    line: line.to_string(),
                                });
                            }
                        }
                    }
                }
                None => {
                    let mut s = s;
                    let _ = s.read_to_end(&mut v).await;
                }
            }
            v
        };
        let ((), out, err) = tokio::join!(write, read_out, read_err);
        let status = child.wait().await;
        (out, err, status)
    };
    let kill = || {
        if let Some(pid) = pid {
            let _ = killpg(pid, Signal::SIGKILL);
        }
    };
    let (out, err, status) = match tokio::time::timeout(timeout, run).await {
        Ok(r) => r,
        Err(_) => {
            kill();
            return Err(CallFailure::timeout(timeout));
        }
    };
    if out.gone {
        kill();
        return Err(CallFailure {
            error: ErrorObject::system(
                "the caller disconnected from the stream: the call was cancelled",
            ),
            timed_out: false,
            cancelled: true,
        });
    }
    let stats = out.stats;
    let out = out.kept;
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
            return whole(Envelope::error(e, logs));
        }
        Err(e) => {
            return whole(Envelope::error(
                ErrorObject::system(format!("failed to wait for handler: {e}")),
                logs,
            ));
        }
    }
    if out.len() > max_output {
        return whole(Envelope::error(
            ErrorObject::function(format!(
                "handler printed more than {} (spec.resources.maxOutputBytes)",
                crate::sandbox::cgroup::human_bytes(max_output as u64)
            )),
            logs,
        ));
    }
    let text = String::from_utf8_lossy(&out);
    if let Some(stats) = stats {
        // What it streamed is its answer (as text; the record's copy).
        let payload = serde_json::value::to_raw_value(&text).unwrap_or_else(|_| null_raw());
        return Ok((
            Envelope {
                context: EnvelopeContext { logs, error: None },
                payload,
            },
            Some(stats),
        ));
    }
    let trimmed = text.trim();
    let raw = if trimmed.is_empty() {
        Ok(null_raw())
    } else {
        RawValue::from_string(trimmed.to_string())
    };
    whole(match raw {
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
