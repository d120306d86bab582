//! The QEMU that boots every guest (L0): Debian's QEMU source package with
//! the patches in `qemu/patches/`, built by setup into the cache
//! (x86_64-softmmu, TCG only). `qemu/README.md` says why.
//!
//! The source comes through an apt state of our own with `deb-src` lines
//! for the pinned suite (`qemu_suite`, `qemu_source` in pins.toml); the
//! build is redone only when the version, the patches or the configure
//! options change (a stamp next to the binary records them). The binary
//! sits in a root of its own (`ROOT/usr/bin`) whose `usr/share` and
//! `usr/lib` lead to the firmware Debian's packages installed, where the
//! binary, configured like Debian's (`--prefix=/usr`, Debian's firmware
//! path), relocates its search.

use crate::ctx::Ctx;
use crate::setup::{PrivateApt, Qemu};
use crate::sh;
use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Debian's firmware path (debian/rules), relocated under our root.
const FIRMWARE_PATH: &str = "/usr/share/qemu:/usr/share/seabios:/usr/lib/ipxe/qemu";

/// configure: what booting our guests needs and nothing else.
const CONFIGURE: &[&str] = &[
    "--target-list=x86_64-softmmu",
    "--without-default-features",
    "--enable-tcg",
    "--enable-fdt=system",
    "--disable-docs",
    "--disable-user",
    "--disable-tools",
    "--disable-werror",
    "--disable-install-blobs",
    "--prefix=/usr",
];

/// Where the patched QEMU lives under the cache.
fn dir(cache: &Path) -> PathBuf {
    cache.join("qemu-l0")
}

/// The root holding `usr/bin/qemu-system-x86_64` once built.
pub fn root(cache: &Path) -> PathBuf {
    dir(cache).join("root")
}

/// The patches, in the order they apply (file name order).
fn patches(repo: &Path) -> Result<Vec<PathBuf>> {
    let d = repo.join("qemu/patches");
    let mut v: Vec<PathBuf> = std::fs::read_dir(&d)
        .with_context(|| format!("cannot read {}", d.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "patch"))
        .collect();
    v.sort();
    Ok(v)
}

/// What the build depends on: the source version, each patch's name and
/// content, the configure options.
fn stamp(version: &str, patches: &[PathBuf]) -> Result<String> {
    let mut s = format!("qemu {version}\nconfigure {}\n", CONFIGURE.join(" "));
    for p in patches {
        let data = std::fs::read(p).with_context(|| format!("cannot read {}", p.display()))?;
        s.push_str(&format!(
            "{} {:x}\n",
            p.file_name().unwrap_or_default().to_string_lossy(),
            Sha256::digest(&data)
        ));
    }
    Ok(s)
}

/// Builds the patched QEMU unless the one in the cache matches the pins
/// and the patches; returns its root.
pub fn build(ctx: &Ctx) -> Result<PathBuf> {
    let d = dir(&ctx.cache);
    let root = root(&ctx.cache);
    let bin = root.join("usr/bin/qemu-system-x86_64");
    let patches = patches(&ctx.repo)?;
    let stamp_file = d.join("stamp");
    let pinned = &ctx.pins.qemu_source;
    if bin.is_file() {
        if let Ok(old) = std::fs::read_to_string(&stamp_file) {
            if old == stamp(pinned, &patches)? {
                return Ok(root);
            }
        }
    }
    let apt = PrivateApt::at(
        &ctx.cache.join("apt-src"),
        &format!(
            "deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian {} main\n",
            ctx.pins.qemu_suite
        ),
    )?;
    let version = pick_version(pinned, &apt.versions("qemu")?)?;
    let started = std::time::Instant::now();
    let debs = d.join("source");
    sh::fresh_dir(&debs)?;
    println!("setup: downloading the qemu source package {version}");
    sh::output(
        Command::new("apt-get")
            .current_dir(&debs)
            .args(apt.opts())
            .args(["source", "--download-only"])
            .arg(format!("qemu={version}")),
    )
    .with_context(|| format!("downloading the qemu source package {version} failed"))?;
    let dsc = std::fs::read_dir(&debs)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e == "dsc"))
        .with_context(|| format!("apt-get source left no .dsc in {}", debs.display()))?;
    let src = d.join("src");
    let _ = std::fs::remove_dir_all(&src);
    sh::output(
        Command::new("dpkg-source")
            .args(["--no-copy", "-x"])
            .arg(&dsc)
            .arg(&src),
    )?;
    for p in &patches {
        println!(
            "setup: qemu: applying {}",
            p.file_name().unwrap_or_default().to_string_lossy()
        );
        let out = Command::new("patch")
            .args(["-p1", "-s", "-N", "-F0", "--no-backup-if-mismatch", "-d"])
            .arg(&src)
            .arg("-i")
            .arg(p)
            .output()
            .context("cannot run patch")?;
        if !out.status.success() {
            bail!(
                "{} does not apply to qemu {version}:\n{}{}",
                p.display(),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    let build = d.join("build");
    sh::fresh_dir(&build)?;
    let log = ctx.logs().join("qemu-build.log");
    std::fs::create_dir_all(ctx.logs())?;
    println!(
        "setup: qemu: configure and build x86_64-softmmu (log: {})",
        log.display()
    );
    let logged = |cmd: &mut Command, what: &str| -> Result<()> {
        let out = cmd
            .output()
            .with_context(|| format!("cannot start `{}`", sh::show(cmd)))?;
        let mut text = out.stdout;
        text.extend_from_slice(&out.stderr);
        std::fs::write(&log, &text)?;
        if !out.status.success() {
            bail!(
                "qemu {what} failed ({}); the end of {}:\n{}",
                out.status,
                log.display(),
                sh::tail(&String::from_utf8_lossy(&text), 30)
            );
        }
        Ok(())
    };
    logged(
        Command::new(src.join("configure"))
            .current_dir(&build)
            .args(CONFIGURE)
            .arg(format!("--firmwarepath={FIRMWARE_PATH}"))
            .arg(format!(
                "--with-pkgversion=Debian {version}, kvm-protmem {} patch(es)",
                patches.len()
            )),
        "configure",
    )?;
    logged(
        Command::new("ninja")
            .current_dir(&build)
            .arg("qemu-system-x86_64"),
        "build",
    )?;
    let partial = sh::with_suffix(&root, ".partial");
    sh::fresh_dir(&partial.join("usr/bin"))?;
    std::fs::copy(
        build.join("qemu-system-x86_64"),
        partial.join("usr/bin/qemu-system-x86_64"),
    )?;
    // Firmware: Debian's data package (the system's or setup's private
    // copy) and the firmware packages it depends on.
    let data = Qemu::debian(&ctx.cache)
        .data
        .unwrap_or_else(|| PathBuf::from("/usr/share/qemu"));
    for (link, to) in [
        ("usr/share/qemu", data.as_path()),
        ("usr/share/seabios", Path::new("/usr/share/seabios")),
        ("usr/lib/ipxe", Path::new("/usr/lib/ipxe")),
    ] {
        let l = partial.join(link);
        std::fs::create_dir_all(l.parent().unwrap_or(&partial))?;
        std::os::unix::fs::symlink(to, &l)?;
    }
    check_firmware(&partial.join("usr/bin/qemu-system-x86_64"))?;
    let _ = std::fs::remove_dir_all(&root);
    std::fs::rename(&partial, &root)?;
    std::fs::write(&stamp_file, stamp(pinned, &patches)?)?;
    // The source package, the tree and the objects are 0.5 GB; only the
    // binary is kept.
    for d in [&debs, &src, &build] {
        let _ = std::fs::remove_dir_all(d);
    }
    println!(
        "setup: qemu {version} with {} patch(es) built in {}s: {}",
        patches.len(),
        started.elapsed().as_secs(),
        root.join("usr/bin/qemu-system-x86_64").display()
    );
    Ok(root)
}

/// Starts `bin` as the PC our guests boot on, stopped, and quits it: it
/// fails (loudly) when a firmware file is missing.
fn check_firmware(bin: &Path) -> Result<()> {
    let out = sh::run_with_stdin(
        Command::new(bin).args([
            "-M",
            "pc",
            "-accel",
            "tcg",
            "-nodefaults",
            "-display",
            "none",
            "-S",
            "-monitor",
            "stdio",
        ]),
        b"quit\n",
    )?;
    if !out.status.success() || !out.stderr.is_empty() {
        bail!(
            "the built QEMU {} does not start a PC ({}): {}",
            bin.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// The pinned version if the suite still has it, else the newest (saying
/// so): bookworm's point releases replace the source package.
fn pick_version(pinned: &str, offered: &[String]) -> Result<String> {
    if offered.iter().any(|v| v == pinned) {
        return Ok(pinned.to_string());
    }
    let newest = offered
        .first()
        .with_context(|| "the archive offers no qemu source package".to_string())?;
    println!("setup: the pinned qemu source {pinned} is gone from the archive; using the newest, {newest}");
    Ok(newest.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_repository_has_the_patches_and_the_stamp_names_them() {
        let ctx = Ctx::new().unwrap();
        let p = patches(&ctx.repo).unwrap();
        assert!(!p.is_empty());
        let s = stamp("1:7.2", &p).unwrap();
        assert!(s.starts_with("qemu 1:7.2\nconfigure --target-list=x86_64-softmmu"));
        assert_eq!(s.lines().count(), 2 + p.len());
        assert_ne!(s, stamp("1:7.3", &p).unwrap());
    }

    #[test]
    fn a_vanished_pin_falls_back_to_the_newest() {
        let offered = vec![
            "1:7.2+dfsg-7+deb12u19".to_string(),
            "1:7.2+dfsg-7+deb12u16".to_string(),
        ];
        assert_eq!(
            pick_version("1:7.2+dfsg-7+deb12u16", &offered).unwrap(),
            "1:7.2+dfsg-7+deb12u16"
        );
        assert_eq!(
            pick_version("1:7.2+dfsg-7+deb12u18", &offered).unwrap(),
            "1:7.2+dfsg-7+deb12u19"
        );
        assert!(pick_version("1:7.2", &[]).is_err());
    }
}
