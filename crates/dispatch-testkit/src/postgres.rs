//! A real PostgreSQL for store and server tests: `initdb` on a temporary folder, `pg_ctl`
//! start on a free port (`-w`: it returns once the server takes connections), its log inside
//! the data dir, trust authentication on 127.0.0.1 only; stopped on drop. Debian's
//! `postgresql` package (.ci/run installs it) keeps its programs in
//! `/usr/lib/postgresql/VERSION/bin`. `initdb` refuses to run as root, so under root the
//! programs run as the `postgres` user (which the package creates).

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::free_port;

/// A PostgreSQL program: PATH, else the newest `/usr/lib/postgresql/*/bin`.
pub fn pg_bin(name: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|d| d.flatten().map(|e| e.path().join("bin")).collect())
        .unwrap_or_default();
    versions.sort_by_key(|p| {
        p.parent()
            .and_then(|v| v.file_name()?.to_str()?.parse::<u32>().ok())
            .unwrap_or(0)
    });
    std::env::split_paths(&path)
        .chain(versions.into_iter().rev())
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!("{name} is not installed (apt-get install postgresql; .ci/run does)")
        })
}

/// See the module docs.
pub struct Postgres {
    dir: tempfile::TempDir,
    port: u16,
    /// `Some("postgres")` when the programs run as that user (tests under root).
    user: Option<&'static str>,
}

fn is_root() -> bool {
    // The effective uid, as the kernel reports it for this process.
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

impl Postgres {
    /// Starts one (a few seconds: initdb, then the server).
    pub fn start() -> Postgres {
        Self::start_with(false)
    }

    /// Starts one that takes TCP connections over TLS only (`hostssl` in `pg_hba.conf`, plain
    /// ones rejected), with a server certificate for `localhost` and `127.0.0.1` signed by a
    /// CA of its own ([`Postgres::ca_file`]), made with `openssl`.
    pub fn start_tls() -> Postgres {
        Self::start_with(true)
    }

    fn start_with(tls: bool) -> Postgres {
        let user = is_root().then_some("postgres");
        let dir = tempfile::Builder::new()
            .prefix("dispatch-pg-")
            .tempdir()
            .expect("a temporary folder");
        if let Some(u) = user {
            let ok = Command::new("chown")
                .args(["-R", &format!("{u}:{u}")])
                .arg(dir.path())
                .status()
                .is_ok_and(|s| s.success());
            assert!(ok, "chown of the PostgreSQL folder to {u}");
        }
        let pg = Postgres {
            port: free_port(),
            user,
            dir,
        };
        let data = pg.data();
        pg.run(
            "initdb",
            &[
                "-D",
                &data,
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
            ],
        );
        let mut options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200",
            pg.port, data
        );
        if tls {
            pg.certificates();
            std::fs::write(
                Path::new(&data).join("pg_hba.conf"),
                "local all all trust\nhostssl all all 127.0.0.1/32 trust\nhostnossl all all 0.0.0.0/0 reject\n",
            )
            .expect("writing pg_hba.conf");
            options.push_str(&format!(
                " -c ssl=on -c ssl_cert_file={data}/server.crt -c ssl_key_file={data}/server.key"
            ));
        }
        pg.run(
            "pg_ctl",
            &[
                "-D",
                &data,
                "-o",
                &options,
                "-l",
                &format!("{data}/postgres.log"),
                "-w",
                "-t",
                "60",
                "start",
            ],
        );
        pg
    }

    /// The CA that signed the server's certificate (PEM), for [`Postgres::start_tls`].
    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("ca.crt")
    }

    /// A CA and a server certificate signed by it, into the folder (the key readable by the
    /// server only, as PostgreSQL demands).
    fn certificates(&self) {
        let dir = self.dir.path();
        let data = self.data();
        let openssl = |args: &[&str]| {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(dir)
                .output()
                .expect("openssl (apt-get install openssl)");
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        openssl(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=dispatch test CA",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
        ]);
        std::fs::write(
            dir.join("san.cnf"),
            "subjectAltName=DNS:localhost,IP:127.0.0.1\n",
        )
        .expect("writing san.cnf");
        openssl(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=localhost",
            "-keyout",
            &format!("{data}/server.key"),
            "-out",
            "server.csr",
        ]);
        openssl(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "san.cnf",
            "-out",
            &format!("{data}/server.crt"),
        ]);
        let key = format!("{data}/server.key");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600))
            .expect("chmod of the server key");
        if let Some(u) = self.user {
            let ok = Command::new("chown")
                .args(["-R", &format!("{u}:{u}"), &data])
                .status()
                .is_ok_and(|s| s.success());
            assert!(ok, "chown of the certificates to {u}");
        }
    }

    fn data(&self) -> String {
        self.dir.path().join("data").display().to_string()
    }

    /// Runs a PostgreSQL program to its end (as the `postgres` user under root); panics with
    /// its output if it fails.
    fn run(&self, program: &str, args: &[&str]) {
        let out = self
            .command(program)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("running {program}: {e}"));
        assert!(
            out.status.success(),
            "{program} failed: {}\n{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// A PostgreSQL program, as the `postgres` user under root, in the temporary folder.
    fn command(&self, program: &str) -> Command {
        let bin = pg_bin(program);
        let mut cmd = match self.user {
            Some(u) => {
                let mut c = Command::new("runuser");
                c.args(["-u", u, "--"]).arg(&bin);
                c
            }
            None => Command::new(&bin),
        };
        cmd.current_dir(self.dir.path());
        cmd
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The URL of database `name` (see [`Postgres::create_database`]).
    pub fn url(&self, name: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{name}", self.port)
    }

    /// Creates an empty database and returns its URL.
    pub fn create_database(&self, name: &str) -> String {
        let port = self.port.to_string();
        self.run(
            "createdb",
            &["-h", "127.0.0.1", "-p", &port, "-U", "postgres", name],
        );
        self.url(name)
    }

    /// The server's log so far (for a failing test's message).
    pub fn log(&self) -> String {
        std::fs::read_to_string(Path::new(&self.data()).join("postgres.log")).unwrap_or_default()
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let data = self.data();
        let _ = self
            .command("pg_ctl")
            .args(["-D", &data, "-m", "immediate", "-w", "stop"])
            .output();
    }
}
