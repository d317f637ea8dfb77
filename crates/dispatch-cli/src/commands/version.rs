//! `dispatch version`: this binary's version, and the server's when it answers.

use std::process::ExitCode;

use anyhow::Result;

use crate::Ctx;
use crate::output::{Format, print_structured};

/// Print the client version and the server's
#[derive(Debug, clap::Args)]
pub struct Version {
    /// Output format: table (lines), json or yaml
    /// (`{"client": {"version"}, "server": {"version", "backend", "url"} | null}`)
    #[arg(short = 'o', long, value_enum, default_value_t = Format::Table)]
    pub output: Format,
}

impl Version {
    pub async fn run(self, ctx: &Ctx) -> Result<ExitCode> {
        let server = ctx.client.version().await;
        if self.output != Format::Table {
            let server = match &server {
                Ok(v) => serde_json::json!({
                    "version": v["version"], "backend": v["backend"], "url": ctx.client.server()
                }),
                Err(e) => serde_json::json!({"url": ctx.client.server(), "error": e.to_string()}),
            };
            let all = serde_json::json!({
                "client": {"version": env!("CARGO_PKG_VERSION")},
                "server": server,
            });
            print_structured(&all, self.output)?;
            return Ok(ExitCode::SUCCESS);
        }
        println!("client: {}", env!("CARGO_PKG_VERSION"));
        match server {
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
