//! `dispatch redeliver event ID | subscription NAME`: dead event deliveries (not queued
//! before their event's TTL ended) become pending again, with a new TTL.

use std::process::ExitCode;

use anyhow::{Result, bail};

use crate::Ctx;
use crate::output::{Format, print_structured};

/// Deliver dead event deliveries again (see `dispatch get events --undelivered`)
#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:\n  \
    dispatch get events --undelivered\n  \
    dispatch redeliver event 01JF3Z…           # that event's dead deliveries\n  \
    dispatch redeliver subscription orders    # every dead delivery of the subscription")]
pub struct Redeliver {
    /// event or subscription
    pub kind: String,
    /// The event id, or the subscription name
    pub name: String,
    /// Event: its source, when two sources sent the same id
    #[arg(long)]
    pub source: Option<String>,
    /// Output format
    #[arg(short = 'o', long = "output", value_enum, default_value_t = Format::Table)]
    pub output: Format,
}

impl Redeliver {
    pub async fn run(self, ctx: &Ctx) -> Result<ExitCode> {
        let c = &ctx.client;
        let r = match self.kind.to_ascii_lowercase().as_str() {
            "event" | "events" => {
                c.redeliver_event(&self.name, self.source.as_deref())
                    .await?
            }
            "subscription" | "subscriptions" if self.source.is_some() => {
                bail!("--source is for events: dispatch redeliver event ID --source S")
            }
            "subscription" | "subscriptions" => c.redeliver_subscription(&self.name).await?,
            other => {
                bail!("cannot redeliver {other:?}: dispatch redeliver event ID | subscription NAME")
            }
        };
        match self.output {
            Format::Table => println!(
                "{} dead deliveries pending again",
                r["redelivered"].as_u64().unwrap_or(0)
            ),
            f => print_structured(&r, f)?,
        }
        Ok(ExitCode::SUCCESS)
    }
}
