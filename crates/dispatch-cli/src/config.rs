//! The CLI's config file, in Dispatch's format: `current` names one of `contexts`, each a
//! server (`host`, `port`, `scheme`, `insecure`) plus `namespace` and `token`. Read from
//! `DISPATCH_CONFIG` or `~/.dispatch/config.json`; flags and env vars win over it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Config {
    #[serde(default)]
    pub current: String,
    #[serde(default)]
    pub contexts: BTreeMap<String, Context>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Context {
    #[serde(default)]
    pub host: String,
    #[serde(default)]
    pub port: Option<u16>,
    #[serde(default)]
    pub scheme: Option<String>,
    #[serde(default)]
    pub insecure: bool,
    /// Dispatch called it `organization`.
    #[serde(default, alias = "organization")]
    pub namespace: Option<String>,
    #[serde(default)]
    pub token: Option<String>,
}

impl Context {
    /// `scheme://host:port`, defaults http and 8080.
    pub fn server_url(&self) -> Option<String> {
        if self.host.is_empty() {
            return None;
        }
        let scheme = self.scheme.as_deref().unwrap_or("http");
        let port = self.port.unwrap_or(8080);
        Some(format!("{scheme}://{}:{port}", self.host))
    }
}

/// `DISPATCH_CONFIG`, else `~/.dispatch/config.json`.
pub fn default_path() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("DISPATCH_CONFIG") {
        return Some(PathBuf::from(p));
    }
    home().map(|h| h.join(".dispatch").join("config.json"))
}

pub fn home() -> Option<PathBuf> {
    std::env::var_os("HOME").map(PathBuf::from)
}

/// The config at `path`; a missing file is an empty config, a broken one an error.
pub fn load(path: &Path) -> Result<Config> {
    match std::fs::read_to_string(path) {
        Ok(text) if text.trim().is_empty() => Ok(Config::default()),
        Ok(text) => serde_json::from_str(&text)
            .with_context(|| format!("config file {} is not valid JSON in Dispatch's format ({{\"current\": …, \"contexts\": {{…}}}})", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Config::default()),
        Err(e) => Err(e).with_context(|| format!("failed to read config file {}", path.display())),
    }
}

/// Writes the config (0600: it holds tokens), creating its folder.
pub fn save(path: &Path, cfg: &Config) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("failed to create {}", dir.display()))?;
    }
    let text = serde_json::to_string_pretty(cfg)?;
    let tmp = path.with_extension("json.tmp");
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .with_context(|| format!("failed to write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("failed to write {}", path.display()))?;
    Ok(())
}

impl Config {
    /// The named context, or the current one.
    pub fn context(&self, name: Option<&str>) -> Result<Option<&Context>> {
        match name {
            Some(n) => self.contexts.get(n).map(Some).with_context(|| {
                format!(
                    "context {n:?} is not in the config file (have: {})",
                    self.names()
                )
            }),
            None if self.current.is_empty() => Ok(None),
            None => Ok(self.contexts.get(&self.current)),
        }
    }

    fn names(&self) -> String {
        let v: Vec<&str> = self.contexts.keys().map(String::as_str).collect();
        if v.is_empty() {
            "none".into()
        } else {
            v.join(", ")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_dispatch_format() {
        let c: Config = serde_json::from_str(
            r#"{"current":"prod","contexts":{"prod":{"host":"d.example.com","port":443,"scheme":"https","insecure":true,"organization":"team","token":"t"}}}"#,
        )
        .unwrap();
        let ctx = c.context(None).unwrap().unwrap();
        assert_eq!(ctx.server_url().unwrap(), "https://d.example.com:443");
        assert_eq!(ctx.namespace.as_deref(), Some("team"));
        assert!(
            c.context(Some("nope"))
                .unwrap_err()
                .to_string()
                .contains("have: prod")
        );
        assert!(Config::default().context(None).unwrap().is_none());
    }
}
