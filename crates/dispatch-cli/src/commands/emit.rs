//! `dispatch emit TYPE [--data JSON|-] [--source S] [--subject S]`: send a CloudEvent.

use std::io::Read;
use std::process::ExitCode;

use anyhow::{Context as _, Result};

use crate::Ctx;
use crate::output::{Format, print_structured};

/// Send a CloudEvent; subscriptions to its type run their functions
#[derive(Debug, clap::Args)]
pub struct Emit {
    /// Event type, e.g. order.created
    pub event_type: String,
    /// Data as JSON; `-` reads it from stdin
    #[arg(long)]
    pub data: Option<String>,
    /// Event source (default: dispatch-cli)
    #[arg(long, default_value = "dispatch-cli")]
    pub source: String,
    #[arg(long)]
    pub subject: Option<String>,
    /// Event id (default: a new ULID)
    #[arg(long)]
    pub id: Option<String>,
    #[arg(short = 'o', long = "output", value_enum, default_value_t = Format::Json)]
    pub output: Format,
}

impl Emit {
    pub async fn run(self, ctx: &Ctx) -> Result<ExitCode> {
        let data = match self.data.as_deref() {
            None => None,
            Some("-") => {
                let mut s = String::new();
                std::io::stdin()
                    .read_to_string(&mut s)
                    .context("failed to read the data from stdin")?;
                Some(s)
            }
            Some(d) => Some(d.to_string()),
        };
        let mut event = serde_json::json!({
            "specversion": "1.0",
            "id": self.id.unwrap_or_else(|| format!("{:032x}", std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0))),
            "source": self.source,
            "type": self.event_type,
        });
        if let Some(d) = data {
            let v: serde_json::Value =
                serde_json::from_str(&d).context("--data is not valid JSON")?;
            event["data"] = v;
            event["datacontenttype"] = "application/json".into();
        }
        if let Some(s) = self.subject {
            event["subject"] = s.into();
        }
        let r = ctx.client.emit(&event).await?;
        print_structured(
            &r,
            if self.output == Format::Yaml {
                Format::Yaml
            } else {
                Format::Json
            },
        )?;
        Ok(ExitCode::SUCCESS)
    }
}
