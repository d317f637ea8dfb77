//! The `dispatch` binary: parse the command line, run it, map failure to exit code 1.

use std::process::ExitCode;

fn main() -> ExitCode {
    // The sandbox launcher (DESIGN §9) must stay single-threaded: it runs before anything else.
    let mut args = std::env::args_os().skip(1);
    if args.next().as_deref() == Some(std::ffi::OsStr::new("sandbox")) {
        dispatch_runtime::sandbox::launch::main(args.collect());
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
