//! `dispatch logs run ID` (a run's stdout, then stderr) and `dispatch logs image NAME` (the
//! image's dependency build log).

use std::process::ExitCode;

use anyhow::{Result, bail};
use dispatch_core::Kind;

use super::{Target, parse_target};
use crate::Ctx;

/// Print the logs of a run (stdout, then stderr) or of an image build
#[derive(Debug, clap::Args)]
pub struct Logs {
    /// run or image
    pub kind: String,
    /// Run id (from `dispatch get runs`) or image name
    pub id: String,
}

impl Logs {
    pub async fn run(self, ctx: &Ctx) -> Result<ExitCode> {
        match parse_target(&self.kind)? {
            Target::Runs => {
                let logs = ctx.client.run_logs(&self.id).await?;
                for l in &logs.stdout {
                    println!("{l}");
                }
                for l in &logs.stderr {
                    eprintln!("{l}");
                }
            }
            Target::Resource(Kind::Image) => print!("{}", ctx.client.image_log(&self.id).await?),
            Target::Resource(_) => bail!(
                "logs are kept for runs and image builds: dispatch logs run ID | dispatch logs image NAME"
            ),
        }
        Ok(ExitCode::SUCCESS)
    }
}
