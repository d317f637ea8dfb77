//! A `dispatch server` process of its own for the soak, burst and fault runs: its memory,
//! open files and threads are the server's alone (the load generator stays in this process),
//! and it can be killed with SIGKILL and started again on the same data dir and ports.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use dispatch_client::{Client, Target};
use dispatch_core::{Kind, Object};
use serde::Serialize;
use serde_json::json;

use super::HELLO_PY;

pub struct ServerProcess {
    child: tokio::process::Child,
    pub pid: u32,
    pub data_dir: PathBuf,
    pub api: SocketAddr,
    pub gateway: SocketAddr,
    pub client: Client,
    args: Vec<String>,
    env: Vec<(String, String)>,
    /// The server's stderr (outside the data dir, so that it does not count in its size).
    pub log: PathBuf,
    _logs: tempfile::TempDir,
}

/// What the kernel says of one process: resident memory, open files, threads.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct ProcSample {
    pub rss_kib: u64,
    pub fds: u64,
    pub threads: u64,
}

/// Two free loopback addresses, distinct: both are bound before either is let go (two
/// addresses taken one after the other could be the same port, and the server would then
/// refuse to start: "address already in use").
pub fn free_addrs() -> Result<(SocketAddr, SocketAddr)> {
    let a = std::net::TcpListener::bind("127.0.0.1:0")?;
    let b = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok((a.local_addr()?, b.local_addr()?))
}

impl ServerProcess {
    /// Starts `dispatch server` (auth off, loopback, free ports) on `data_dir` with `extra`
    /// flags, and waits (up to a minute) for `/readyz`.
    pub async fn start(data_dir: &Path, extra: &[&str]) -> Result<ServerProcess> {
        Self::start_env(data_dir, extra, &[]).await
    }

    /// [`ServerProcess::start`] with environment variables for the server (kept on restart).
    pub async fn start_env(
        data_dir: &Path,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Result<ServerProcess> {
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let (api, gateway) = free_addrs()?;
        let mut args: Vec<String> = vec!["server".into(), "--insecure-no-auth".into()];
        args.extend(["--data-dir".into(), data_dir.display().to_string()]);
        args.extend(["--api-addr".into(), api.to_string()]);
        args.extend(["--gateway-addr".into(), gateway.to_string()]);
        args.extend(extra.iter().map(|s| s.to_string()));
        let logs = tempfile::Builder::new()
            .prefix("dispatch-bench-log-")
            .tempdir()?;
        let log = logs.path().join("server.log");
        let client = Client::new(&Target {
            server: format!("http://{api}"),
            token: None,
            namespace: "default".into(),
            insecure: false,
        })?;
        let child = spawn(&args, &env, &log)?;
        let mut s = ServerProcess {
            pid: child.id().context("the server has no pid")?,
            child,
            data_dir: data_dir.to_path_buf(),
            api,
            gateway,
            client,
            args,
            env,
            log,
            _logs: logs,
        };
        s.wait_ready().await?;
        Ok(s)
    }

    async fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !self.client.ready().await {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "dispatch server exited ({status}) before it was ready:\n{}",
                    self.log_tail()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "dispatch server was not ready within a minute:\n{}",
                    self.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    /// The last lines of the server's log.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }

    /// `kill -9` of the server (its workers, in their own process groups, notice their socket
    /// closing and exit).
    pub async fn kill9(&mut self) -> Result<()> {
        self.child.start_kill()?;
        self.child.wait().await?;
        Ok(())
    }

    /// Starts the server again on the same data dir, ports and flags.
    pub async fn restart(&mut self) -> Result<()> {
        if self.child.try_wait()?.is_none() {
            self.kill9().await?;
        }
        // The ports were the killed process's; they are free again at once (SO_REUSEADDR).
        self.child = spawn(&self.args, &self.env, &self.log)?;
        self.pid = self.child.id().context("the server has no pid")?;
        self.wait_ready().await
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    pub fn sample(&self) -> ProcSample {
        proc_sample(self.pid)
    }

    /// CPU time the server has used so far, all threads, user + system, in seconds (its
    /// workers are processes of their own and not counted).
    pub fn cpu_seconds(&self) -> f64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid)).unwrap_or_default();
        // After the command's closing parenthesis: state is field 3, utime 14, stime 15.
        let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
        let f: Vec<f64> = rest
            .split_whitespace()
            .map(|x| x.parse().unwrap_or(0.0))
            .collect();
        // Clock ticks of 1/100 s (USER_HZ on Linux).
        (f.get(11).unwrap_or(&0.0) + f.get(12).unwrap_or(&0.0)) / 100.0
    }

    /// One sample of `/metrics`: the value of the first line that starts with `series`.
    pub async fn metric(&self, series: &str) -> Option<f64> {
        let text = reqwest_get(&format!("http://{}/metrics", self.api))
            .await
            .ok()?;
        text.lines()
            .find(|l| l.starts_with(series))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    }

    /// Bytes of the SQLite databases (records and history, with their WALs) and of the
    /// whole data dir.
    pub fn disk(&self) -> (u64, u64) {
        let db = [
            "dispatch.db",
            "dispatch.db-wal",
            "history.db",
            "history.db-wal",
        ]
        .iter()
        .map(|f| std::fs::metadata(self.data_dir.join(f)).map_or(0, |m| m.len()))
        .sum();
        (db, dir_bytes(&self.data_dir))
    }

    /// The hello example as function `name` on image `image` (created if missing), with a
    /// gateway endpoint at `/{name}`; waits until it is READY.
    pub async fn deploy_hello(
        &self,
        image: &str,
        name: &str,
        spec: serde_json::Value,
    ) -> Result<()> {
        self.deploy(image, name, HELLO_PY, spec).await
    }

    /// Python `code` as function `name` (see [`ServerProcess::deploy_hello`]); `spec` adds
    /// fields to the function's spec.
    pub async fn deploy(
        &self,
        image: &str,
        name: &str,
        code: &str,
        spec: serde_json::Value,
    ) -> Result<()> {
        let c = &self.client;
        if c.get(Kind::Image, image).await.is_err() {
            c.create(&Object::new(
                Kind::Image,
                "default",
                image,
                json!({"baseImage": "python3"}),
            ))
            .await?;
        }
        let src = tempfile::tempdir()?;
        let file = src.path().join(format!("{name}.py"));
        std::fs::write(&file, code)?;
        let source = crate::commands::upload(c, "default", name, &file).await?;
        let mut body = json!({"image": image, "source": source});
        if let (Some(b), Some(extra)) = (body.as_object_mut(), spec.as_object()) {
            b.extend(extra.clone());
        }
        c.create(&Object::new(Kind::Function, "default", name, body))
            .await?;
        super::wait_ready(c, name).await?;
        c.create(&Object::new(
            Kind::Endpoint,
            "default",
            name,
            json!({"function": name, "methods": ["GET", "POST"], "paths": [format!("/{name}")]}),
        ))
        .await?;
        Ok(())
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

fn spawn(args: &[String], env: &[(String, String)], log: &Path) -> Result<tokio::process::Child> {
    let err = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
    tokio::process::Command::new(std::env::current_exe()?)
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(err)
        .kill_on_drop(true)
        .spawn()
        .context("starting dispatch server")
}

/// A plain GET with the client's HTTP stack, for `/metrics` and `/readyz`.
pub async fn reqwest_get(url: &str) -> Result<String> {
    let r = reqwest::Client::new()
        .get(url)
        .timeout(Duration::from_secs(10))
        .send()
        .await?;
    Ok(r.text().await?)
}

pub fn proc_sample(pid: u32) -> ProcSample {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|r| r.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count() as u64);
    ProcSample {
        rss_kib: field("VmRSS:"),
        fds,
        threads: field("Threads:"),
    }
}

fn dir_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => dir_bytes(&e.path()),
            Ok(t) if t.is_file() => e.metadata().map_or(0, |m| m.len()),
            _ => 0,
        })
        .sum()
}

/// The pids of every process whose parent is `pid`.
pub fn children(pid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|p| parent(*p) == Some(pid))
        .collect()
}

/// Every descendant of `pid`.
pub fn descendants(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let mut todo = vec![pid];
    while let Some(p) = todo.pop() {
        for c in children(p) {
            out.push(c);
            todo.push(c);
        }
    }
    out
}

pub fn parent(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) state ppid …": comm may hold spaces and parentheses.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split(' ').nth(1)?.parse().ok()
}

pub fn cmdline(pid: u32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
        .unwrap_or_default()
}
