//! `dispatch cancel run ID`: stop a queued run, or kill a running one (status CANCELLED).

use std::process::ExitCode;

use anyhow::{Result, bail};

use super::{Target, parse_target};
use crate::Ctx;

/// Cancel an async run: a queued one will not run, a running one is killed
#[derive(Debug, clap::Args)]
pub struct Cancel {
    /// run
    pub kind: String,
    pub id: String,
}

impl Cancel {
    pub async fn run(self, ctx: &Ctx) -> Result<ExitCode> {
        if parse_target(&self.kind)? != Target::Runs {
            bail!("only runs are cancelled: dispatch cancel run ID");
        }
        let run = ctx.client.cancel_run(&self.id).await?;
        println!(
            "run/{} {}",
            run.id,
            run.status.as_str().to_ascii_lowercase()
        );
        Ok(ExitCode::SUCCESS)
    }
}
