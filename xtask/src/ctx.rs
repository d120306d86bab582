//! Where things are: the repository, the cache outside it, pinned versions.

use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Environment variable that overrides the cache directory.
pub const CACHE_ENV: &str = "KVM_PROTMEM_CACHE";

/// Paths and pins shared by every command.
pub struct Ctx {
    /// The repository root.
    pub repo: PathBuf,
    /// The cache directory (downloads, pristine source, trees, builds).
    pub cache: PathBuf,
    /// `guest-kernel/pins.toml`.
    pub pins: Pins,
}

/// Pinned versions (`guest-kernel/pins.toml`).
pub struct Pins {
    pub suite: String,
    pub linux_source: String,
    pub linux_series: String,
    pub rust_src: String,
    pub rustc: String,
    pub bindgen: String,
    pub llvm: String,
    /// Debian suite and version of the QEMU source package (crate::qemu).
    pub qemu_suite: String,
    pub qemu_source: String,
}

impl Ctx {
    pub fn new() -> Result<Self> {
        let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .context("xtask has no parent directory")?
            .to_path_buf();
        let cache = match std::env::var_os(CACHE_ENV) {
            Some(p) if !p.is_empty() => PathBuf::from(p),
            _ => match std::env::var_os("XDG_CACHE_HOME") {
                Some(p) if !p.is_empty() => PathBuf::from(p).join("kvm-protmem"),
                _ => PathBuf::from(std::env::var_os("HOME").context("HOME is not set")?)
                    .join(".cache/kvm-protmem"),
            },
        };
        let pins = Pins::load(&repo.join("guest-kernel/pins.toml"))?;
        Ok(Ctx { repo, cache, pins })
    }

    /// Directory for logs of builds and boots.
    pub fn logs(&self) -> PathBuf {
        self.cache.join("logs")
    }
}

impl Pins {
    fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let map = parse_pins(&text).with_context(|| format!("in {}", path.display()))?;
        let get = |k: &str| -> Result<String> {
            map.get(k)
                .cloned()
                .with_context(|| format!("{}: missing key `{k}`", path.display()))
        };
        Ok(Pins {
            suite: get("suite")?,
            linux_source: get("linux_source")?,
            linux_series: get("linux_series")?,
            rust_src: get("rust_src")?,
            rustc: get("rustc")?,
            bindgen: get("bindgen")?,
            llvm: get("llvm")?,
            qemu_suite: get("qemu_suite")?,
            qemu_source: get("qemu_source")?,
        })
    }
}

/// Parses `key = "value"` lines; `#` starts a comment line.
fn parse_pins(text: &str) -> Result<BTreeMap<String, String>> {
    let mut map = BTreeMap::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((k, v)) = line.split_once('=') else {
            bail!("line {}: expected key = \"value\", got `{line}`", i + 1);
        };
        let v = v.trim();
        let Some(v) = v.strip_prefix('"').and_then(|v| v.strip_suffix('"')) else {
            bail!("line {}: value of `{}` must be quoted", i + 1, k.trim());
        };
        map.insert(k.trim().to_string(), v.to_string());
    }
    Ok(map)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins_parse_and_reject_garbage() {
        let m = parse_pins("# c\nrustc = \"1.95.0\"\n\nllvm = \"19\"\n").unwrap();
        assert_eq!(m["rustc"], "1.95.0");
        assert_eq!(m["llvm"], "19");
        assert!(parse_pins("rustc 1.95").is_err());
        assert!(parse_pins("rustc = 1.95").is_err());
    }

    #[test]
    fn repository_pins_are_complete() {
        let ctx = Ctx::new().unwrap();
        assert!(ctx.pins.rust_src.starts_with(&ctx.pins.rustc));
        assert!(ctx.pins.linux_source.starts_with(&ctx.pins.linux_series));
    }
}
