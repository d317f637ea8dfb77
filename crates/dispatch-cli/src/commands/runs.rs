//! `dispatch runs redrive ID | --all [--function F]` and `dispatch runs purge`.

use std::process::ExitCode;

use anyhow::{Result, bail};

use crate::Ctx;

/// Manage async runs: re-queue dead ones, delete finished ones
#[derive(Debug, clap::Args)]
pub struct Runs {
    #[command(subcommand)]
    pub what: RunsWhat,
}

#[derive(Debug, clap::Subcommand)]
pub enum RunsWhat {
    /// Re-queue DEAD runs (attempts start again; earlier errors are kept)
    Redrive {
        /// One run
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        id: Option<String>,
        /// Every dead run (of --function)
        #[arg(long)]
        all: bool,
        #[arg(long, requires = "all")]
        function: Option<String>,
    },
    /// Delete finished runs (never queued or running ones)
    Purge {
        #[arg(long)]
        function: Option<String>,
        /// Only runs with this status (succeeded, failed, timeout, cancelled, dead)
        #[arg(long)]
        status: Option<String>,
    },
}

impl Runs {
    pub async fn run(self, ctx: &Ctx) -> Result<ExitCode> {
        let c = &ctx.client;
        match self.what {
            RunsWhat::Redrive { id: Some(id), .. } => {
                let r = c.redrive_run(&id).await?;
                println!("run/{} {}", r.id, r.status.as_str().to_ascii_lowercase());
            }
            RunsWhat::Redrive {
                all: true,
                function,
                ..
            } => {
                let v = c.redrive_all(function.as_deref()).await?;
                println!(
                    "{} dead runs re-queued",
                    v["redriven"].as_u64().unwrap_or(0)
                );
            }
            RunsWhat::Redrive { .. } => bail!("name a run, or pass --all"),
            RunsWhat::Purge { function, status } => {
                let v = c.purge_runs(function.as_deref(), status.as_deref()).await?;
                println!("{} runs deleted", v["deleted"].as_u64().unwrap_or(0));
            }
        }
        Ok(ExitCode::SUCCESS)
    }
}
