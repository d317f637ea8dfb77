//! Real brokers for driver tests, started on free ports and stopped on drop: `nats-server`
//! (JetStream on request), `mosquitto`, and the Kafka-protocol broker `tansu`; a Kafka
//! producer. Used by the server's driver tests and the CLI's `kill -9` tests.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub use crate::free_port;

/// A broker program: PATH, or Debian's sbin folders.
pub fn broker_bin(name: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/local/sbin")])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("{name} is not installed (apt-get install {name}; .ci/run does)"))
}

/// The Kafka-protocol broker `tansu` (cargo install tansu --features dynostore; .ci/run
/// builds it once into a cache): `$TANSU`, PATH, or that cache folder.
pub fn tansu_bin() -> PathBuf {
    let cached = std::env::var_os("HOME")
        .map(|h| PathBuf::from(h).join(".cache/dispatch-tools/tansu/bin/tansu"));
    std::env::var_os("TANSU")
        .map(PathBuf::from)
        .into_iter()
        .chain(
            std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
                .map(|d| d.join("tansu")),
        )
        .chain(cached)
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "tansu is not installed (cargo install tansu --features dynostore; .ci/run does)"
            )
        })
}

pub struct Broker(Child);

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `program` and returns once it accepts connections on `port` (a driver created
/// before would start its reconnect backoff, which under load outlasts a test's deadline).
pub async fn broker(program: &Path, args: &[&str], port: u16) -> Broker {
    let name = program.display().to_string();
    let mut b = Broker(
        Command::new(program)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name}: {e}")),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    loop {
        tick.tick().await;
        if let Ok(Some(status)) = b.0.try_wait() {
            panic!("{name} exited ({status}) before listening on {port}: is the port taken?");
        }
        // Its own socket, not just something answering on the port: the kernel may have
        // handed the port to another listener (a test server's) since it was picked, and a
        // driver would then talk to that.
        if listens(b.0.id(), port) {
            return b;
        }
        assert!(
            Instant::now() < deadline,
            "{name} did not listen on 127.0.0.1:{port} in 30 s (does another process hold it?)"
        );
    }
}

/// Whether process `pid` itself holds a socket listening on 127.0.0.1 (or every IPv4
/// address) at `port`: its descriptors against the kernel's table of TCP sockets.
fn listens(pid: u32, port: u16) -> bool {
    listens_in("/proc/net/tcp", &["0100007F", "00000000"], pid, port)
}

/// Whether `pid` holds a socket listening at `port` on one of `addrs` (as the kernel's
/// table at `table` spells addresses).
fn listens_in(table: &str, addrs: &[&str], pid: u32, port: u16) -> bool {
    let Ok(table) = std::fs::read_to_string(table) else {
        return false;
    };
    // sl local_address rem_address st … inode: `0100007F:1F90 00000000:0000 0A … 12345`.
    let sockets: Vec<String> = table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (addr, p) = f.get(1)?.split_once(':')?;
            let ours = addrs.contains(&addr)
                && u16::from_str_radix(p, 16).ok()? == port
                && *f.get(3)? == "0A";
            let inode = f.get(9)?;
            ours.then(|| format!("socket:[{inode}]"))
        })
        .collect();
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.flatten().any(|fd| {
        std::fs::read_link(fd.path())
            .is_ok_and(|target| sockets.iter().any(|s| target.as_os_str() == s.as_str()))
    })
}

/// nats-server on `port`; with `jetstream`, JetStream on with its store in that folder.
pub async fn nats(port: u16, jetstream: Option<&Path>) -> Broker {
    let p = port.to_string();
    let mut args = vec!["-a", "127.0.0.1", "-p", &p];
    let store;
    if let Some(dir) = jetstream {
        store = dir.display().to_string();
        args.extend(["-js", "-sd", &store]);
    }
    broker(&broker_bin("nats-server"), &args, port).await
}

pub async fn mosquitto(port: u16) -> Broker {
    broker(&broker_bin("mosquitto"), &["-p", &port.to_string()], port).await
}

/// tansu (memory storage) on `port` with `topic` (one partition) created.
pub async fn tansu(port: u16, topic: &str) -> Broker {
    let url = format!("tcp://127.0.0.1:{port}");
    let b = broker(
        &tansu_bin(),
        &[
            "broker",
            "--listener-url",
            &url,
            "--advertised-listener-url",
            &url,
            "--storage-engine",
            "memory://tansu/",
        ],
        port,
    )
    .await;
    let status = Command::new(tansu_bin())
        .args([
            "topic",
            "create",
            topic,
            "--broker",
            &url,
            "--partitions",
            "1",
        ])
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "tansu topic create {topic}");
    b
}

/// Produces `values` on partition 0 of `topic`, one record per batch (tansu 0.6 cannot
/// resume inside a batch).
pub async fn produce(port: u16, topic: &str, values: impl IntoIterator<Item = String>) {
    let client = rskafka::client::ClientBuilder::new(vec![format!("127.0.0.1:{port}")])
        .build()
        .await
        .unwrap();
    let pc = client
        .partition_client(
            topic,
            0,
            rskafka::client::partition::UnknownTopicHandling::Retry,
        )
        .await
        .unwrap();
    for v in values {
        let record = rskafka::record::Record {
            key: None,
            value: Some(v.into_bytes()),
            headers: Default::default(),
            timestamp: chrono::Utc::now(),
        };
        pc.produce(vec![record], Default::default()).await.unwrap();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// mosquitto whose IPv4 port is taken keeps running on IPv6 only: something answers on
    /// 127.0.0.1 (what a connect-based check took for the broker, and a driver then hung
    /// talking to), but it is not the broker's socket.
    #[tokio::test]
    async fn a_broker_on_a_port_another_process_holds_is_not_taken_for_listening() {
        let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = held.local_addr().unwrap().port();
        let mut child = Command::new(broker_bin("mosquitto"))
            .args(["-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let pid = child.id();
        // Ready once its IPv6 socket listens (it gave up on IPv4 before opening that one).
        let deadline = Instant::now() + Duration::from_secs(30);
        while !listens_in(
            "/proc/net/tcp6",
            &[
                "00000000000000000000000001000000",
                "00000000000000000000000000000000",
            ],
            pid,
            port,
        ) {
            assert!(
                Instant::now() < deadline,
                "mosquitto never listened on IPv6"
            );
            assert!(child.try_wait().unwrap().is_none(), "mosquitto exited");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_ok());
        assert!(
            !listens(pid, port),
            "the IPv4 listener is this test's, not mosquitto's"
        );
        let _ = child.kill();
        let _ = child.wait();
        drop(held);
        // On a free port its own socket is seen.
        let b = mosquitto(crate::free_port()).await;
        drop(b);
    }
}
