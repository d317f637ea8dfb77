//! `dispatch gc`: remove builds and source archives nothing references any more.

use std::process::ExitCode;

use anyhow::Result;

use crate::Ctx;
use crate::output::{Format, print_structured, table};

/// Remove image builds, function builds and source archives no resource references
#[derive(Debug, clap::Args)]
pub struct Gc {
    /// Keep anything touched within this long (default: the server's, 1h); 0s = everything unreferenced
    #[arg(long)]
    pub grace: Option<String>,
    #[arg(short = 'o', long = "output", value_enum, default_value_t = Format::Table)]
    pub output: Format,
}

impl Gc {
    pub async fn run(self, ctx: &Ctx) -> Result<ExitCode> {
        let report = ctx.client.gc(self.grace.as_deref()).await?;
        if self.output != Format::Table {
            print_structured(&report, self.output)?;
            return Ok(ExitCode::SUCCESS);
        }
        let rows: Vec<Vec<String>> = report["removed"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|r| {
                        vec![
                            r["what"].as_str().unwrap_or("").to_string(),
                            r["digest"].as_str().unwrap_or("").to_string(),
                            r["bytes"].as_u64().unwrap_or(0).to_string(),
                        ]
                    })
                    .collect()
            })
            .unwrap_or_default();
        if !rows.is_empty() {
            print!("{}", table(&["REMOVED", "DIGEST", "BYTES"], &rows));
        }
        println!(
            "{} removed, {} bytes freed",
            rows.len(),
            report["freedBytes"].as_u64().unwrap_or(0)
        );
        Ok(ExitCode::SUCCESS)
    }
}
