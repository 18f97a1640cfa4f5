//! Validation of a session's volume mounts against the allow-list of host roots.
//! Shared by every runtime: call it before [`crate::Runtime::start`].

use std::path::{Component, Path, PathBuf};

use crate::{Mount, RuntimeError};

/// Destinations a mount may not cover or sit under: they are the sandbox's own machinery.
const RESERVED_DESTINATIONS: &[&str] = &[
    "/",
    "/proc",
    "/dev",
    "/sys",
    "/.sparkla",
    "/usr",
    "/bin",
    "/sbin",
    "/lib",
    "/lib32",
    "/lib64",
    "/libx32",
    "/etc",
];

fn refused(msg: String) -> RuntimeError {
    RuntimeError::Refused(msg)
}

/// Lexically normalise an absolute path (no `..` above the root, no `.`), without touching
/// the filesystem. Returns `None` for relative paths.
fn normalise(path: &Path) -> Option<PathBuf> {
    if !path.is_absolute() {
        return None;
    }
    let mut out = PathBuf::from("/");
    for c in path.components() {
        match c {
            Component::RootDir | Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            Component::Normal(n) => out.push(n),
            Component::Prefix(_) => return None,
        }
    }
    Some(out)
}

/// Check requested mounts against `allow` (host directories under which sources may lie).
///
/// Sources are canonicalised (symlinks resolved, `..` removed) before the check, so a
/// symlink inside an allowed root that points outside it is refused. Destinations must be
/// absolute, are normalised, must not be a system directory of the sandbox (`/`, `/proc`,
/// `/dev`, `/usr`, `/etc`, ...), and must be distinct. Returns the mounts with canonical
/// sources and normalised destinations, or [`RuntimeError::Refused`] saying why.
pub fn validate_mounts(requested: &[Mount], allow: &[PathBuf]) -> Result<Vec<Mount>, RuntimeError> {
    let mut out: Vec<Mount> = Vec::with_capacity(requested.len());
    if requested.is_empty() {
        return Ok(out);
    }
    let allowed: Vec<PathBuf> = allow.iter().filter_map(|a| a.canonicalize().ok()).collect();
    for m in requested {
        let src_shown = m.source.display();
        if !m.source.is_absolute() {
            return Err(refused(format!(
                "volume mount source {src_shown:?} must be an absolute host path"
            )));
        }
        let source = m.source.canonicalize().map_err(|e| {
            refused(format!(
                "volume mount source {src_shown:?} cannot be used: {e}"
            ))
        })?;
        if !allowed.iter().any(|a| source.starts_with(a)) {
            let roots: Vec<String> = allow.iter().map(|a| a.display().to_string()).collect();
            return Err(refused(format!(
                "volume mount source {src_shown:?} (resolved to {:?}) is outside the allowed host roots [{}]",
                source.display(),
                roots.join(", ")
            )));
        }
        let destination = normalise(&m.destination).ok_or_else(|| {
            refused(format!(
                "volume mount destination {:?} must be an absolute path",
                m.destination.display()
            ))
        })?;
        for r in RESERVED_DESTINATIONS {
            let reserved = Path::new(r);
            let clash = if *r == "/" {
                destination == reserved
            } else {
                destination.starts_with(reserved)
            };
            if clash {
                return Err(refused(format!(
                    "volume mount destination {:?} is reserved by the sandbox ({r})",
                    destination.display()
                )));
            }
        }
        if out.iter().any(|o| o.destination == destination) {
            return Err(refused(format!(
                "two volume mounts have the destination {:?}",
                destination.display()
            )));
        }
        out.push(Mount {
            source,
            destination,
            read_only: m.read_only,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(src: &Path, dst: &str, ro: bool) -> Mount {
        Mount {
            source: src.to_path_buf(),
            destination: dst.into(),
            read_only: ro,
        }
    }

    #[test]
    fn allows_inside_and_refuses_outside() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("data");
        std::fs::create_dir_all(root.join("a")).unwrap();
        std::fs::create_dir_all(tmp.path().join("secret")).unwrap();
        let allow = vec![root.clone()];

        let ok = validate_mounts(&[m(&root.join("a"), "/data/a/../b", true)], &allow).unwrap();
        assert_eq!(ok[0].source, root.join("a").canonicalize().unwrap());
        assert_eq!(ok[0].destination, PathBuf::from("/data/b"));
        assert!(ok[0].read_only);

        // `..` escaping the allowed root.
        let e = validate_mounts(&[m(&root.join("../secret"), "/x", false)], &allow).unwrap_err();
        assert!(matches!(e, RuntimeError::Refused(_)));
        assert!(
            e.to_string().contains("outside the allowed host roots"),
            "{e}"
        );

        // A symlink inside the root pointing out of it.
        std::os::unix::fs::symlink(tmp.path().join("secret"), root.join("link")).unwrap();
        let e = validate_mounts(&[m(&root.join("link"), "/x", false)], &allow).unwrap_err();
        assert!(e.to_string().contains("outside"), "{e}");

        // Prefix of a name is not containment (/data vs /data2).
        let sibling = tmp.path().join("data2");
        std::fs::create_dir_all(&sibling).unwrap();
        assert!(validate_mounts(&[m(&sibling, "/x", false)], &allow).is_err());

        // Nothing allowed at all.
        assert!(validate_mounts(&[m(&root, "/x", false)], &[]).is_err());
        // Missing source, relative source.
        assert!(validate_mounts(&[m(&root.join("nope"), "/x", false)], &allow).is_err());
        assert!(validate_mounts(&[m(Path::new("rel"), "/x", false)], &allow).is_err());
    }

    #[test]
    fn refuses_reserved_relative_and_duplicate_destinations() {
        let tmp = tempfile::tempdir().unwrap();
        let allow = vec![tmp.path().to_path_buf()];
        for dst in [
            "/",
            "/proc",
            "/proc/1",
            "/etc/passwd",
            "/usr/bin",
            "/.sparkla/agent",
            "/dev/x",
            "/a/../",
        ] {
            let e = validate_mounts(&[m(tmp.path(), dst, true)], &allow).unwrap_err();
            assert!(e.to_string().contains("reserved"), "{dst}: {e}");
        }
        assert!(validate_mounts(&[m(tmp.path(), "data", true)], &allow).is_err());
        let e = validate_mounts(
            &[m(tmp.path(), "/data", true), m(tmp.path(), "/data/", true)],
            &allow,
        )
        .unwrap_err();
        assert!(e.to_string().contains("two volume mounts"), "{e}");
        assert!(validate_mounts(&[], &[]).unwrap().is_empty());
    }
}
