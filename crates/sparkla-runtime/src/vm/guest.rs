//! The guest image shared by the Firecracker and QEMU runtimes, and its build
//! (`sparkla guest build` calls [`build`]).
//!
//! A guest directory (default [`default_dir`], `$XDG_CACHE_HOME/sparkla/guest`) holds:
//!
//! | file | what | used by |
//! |---|---|---|
//! | `rootfs.ext4` | Debian bookworm minbase + bash, python3, nodejs, procps; `/sbin/sparkla-agent` (static) and `/sbin/sparkla-init` (static `sparkla-guest-init`); made with `mkfs.ext4 -d` (no mount); attached read-only | both |
//! | `vmlinuz` | Debian's `linux-image-cloud-amd64` kernel (extracted from the .deb, never installed) | QEMU |
//! | `initrd.img` | a tiny initramfs (uncompressed newc cpio written here): `sparkla-guest-init` as `/init` and the virtio modules it loads (virtio_ring, virtio, virtio_mmio, virtio_blk, virtio_console; ext4 is built in) | QEMU |
//! | `guest.json` | what was built, and how long it took | – |
//!
//! Firecracker needs a kernel with virtio-mmio command-line devices
//! (`CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES=y`), virtio-blk, ext4 and vsock built in, which
//! Debian's kernels are not: use one of Firecracker's published CI kernels (`vmlinux-6.1.*`),
//! or build one with Firecracker's `microvm-kernel-ci-x86_64-6.1.config`, and point
//! [`super::firecracker::FirecrackerConfig::kernel`] at it. It boots `rootfs.ext4` directly
//! (`root=/dev/vda ro init=/sbin/sparkla-init`), without initramfs.

use crate::RuntimeError;
use std::io::Write;
use std::path::{Path, PathBuf};

/// The build script (bash; needs root, mmdebstrap, e2fsprogs and apt-get).
pub const BUILD_SCRIPT: &str = include_str!("build-guest.sh");
/// The command that builds the guest image (named in "missing image" errors).
pub const GUEST_BUILD_COMMAND: &str = "sparkla guest build";
/// The environment variable naming the `sparkla-guest-init` binary.
pub const INIT_ENV: &str = "SPARKLA_GUEST_INIT";

/// The default guest directory: `$SPARKLA_GUEST_DIR`, else `<cache>/sparkla/guest`.
pub fn default_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("SPARKLA_GUEST_DIR") {
        return PathBuf::from(d);
    }
    cache_dir().join("guest")
}

/// `$SPARKLA_CACHE_DIR`, else `$XDG_CACHE_HOME/sparkla`, else `~/.cache/sparkla`.
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("SPARKLA_CACHE_DIR") {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(d).join("sparkla");
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    PathBuf::from(home).join(".cache").join("sparkla")
}

/// Find `sparkla-guest-init`: `$SPARKLA_GUEST_INIT`, else next to the current executable,
/// else in its parent directory (test binaries live in `target/<profile>/deps/`).
pub fn find_init() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os(INIT_ENV) {
        let p = PathBuf::from(p);
        return p.is_file().then_some(p);
    }
    crate::sibling_binary("sparkla-guest-init")
}

/// The files of a built guest image.
#[derive(Debug, Clone, PartialEq)]
pub struct GuestImage {
    pub dir: PathBuf,
    pub rootfs: PathBuf,
    /// Debian's cloud kernel (QEMU).
    pub kernel: PathBuf,
    /// The initramfs loading the virtio modules (QEMU).
    pub initrd: PathBuf,
}

impl GuestImage {
    /// The image files in `dir` (not checked).
    pub fn at(dir: impl Into<PathBuf>) -> Self {
        let dir = dir.into();
        Self {
            rootfs: dir.join("rootfs.ext4"),
            kernel: dir.join("vmlinuz"),
            initrd: dir.join("initrd.img"),
            dir,
        }
    }

    /// Check that the files QEMU needs exist; the error says how to build them.
    pub fn check_qemu(&self) -> Result<(), RuntimeError> {
        for f in [&self.rootfs, &self.kernel, &self.initrd] {
            if !f.is_file() {
                return Err(RuntimeError::Environment {
                    name: self.dir.display().to_string(),
                    reason: format!(
                        "the guest image is incomplete: {} is missing; build it with `{GUEST_BUILD_COMMAND}`",
                        f.display()
                    ),
                });
            }
        }
        Ok(())
    }
}

/// Options of [`build`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BuildOptions {
    /// Output directory (default [`default_dir`]).
    pub out: Option<PathBuf>,
    /// The static agent (default [`crate::process::find_agent`]).
    pub agent: Option<PathBuf>,
    /// The static guest init (default [`find_init`]).
    pub init: Option<PathBuf>,
    /// Use this environment directory instead of building one with mmdebstrap.
    pub env_dir: Option<PathBuf>,
    /// Rebuild the environment even if a cached one of the same recipe exists.
    pub force: bool,
    /// Debian mirror (default: the one in /etc/apt/sources.list*).
    pub mirror: Option<String>,
    /// Cache directory (default [`cache_dir`]).
    pub cache_dir: Option<PathBuf>,
}

fn build_err(reason: String) -> RuntimeError {
    RuntimeError::Environment {
        name: "guest".into(),
        reason,
    }
}

/// Build the guest image: run [`BUILD_SCRIPT`] (environment with mmdebstrap, cached by
/// recipe; kernel .deb extracted, cached; `rootfs.ext4` with `mkfs.ext4 -d`), then write
/// `initrd.img`. The script's progress goes to this process's stdout and stderr.
pub async fn build(opts: &BuildOptions) -> Result<GuestImage, RuntimeError> {
    let agent = opts
        .agent
        .clone()
        .or_else(crate::process::find_agent)
        .ok_or_else(|| {
            build_err("the static sparkla-agent was not found (set SPARKLA_AGENT)".into())
        })?;
    let init = opts.init.clone().or_else(find_init).ok_or_else(|| {
        build_err(format!(
            "sparkla-guest-init was not found (cargo build -p sparkla-runtime --bin sparkla-guest-init, or set {INIT_ENV})"
        ))
    })?;
    let out = opts.out.clone().unwrap_or_else(default_dir);
    let mut script = tempfile::Builder::new()
        .prefix("sparkla-build-guest-")
        .suffix(".sh")
        .tempfile()
        .map_err(|e| RuntimeError::io("creating the build script", e))?;
    script
        .write_all(BUILD_SCRIPT.as_bytes())
        .map_err(|e| RuntimeError::io("writing the build script", e))?;
    let mut cmd = tokio::process::Command::new("bash");
    cmd.arg(script.path())
        .arg("--agent")
        .arg(&agent)
        .arg("--init")
        .arg(&init)
        .arg("--out")
        .arg(&out);
    if let Some(d) = &opts.env_dir {
        cmd.arg("--env-dir").arg(d);
    }
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
        .map_err(|e| RuntimeError::io("running the guest build script", e))?;
    if !status.success() {
        return Err(build_err(format!("the build script failed ({status})")));
    }
    let image = GuestImage::at(&out);
    // the script leaves a stripped copy of the init beside the modules
    let stripped = out.join("sparkla-guest-init");
    let init = if stripped.is_file() { stripped } else { init };
    write_initrd(&init, &out.join("modules"), &image.initrd)?;
    image.check_qemu()?;
    Ok(image)
}

/// Write the QEMU initramfs: `/init` (the guest init), `/sparkla-initramfs` (the marker of
/// stage 1), `/dev/console`, the modules of `modules_dir` (with its `order` file) under
/// `/modules`, and empty `/proc`, `/sys`, `/newroot`.
pub fn write_initrd(init: &Path, modules_dir: &Path, out: &Path) -> Result<(), RuntimeError> {
    let io = |what: &str, e| RuntimeError::io(format!("writing the initramfs: {what}"), e);
    let mut cpio = Newc::default();
    for d in ["dev", "proc", "sys", "newroot", "modules"] {
        cpio.dir(d);
    }
    cpio.node("dev/console", 0o020600, (5, 1));
    cpio.file(
        "init",
        0o755,
        &std::fs::read(init).map_err(|e| io("reading the init", e))?,
    );
    cpio.file("sparkla-initramfs", 0o644, b"");
    let order = std::fs::read_to_string(modules_dir.join("order"))
        .map_err(|e| io("reading modules/order", e))?;
    cpio.file("modules/order", 0o644, order.as_bytes());
    for m in order.split_whitespace() {
        let data = std::fs::read(modules_dir.join(format!("{m}.ko")))
            .map_err(|e| io(&format!("reading module {m}"), e))?;
        cpio.file(&format!("modules/{m}.ko"), 0o644, &data);
    }
    let bytes = cpio.finish();
    let tmp = out.with_extension("img.tmp");
    std::fs::write(&tmp, bytes).map_err(|e| io("writing", e))?;
    std::fs::rename(&tmp, out).map_err(|e| io("renaming", e))
}

/// A minimal writer of the `newc` cpio format the kernel unpacks as initramfs.
#[derive(Default)]
struct Newc {
    buf: Vec<u8>,
    ino: u32,
}

impl Newc {
    fn entry(&mut self, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) {
        self.ino += 1;
        let fields = [
            self.ino,
            mode,
            0,
            0,
            if mode & 0o040000 != 0 { 2 } else { 1 },
            0,
            data.len() as u32,
            0,
            0,
            rdev.0,
            rdev.1,
            name.len() as u32 + 1,
            0,
        ];
        self.buf.extend_from_slice(b"070701");
        for f in fields {
            self.buf.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.buf.extend_from_slice(name.as_bytes());
        self.buf.push(0);
        self.pad();
        self.buf.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        let len = self.buf.len().next_multiple_of(4);
        self.buf.resize(len, 0);
    }

    fn dir(&mut self, name: &str) {
        self.entry(name, 0o040755, (0, 0), b"");
    }

    fn file(&mut self, name: &str, perm: u32, data: &[u8]) {
        self.entry(name, 0o100000 | perm, (0, 0), data);
    }

    fn node(&mut self, name: &str, mode: u32, rdev: (u32, u32)) {
        self.entry(name, mode, rdev, b"");
    }

    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, (0, 0), b"");
        // the kernel reads the archive in 512-byte blocks
        let len = self.buf.len().next_multiple_of(512);
        self.buf.resize(len, 0);
        self.buf
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newc_layout() {
        let mut c = Newc::default();
        c.file("init", 0o755, b"abc");
        let b = c.finish();
        assert_eq!(&b[..6], b"070701");
        // header (110) + "init\0" (5) padded to 116, then data
        assert_eq!(&b[110..115], b"init\0");
        assert_eq!(&b[116..119], b"abc");
        assert_eq!(&b[6 + 6 * 8..6 + 7 * 8], b"00000003", "file size field");
        assert!(b.windows(10).any(|w| w == b"TRAILER!!!"));
        assert_eq!(b.len() % 512, 0);
    }

    #[test]
    fn initrd_holds_init_and_modules() {
        let d = tempfile::tempdir().unwrap();
        let m = d.path().join("modules");
        std::fs::create_dir(&m).unwrap();
        std::fs::write(m.join("order"), "a b\n").unwrap();
        std::fs::write(m.join("a.ko"), "AAAA").unwrap();
        std::fs::write(m.join("b.ko"), "BBBB").unwrap();
        std::fs::write(d.path().join("init"), "INIT").unwrap();
        let out = d.path().join("initrd.img");
        write_initrd(&d.path().join("init"), &m, &out).unwrap();
        let b = std::fs::read(&out).unwrap();
        let s = String::from_utf8_lossy(&b);
        for needle in [
            "modules/a.ko",
            "modules/b.ko",
            "sparkla-initramfs",
            "dev/console",
            "INIT",
            "BBBB",
        ] {
            assert!(s.contains(needle), "{needle} missing");
        }
        assert!(write_initrd(&d.path().join("init"), &d.path().join("none"), &out).is_err());
    }

    #[test]
    fn script_pins_recipe() {
        assert!(BUILD_SCRIPT.contains("SUITE=bookworm"));
        for p in [
            "python3",
            "nodejs",
            "bash",
            "procps",
            "virtio_mmio",
            "virtio_console",
            "virtio_blk",
        ] {
            assert!(BUILD_SCRIPT.contains(p), "{p} missing from the recipe");
        }
    }
}
