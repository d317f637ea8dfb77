//! `dispatch exec FUNCTION [--input JSON]`: run a function and print its envelope. Reads the
//! input from stdin when `--input` is not given and stdin is not a terminal
//! (`dispatch exec hello <<< '{"name": "user"}'`). Exits 1 when `context.error` is set.

use std::io::{IsTerminal, Read};
use std::process::ExitCode;

use anyhow::{Context as _, Result};
use serde_json::value::RawValue;

use crate::Ctx;
use crate::output::{Format, print_structured};

/// Run a function and print {"context":{"logs","error"},"payload"} (or queue it: --async)
#[derive(Debug, clap::Args)]
pub struct Exec {
    /// FUNCTION (the build deployed now), FUNCTION@N (version N: `dispatch get versions`) or
    /// FUNCTION@ALIAS (a version the alias picks by weight)
    pub function: String,
    /// Payload as JSON; default: read from stdin (or null when stdin is a terminal)
    #[arg(long)]
    pub input: Option<String>,
    /// Output format of the envelope
    #[arg(short = 'o', long = "output", value_enum, default_value_t = Format::Json)]
    pub output: Format,
    /// Queue the run and return at once with its id (durable; retried per the function's
    /// retry policy); watch it with `dispatch get run ID` / `dispatch logs run ID --follow`
    #[arg(long = "async", conflicts_with = "wait")]
    pub is_async: bool,
    /// Run now and wait for the result (the default)
    #[arg(long)]
    pub wait: bool,
    /// With --async: POST the final run record to this URL
    #[arg(long, requires = "is_async", value_name = "URL")]
    pub callback_url: Option<String>,
    /// Print a streaming handler's chunks as they come (a Python generator); an error after
    /// the first chunk goes to stderr and exits 1. A handler that does not stream prints its
    /// envelope as usual
    #[arg(long, conflicts_with = "is_async")]
    pub stream: bool,
}

impl Exec {
    pub async fn run(self, ctx: &Ctx) -> Result<ExitCode> {
        let text = match self.input {
            Some(t) => t,
            None if std::io::stdin().is_terminal() => String::new(),
            None => {
                let mut s = String::new();
                std::io::stdin()
                    .read_to_string(&mut s)
                    .context("failed to read the input from stdin")?;
                s
            }
        };
        let text = if text.trim().is_empty() {
            "null".to_string()
        } else {
            text.trim().to_string()
        };
        let input = RawValue::from_string(text).map_err(|e| {
            anyhow::anyhow!("input is not valid JSON ({e}): pass a JSON value, e.g. --input '{{\"name\": \"user\"}}'")
        })?;
        if self.is_async {
            let accepted = ctx
                .client
                .exec_async(&self.function, &input, self.callback_url.as_deref())
                .await?;
            match self.output {
                Format::Yaml => print_structured(&accepted, Format::Yaml)?,
                Format::Name => {
                    let v = serde_json::to_value(&accepted)?;
                    println!(
                        "run/{}",
                        v["runId"].as_str().or(v["id"].as_str()).unwrap_or("-")
                    );
                }
                _ => print_structured(&accepted, Format::Json)?,
            }
            return Ok(ExitCode::SUCCESS);
        }
        if self.stream {
            use std::io::Write as _;
            let streamed = ctx
                .client
                .exec_stream(&self.function, &input, |chunk| {
                    let mut out = std::io::stdout().lock();
                    let _ = out.write_all(chunk.as_bytes());
                    let _ = out.flush();
                })
                .await?;
            match streamed {
                dispatch_client::Streamed::Whole(r) => {
                    print_structured(&r.envelope, Format::Json)?;
                    return Ok(if r.envelope.context.error.is_some() {
                        ExitCode::FAILURE
                    } else {
                        ExitCode::SUCCESS
                    });
                }
                dispatch_client::Streamed::Ended { .. } => {
                    println!();
                    return Ok(ExitCode::SUCCESS);
                }
                dispatch_client::Streamed::Failed { run_id, error } => {
                    println!();
                    let what = error["error"]["message"]
                        .as_str()
                        .or(error["message"].as_str())
                        .unwrap_or("the stream failed");
                    eprintln!("error: {what} (run {})", run_id.as_deref().unwrap_or("-"));
                    return Ok(ExitCode::FAILURE);
                }
            }
        }
        let r = ctx.client.exec(&self.function, &input).await?;
        match self.output {
            Format::Table | Format::Json | Format::Wide | Format::JsonPath => {
                print_structured(&r.envelope, Format::Json)?
            }
            // The run happened: its id is what names it.
            Format::Name => println!("run/{}", r.run_id.as_deref().unwrap_or("-")),
            Format::Yaml => print_structured(&serde_json::to_value(&r.envelope)?, Format::Yaml)?,
        }
        Ok(if r.envelope.context.error.is_some() {
            ExitCode::FAILURE
        } else {
            ExitCode::SUCCESS
        })
    }
}
