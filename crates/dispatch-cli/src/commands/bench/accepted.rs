//! Work the server accepted (an async run's 202, an event's matched run, a job's uuid),
//! followed to its end: the soak and the fault matrix count what finished, what failed and
//! what was lost (accepted, then unknown to the server or never final).

use std::time::{Duration, Instant};

use dispatch_client::Client;
use dispatch_core::{JobPhase, RunStatus};
use futures_util::future::join_all;
use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Work {
    Run,
    Job,
}

#[derive(Debug, Clone)]
pub struct Accepted {
    pub work: Work,
    pub id: String,
}

impl Accepted {
    pub fn run(id: impl Into<String>) -> Accepted {
        Accepted {
            work: Work::Run,
            id: id.into(),
        }
    }
    pub fn job(id: impl Into<String>) -> Accepted {
        Accepted {
            work: Work::Job,
            id: id.into(),
        }
    }
}

/// What became of accepted work.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Outcome {
    pub accepted: usize,
    pub succeeded: usize,
    /// Ended, but not successfully (FAILED, DEAD, a failed job): the reasons, a few.
    pub failed: usize,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub failures: Vec<String>,
    /// Accepted, then unknown to the server (404) or still not final at the deadline.
    pub lost: usize,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub lost_ids: Vec<String>,
}

impl Outcome {
    pub fn merge(&mut self, o: Outcome) {
        self.accepted += o.accepted;
        self.succeeded += o.succeeded;
        self.failed += o.failed;
        self.lost += o.lost;
        self.failures.extend(o.failures);
        self.failures.truncate(5);
        self.lost_ids.extend(o.lost_ids);
        self.lost_ids.truncate(5);
    }
}

enum State {
    Succeeded,
    Failed(String),
    Pending,
    Unknown,
}

async fn state(client: &Client, a: &Accepted) -> State {
    let not_found =
        |e: &dispatch_client::ClientError| e.status() == Some(reqwest::StatusCode::NOT_FOUND);
    match a.work {
        Work::Run => match client.get_run(&a.id).await {
            Ok(r) if r.status == RunStatus::Succeeded => State::Succeeded,
            Ok(r) if r.status.is_final() => State::Failed(format!(
                "run {} {}: {}",
                a.id,
                r.status,
                r.error.map(|e| e.message).unwrap_or_default()
            )),
            Ok(_) => State::Pending,
            Err(e) if not_found(&e) => State::Unknown,
            Err(_) => State::Pending,
        },
        Work::Job => match client.get_job(&a.id).await {
            Ok(j) if j.phase == JobPhase::Completed => State::Succeeded,
            Ok(j) if j.phase.is_final() => {
                State::Failed(format!("job {} {:?}: {}", a.id, j.phase, j.reason))
            }
            Ok(_) => State::Pending,
            Err(e) if not_found(&e) => State::Unknown,
            Err(_) => State::Pending,
        },
    }
}

/// Checks each of `work` once: the final ones are counted into the outcome, the pending ones
/// come back. With `last`, pending ones count as lost too.
pub async fn check(client: &Client, work: Vec<Accepted>, last: bool) -> (Outcome, Vec<Accepted>) {
    let mut out = Outcome::default();
    let mut pending = Vec::new();
    // A few at a time: the server is under load already.
    let mut states = Vec::with_capacity(work.len());
    for chunk in work.chunks(16) {
        states.extend(join_all(chunk.iter().map(|a| state(client, a))).await);
    }
    for (a, s) in work.into_iter().zip(states) {
        match s {
            State::Succeeded => {
                out.accepted += 1;
                out.succeeded += 1;
            }
            State::Failed(why) => {
                out.accepted += 1;
                out.failed += 1;
                if out.failures.len() < 5 {
                    out.failures.push(why);
                }
            }
            State::Unknown => {
                out.accepted += 1;
                out.lost += 1;
                if out.lost_ids.len() < 5 {
                    out.lost_ids
                        .push(format!("{:?} {} (unknown to the server)", a.work, a.id));
                }
            }
            State::Pending if last => {
                out.accepted += 1;
                out.lost += 1;
                if out.lost_ids.len() < 5 {
                    out.lost_ids
                        .push(format!("{:?} {} (never final)", a.work, a.id));
                }
            }
            State::Pending => pending.push(a),
        }
    }
    (out, pending)
}

/// Follows `work` until all of it is final or `within` has passed (then the rest is lost).
pub async fn settle(client: &Client, mut work: Vec<Accepted>, within: Duration) -> Outcome {
    let deadline = Instant::now() + within;
    let mut total = Outcome::default();
    loop {
        let last = Instant::now() >= deadline;
        let (o, rest) = check(client, work, last).await;
        total.merge(o);
        if rest.is_empty() {
            return total;
        }
        work = rest;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
