//! A stock distribution kernel as the L1 host: the machine's own Debian
//! suite's `linux-image-amd64`, whose KVM is modular and knows nothing of
//! this project (PLATFORM.md, "A stock distribution kernel as L1").
//!
//! Only downloaded and unpacked under the cache (`stock-l1/`), never
//! installed: the kernel image and the four modules KVM on AMD needs, in
//! the order they are loaded.

use crate::ctx::Ctx;
use crate::sh;
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The modules L1's /init loads, in order (kvm_amd gets `npt=1` from the
/// L1 command line).
const MODULES: [&str; 4] = [
    "kernel/virt/lib/irqbypass.ko",
    "kernel/arch/x86/kvm/kvm.ko",
    "kernel/drivers/crypto/ccp/ccp.ko",
    "kernel/arch/x86/kvm/kvm-amd.ko",
];

/// A stock kernel ready to boot as L1.
pub struct StockHost {
    /// Debian package it came from, e.g. `linux-image-6.1.0-57-amd64`.
    pub package: String,
    /// The kernel image.
    pub vmlinuz: PathBuf,
    /// KVM's modules, in load order.
    pub modules: Vec<PathBuf>,
}

/// The package `linux-image-amd64` depends on in the machine's suite.
fn current_package() -> Result<String> {
    let out = sh::output(Command::new("apt-cache").args(["depends", "linux-image-amd64"]))
        .context("apt-cache cannot resolve linux-image-amd64 (apt lists missing?)")?;
    out.lines()
        .find_map(|l| l.trim().strip_prefix("Depends: linux-image-"))
        .map(|p| format!("linux-image-{}", p.trim()))
        .context("linux-image-amd64 depends on no linux-image-* package")
}

/// Downloads and unpacks the stock kernel once; later calls reuse it.
pub fn host(ctx: &Ctx) -> Result<StockHost> {
    let dir = ctx.cache.join("stock-l1");
    let ready = dir.join("package");
    if let Ok(package) = std::fs::read_to_string(&ready) {
        let package = package.trim().to_string();
        let host = layout(&dir, package);
        if host.vmlinuz.is_file() && host.modules.iter().all(|m| m.is_file()) {
            return Ok(host);
        }
    }
    let package = current_package()?;
    println!("stock: downloading {package} (the L1 of the stock-host scenarios)");
    let _ = std::fs::remove_dir_all(&dir);
    let debs = dir.join("deb");
    std::fs::create_dir_all(&debs)?;
    sh::output(
        Command::new("apt-get")
            .current_dir(&debs)
            .args(["download", "-q", &package]),
    )
    .with_context(|| format!("apt-get download {package} failed"))?;
    let deb = std::fs::read_dir(&debs)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .with_context(|| format!("apt-get download {package} left no .deb"))?;
    let root = dir.join("root");
    sh::run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root))?;
    let host = layout(&dir, package.clone());
    let release = package.trim_start_matches("linux-image-");
    std::fs::copy(root.join(format!("boot/vmlinuz-{release}")), &host.vmlinuz)
        .with_context(|| format!("{package} has no boot/vmlinuz-{release}"))?;
    for (m, dst) in MODULES.iter().zip(&host.modules) {
        let src = root.join(format!("lib/modules/{release}/{m}"));
        if !src.is_file() {
            bail!("{package} lacks {m}: KVM is not modular there as expected");
        }
        std::fs::copy(&src, dst)?;
    }
    std::fs::remove_dir_all(&root)?;
    std::fs::remove_dir_all(&debs)?;
    std::fs::write(&ready, &package)?;
    Ok(host)
}

/// Where the pieces of `package` live under `dir`.
fn layout(dir: &Path, package: String) -> StockHost {
    StockHost {
        package,
        vmlinuz: dir.join("vmlinuz"),
        modules: MODULES
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let name = Path::new(m).file_name().unwrap_or_default();
                dir.join(format!("{i}-{}", name.to_string_lossy()))
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modules_keep_their_load_order() {
        let h = layout(Path::new("/c"), "linux-image-6.1.0-57-amd64".into());
        let names: Vec<_> = h
            .modules
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            names,
            ["0-irqbypass.ko", "1-kvm.ko", "2-ccp.ko", "3-kvm-amd.ko"]
        );
        let mut sorted = names.clone();
        sorted.sort();
        assert_eq!(
            sorted, names,
            "the glob in tests/host/init loads them in order"
        );
    }
}
