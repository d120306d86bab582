//! A `newc` cpio writer for initramfs images (no root, no mknod needed).

use anyhow::{Context, Result};
use std::path::Path;

/// An initramfs being assembled in memory.
#[derive(Default)]
pub struct Initramfs {
    buf: Vec<u8>,
    ino: u32,
}

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;

impl Initramfs {
    pub fn new() -> Self {
        Self::default()
    }

    fn entry(&mut self, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) {
        self.ino += 1;
        let name = name.trim_start_matches('/');
        let fields = [
            self.ino,
            mode,
            0, // uid
            0, // gid
            if mode & S_IFDIR == S_IFDIR { 2 } else { 1 },
            0, // mtime: reproducible images
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
        while self.buf.len() % 4 != 0 {
            self.buf.push(0);
        }
    }

    pub fn dir(&mut self, path: &str) -> &mut Self {
        self.entry(path, S_IFDIR | 0o755, (0, 0), &[]);
        self
    }

    pub fn file(&mut self, path: &str, mode: u32, data: &[u8]) -> &mut Self {
        self.entry(path, S_IFREG | mode, (0, 0), data);
        self
    }

    /// Adds a file copied from the host.
    pub fn copy(&mut self, path: &str, mode: u32, from: &Path) -> Result<&mut Self> {
        let data =
            std::fs::read(from).with_context(|| format!("cannot read {}", from.display()))?;
        Ok(self.file(path, mode, &data))
    }

    pub fn symlink(&mut self, path: &str, target: &str) -> &mut Self {
        self.entry(path, S_IFLNK | 0o777, (0, 0), target.as_bytes());
        self
    }

    pub fn chardev(&mut self, path: &str, major: u32, minor: u32) -> &mut Self {
        self.entry(path, S_IFCHR | 0o600, (major, minor), &[]);
        self
    }

    /// Closes the archive and returns its bytes.
    pub fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, (0, 0), &[]);
        while self.buf.len() % 512 != 0 {
            self.buf.push(0);
        }
        self.buf
    }
}

/// The busybox-based initramfs that every guest boots: busybox, `/init`
/// from `tests/guest/init`, and the given extra files.
pub fn busybox(repo: &Path, extra: &[(&str, &[u8])]) -> Result<Vec<u8>> {
    let mut i = busybox_base(repo)?;
    for (path, data) in extra {
        if let Some(parent) = Path::new(path).parent() {
            if !parent.as_os_str().is_empty() {
                i.dir(&parent.to_string_lossy());
            }
        }
        i.file(path, 0o644, data);
    }
    Ok(i.finish())
}

/// The files of [`busybox`] without extras, still open for more.
pub fn busybox_base(repo: &Path) -> Result<Initramfs> {
    let mut i = Initramfs::new();
    for d in ["bin", "dev", "proc", "sys", "tmp", "etc", "mnt"] {
        i.dir(d);
    }
    i.chardev("dev/console", 5, 1).chardev("dev/null", 1, 3);
    i.copy("bin/busybox", 0o755, Path::new("/bin/busybox"))
        .context("busybox-static is needed (cargo xtask setup installs it)")?;
    i.symlink("bin/sh", "busybox");
    i.copy("init", 0o755, &repo.join("tests/guest/init"))?;
    Ok(i)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newc_layout() {
        let mut i = Initramfs::new();
        i.dir("bin")
            .file("bin/x", 0o755, b"abcde")
            .symlink("bin/sh", "x");
        let b = i.finish();
        assert_eq!(b.len() % 512, 0);
        assert_eq!(&b[..6], b"070701");
        // Header (110) + "bin\0" (4) = 114, padded to 116 where the next entry starts.
        assert_eq!(&b[116..122], b"070701");
        let s = String::from_utf8_lossy(&b);
        assert!(s.contains("bin/x\0"));
        assert!(s.contains("abcde"));
        assert!(s.contains("TRAILER!!!"));
        // File size field of bin/x: 5 bytes.
        let x = &b[116..];
        assert_eq!(&x[54..62], b"00000005");
    }

    #[test]
    fn cpio_tool_reads_it_back() {
        if !crate::sh::have("cpio") {
            return;
        }
        let mut i = Initramfs::new();
        i.dir("d")
            .file("d/f", 0o644, b"hello")
            .symlink("d/l", "f")
            .chardev("d/c", 5, 1);
        let path = std::env::temp_dir().join(format!("xtask-cpio-{}", std::process::id()));
        std::fs::write(&path, i.finish()).unwrap();
        let out = std::process::Command::new("cpio")
            .args(["-itv", "-F"])
            .arg(&path)
            .output()
            .unwrap();
        std::fs::remove_file(&path).unwrap();
        let list = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        for want in ["d/f", "d/l -> f", "d/c"] {
            assert!(list.contains(want), "{want} missing in:\n{list}");
        }
    }
}
