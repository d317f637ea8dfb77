//! Live log lines (issue 22). An async, event or cron run's attempt asks its worker to send
//! each line as it is printed; the lines go to whoever follows the run here
//! (`GET …/runs/ID/logs?follow=true`, `dispatch logs run ID --follow`), redacted of the
//! function's secrets. A follower gets the attempt's lines so far (its first [`LINES`]),
//! then each new one, through a bounded broadcast channel; one that comes after more lines
//! than that, or falls behind, is told so and reads the rest from the record when the attempt
//! ends (the record keeps every line, as before).
//!
//! A function can be followed as a whole (`GET …/functions/NAME/logs?follow=true`, `dispatch
//! logs function NAME --follow`): every call of it that starts while it is followed — sync
//! gateway and API calls, WebSocket messages and sessions, async, event and cron runs — sends
//! its lines as they are printed, each with its run's id. Sync calls ask for live lines only
//! then: a frame per printed line on every gateway call would cost the hot path, and while
//! nobody follows a function the check is one atomic load.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use dispatch_runtime::stream::{LogLine, LogListener};
use parking_lot::Mutex;
use tokio::sync::broadcast;

/// Lines one attempt keeps for a follower that comes late, and in flight to a slow one.
pub const LINES: usize = 256;
/// A longer line goes out cut (the record keeps it whole, within the log cap).
const LINE_BYTES: usize = 16 * 1024;

struct Attempt {
    tx: broadcast::Sender<LogLine>,
    /// The attempt's first lines, for followers that come later.
    so_far: VecDeque<LogLine>,
    /// More lines came than `so_far` keeps: a new follower cannot have them all.
    overflowed: bool,
}

/// One line a followed function's call printed, and which run printed it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct FunctionLine {
    #[serde(serialize_with = "shared_str")]
    pub run: Arc<str>,
    #[serde(flatten)]
    pub line: LogLine,
}

fn shared_str<S: serde::Serializer>(s: &Arc<str>, to: S) -> Result<S::Ok, S::Error> {
    to.serialize_str(s)
}

type FunctionKey = (String, String);

#[derive(Default)]
pub struct LiveLogs {
    runs: Mutex<HashMap<String, Arc<Mutex<Attempt>>>>,
    /// Followed functions (namespace, name): each line of their calls goes to the channel.
    functions: Mutex<HashMap<FunctionKey, broadcast::Sender<FunctionLine>>>,
    /// How many functions are followed: while none is, a call asks nothing of this.
    followed: AtomicUsize,
    /// The server is shutting down: following ends.
    closed: std::sync::atomic::AtomicBool,
}

/// A follower of a function: the next lines of its calls. Dropping it ends the following
/// (the last follower gone, the function's calls stop sending lines).
pub struct FunctionFollower {
    logs: Arc<LiveLogs>,
    key: FunctionKey,
    rx: Option<broadcast::Receiver<FunctionLine>>,
}

impl FunctionFollower {
    /// The next line; `Err(n)` when this follower fell `n` lines behind (they are lost to
    /// it, the runs' records keep them); `None` when the server is shutting down.
    pub async fn next(&mut self) -> Option<Result<FunctionLine, u64>> {
        match self.rx.as_mut()?.recv().await {
            Ok(l) => Some(Ok(l)),
            Err(broadcast::error::RecvError::Lagged(n)) => Some(Err(n)),
            Err(broadcast::error::RecvError::Closed) => None,
        }
    }
}

impl Drop for FunctionFollower {
    fn drop(&mut self) {
        let mut functions = self.logs.functions.lock();
        drop(self.rx.take());
        if functions
            .get(&self.key)
            .is_some_and(|tx| tx.receiver_count() == 0)
        {
            functions.remove(&self.key);
            self.logs.followed.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// A long line cut at [`LINE_BYTES`] (on a character boundary) and redacted of `secrets`.
fn tidy(l: &mut LogLine, secrets: &[String]) {
    if l.line.len() > LINE_BYTES {
        let mut cut = LINE_BYTES;
        while !l.line.is_char_boundary(cut) {
            cut -= 1;
        }
        l.line.truncate(cut);
    }
    if !secrets.is_empty() {
        l.line = crate::secrets::redact(&l.line, secrets);
    }
}

/// A run's attempt being followable: its lines stop when this is dropped (the attempt ended).
pub struct Live {
    logs: Arc<LiveLogs>,
    run: String,
}

impl Drop for Live {
    fn drop(&mut self) {
        self.logs.runs.lock().remove(&self.run);
    }
}

/// What a follower gets.
pub enum Following {
    /// No attempt of the run is running on this server (the record has the logs).
    NotHere,
    /// More lines came than are kept for late followers: it reads the record at the end.
    TooLate,
    /// The lines so far and the channel of the next ones.
    Lines(Vec<LogLine>, broadcast::Receiver<LogLine>),
}

impl LiveLogs {
    /// Makes `run`'s attempt (a run of function `ns`/`name`) followable: the listener to give
    /// its call, and the guard that ends it. `secrets` are redacted from every line.
    pub fn open(
        self: &Arc<Self>,
        run: &str,
        (ns, name): (&str, &str),
        secrets: Vec<String>,
    ) -> (LogListener, Live) {
        let attempt = Arc::new(Mutex::new(Attempt {
            tx: broadcast::channel(LINES).0,
            so_far: VecDeque::new(),
            overflowed: false,
        }));
        self.runs.lock().insert(run.to_string(), attempt.clone());
        let function = self
            .function_channel(ns, name)
            .map(|tx| (tx, Arc::from(run)));
        let listener: LogListener = Arc::new(move |mut l: LogLine| {
            tidy(&mut l, &secrets);
            if let Some((tx, run)) = &function {
                let _ = tx.send(FunctionLine {
                    run: Arc::clone(run),
                    line: l.clone(),
                });
            }
            let mut a = attempt.lock();
            if a.so_far.len() < LINES {
                a.so_far.push_back(l.clone());
            } else {
                a.overflowed = true;
            }
            let _ = a.tx.send(l);
        });
        (
            listener,
            Live {
                logs: self.clone(),
                run: run.to_string(),
            },
        )
    }

    /// Where a sync call's lines go as they are printed, when its function is followed
    /// (else `None`, and the call sends its lines with its answer). `secrets` is asked only
    /// then.
    pub fn for_call(
        &self,
        run: &str,
        (ns, name): (&str, &str),
        secrets: impl FnOnce() -> Vec<String>,
    ) -> Option<LogListener> {
        let tx = self.function_channel(ns, name)?;
        let (run, secrets): (Arc<str>, _) = (Arc::from(run), secrets());
        Some(Arc::new(move |mut l: LogLine| {
            tidy(&mut l, &secrets);
            let _ = tx.send(FunctionLine {
                run: Arc::clone(&run),
                line: l,
            });
        }))
    }

    /// The channel of function `ns`/`name`'s lines, when it is followed.
    fn function_channel(&self, ns: &str, name: &str) -> Option<broadcast::Sender<FunctionLine>> {
        if self.followed.load(Ordering::Relaxed) == 0 {
            return None;
        }
        self.functions
            .lock()
            .get(&(ns.to_string(), name.to_string()))
            .cloned()
    }

    /// Follows function `ns`/`name`: the lines of every call that starts from now on, as they
    /// are printed (up to [`LINES`] in flight to a slow follower).
    pub fn follow_function(self: &Arc<Self>, ns: &str, name: &str) -> FunctionFollower {
        let key = (ns.to_string(), name.to_string());
        let mut functions = self.functions.lock();
        let rx = match functions.get(&key) {
            _ if self.closed.load(Ordering::Relaxed) => broadcast::channel(1).1,
            Some(tx) => tx.subscribe(),
            None => {
                let (tx, rx) = broadcast::channel(LINES);
                functions.insert(key.clone(), tx);
                self.followed.fetch_add(1, Ordering::Relaxed);
                rx
            }
        };
        FunctionFollower {
            logs: self.clone(),
            key,
            rx: Some(rx),
        }
    }

    /// The server is shutting down: every function's followers are told the end (a follow
    /// would otherwise hold its connection through the drain).
    pub fn close(&self) {
        let mut functions = self.functions.lock();
        self.closed.store(true, Ordering::Relaxed);
        functions.clear();
        self.followed.store(0, Ordering::Relaxed);
    }

    /// What a follower of `run` gets now.
    pub fn follow(&self, run: &str) -> Following {
        let Some(attempt) = self.runs.lock().get(run).cloned() else {
            return Following::NotHere;
        };
        let a = attempt.lock();
        if a.overflowed {
            return Following::TooLate;
        }
        // Under the attempt's lock: no line between the copy and the subscription is lost
        // or seen twice.
        Following::Lines(a.so_far.iter().cloned().collect(), a.tx.subscribe())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(stream: &'static str, text: &str) -> LogLine {
        LogLine {
            stream,
            line: text.into(),
        }
    }

    #[tokio::test]
    async fn followers_get_the_lines_so_far_then_each_new_one_redacted() {
        let logs = Arc::new(LiveLogs::default());
        let (listen, live) = logs.open("r1", ("default", "f"), vec!["s3cret".into()]);
        listen(line("stdout", "before anyone follows"));
        let Following::Lines(so_far, mut rx) = logs.follow("r1") else {
            panic!("the attempt runs")
        };
        assert_eq!(so_far, vec![line("stdout", "before anyone follows")]);
        listen(line("stderr", "the key is s3cret"));
        let got = rx.recv().await.unwrap();
        assert_eq!(got.stream, "stderr");
        assert!(!got.line.contains("s3cret"), "{}", got.line);
        drop(live);
        assert!(matches!(logs.follow("r1"), Following::NotHere), "it ended");
    }

    #[test]
    fn a_late_follower_of_a_long_attempt_is_told_to_read_the_record() {
        let logs = Arc::new(LiveLogs::default());
        let (listen, _live) = logs.open("r1", ("default", "f"), Vec::new());
        for i in 0..=LINES {
            listen(line("stdout", &i.to_string()));
        }
        assert!(matches!(logs.follow("r1"), Following::TooLate));
    }

    #[tokio::test]
    async fn a_followed_function_gets_every_calls_lines_with_its_run_and_only_while_followed() {
        let logs = Arc::new(LiveLogs::default());
        let f = ("default", "f");
        // Nobody follows: a sync call asks for nothing (not even its secrets).
        assert!(
            logs.for_call("r0", f, || panic!("asked for secrets"))
                .is_none()
        );
        let mut follower = logs.follow_function("default", "f");
        let mut other = logs.follow_function("default", "g");
        let sync = logs
            .for_call("r1", f, || vec!["s3cret".into()])
            .expect("followed");
        let (run, _live) = logs.open("r2", f, Vec::new());
        sync(line("stdout", "the key is s3cret"));
        run(line("stderr", "from the async run"));
        let got = follower.next().await.unwrap().unwrap();
        assert_eq!(&*got.run, "r1");
        assert_eq!(got.line.line, "the key is [redacted]");
        let got = follower.next().await.unwrap().unwrap();
        assert_eq!((&*got.run, got.line.stream), ("r2", "stderr"));
        assert_eq!(
            serde_json::to_value(&got).unwrap(),
            serde_json::json!({"run": "r2", "stream": "stderr", "line": "from the async run"})
        );
        // Another function's follower saw none of it.
        assert!(
            tokio::time::timeout(std::time::Duration::ZERO, other.next())
                .await
                .is_err()
        );
        // A second follower of f, then both gone: calls stop asking.
        let second = logs.follow_function("default", "f");
        drop(follower);
        assert!(logs.for_call("r3", f, Vec::new).is_some());
        drop(second);
        assert!(logs.for_call("r4", f, Vec::new).is_none());
        drop(other);
        assert_eq!(logs.followed.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn a_slow_function_follower_is_told_how_many_lines_it_missed() {
        let logs = Arc::new(LiveLogs::default());
        let mut follower = logs.follow_function("default", "f");
        let sync = logs.for_call("r1", ("default", "f"), Vec::new).unwrap();
        for i in 0..LINES + 10 {
            sync(line("stdout", &i.to_string()));
        }
        assert_eq!(follower.next().await, Some(Err(10)));
        assert_eq!(follower.next().await.unwrap().unwrap().line.line, "10");
    }

    #[tokio::test]
    async fn shutting_down_ends_every_function_follower() {
        let logs = Arc::new(LiveLogs::default());
        let mut follower = logs.follow_function("default", "f");
        logs.close();
        assert_eq!(follower.next().await, None);
        assert!(logs.for_call("r1", ("default", "f"), Vec::new).is_none());
        assert_eq!(logs.follow_function("default", "f").next().await, None);
        drop(follower);
        assert_eq!(logs.followed.load(Ordering::Relaxed), 0);
    }
}
