//! `dispatch execute TEMPLATE [--payload TEXT|-] [--wait]`: dispatcher's `PUT /execute`
//! from the CLI. With `--wait`, follows the execution's logs and exits with its exit code.

use std::io::Read;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context as _, Result};
use dispatch_client::Client;
use dispatch_core::JobPhase;

use crate::Ctx;
use crate::output::{Format, print_structured};

/// Run a job template (its `{{ .Payload }}` is the payload)
#[derive(Debug, clap::Args)]
pub struct Execute {
    /// Job template name
    pub template: String,
    /// Payload text; `-` reads it from stdin; default empty
    #[arg(long, short = 'p')]
    pub payload: Option<String>,
    /// Follow the logs until the job ends and exit with its exit code
    #[arg(long)]
    pub wait: bool,
    #[arg(short = 'o', long = "output", value_enum, default_value_t = Format::Json)]
    pub output: Format,
}

impl Execute {
    pub async fn run(self, ctx: &Ctx) -> Result<ExitCode> {
        let payload = match self.payload.as_deref() {
            Some("-") => {
                let mut b = Vec::new();
                std::io::stdin()
                    .read_to_end(&mut b)
                    .context("failed to read the payload from stdin")?;
                b
            }
            Some(p) => p.as_bytes().to_vec(),
            None => Vec::new(),
        };
        let started = ctx.client.execute(&self.template, payload).await?;
        let uuid = started["uuid"].as_str().unwrap_or_default().to_string();
        if !self.wait {
            match self.output {
                Format::Yaml => print_structured(&started, Format::Yaml)?,
                _ => print_structured(&started, Format::Json)?,
            }
            return Ok(ExitCode::SUCCESS);
        }
        eprintln!("jobexecution {uuid} started");
        follow(&ctx.client, &uuid).await
    }
}

/// Prints new log lines as they come (stdout lines to stdout, stderr to stderr) until the
/// execution ends; exits with its exit code (1 when it failed without one).
pub async fn follow(client: &Client, uuid: &str) -> Result<ExitCode> {
    let (mut out, mut err) = (0usize, 0usize);
    let mut phase = None;
    loop {
        let job = client.get_job(uuid).await?;
        for l in job.logs.stdout.iter().skip(out) {
            println!("{l}");
        }
        for l in job.logs.stderr.iter().skip(err) {
            eprintln!("{l}");
        }
        out = out.max(job.logs.stdout.len());
        err = err.max(job.logs.stderr.len());
        if phase != Some(job.phase) {
            if phase.is_some() || job.phase != JobPhase::Active {
                eprintln!(
                    "jobexecution {uuid}: {}{}",
                    job.phase,
                    if job.reason.is_empty() {
                        String::new()
                    } else {
                        format!(" ({})", job.reason)
                    }
                );
            }
            phase = Some(job.phase);
        }
        if job.phase.is_final() {
            let code = match (job.phase, job.exit_code) {
                (JobPhase::Completed, _) => 0,
                (_, Some(c)) if c != 0 => c,
                _ => 1,
            };
            return Ok(ExitCode::from(
                u8::try_from(code.clamp(0, 255)).unwrap_or(1),
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
