//! `dispatch logs run ID` (a run's stdout, then stderr) and `dispatch logs image NAME` (the
//! image's dependency build log).

use std::process::ExitCode;

use std::time::Duration;

use anyhow::{Result, bail};
use dispatch_core::Kind;

use super::{Target, parse_target};
use crate::Ctx;

/// Print the logs of a run (stdout, then stderr) or of an image build
#[derive(Debug, clap::Args)]
pub struct Logs {
    /// run, jobexecution or image
    pub kind: String,
    /// Run id (from `dispatch get runs`) or image name
    pub id: String,
    /// Runs: follow the run until it ends, showing each status change and, for an async,
    /// event or cron run, each line as its handler prints it (a sync call's lines, and those
    /// of an attempt on another server, print when the attempt ends)
    #[arg(short = 'f', long)]
    pub follow: bool,
}

impl Logs {
    pub async fn run(self, ctx: &Ctx) -> Result<ExitCode> {
        match parse_target(&self.kind)? {
            Target::Runs if self.follow => return follow(ctx, &self.id).await,
            Target::Runs => {
                let logs = ctx.client.run_logs(&self.id).await?;
                for l in &logs.stdout {
                    println!("{l}");
                }
                for l in &logs.stderr {
                    eprintln!("{l}");
                }
            }
            Target::JobExecutions if self.follow => {
                return super::execute::follow(&ctx.client, &self.id).await;
            }
            Target::JobExecutions => {
                let logs = ctx.client.job_logs(&self.id).await?;
                for l in &logs.stdout {
                    println!("{l}");
                }
                for l in &logs.stderr {
                    eprintln!("{l}");
                }
            }
            Target::Resource(Kind::Image) => print!("{}", ctx.client.image_log(&self.id).await?),
            Target::Resource(_)
            | Target::Tokens
            | Target::Audit
            | Target::Namespaces
            | Target::PulledImages
            | Target::Versions
            | Target::Events => bail!(
                "logs are kept for runs, job executions and image builds: dispatch logs run ID | jobexecution UUID | image NAME"
            ),
        }
        Ok(ExitCode::SUCCESS)
    }
}

/// Polls a run until it is final: status changes on stderr; the lines of a running attempt as
/// they are printed (followed on the server), the rest of each attempt's logs as it ends.
async fn follow(ctx: &Ctx, id: &str) -> Result<ExitCode> {
    let mut last = (None, 0u32);
    let mut printed_errors = 0usize;
    // The attempt followed live, and how many of its stdout/stderr lines it printed.
    let mut live: Option<(u32, tokio::task::JoinHandle<(usize, usize)>)> = None;
    loop {
        let run = ctx.client.get_run(id).await?;
        if (Some(run.status), run.attempts) != last {
            eprintln!("run {id}: {} (attempt {})", run.status, run.attempts);
            last = (Some(run.status), run.attempts);
        }
        for e in run.attempt_errors.iter().skip(printed_errors) {
            eprintln!(
                "attempt {} failed: {}: {}",
                e.attempt, e.error.kind, e.error.message
            );
        }
        printed_errors = run.attempt_errors.len();
        let attempt = run.attempts;
        if run.status == dispatch_core::RunStatus::Running
            && live.as_ref().is_none_or(|(a, _)| *a != attempt)
        {
            let (client, id) = (ctx.client.clone(), id.to_string());
            live = Some((
                attempt,
                tokio::spawn(async move {
                    let mut n = (0, 0);
                    let _ = client
                        .follow_run_logs(&id, |stream, line| {
                            if stream == "stderr" {
                                eprintln!("{line}");
                                n.1 += 1;
                            } else {
                                println!("{line}");
                                n.0 += 1;
                            }
                        })
                        .await;
                    n
                }),
            ));
        }
        if run.status.is_final() {
            // What the attempt printed live is not printed again.
            let (out, err) = match live.take() {
                Some((a, h)) if a == attempt => h.await.unwrap_or_default(),
                Some((_, h)) => {
                    h.abort();
                    (0, 0)
                }
                None => (0, 0),
            };
            for l in run.logs.stdout.iter().skip(out) {
                println!("{l}");
            }
            for l in run.logs.stderr.iter().skip(err) {
                eprintln!("{l}");
            }
            let ok = run.status == dispatch_core::RunStatus::Succeeded;
            return Ok(if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            });
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
