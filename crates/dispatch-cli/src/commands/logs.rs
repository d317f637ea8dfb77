//! `dispatch logs run ID`: a run's stdout then stderr lines.

use std::process::ExitCode;

use anyhow::{Result, bail};

use super::{Target, parse_target};
use crate::Ctx;

/// Print the logs of a run (stdout, then stderr)
#[derive(Debug, clap::Args)]
pub struct Logs {
    /// What to show logs of: run
    pub kind: String,
    /// Run id (from `dispatch get runs`)
    pub id: String,
}

impl Logs {
    pub async fn run(self, ctx: &Ctx) -> Result<ExitCode> {
        if parse_target(&self.kind)? != Target::Runs {
            bail!("logs are kept for runs: dispatch logs run ID");
        }
        let logs = ctx.client.run_logs(&self.id).await?;
        for l in &logs.stdout {
            println!("{l}");
        }
        for l in &logs.stderr {
            eprintln!("{l}");
        }
        Ok(ExitCode::SUCCESS)
    }
}
