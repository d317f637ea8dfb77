//! `dispatch login --server URL --token T`: checks the token and stores a context in the
//! config file (Dispatch's format), making it the current one.

use std::process::ExitCode;

use anyhow::{Context as _, Result, bail};
use dispatch_client::{Client, Target};

use crate::config::{self, Context};

/// Check a server and token, and save them as the current context of the config file
#[derive(Debug, clap::Args)]
pub struct Login {
    /// Server URL, e.g. https://dispatch.example.com:8080
    #[arg(long)]
    pub server: String,
    /// API token (from `dispatch create token`, or the server's DATA_DIR/admin-token)
    #[arg(long, env = "DISPATCH_TOKEN", hide_env_values = true)]
    pub token: String,
    /// Context name (default: the server's host)
    #[arg(long = "context-name")]
    pub context_name: Option<String>,
    /// Default namespace of the context (default: the token's, else "default")
    #[arg(long)]
    pub namespace: Option<String>,
    /// Accept any TLS certificate
    #[arg(long)]
    pub insecure: bool,
}

impl Login {
    pub async fn run(self) -> Result<ExitCode> {
        let (scheme, rest) = self.server.split_once("://").with_context(|| {
            format!(
                "{:?} is not a URL: write http://host:port or https://host:port",
                self.server
            )
        })?;
        let hostport = rest.trim_end_matches('/');
        let (host, port) = match hostport.rsplit_once(':') {
            Some((h, p)) => (
                h.to_string(),
                p.parse::<u16>()
                    .with_context(|| format!("bad port in {:?}", self.server))?,
            ),
            None => (
                hostport.to_string(),
                if scheme == "https" { 443 } else { 80 },
            ),
        };
        if scheme != "http" && scheme != "https" {
            bail!("scheme {scheme:?} is not supported: use http or https");
        }
        let client = Client::new(&Target {
            server: self.server.clone(),
            token: Some(self.token.clone()),
            namespace: "default".into(),
            insecure: self.insecure,
        })?;
        let me = client
            .whoami()
            .await
            .context("the server refused the token")?;
        let token_ns = me["namespace"].as_str().unwrap_or("default");
        let namespace = self.namespace.clone().unwrap_or_else(|| {
            if token_ns == "*" {
                "default".into()
            } else {
                token_ns.to_string()
            }
        });
        let path = config::default_path().context("HOME is not set: set DISPATCH_CONFIG")?;
        let mut cfg = config::load(&path)?;
        let name = self.context_name.clone().unwrap_or_else(|| host.clone());
        cfg.contexts.insert(
            name.clone(),
            Context {
                host,
                port: Some(port),
                scheme: Some(scheme.to_string()),
                insecure: self.insecure,
                namespace: Some(namespace.clone()),
                token: Some(self.token.clone()),
            },
        );
        cfg.current = name.clone();
        config::save(&path, &cfg)?;
        println!(
            "logged in to {} as {} ({}, namespace {}); context {name:?} saved in {}",
            self.server,
            me["name"].as_str().unwrap_or("?"),
            me["role"].as_str().unwrap_or("?"),
            if token_ns == "*" {
                "all".to_string()
            } else {
                token_ns.to_string()
            },
            path.display()
        );
        Ok(ExitCode::SUCCESS)
    }
}
