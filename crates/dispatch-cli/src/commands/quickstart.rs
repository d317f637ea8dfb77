//! `dispatch quickstart`: the seed's quickstart in one command. Starts an embedded server on
//! free loopback ports with a fresh data dir, deploys the bundled examples (Python and Node
//! hello functions, an image for each, endpoints), execs them, prints the output and the
//! commands to try next, and serves until Ctrl-C.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context as _, Result};
use dispatch_client::{Client, Target};
use dispatch_core::{Kind, Object};
use serde_json::json;

use super::{ensure_ready, upload, wait_settled};

const HELLO_PY: &str = include_str!("../../../../examples/python3/hello.py");
const HELLO_JS: &str = include_str!("../../../../examples/nodejs/hello.js");

/// Start an embedded server, deploy the examples, exec them, keep serving until Ctrl-C
#[derive(Debug, clap::Args)]
pub struct Quickstart {
    /// Data dir (default: a fresh temporary one, removed on exit)
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// API address (port 0 = any free port)
    #[arg(long, default_value = "127.0.0.1:0")]
    pub api_addr: SocketAddr,
    /// Gateway address (port 0 = any free port)
    #[arg(long, default_value = "127.0.0.1:0")]
    pub gateway_addr: SocketAddr,
    /// Exit after the demo instead of serving until Ctrl-C
    #[arg(long)]
    pub exit: bool,
}

impl Quickstart {
    pub async fn run(self) -> Result<ExitCode> {
        let tmp;
        let data_dir = match self.data_dir {
            Some(d) => d,
            None => {
                tmp = tempfile::Builder::new()
                    .prefix("dispatch-quickstart-")
                    .tempdir()?;
                tmp.path().to_path_buf()
            }
        };
        let server = dispatch_server::Server::builder()
            .data_dir(&data_dir)
            .api_addr(self.api_addr)
            .gateway_addr(self.gateway_addr)
            .start()
            .await?;
        let api = format!("http://{}", server.api_addr);
        let gateway = format!("http://{}", server.gateway_addr);
        // The admin token of this data dir (written on its first start).
        let token_file = data_dir.join("admin-token");
        let token = std::fs::read_to_string(&token_file)
            .ok()
            .map(|t| t.trim().to_string());
        let client = Client::new(&Target {
            server: api.clone(),
            token: token.clone(),
            namespace: "default".into(),
            insecure: false,
        })?;
        let demo = deploy_and_exec(&client, &data_dir, &gateway).await;
        if let Err(e) = demo {
            server.stop().await?;
            return Err(e.context("quickstart failed"));
        }
        println!("\nTry it from another terminal:");
        println!("  export DISPATCH_SERVER={api}");
        if token.is_some() {
            println!("  export DISPATCH_TOKEN=$(cat {})", token_file.display());
        }
        println!("  dispatch get functions");
        println!("  dispatch exec hello <<< '{{\"name\": \"user\"}}'");
        println!("  curl '{gateway}/hello?name=Jon'");
        println!(
            "  curl -X POST {gateway}/hello -H 'Content-Type: application/json' -d '{{\"name\":\"Ann\",\"place\":\"Oslo\"}}'"
        );
        println!("  curl '{gateway}/hello-js?name=Node'");
        println!("  dispatch get runs");
        println!("Or open the web console: {api}/ui/ (paste the token)");
        if !self.exit {
            println!("\nServing until Ctrl-C.");
            super::server::shutdown_signal().await;
        }
        server.stop().await?;
        Ok(ExitCode::SUCCESS)
    }
}

async fn deploy_and_exec(c: &Client, data_dir: &std::path::Path, gateway: &str) -> Result<()> {
    let src = data_dir.join("quickstart-examples");
    std::fs::create_dir_all(&src)?;
    let examples = [
        ("python3", "hello", "hello.py", HELLO_PY, "/hello"),
        ("nodejs", "hello-js", "hello.js", HELLO_JS, "/hello-js"),
    ];
    for (image, ..) in &examples {
        c.create(&Object::new(
            Kind::Image,
            "default",
            image,
            json!({"baseImage": image}),
        ))
        .await
        .with_context(|| format!("creating image {image}"))?;
        println!("$ dispatch create image {image} {image}");
    }
    for (image, name, file, body, _) in &examples {
        let path = src.join(file);
        std::fs::write(&path, body)?;
        let source = upload(c, "default", name, &path).await?;
        c.create(&Object::new(
            Kind::Function,
            "default",
            name,
            json!({"image": image, "source": source}),
        ))
        .await
        .with_context(|| format!("creating function {name}"))?;
        println!(
            "$ dispatch create function {name} {} --image {image}",
            path.display()
        );
    }
    for (_, name, ..) in &examples {
        let f = wait_settled(c, Kind::Function, name, Duration::from_secs(120)).await?;
        ensure_ready(&f)?;
    }
    for (_, name, _, _, path) in &examples {
        let ep = format!("{name}-endpoint");
        c.create(&Object::new(
            Kind::Endpoint,
            "default",
            &ep,
            json!({"function": name, "methods": ["GET", "POST"], "paths": [path]}),
        ))
        .await?;
        println!("$ dispatch create endpoint {ep} {name} --method GET --method POST --path {path}");
    }
    println!(
        "\nfunctions:\n{}",
        crate::output::objects_table(Kind::Function, &c.list(Kind::Function).await?)
    );
    for (_, name, ..) in &examples {
        let input = serde_json::value::to_raw_value(&json!({"name": "user"}))?;
        let r = c.exec(name, &input).await?;
        println!("$ dispatch exec {name} <<< '{{\"name\": \"user\"}}'");
        println!("{}", serde_json::to_string_pretty(&r.envelope)?);
    }
    let http = reqwest::Client::new();
    let body = http
        .get(format!("{gateway}/hello?name=Jon"))
        .send()
        .await?
        .text()
        .await?;
    println!("$ curl '{gateway}/hello?name=Jon'\n{body}");
    Ok(())
}
