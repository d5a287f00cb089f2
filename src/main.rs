//! The `mxhsm` command: parse, dispatch, exit code.
#![forbid(unsafe_code)]

mod cli;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let args = match cli::Cli::try_parse() {
        Ok(args) => args,
        Err(e) => return cli::usage_error(e),
    };
    let json = args.global.json;
    cli::init_logging(&args.global);
    match cli::run(args) {
        Ok(code) => code,
        Err(e) => cli::report(&e, json),
    }
}
