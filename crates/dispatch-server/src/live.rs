//! Live log lines (issue 22): an async, event or cron run's attempt asks its worker to send
//! each line as it is printed; the lines go to whoever follows the run here
//! (`GET …/runs/ID/logs?follow=true`, `dispatch logs run ID --follow`), redacted of the
//! function's secrets. A follower gets the attempt's lines so far (its first [`LINES`]),
//! then each new one, through a bounded broadcast channel; one that comes after more lines
//! than that, or falls behind, is told so and reads the rest from the record when the attempt
//! ends (the record keeps every line, as before). Sync calls send their lines with the
//! answer: asking every gateway call for frames would cost the hot path a frame per line.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

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

#[derive(Default)]
pub struct LiveLogs {
    runs: Mutex<HashMap<String, Arc<Mutex<Attempt>>>>,
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
    /// Makes `run`'s attempt followable: the listener to give its call, and the guard that
    /// ends it. `secrets` are redacted from every line.
    pub fn open(self: &Arc<Self>, run: &str, secrets: Vec<String>) -> (LogListener, Live) {
        let attempt = Arc::new(Mutex::new(Attempt {
            tx: broadcast::channel(LINES).0,
            so_far: VecDeque::new(),
            overflowed: false,
        }));
        self.runs.lock().insert(run.to_string(), attempt.clone());
        let listener: LogListener = Arc::new(move |mut l: LogLine| {
            if l.line.len() > LINE_BYTES {
                let mut cut = LINE_BYTES;
                while !l.line.is_char_boundary(cut) {
                    cut -= 1;
                }
                l.line.truncate(cut);
            }
            if !secrets.is_empty() {
                l.line = crate::secrets::redact(&l.line, &secrets);
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
        let (listen, live) = logs.open("r1", vec!["s3cret".into()]);
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
        let (listen, _live) = logs.open("r1", Vec::new());
        for i in 0..=LINES {
            listen(line("stdout", &i.to_string()));
        }
        assert!(matches!(logs.follow("r1"), Following::TooLate));
    }
}
