//! `sparkla execute` on its own, for development until the `sparkla` binary has the
//! subcommand: `cargo run -p sparkla-documents --example sparkla-execute -- [--runtime R] DOC …`.
//! (Needs `sparkla-sandbox` and `sparkla-agent` built: `cargo build -p sparkla-agent -p sparkla-runtime`.)

use clap::Parser;
use sparkla_documents::cli::{run, ExecuteArgs};

#[derive(Parser)]
#[command(name = "sparkla-execute")]
struct Cli {
    /// Session runtime: sandbox, docker, or process (NO isolation)
    #[arg(long, env = "SPARKLA_RUNTIME", default_value = "sandbox")]
    runtime: String,
    /// The sparkla-agent binary [default: next to this binary]
    #[arg(long, env = "SPARKLA_AGENT")]
    agent: Option<std::path::PathBuf>,
    #[command(flatten)]
    args: ExecuteArgs,
}

fn main() -> std::process::ExitCode {
    sparkla_runtime::sandbox::launcher::run_if_requested();
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(run(cli.args, &cli.runtime, cli.agent))
}
