//! `dispatch describe KIND NAME`: one resource for people, as `kubectl describe` shows one —
//! its metadata, status (phase, reason, whether the controller has seen the current spec),
//! spec, and what is around it: a function's endpoints, subscriptions, async queue and recent
//! runs; an image's functions; a subscription's deliveries.

use std::process::ExitCode;

use anyhow::{Result, bail};
use dispatch_client::RunQuery;
use dispatch_core::{Kind, Object};

use crate::Ctx;

/// Show one resource in detail: status, spec, and what uses it (endpoints, runs, deliveries)
#[derive(Debug, clap::Args)]
#[command(
    long_about = "Shows one resource for people: its metadata, status (phase, reason, \
whether the controller has acted on the current spec), its spec, and what is around it — for a \
function the endpoints and subscriptions that call it, its async queue and its 5 newest runs; \
for an image the functions on it; for a subscription its deliveries. For scripts use \
`dispatch get KIND NAME -o json`.\n\nExample: dispatch describe function hello"
)]
pub struct Describe {
    /// base-image, image, function, endpoint, secret, subscription, eventdriver, jobtemplate
    pub kind: String,
    pub name: String,
}

/// `spec.field == name` of the objects of a kind: who refers to `name`.
async fn referring(ctx: &Ctx, kind: Kind, field: &str, name: &str) -> Result<Vec<String>> {
    Ok(ctx
        .client
        .list(kind)
        .await?
        .into_iter()
        .filter(|o| o.spec.get(field).and_then(|v| v.as_str()) == Some(name))
        .map(|o| o.name().to_string())
        .collect())
}

fn line(key: &str, value: impl std::fmt::Display) {
    println!("{:<20}{value}", format!("{key}:"));
}

fn list_or_none(v: &[String]) -> String {
    if v.is_empty() {
        "<none>".into()
    } else {
        v.join(", ")
    }
}

impl Describe {
    pub async fn run(self, ctx: &Ctx) -> Result<ExitCode> {
        let Some(kind) = Kind::parse(&self.kind) else {
            let kinds: Vec<&str> = Kind::ALL.iter().map(|k| k.cli_name()).collect();
            bail!(
                "unknown kind {:?}: describe one of {} (runs: dispatch get run ID)",
                self.kind,
                kinds.join(", ")
            );
        };
        let c = &ctx.client;
        let o: Object = c.get(kind, &self.name).await?;
        line("Name", o.name());
        line("Namespace", o.namespace());
        line("Kind", kind.as_str());
        line("Labels", list_or_none(&crate::output::labels(&o)));
        line("Created", crate::output::date(o.metadata.created_at));
        line("Phase", crate::output::phase(&o));
        if !o.status.reason.is_empty() {
            line("Reason", &o.status.reason);
        }
        if let Some(d) = &o.status.digest {
            line("Digest", d);
        }
        if let Some(i) = &o.status.image {
            line("Runs image", i);
        }
        if let Some(t) = o.status.next_fire {
            line("Next fire", crate::output::date(Some(t)));
        }
        if let (Some(g), Some(seen)) = (o.metadata.generation, o.status.observed_generation)
            && seen < g
        {
            line(
                "Pending",
                format!("generation {g} not yet acted on (the status is of {seen})"),
            );
        }
        println!("Spec:");
        let spec = serde_saphyr::to_string(&o.spec).unwrap_or_default();
        for l in spec.lines() {
            println!("  {l}");
        }
        match kind {
            Kind::Function => {
                line(
                    "Endpoints",
                    list_or_none(&referring(ctx, Kind::Endpoint, "function", o.name()).await?),
                );
                line(
                    "Subscriptions",
                    list_or_none(&referring(ctx, Kind::Subscription, "function", o.name()).await?),
                );
                super::get::print_queue(&c.function_queue(o.name()).await?);
                let runs = c
                    .list_runs(&RunQuery {
                        function: Some(o.name().to_string()),
                        limit: Some(5),
                        ..Default::default()
                    })
                    .await?;
                println!("\nRecent runs:");
                if runs.is_empty() {
                    println!("  <none>");
                }
                for r in &runs {
                    let took = match (r.started_at, r.finished_at) {
                        (Some(s), Some(f)) => {
                            format!("{} ms", f.duration_since(s).as_millis().max(0))
                        }
                        _ => "-".into(),
                    };
                    println!(
                        "  {}  {:<10} {:<8} {}  {took}",
                        r.id,
                        r.status.to_string(),
                        format!("{:?}", r.trigger).to_lowercase(),
                        crate::output::date(Some(r.created_at))
                    );
                }
            }
            Kind::Image => line(
                "Functions",
                list_or_none(&referring(ctx, Kind::Function, "image", o.name()).await?),
            ),
            Kind::BaseImage => line(
                "Images",
                list_or_none(&referring(ctx, Kind::Image, "baseImage", o.name()).await?),
            ),
            Kind::Subscription => {
                super::get::print_deliveries(&c.subscription_deliveries(o.name()).await?)
            }
            _ => {}
        }
        Ok(ExitCode::SUCCESS)
    }
}
