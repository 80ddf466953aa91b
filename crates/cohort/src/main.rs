//! `cohort`: parse, build, run, and map errors to exit codes.

#![forbid(unsafe_code)]

mod cli;
mod serve;
mod start;

use clap::Parser;

/// Exit code of a usage or configuration error (BSD `EX_USAGE`).
const EXIT_USAGE: i32 = 64;

fn main() {
    let cli = match cli::Cli::try_parse() {
        Ok(cli) => cli,
        // Help and version go to stdout with 0; every other parse error is a usage error:
        // 64, as for bad settings, not clap's own 2.
        Err(e) => {
            let code = if e.use_stderr() { EXIT_USAGE } else { 0 };
            let _ = e.print();
            std::process::exit(code);
        }
    };
    let code = match cli.command {
        cli::Command::Worker {
            command: cli::WorkerCommand::Start(args),
        } => start::main(args),
        cli::Command::Flow {
            command: cli::FlowCommand::Serve(args),
        } => serve::flow_serve(args),
        cli::Command::Serve(args) => serve::serve_many(args),
        cli::Command::Shim(args) => {
            cohort_process::shim::run(&args.status, &args.program, &args.args)
        }
    };
    std::process::exit(code);
}

/// How `main` turns an error into an exit code.
#[derive(Debug)]
pub enum Failure {
    /// Bad flags or settings: exit 64.
    Usage(anyhow::Error),
    /// Anything else: exit 1.
    Runtime(anyhow::Error),
}

impl Failure {
    pub fn exit_code(&self) -> i32 {
        match self {
            Failure::Usage(_) => EXIT_USAGE,
            Failure::Runtime(_) => 1,
        }
    }
}
