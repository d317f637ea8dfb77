//! `dispatch rollback FUNCTION [--to N]`: the function's spec goes back to one of its
//! versions (`dispatch get versions FUNCTION`), in one API call; the server redeploys that
//! build, which it still has.

use std::process::ExitCode;

use anyhow::Result;
use dispatch_core::Kind;

use super::{WaitArgs, ensure_ready, wait_settled};
use crate::Ctx;
use crate::output::{Format, print_structured};

/// Return a function to one of its versions (default: the one before the version serving)
#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:\n  \
    dispatch get versions hello        # VERSION, DIGEST, SOURCE, CREATED; * marks the one serving\n  \
    dispatch rollback hello            # back to the version before the one serving\n  \
    dispatch rollback hello --to 3     # to version 3 (forward again too)\n  \
    dispatch rollback hello --to 3 --alias prod   # and all of prod's traffic to it, in the same call")]
pub struct Rollback {
    /// The function
    pub function: String,
    /// The version to return to (default: the newest one older than the version serving)
    #[arg(long)]
    pub to: Option<u32>,
    /// Also point this alias (all of its traffic) at the version, ending its promotion
    #[arg(long)]
    pub alias: Option<String>,
    #[command(flatten)]
    pub wait: WaitArgs,
    /// Output format
    #[arg(short = 'o', long = "output", value_enum, default_value_t = Format::Table)]
    pub output: Format,
}

impl Rollback {
    pub async fn run(self, ctx: &Ctx) -> Result<ExitCode> {
        let c = &ctx.client;
        let r = c
            .rollback(&self.function, self.to, self.alias.as_deref())
            .await?;
        let version = r["version"].as_u64().unwrap_or(0);
        if self.wait.resolve() {
            let o = wait_settled(c, Kind::Function, &self.function, super::create::WAIT).await?;
            ensure_ready(&o)?;
        }
        match self.output {
            Format::Table | Format::Wide => {
                println!(
                    "function/{} rolled back to version {version} ({})",
                    self.function,
                    r["digest"].as_str().unwrap_or("")
                );
                if let Some(a) = &self.alias {
                    println!("alias/{}.{a} points to version {version}", self.function);
                }
            }
            f => print_structured(&r, f)?,
        }
        Ok(ExitCode::SUCCESS)
    }
}
