//! `dispatch update function NAME PATH`: new source (and settings) for an existing function;
//! `dispatch update secret`, `dispatch update namespace NAME --run-history-budget SIZE`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use dispatch_core::Kind;

use super::{ensure_ready, say, upload, wait_settled};
use crate::Ctx;

/// Change an existing resource: a function's source and settings, a secret's data, a
/// namespace's settings
#[derive(Debug, clap::Args)]
pub struct Update {
    #[command(subcommand)]
    pub what: UpdateWhat,
}

#[derive(Debug, clap::Subcommand)]
pub enum UpdateWhat {
    /// Replace a secret's data (functions using it get the new values)
    Secret {
        name: String,
        #[command(flatten)]
        data: super::create::SecretArgs,
    },
    /// A namespace's settings (cluster admin):
    /// `dispatch update namespace team-a --run-history-budget 2Gi`
    Namespace {
        name: String,
        /// Its own budget for run records (e.g. 2Gi); `default`: the server's
        /// --run-history-budget again. Retention applies it within a second
        #[arg(long, value_name = "SIZE|default")]
        run_history_budget: String,
    },
    /// Where an alias points: `dispatch update alias hello prod --traffic 3=50,4=50` (ends a
    /// promotion under way)
    #[command(disable_version_flag = true)]
    Alias {
        #[command(flatten)]
        target: super::create::AliasArgs,
    },
    /// New source (file or folder) and settings: a new digest, traffic moves when it is READY
    Function {
        name: String,
        /// Source file or folder; omitted = keep the current source
        path: Option<PathBuf>,
        #[arg(long)]
        image: Option<String>,
        #[command(flatten)]
        handler: super::create::HandlerArgs,
        #[command(flatten)]
        limits: Box<super::create::LimitArgs>,
        #[command(flatten)]
        wait: super::WaitArgs,
    },
}

impl Update {
    pub async fn run(self, ctx: &Ctx) -> Result<ExitCode> {
        let c = &ctx.client;
        let (name, path, image, handler, limits, wait) = match self.what {
            UpdateWhat::Secret { name, data } => {
                let data = data.data()?;
                let mut o = c.get(Kind::Secret, &name).await?;
                o.spec = serde_json::to_value(dispatch_core::SecretSpec { data })?;
                let updated = c.update(&o).await?;
                say(&updated, "updated");
                return Ok(ExitCode::SUCCESS);
            }
            UpdateWhat::Alias { target } => {
                let mut o = c.get(Kind::Alias, &target.name()).await?;
                o.spec = serde_json::to_value(target.spec()?)?;
                let updated = c.update(&o).await?;
                say(&updated, "updated");
                return Ok(ExitCode::SUCCESS);
            }
            UpdateWhat::Namespace {
                name,
                run_history_budget,
            } => {
                let budget = match run_history_budget.as_str() {
                    "default" => serde_json::Value::Null,
                    b => b.into(),
                };
                let ns = c
                    .patch_namespace(&name, serde_json::json!({"runHistoryBudget": budget}))
                    .await?;
                let h = &ns["status"]["runHistory"];
                println!(
                    "namespace/{name} updated (run history {} of {}, from the {})",
                    human(h["bytes"].as_u64()),
                    human(h["budget"].as_u64()),
                    h["budgetFrom"].as_str().unwrap_or("server")
                );
                return Ok(ExitCode::SUCCESS);
            }
            UpdateWhat::Function {
                name,
                path,
                image,
                handler,
                limits,
                wait,
            } => (name, path, image, handler, limits, wait),
        };
        let mut o = c.get(Kind::Function, &name).await?;
        let mut spec: dispatch_core::FunctionSpec = o.typed_spec()?;
        if let Some(p) = &path {
            spec.source = Some(upload(c, c.namespace(), &name, p).await?);
        }
        if let Some(i) = image {
            spec.image = i;
        }
        handler.apply(&mut spec)?;
        limits.apply(&mut spec)?;
        o.spec = serde_json::to_value(&spec)?;
        let before = o.metadata.generation;
        let updated = c.update(&o).await?;
        say(
            &updated,
            if updated.metadata.generation == before {
                "unchanged"
            } else {
                "updated"
            },
        );
        if wait.resolve() {
            // The controller may not have seen the new generation yet.
            let deadline = std::time::Instant::now() + super::create::WAIT;
            loop {
                let cur = wait_settled(c, Kind::Function, &name, super::create::WAIT).await?;
                if cur.status.observed_generation >= updated.metadata.generation
                    || std::time::Instant::now() > deadline
                {
                    ensure_ready(&cur)?;
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
        Ok(ExitCode::SUCCESS)
    }
}

/// A size for people; `None`: no budget.
fn human(bytes: Option<u64>) -> String {
    bytes.map_or_else(
        || "no budget".to_string(),
        dispatch_core::quantity::human_bytes,
    )
}
