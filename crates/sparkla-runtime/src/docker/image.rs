//! The default environment image of the Docker runtime, built locally without a registry.
//!
//! [`BUILD_SCRIPT`] (`build-env.sh`, also reachable as `scripts/build-docker-env.sh`) makes a
//! Debian bookworm root filesystem with `mmdebstrap` from a pinned package list (bash,
//! python3 with numpy, pandas and matplotlib, Debian's nodejs), with a `sparkla` user
//! (1000:1000) and an empty `/.sparkla` for the agent mount, then `docker import`s and tags
//! it and prints the image ID. Builds are cached by a hash of the recipe (see the script).
//! `sparkla env build docker` calls [`build_default_image`].

use crate::RuntimeError;
use std::io::Write;
use std::path::PathBuf;

/// The tag of the default environment image.
pub const DEFAULT_IMAGE: &str = "sparkla/env:bookworm";

/// The command that builds the default image (named in "missing image" errors).
pub const ENV_BUILD_COMMAND: &str = "sparkla env build docker";

/// The build script (bash; needs root or unprivileged user namespaces, mmdebstrap and docker).
pub const BUILD_SCRIPT: &str = include_str!("build-env.sh");

/// Options of [`build_default_image`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BuildOptions {
    /// The tag (default [`DEFAULT_IMAGE`]).
    pub tag: Option<String>,
    /// Rebuild even when an image of the same recipe exists.
    pub force: bool,
    /// Debian mirror (default: the one in /etc/apt/sources.list*).
    pub mirror: Option<String>,
    /// Cache directory (default `$XDG_CACHE_HOME/sparkla` or `~/.cache/sparkla`).
    pub cache_dir: Option<PathBuf>,
}

/// What a build produced.
#[derive(Debug, Clone, PartialEq)]
pub struct BuiltImage {
    pub tag: String,
    /// The image ID (`sha256:...`), the digest of its configuration and content.
    pub id: String,
}

/// Build (or find up to date) the default environment image by running [`BUILD_SCRIPT`].
/// The script's progress goes to this process's stdout and stderr.
pub async fn build_default_image(opts: &BuildOptions) -> Result<BuiltImage, RuntimeError> {
    let tag = opts
        .tag
        .clone()
        .unwrap_or_else(|| DEFAULT_IMAGE.to_string());
    let mut script = tempfile::Builder::new()
        .prefix("sparkla-build-env-")
        .suffix(".sh")
        .tempfile()
        .map_err(|e| RuntimeError::io("creating the build script", e))?;
    script
        .write_all(BUILD_SCRIPT.as_bytes())
        .map_err(|e| RuntimeError::io("writing the build script", e))?;
    let mut cmd = tokio::process::Command::new("bash");
    cmd.arg(script.path()).arg("--tag").arg(&tag);
    if opts.force {
        cmd.arg("--force");
    }
    if let Some(m) = &opts.mirror {
        cmd.env("SPARKLA_DEBIAN_MIRROR", m);
    }
    if let Some(c) = &opts.cache_dir {
        cmd.env("SPARKLA_CACHE_DIR", c);
    }
    let status = cmd
        .status()
        .await
        .map_err(|e| RuntimeError::io("running the environment build script", e))?;
    if !status.success() {
        return Err(RuntimeError::Environment {
            name: tag,
            reason: format!("the build script failed ({status})"),
        });
    }
    let docker = super::connect(None).await?;
    let info = docker
        .inspect_image(&tag)
        .await
        .map_err(|e| RuntimeError::Environment {
            name: tag.clone(),
            reason: format!("built, but the engine cannot inspect it: {e}"),
        })?;
    Ok(BuiltImage {
        tag,
        id: info.id.unwrap_or_default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn script_pins_suite_and_packages() {
        assert!(BUILD_SCRIPT.contains("SUITE=bookworm"));
        for p in [
            "python3-numpy",
            "python3-pandas",
            "python3-matplotlib",
            "nodejs",
            "bash",
        ] {
            assert!(BUILD_SCRIPT.contains(p), "{p} missing from the recipe");
        }
    }
}
