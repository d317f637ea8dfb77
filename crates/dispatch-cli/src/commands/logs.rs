//! `dispatch logs run ID` (a run's stdout, then stderr), `dispatch logs function NAME` (its
//! last runs' lines, or with `--follow` every call's lines as they are printed) and `dispatch
//! logs image NAME` (the image's dependency build log).

use std::process::ExitCode;

use std::time::Duration;

use anyhow::{Result, bail};
use dispatch_core::Kind;

use super::{Target, parse_target};
use crate::Ctx;

/// Print the logs of a run (stdout, then stderr), of a function's runs, or of an image build
///
/// Examples:
///   dispatch logs run 01J…            # a run's lines
///   dispatch logs run 01J… -f         # until it ends, lines live
///   dispatch logs function hello      # its last 10 runs' lines, each after its run id
///   dispatch logs function hello -f   # every call's lines as they are printed (Ctrl-C ends)
#[derive(Debug, clap::Args)]
#[command(verbatim_doc_comment)]
pub struct Logs {
    /// run, function, jobexecution or image
    pub kind: String,
    /// Run id (from `dispatch get runs`), function name, job execution UUID or image name
    pub id: String,
    /// Runs: follow the run until it ends, showing each status change and, for an async,
    /// event or cron run, each line as its handler prints it (the lines of an attempt on
    /// another server print when it ends). Functions: print the lines of every call that
    /// starts from now on — sync gateway and API calls, WebSocket messages, async, event and
    /// cron runs — as they are printed, until interrupted
    #[arg(short = 'f', long)]
    pub follow: bool,
    /// Functions, without --follow: how many of its last runs to print
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u16).range(1..=1000))]
    pub runs: u16,
    /// Functions: `table` prints `RUN  line` (stderr lines to stderr); `json` one object per
    /// line ({"run","stream","line"}), for scripts
    #[arg(short = 'o', long = "output", value_enum, default_value_t = LineFormat::Table)]
    pub output: LineFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LineFormat {
    Table,
    Json,
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
            Target::Resource(Kind::Function) => {
                let print = |run: &str, stream: &str, line: &str| {
                    print_line(self.output, run, stream, line)
                };
                if self.follow {
                    ctx.client
                        .follow_function_logs(&self.id, |l| match l {
                            dispatch_client::FunctionLog::Line { run, stream, line } => {
                                print(run, stream, line)
                            }
                            dispatch_client::FunctionLog::Lagged(n) => eprintln!(
                                "({n} lines missed: this terminal fell behind; the runs' \
                                 records keep them)"
                            ),
                        })
                        .await?;
                    eprintln!("the server ended the following (it is shutting down)");
                    return Ok(ExitCode::FAILURE);
                }
                // Make sure it exists: no runs of a misspelt name would print nothing.
                ctx.client.get(Kind::Function, &self.id).await?;
                let q = dispatch_client::RunQuery {
                    function: Some(self.id.clone()),
                    limit: Some(self.runs.into()),
                    ..Default::default()
                };
                let mut runs = ctx.client.list_runs(&q).await?;
                runs.reverse(); // oldest first, as they ran
                for r in &runs {
                    for l in &r.logs.stdout {
                        print(&r.id, "stdout", l);
                    }
                    for l in &r.logs.stderr {
                        print(&r.id, "stderr", l);
                    }
                }
            }
            Target::Resource(_)
            | Target::Tokens
            | Target::Audit
            | Target::Namespaces
            | Target::PulledImages
            | Target::Versions
            | Target::Events => bail!(
                "logs are kept for runs, functions, job executions and image builds: dispatch logs run ID | function NAME | jobexecution UUID | image NAME"
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

/// One line of a function's runs: after its run id (stderr lines to stderr), or as JSON.
fn print_line(format: LineFormat, run: &str, stream: &str, line: &str) {
    match format {
        LineFormat::Json => println!(
            "{}",
            serde_json::json!({"run": run, "stream": stream, "line": line})
        ),
        LineFormat::Table if stream == "stderr" => eprintln!("{run}  {line}"),
        LineFormat::Table => println!("{run}  {line}"),
    }
}
