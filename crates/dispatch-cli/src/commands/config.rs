//! `dispatch config get-contexts | current-context | use-context NAME | delete-context NAME`:
//! the contexts of the config file (`DISPATCH_CONFIG` or `~/.dispatch/config.json`, Dispatch's
//! format) that `dispatch login` writes, as kubectl's `config` has them. Tokens are never
//! printed.

use std::process::ExitCode;

use anyhow::{Result, bail};

use crate::config;
use crate::output::{Format, print_structured, table};

/// Show or switch the contexts `dispatch login` stored (server, namespace, token)
#[derive(Debug, clap::Args)]
pub struct Config {
    #[command(subcommand)]
    pub what: ConfigWhat,
}

#[derive(Debug, clap::Subcommand)]
pub enum ConfigWhat {
    /// List the contexts (CURRENT marks the one in use; tokens are not shown)
    GetContexts {
        /// Output format
        #[arg(short = 'o', long, value_enum, default_value_t = Format::Table)]
        output: Format,
    },
    /// Print the name of the context in use
    CurrentContext,
    /// Make NAME the context later commands use
    UseContext { name: String },
    /// Remove a context (and its token) from the config file
    DeleteContext { name: String },
}

impl Config {
    pub fn run(self) -> Result<ExitCode> {
        let Some(path) = config::default_path() else {
            bail!("no config file: set HOME or DISPATCH_CONFIG");
        };
        let mut cfg = config::load(&path)?;
        let known = |cfg: &config::Config, name: &str| -> Result<()> {
            if !cfg.contexts.contains_key(name) {
                let have: Vec<&str> = cfg.contexts.keys().map(String::as_str).collect();
                bail!(
                    "context {name:?} is not in {} (have: {}); dispatch login --context-name {name} adds it",
                    path.display(),
                    if have.is_empty() {
                        "none".to_string()
                    } else {
                        have.join(", ")
                    }
                );
            }
            Ok(())
        };
        match self.what {
            ConfigWhat::GetContexts { output } => {
                let rows: Vec<serde_json::Value> = cfg
                    .contexts
                    .iter()
                    .map(|(name, c)| {
                        serde_json::json!({
                            "name": name,
                            "current": *name == cfg.current,
                            "server": c.server_url(),
                            "namespace": c.namespace.clone().unwrap_or_else(|| dispatch_core::DEFAULT_NAMESPACE.into()),
                            "insecure": c.insecure,
                            "token": c.token.as_deref().is_some_and(|t| !t.is_empty()),
                        })
                    })
                    .collect();
                match output {
                    Format::Table => print!(
                        "{}",
                        table(
                            &["CURRENT", "NAME", "SERVER", "NAMESPACE", "TOKEN"],
                            &rows
                                .iter()
                                .map(|r| {
                                    let s = |k: &str| r[k].as_str().unwrap_or("-").to_string();
                                    vec![
                                        if r["current"] == true { "*" } else { "" }.into(),
                                        s("name"),
                                        s("server"),
                                        s("namespace"),
                                        if r["token"] == true { "set" } else { "none" }.into(),
                                    ]
                                })
                                .collect::<Vec<_>>()
                        )
                    ),
                    f => print_structured(&rows, f)?,
                }
            }
            ConfigWhat::CurrentContext => {
                if cfg.current.is_empty() {
                    bail!(
                        "no current context: dispatch login, or dispatch config use-context NAME"
                    );
                }
                println!("{}", cfg.current);
            }
            ConfigWhat::UseContext { name } => {
                known(&cfg, &name)?;
                cfg.current = name.clone();
                config::save(&path, &cfg)?;
                println!("switched to context {name}");
            }
            ConfigWhat::DeleteContext { name } => {
                known(&cfg, &name)?;
                cfg.contexts.remove(&name);
                if cfg.current == name {
                    cfg.current = String::new();
                }
                config::save(&path, &cfg)?;
                println!("context {name} deleted");
            }
        }
        Ok(ExitCode::SUCCESS)
    }
}
