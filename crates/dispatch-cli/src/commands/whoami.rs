//! `dispatch whoami`: who the server takes this CLI for (`GET /v1/whoami`) and where it is
//! pointed: the token's name, role and namespace, the server and the namespace in use.

use std::process::ExitCode;

use anyhow::Result;

use crate::Ctx;
use crate::output::{Format, print_structured};

/// Show who the server takes you for: token name, role, namespaces it covers
#[derive(Debug, clap::Args)]
#[command(
    long_about = "Asks the server who the current token is (GET /v1/whoami): its name, \
role and the namespace it covers (* for all), with the server and the namespace this CLI uses. \
Without a token on a server run with --insecure-no-auth the answer is an anonymous admin.\n\n\
Example: dispatch whoami -o json"
)]
pub struct Whoami {
    /// Output format
    #[arg(short = 'o', long, value_enum, default_value_t = Format::Table)]
    pub output: Format,
}

impl Whoami {
    pub async fn run(self, ctx: &Ctx) -> Result<ExitCode> {
        let mut me = ctx.client.whoami().await?;
        if let Some(m) = me.as_object_mut() {
            m.insert("server".into(), ctx.client.server().into());
            m.insert("currentNamespace".into(), ctx.client.namespace().into());
        }
        match self.output {
            Format::Table => {
                let s = |k: &str| me[k].as_str().unwrap_or("").to_string();
                let covers = if me["allNamespaces"].as_bool() == Some(true) {
                    "all namespaces".to_string()
                } else {
                    format!("namespace {}", s("namespace"))
                };
                println!(
                    "{} ({}, {covers}) at {}, using namespace {}",
                    s("name"),
                    s("role"),
                    s("server"),
                    s("currentNamespace")
                );
            }
            f => print_structured(&me, f)?,
        }
        Ok(ExitCode::SUCCESS)
    }
}
