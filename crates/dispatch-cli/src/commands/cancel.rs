//! `dispatch cancel run ID`: stop a queued run, or kill a running one (status CANCELLED).

use std::process::ExitCode;

use anyhow::{Result, bail};

use super::{Target, parse_target};
use crate::Ctx;

/// Cancel an async run or a job execution: a waiting one will not run, a running one is killed
#[derive(Debug, clap::Args)]
pub struct Cancel {
    /// run or jobexecution
    pub kind: String,
    pub id: String,
}

impl Cancel {
    pub async fn run(self, ctx: &Ctx) -> Result<ExitCode> {
        match parse_target(&self.kind)? {
            Target::Runs => {
                let run = ctx.client.cancel_run(&self.id).await?;
                println!(
                    "run/{} {}",
                    run.id,
                    run.status.as_str().to_ascii_lowercase()
                );
            }
            Target::JobExecutions => {
                let job = ctx.client.cancel_job(&self.id).await?;
                println!(
                    "jobexecution/{} {}",
                    job.uuid,
                    job.phase.as_str().to_ascii_lowercase()
                );
            }
            Target::Resource(_)
            | Target::Tokens
            | Target::Audit
            | Target::Namespaces
            | Target::PulledImages
            | Target::Versions
            | Target::Events => bail!(
                "runs and job executions are cancelled: dispatch cancel run ID | jobexecution UUID"
            ),
        }
        Ok(ExitCode::SUCCESS)
    }
}
