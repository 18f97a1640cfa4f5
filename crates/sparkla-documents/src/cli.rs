//! `sparkla execute`: its arguments and the function the `sparkla` binary calls.

use clap::Args;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use crate::{execute, Error, ExecuteOptions, Format, Output, Progress, Report, Session};

/// Execute a document (Jupyter .ipynb, Markdown .md/.qmd/.Rmd, Stencila .json) in one fresh
/// isolated session and write it with its outputs (to stdout unless -o or --in-place).
#[derive(Debug, Clone, Args)]
pub struct ExecuteArgs {
    /// The document
    pub input: PathBuf,

    /// Write the executed document here (atomically) [default: stdout]
    #[arg(short, long, value_name = "FILE", conflicts_with_all = ["in_place", "check"])]
    pub output: Option<PathBuf>,

    /// Replace the input with the executed document (atomically)
    #[arg(long, conflicts_with = "check")]
    pub in_place: bool,

    /// Input format, instead of guessing from the extension: ipynb, md, json
    #[arg(long, value_name = "FORMAT")]
    pub from: Option<String>,

    /// Output format: must be the input's (converting is not supported)
    #[arg(long, value_name = "FORMAT")]
    pub to: Option<String>,

    /// The session's environment (an environment directory of the sandbox, an image for docker)
    #[arg(long, value_name = "NAME")]
    pub environment: Option<String>,

    /// Execute on this Sparkla server instead of in this process (ws://host:port)
    #[arg(long, value_name = "URL")]
    pub server: Option<String>,

    /// JWT for --server
    #[arg(
        long,
        env = "SPARKLA_TOKEN",
        hide_env_values = true,
        requires = "server"
    )]
    pub token: Option<String>,

    /// Keep executing after a chunk fails (exit status is still non-zero)
    #[arg(long)]
    pub continue_on_error: bool,

    /// Re-execute in a fresh session and compare with the stored outputs; never writes
    #[arg(long)]
    pub check: bool,

    /// No progress bar, even on a terminal
    #[arg(long, short)]
    pub quiet: bool,

    /// Extra session environment variable (repeatable)
    #[arg(long = "env", value_name = "KEY=VALUE")]
    pub env: Vec<String>,
}

impl ExecuteArgs {
    /// The library's options for these arguments. `runtime` and `agent` come from the
    /// `sparkla` command's global options (`--runtime`, `--agent`, config file, environment).
    pub fn options(&self, runtime: &str, agent: Option<PathBuf>) -> Result<ExecuteOptions, Error> {
        let from = match &self.from {
            Some(f) => Some(Format::from_name(f).ok_or_else(|| {
                Error::Usage(format!("--from {f}: unknown format (ipynb, md, json)"))
            })?),
            None => None,
        };
        let input_format = from.or_else(|| Format::from_path(&self.input));
        if let Some(to) = &self.to {
            let to_format = Format::from_name(to).ok_or_else(|| {
                Error::Usage(format!("--to {to}: unknown format (ipynb, md, json)"))
            })?;
            if Some(to_format) != input_format {
                return Err(Error::Usage(format!(
                    "--to {to}: converting between formats is not supported; the output has the input's format"
                )));
            }
        }
        let session = match &self.server {
            Some(url) => Session::Remote {
                url: url.clone(),
                token: self.token.clone(),
                environment: self.environment.clone(),
            },
            None => Session::Runtime {
                name: runtime.to_string(),
                agent,
                environment: self.environment.clone(),
            },
        };
        let mut env = Vec::new();
        for kv in &self.env {
            let (k, v) = kv
                .split_once('=')
                .ok_or_else(|| Error::Usage(format!("--env {kv}: expected KEY=VALUE")))?;
            env.push((k.to_string(), v.to_string()));
        }
        Ok(ExecuteOptions {
            input: self.input.clone(),
            output: match (&self.output, self.in_place) {
                (Some(o), _) => Output::File(o.clone()),
                (None, true) => Output::InPlace,
                (None, false) => Output::Stdout,
            },
            from,
            session,
            continue_on_error: self.continue_on_error,
            check: self.check,
            progress: if self.quiet {
                Progress::Never
            } else {
                Progress::Auto
            },
            env,
        })
    }
}

/// The summary printed at the end (stderr).
pub fn summary(report: &Report, check: bool) -> String {
    let mut s = String::new();
    if check {
        let differing = report.differing();
        for c in &differing {
            s.push_str(&format!(
                "{} differs from the stored outputs:\n{}\n",
                c.label,
                c.diff.as_deref().unwrap_or("")
            ));
        }
        s.push_str(&format!(
            "check: {} chunks re-executed in {:.2} s ({}): {}",
            report.executed(),
            report.total.as_secs_f64(),
            report.runtime,
            if differing.is_empty() {
                "all outputs reproduced".to_string()
            } else {
                format!(
                    "{} differ ({})",
                    differing.len(),
                    differing
                        .iter()
                        .map(|c| c.label.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            }
        ));
    } else {
        let failed: Vec<&str> = report
            .chunks
            .iter()
            .filter(|c| c.errors > 0)
            .map(|c| c.label.as_str())
            .collect();
        let skipped = report.chunks.len() - report.executed();
        s.push_str(&format!(
            "executed {} of {} chunks in {:.2} s ({}): {} error{}{}{}",
            report.executed(),
            report.chunks.len(),
            report.total.as_secs_f64(),
            report.runtime,
            failed.len(),
            if failed.len() == 1 { "" } else { "s" },
            if failed.is_empty() {
                String::new()
            } else {
                format!(" ({})", failed.join(", "))
            },
            if skipped > 0 {
                format!("; {skipped} not executed (stopped at the first error; --continue-on-error runs them)")
            } else {
                String::new()
            }
        ));
    }
    s
}

/// Run `sparkla execute`: exit 0 on success; 1 when a chunk failed or (`--check`) outputs
/// differ; 2 on bad input or a session that cannot start; 130 on Ctrl-C.
pub async fn run(args: ExecuteArgs, runtime: &str, agent: Option<PathBuf>) -> ExitCode {
    let opts = match args.options(runtime, agent) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let check = opts.check;
    match execute(opts).await {
        Ok(report) => {
            if let Some(doc) = &report.document {
                let mut out = std::io::stdout().lock();
                if let Err(e) = out.write_all(doc).and_then(|_| out.flush()) {
                    eprintln!("error: writing to stdout: {e}");
                    return ExitCode::from(2);
                }
            }
            eprintln!("{}", summary(&report, check));
            if report.success(check) {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(Error::Interrupted) => {
            eprintln!("interrupted: nothing was written");
            ExitCode::from(130)
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: ExecuteArgs,
    }

    fn parse(argv: &[&str]) -> Result<ExecuteOptions, String> {
        let cli = Cli::try_parse_from(std::iter::once("x").chain(argv.iter().copied()))
            .map_err(|e| e.to_string())?;
        cli.args.options("sandbox", None).map_err(|e| e.to_string())
    }

    #[test]
    fn arguments() {
        let o = parse(&["nb.ipynb"]).unwrap();
        assert_eq!(o.output, Output::Stdout);
        assert!(matches!(o.session, Session::Runtime { ref name, .. } if name == "sandbox"));
        let o = parse(&[
            "nb.ipynb",
            "-o",
            "out.ipynb",
            "--continue-on-error",
            "--env",
            "A=b=c",
        ])
        .unwrap();
        assert_eq!(o.output, Output::File("out.ipynb".into()));
        assert!(o.continue_on_error);
        assert_eq!(o.env, vec![("A".to_string(), "b=c".to_string())]);
        let o = parse(&[
            "doc.md",
            "--in-place",
            "--server",
            "ws://h:9000",
            "--token",
            "t",
        ])
        .unwrap();
        assert_eq!(o.output, Output::InPlace);
        assert!(
            matches!(o.session, Session::Remote { ref token, .. } if token.as_deref() == Some("t"))
        );
        assert!(parse(&["doc.md", "--check", "--in-place"]).is_err());
        assert!(parse(&["doc.md", "--check", "-o", "x.md"]).is_err());
        assert!(
            parse(&["doc.md", "--token", "t"]).is_err(),
            "--token needs --server"
        );
        assert!(parse(&["doc.md", "--to", "ipynb"])
            .unwrap_err()
            .contains("converting"));
        assert!(parse(&["doc.txt", "--from", "md", "--to", "md"]).is_ok());
        assert!(parse(&["doc.md", "--env", "NOEQUALS"]).is_err());
    }
}
