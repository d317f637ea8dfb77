//! The `dispatch` binary: parse the command line, run it, map failure to exit code 1.

use std::process::ExitCode;

fn main() -> ExitCode {
    // The sandbox launcher (DESIGN §9) must stay single-threaded: it runs before anything else.
    let mut args = std::env::args_os().skip(1);
    match args.next().as_deref().and_then(std::ffi::OsStr::to_str) {
        Some("sandbox") => dispatch_runtime::sandbox::launch::main(args.collect()),
        // A container worker's runtime, its protocol socket moved to fd 3 (DESIGN §9); as
        // early, before any fd is opened.
        Some(dispatch_runtime::container::engine::EXEC_STEP) => {
            dispatch_runtime::container::engine::exec_main(args.collect())
        }
        _ => {}
    }
    // One rustls crypto provider, installed before anything builds a TLS client (DESIGN §11).
    dispatch_client::install_crypto_provider();
    // Every failure exits 1, usage errors too (clap's own code is 2); --help and --version
    // print to stdout and exit 0.
    let cli = match dispatch_cli::parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    dispatch_cli::init_tracing(&cli);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: failed to start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dispatch_cli::run(cli)) {
        Ok(code) => code,
        Err(err) => {
            dispatch_cli::print_error(&err);
            ExitCode::FAILURE
        }
    }
}
