//! The `dispatch` command line: one file per command under [`commands`], each a clap struct
//! with `async fn run(self, ctx)`. [`run`] resolves where the server is (flags, env, the
//! config file's context) and hands the command a [`Ctx`].
//!
//! Failures are `anyhow` errors; `main` prints them as one `error: …` line (plus the cause
//! chain and a hint) and exits 1, like Dispatch's CLI.

pub mod commands;
pub mod config;
pub mod jsonpath;
pub mod output;

use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};
use dispatch_client::{Client, Target};

#[derive(Debug, Parser)]
#[command(
    name = "dispatch",
    version,
    about = "Dispatch: functions and jobs, embedded on one machine or on Kubernetes",
    long_about = "Dispatch runs your handlers (Python, Node or any executable) as functions: \
create a base image and an image, create a function from a file or folder, then exec it or \
expose it as an HTTP endpoint.\n\nStart here: `dispatch quickstart` (an embedded server with \
the examples deployed), or `dispatch server` in one terminal and the commands below in another.",
    after_long_help = "The HTTP API these commands call is described by an OpenAPI 3.1 document \
on the server: GET /v1/openapi.json on the API port (e.g. http://127.0.0.1:8080/v1/openapi.json), \
for client generators and API testers.",
    propagate_version = true
)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, clap::Args)]
pub struct Global {
    /// API server URL (default: the config file's current context, else http://127.0.0.1:8080)
    #[arg(long, global = true, env = "DISPATCH_SERVER", value_name = "URL")]
    pub server: Option<String>,
    /// API token (sent as a Bearer token)
    #[arg(long, global = true, env = "DISPATCH_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Namespace (Dispatch's organization); default: the context's, else "default"
    #[arg(long, short = 'n', global = true, env = "DISPATCH_NAMESPACE")]
    pub namespace: Option<String>,
    /// Context of the config file to use (default: its `current`)
    #[arg(long, global = true, env = "DISPATCH_CONTEXT")]
    pub context: Option<String>,
    /// Accept any TLS certificate (self-signed servers); a context's `insecure` does the same
    #[arg(long, global = true, env = "DISPATCH_INSECURE")]
    pub insecure: bool,
    /// Log more (-v info, -vv debug); RUST_LOG overrides
    #[arg(long, short = 'v', global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// How this program's own log lines (stderr) are written: text, or json — one object a
    /// line with timestamp, level, fields and message, for log collectors. Text has colours
    /// only when stderr is a terminal.
    #[arg(
        long,
        global = true,
        env = "DISPATCH_LOG_FORMAT",
        value_enum,
        default_value_t = LogFormat::Text
    )]
    pub log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    Server(Box<commands::server::Server>),
    Quickstart(commands::quickstart::Quickstart),
    Create(commands::create::Create),
    Apply(commands::apply::Apply),
    Diff(commands::diff::Diff),
    Get(commands::get::Get),
    Describe(commands::describe::Describe),
    Update(commands::update::Update),
    Delete(commands::delete::Delete),
    Exec(commands::exec::Exec),
    Emit(commands::emit::Emit),
    Execute(commands::execute::Execute),
    Logs(commands::logs::Logs),
    Cancel(commands::cancel::Cancel),
    Redeliver(commands::redeliver::Redeliver),
    Rollback(commands::rollback::Rollback),
    Promote(commands::promote::Promote),
    Runs(commands::runs::Runs),
    Gc(commands::gc::Gc),
    Version(commands::version::Version),
    Whoami(commands::whoami::Whoami),
    Config(commands::config::Config),
    Explain(commands::explain::Explain),
    Completion(commands::completion::Completion),
    #[command(name = "__complete-names", hide = true)]
    CompleteNames(commands::completion::CompleteNames),
    Login(commands::login::Login),
    Runner(commands::runner::Runner),
    Bench(commands::bench::Bench),
    K8s(commands::k8s::K8s),
}

/// What a command needs: the resolved target and a client for it.
pub struct Ctx {
    pub target: Target,
    pub client: Client,
}

impl Ctx {
    /// Resolves the server, token and namespace: flags and env first, then the config file.
    pub fn resolve(g: &Global) -> Result<Ctx> {
        let cfg = match config::default_path() {
            Some(p) => config::load(&p)?,
            None => config::Config::default(),
        };
        let ctx = cfg
            .context(g.context.as_deref())?
            .cloned()
            .unwrap_or_default();
        let server = g
            .server
            .clone()
            .filter(|s| !s.is_empty())
            .or_else(|| ctx.server_url())
            .unwrap_or_else(|| "http://127.0.0.1:8080".to_string());
        let target = Target {
            server,
            token: g
                .token
                .clone()
                .filter(|t| !t.is_empty())
                .or(ctx.token.filter(|t| !t.is_empty())),
            namespace: g
                .namespace
                .clone()
                .or(ctx.namespace)
                .unwrap_or_else(|| dispatch_core::DEFAULT_NAMESPACE.to_string()),
            insecure: g.insecure || ctx.insecure,
        };
        dispatch_core::names::validate_name("namespace", &target.namespace)?;
        let client = Client::new(&target)?;
        Ok(Ctx { target, client })
    }
}

/// The command line, with the client's global flags (`--server`, `--token`, `-n`,
/// `--context`, `--insecure`) out of the help of the commands that do not talk to a server
/// as a client (`server`, `runner`, `completion`, `bench`, `k8s`, `quickstart`): each gets
/// hidden flags of the same ids, which clap then does not propagate the global ones over.
/// They are still accepted there, and mean nothing.
pub fn parse() -> Result<Cli, clap::Error> {
    use clap::{Arg, ArgAction, CommandFactory as _, FromArgMatches as _};
    let mut cmd = Cli::command();
    for sub in [
        "server",
        "runner",
        "completion",
        "bench",
        "k8s",
        "quickstart",
    ] {
        cmd = cmd.mut_subcommand(sub, |c| {
            let hidden = |id: &'static str| Arg::new(id).long(id).hide(true);
            c.arg(hidden("server").num_args(1))
                .arg(hidden("token").num_args(1))
                .arg(hidden("namespace").short('n').num_args(1))
                .arg(hidden("context").num_args(1))
                .arg(hidden("insecure").action(ArgAction::SetTrue))
        });
    }
    let matches = cmd.try_get_matches()?;
    Cli::from_arg_matches(&matches)
}

pub async fn run(cli: Cli) -> Result<ExitCode> {
    use Command::*;
    // Client commands end quietly when their reader goes (`| head`); a server, or a command
    // that runs one, must not end because its stdout went away.
    if !matches!(
        cli.command,
        Server(_) | Quickstart(_) | Runner(_) | Bench(_) | K8s(_)
    ) {
        output::quiet_on_closed_stdout();
    }
    // Commands that need no server connection.
    match cli.command {
        Server(c) => return c.run().await,
        Quickstart(c) => return c.run().await,
        Completion(c) => return c.run(),
        CompleteNames(c) => return c.run(&cli.global).await,
        Config(c) => return c.run(),
        Explain(c) => return c.run(),
        Login(c) => return c.run().await,
        Runner(c) => return c.run().await,
        Bench(c) => return c.run().await,
        K8s(c) => return c.run().await,
        _ => {}
    }
    let ctx = Ctx::resolve(&cli.global)?;
    match cli.command {
        Create(c) => c.run(&ctx).await,
        Apply(c) => c.run(&ctx).await,
        Diff(c) => c.run(&ctx).await,
        Get(c) => c.run(&ctx).await,
        Describe(c) => c.run(&ctx).await,
        Update(c) => c.run(&ctx).await,
        Delete(c) => c.run(&ctx).await,
        Exec(c) => c.run(&ctx).await,
        Emit(c) => c.run(&ctx).await,
        Execute(c) => c.run(&ctx).await,
        Logs(c) => c.run(&ctx).await,
        Cancel(c) => c.run(&ctx).await,
        Redeliver(c) => c.run(&ctx).await,
        Rollback(c) => c.run(&ctx).await,
        Promote(c) => c.run(&ctx).await,
        Runs(c) => c.run(&ctx).await,
        Gc(c) => c.run(&ctx).await,
        Version(c) => c.run(&ctx).await,
        Whoami(c) => c.run(&ctx).await,
        Server(_) | Quickstart(_) | Completion(_) | CompleteNames(_) | Config(_) | Explain(_)
        | Login(_) | Runner(_) | K8s(_) | Bench(_) => {
            unreachable!("handled above")
        }
    }
}

/// Set once by [`init_tracing`]: the program's log lines are JSON.
static LOG_JSON: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// A long-running command's word to its operator (where it listens, what isolation it has):
/// a plain line on stderr, or with `--log-format json` an info event like the others, so that
/// every line of stderr parses.
pub fn say(message: &str) {
    if LOG_JSON.load(std::sync::atomic::Ordering::Relaxed) {
        tracing::info!("{message}");
    } else {
        eprintln!("{message}");
    }
}

pub fn init_tracing(cli: &Cli) {
    LOG_JSON.store(
        cli.global.log_format == LogFormat::Json,
        std::sync::atomic::Ordering::Relaxed,
    );
    let default = match (&cli.command, cli.global.verbose) {
        (_, 2..) => "debug",
        (_, 1) => "info",
        (Command::Server(_) | Command::Quickstart(_), _) => "info",
        _ => "warn",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match cli.global.log_format {
        // The target says which log a line belongs to (`dispatch::access` for the access log).
        LogFormat::Json => fmt.json().flatten_event(true).try_init(),
        // Colour codes only for a terminal: in a file or a journal they are noise.
        LogFormat::Text => fmt
            .with_target(false)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .try_init(),
    };
}

/// Prints `error: <message>` with the cause chain, and a hint when one helps.
pub fn print_error(err: &anyhow::Error) {
    let mut line = err.to_string();
    for cause in err.chain().skip(1) {
        let c = cause.to_string();
        if !line.contains(&c) {
            line.push_str(": ");
            line.push_str(&c);
        }
    }
    eprintln!("error: {line}");
    if let Some(hint) = hint(err) {
        eprintln!("hint: {hint}");
    }
}

fn hint(err: &anyhow::Error) -> Option<&'static str> {
    let ce = err.downcast_ref::<dispatch_client::ClientError>()?;
    match ce.code()? {
        "AlreadyExists" => {
            Some("use `dispatch apply -f` or `dispatch update` to change an existing resource")
        }
        "UnknownReference" if ce.to_string().contains(" has no ") => {
            Some("`dispatch get versions FUNCTION` / `dispatch get aliases` list what exists")
        }
        "UnknownReference" => {
            Some("`dispatch get images` / `dispatch get base-images` list what exists")
        }
        "FunctionNotReady" => {
            Some("`dispatch get function NAME -o json` shows the build status and reason")
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    /// Clap's own checks of every command and argument (unique ids, conflicts naming real
    /// arguments): a clash panics only when that subcommand is parsed, so it is checked here.
    #[test]
    fn every_command_line_is_well_formed() {
        use clap::CommandFactory as _;
        super::Cli::command().debug_assert();
    }
}
