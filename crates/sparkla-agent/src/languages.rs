//! The languages the agent can run, their aliases, interpreters and kernel scripts.

use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Lang {
    Python,
    Bash,
    JavaScript,
    R,
}

impl Lang {
    pub const ALL: [Lang; 4] = [Lang::Python, Lang::Bash, Lang::JavaScript, Lang::R];

    /// The language for a `programmingLanguage` value (case-insensitive, with aliases).
    pub fn from_name(name: &str) -> Option<Lang> {
        match name.trim().to_ascii_lowercase().as_str() {
            "python" | "python3" | "py" => Some(Lang::Python),
            "bash" | "sh" | "shell" => Some(Lang::Bash),
            "javascript" | "js" | "node" | "nodejs" => Some(Lang::JavaScript),
            "r" => Some(Lang::R),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Lang::Python => "python",
            Lang::Bash => "bash",
            Lang::JavaScript => "javascript",
            Lang::R => "r",
        }
    }

    /// The environment variable that overrides the interpreter's path.
    fn env_var(self) -> &'static str {
        match self {
            Lang::Python => "SPARKLA_PYTHON",
            Lang::Bash => "SPARKLA_BASH",
            Lang::JavaScript => "SPARKLA_NODE",
            Lang::R => "SPARKLA_R",
        }
    }

    fn commands(self) -> &'static [&'static str] {
        match self {
            Lang::Python => &["python3", "python"],
            Lang::Bash => &["bash"],
            Lang::JavaScript => &["node", "nodejs"],
            Lang::R => &["Rscript"],
        }
    }

    /// The kernel script, embedded in the agent so that it needs no files of its own.
    pub fn script(self) -> Option<&'static str> {
        match self {
            Lang::Python => Some(include_str!("kernels/python.py")),
            Lang::Bash => Some(include_str!("kernels/bash.sh")),
            Lang::JavaScript => Some(include_str!("kernels/javascript.js")),
            Lang::R => Some(include_str!("kernels/r.R")),
        }
    }

    /// The arguments that make the interpreter run the kernel script.
    pub fn args(self) -> Vec<&'static str> {
        let script = self.script().unwrap_or_default();
        match self {
            Lang::Python => vec!["-c", script],
            // Bash reads its script (the kernel, then one line per request) from stdin.
            Lang::Bash => vec!["--norc", "--noprofile", "-s"],
            Lang::JavaScript => vec!["-e", script],
            Lang::R => vec!["--vanilla", "-e", script],
        }
    }

    /// Find the interpreter: `$SPARKLA_<LANG>`, else `PATH` (skipping pyenv-style shims,
    /// which are slow launchers of some other interpreter), else the usual system paths.
    /// `None` when the interpreter is absent or the kernel is not implemented.
    pub fn interpreter(self) -> Option<PathBuf> {
        self.script()?;
        if let Some(p) = std::env::var_os(self.env_var()) {
            let p = PathBuf::from(p);
            return is_executable(&p).then_some(p);
        }
        let path = std::env::var_os("PATH").unwrap_or_default();
        let dirs = std::env::split_paths(&path)
            .filter(|d| !is_shim_dir(d))
            .chain(["/usr/local/bin", "/usr/bin", "/bin"].map(PathBuf::from));
        for dir in dirs {
            for cmd in self.commands() {
                let candidate = dir.join(cmd);
                if is_executable(&candidate) {
                    return Some(candidate);
                }
            }
        }
        None
    }
}

fn is_shim_dir(dir: &Path) -> bool {
    let s = dir.to_string_lossy();
    s.contains("/shims") || s.contains("/.pyenv/") || s.contains("/.rbenv/")
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aliases() {
        for (alias, lang) in [
            ("py", Lang::Python),
            ("Python3", Lang::Python),
            ("sh", Lang::Bash),
            ("shell", Lang::Bash),
            ("js", Lang::JavaScript),
            ("node", Lang::JavaScript),
            ("R", Lang::R),
        ] {
            assert_eq!(Lang::from_name(alias), Some(lang), "{alias}");
        }
        assert_eq!(Lang::from_name("cobol"), None);
    }

    #[test]
    fn shims_are_skipped() {
        assert!(is_shim_dir(Path::new("/root/.pyenv/shims")));
        assert!(!is_shim_dir(Path::new("/usr/bin")));
    }
}
