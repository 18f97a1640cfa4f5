//! `sparkla`: serve sessions (`sparkla serve`, or `sparkla` alone), print the effective
//! configuration (`sparkla config`), or load-test a server (`sparkla bench`).

mod agent_build;
mod bench;
mod options;

use anyhow::Context;
use clap::{Parser, Subcommand};
use serde_json::json;
use sparkla_server::edge::jwt::{self, Jwt};
use sparkla_server::{manager_for, runtime_for, Server};

#[derive(Debug, Parser)]
#[command(
    name = "sparkla",
    version,
    about = "Fast, isolated, reproducible compute sessions for executable documents (Executa-compatible)",
    after_help = "With no command, `sparkla` serves (as `sparkla serve`)."
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,

    #[command(flatten)]
    options: options::Options,

    /// Shorthand for --runtime docker
    #[arg(long, global = true)]
    docker: bool,

    /// Shorthand for --runtime firecracker
    #[arg(long, global = true)]
    firecracker: bool,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve sessions over WebSocket and HTTP (the default command)
    Serve,
    /// Print the effective configuration (defaults < config file < environment < flags) as JSON
    Config,
    /// Load-test a running server with concurrent WebSocket clients
    Bench(bench::BenchArgs),
    /// Execute a document (notebook, Markdown, Stencila JSON) in one fresh session
    Execute(sparkla_documents::cli::ExecuteArgs),
    /// Session environments: `sparkla env build docker` builds the default Docker image
    Env {
        #[command(subcommand)]
        command: EnvCommand,
    },
    /// The microVM guest image: `sparkla guest build` (for --runtime qemu|firecracker)
    Guest {
        #[command(subcommand)]
        command: GuestCommand,
    },
}

#[derive(Debug, Subcommand)]
enum EnvCommand {
    /// Build an environment: `docker` (the default image, from Debian packages, no registry)
    Build {
        /// What to build: docker
        kind: String,
        /// Image tag [default: sparkla/env:bookworm]
        #[arg(long)]
        tag: Option<String>,
        /// Rebuild even when an image of the same recipe exists
        #[arg(long)]
        force: bool,
        /// Debian mirror [default: the one in /etc/apt/sources.list*]
        #[arg(long)]
        mirror: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
enum GuestCommand {
    /// Build rootfs.ext4 (with the agent and sparkla-guest-init), the kernel and initramfs
    Build {
        /// Output directory [default: $SPARKLA_GUEST_DIR or ~/.cache/sparkla/guest]
        #[arg(long)]
        out: Option<std::path::PathBuf>,
        /// Use this environment directory instead of building one with mmdebstrap
        #[arg(long)]
        env_dir: Option<std::path::PathBuf>,
        /// Rebuild the environment even if a cached one of the same recipe exists
        #[arg(long)]
        force: bool,
        /// Debian mirror [default: the one in /etc/apt/sources.list*]
        #[arg(long)]
        mirror: Option<String>,
    },
}

fn main() -> std::process::ExitCode {
    // The sandbox runtime re-executes this binary as its launcher.
    sparkla_runtime::sandbox::launcher::run_if_requested();
    let cli = Cli::parse();
    raise_nofile_limit();
    if let Some(Command::Execute(args)) = cli.command {
        return execute(args, cli.options, cli.docker, cli.firecracker);
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let mut opts = cli.options.clone();
    if cli.docker {
        opts.runtime = Some("docker".into());
    }
    if cli.firecracker {
        opts.runtime = Some("firecracker".into());
    }
    match cli.command {
        Some(Command::Bench(args)) => {
            init_tracing(opts.debug.unwrap_or(false));
            bench::run(args, &opts).await
        }
        Some(Command::Config) => {
            let config = opts.resolve()?;
            println!("{}", serde_json::to_string_pretty(&config.redacted())?);
            Ok(())
        }
        Some(Command::Serve) | None => serve(opts).await,
        Some(Command::Execute(_)) => unreachable!("handled in main"),
        Some(Command::Env {
            command:
                EnvCommand::Build {
                    kind,
                    tag,
                    force,
                    mirror,
                },
        }) => {
            init_tracing(opts.debug.unwrap_or(false));
            anyhow::ensure!(
                kind == "docker",
                "unknown environment kind {kind:?}: `sparkla env build docker` is the one there is"
            );
            let built = sparkla_runtime::docker::image::build_default_image(
                &sparkla_runtime::docker::image::BuildOptions {
                    tag,
                    force,
                    mirror,
                    cache_dir: None,
                },
            )
            .await?;
            println!("{} {}", built.tag, built.id);
            Ok(())
        }
        Some(Command::Guest {
            command:
                GuestCommand::Build {
                    out,
                    env_dir,
                    force,
                    mirror,
                },
        }) => {
            init_tracing(opts.debug.unwrap_or(false));
            agent_build::ensure_built("sparkla-agent", &["-p", "sparkla-agent"])?;
            agent_build::ensure_built(
                "sparkla-guest-init",
                &["-p", "sparkla-runtime", "--bin", "sparkla-guest-init"],
            )?;
            let image =
                sparkla_runtime::vm::guest::build(&sparkla_runtime::vm::guest::BuildOptions {
                    out,
                    agent: opts.agent.clone(),
                    init: None,
                    env_dir,
                    force,
                    mirror,
                    cache_dir: None,
                })
                .await?;
            println!("{}", image.dir.display());
            Ok(())
        }
    }
}

/// `sparkla execute`: its own exit codes (see `sparkla_documents::cli::run`).
fn execute(
    args: sparkla_documents::cli::ExecuteArgs,
    mut opts: options::Options,
    docker: bool,
    firecracker: bool,
) -> std::process::ExitCode {
    if docker {
        opts.runtime = Some("docker".into());
    }
    if firecracker {
        opts.runtime = Some("firecracker".into());
    }
    let config = match opts.resolve() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e:#}");
            return std::process::ExitCode::from(2);
        }
    };
    // The command's own progress and summary say what happened; logs only for trouble.
    init_tracing_at(config.debug, "warn");
    if let Err(e) = agent_build::ensure_built("sparkla-agent", &["-p", "sparkla-agent"]) {
        eprintln!("error: {e:#}");
        return std::process::ExitCode::from(2);
    }
    match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt.block_on(sparkla_documents::cli::run(
            args,
            &config.runtime,
            config.agent.clone(),
        )),
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            std::process::ExitCode::from(2)
        }
    }
}

fn init_tracing(debug: bool) {
    init_tracing_at(debug, "info");
}

/// Logging to stderr: `level` unless `--debug`, and `SPARKLA_LOG` / `RUST_LOG` override both.
fn init_tracing_at(debug: bool, level: &str) {
    use tracing_subscriber::EnvFilter;
    let default = if debug {
        "debug,hyper=info,tungstenite=info,tokio_tungstenite=info"
    } else {
        level
    };
    let filter = EnvFilter::try_from_env("SPARKLA_LOG")
        .or_else(|_| EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

async fn serve(opts: options::Options) -> anyhow::Result<()> {
    let mut config = opts.resolve()?;
    init_tracing(config.debug);
    agent_build::ensure_built("sparkla-agent", &["-p", "sparkla-agent"])?;
    let generated = config.jwt_secret.is_none();
    if generated {
        config.jwt_secret = Some(jwt::generate_secret());
    }
    let runtime = runtime_for(&config)
        .await
        .with_context(|| format!("cannot use the {} runtime", config.runtime))?;
    let manager = manager_for(&config, runtime);
    let server = Server::start(config.clone(), manager).await?;
    let addr = server.addr();
    if generated {
        let secret = config.jwt_secret.as_deref().expect("secret");
        let token = Jwt::new(secret)
            .map_err(|e| anyhow::anyhow!(e))?
            .sign(&json!({"admin": true, "iat": jwt::now(), "exp": jwt::now() + 7 * 86400}));
        tracing::warn!(
            "no JWT secret configured (JWT_SECRET, SPARKLA_JWT_SECRET or --jwt-secret): generated one for this run only"
        );
        tracing::info!("admin URL (token valid 7 days): http://{addr}/admin?jwt={token}");
        tracing::info!("WebSocket URL for clients: ws://{addr}/?jwt={token}");
    }
    tracing::info!(%addr, runtime = %config.runtime, "sparkla is serving");
    wait_for_signal().await;
    server.shutdown().await?;
    tracing::info!("stopped");
    Ok(())
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
}

/// Many connections need many file descriptors: raise the soft limit to the hard one.
fn raise_nofile_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}
