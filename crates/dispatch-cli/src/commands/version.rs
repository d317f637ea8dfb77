//! `dispatch version`: this binary's version, and the server's when it answers.

use std::process::ExitCode;

use anyhow::Result;

use crate::Ctx;

/// Print the client version and the server's
#[derive(Debug, clap::Args)]
pub struct Version {}

impl Version {
    pub async fn run(self, ctx: &Ctx) -> Result<ExitCode> {
        println!("client: {}", env!("CARGO_PKG_VERSION"));
        match ctx.client.version().await {
            Ok(v) => println!(
                "server: {} ({} backend) at {}",
                v["version"].as_str().unwrap_or("?"),
                v["backend"].as_str().unwrap_or("?"),
                ctx.client.server()
            ),
            Err(e) => println!("server: not reachable ({e})"),
        }
        Ok(ExitCode::SUCCESS)
    }
}
