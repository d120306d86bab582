//! `cargo xtask setup`: build dependencies, pinned kernel source, rust-src
//! and bindgen, all idempotent.
//!
//! The kernel source and rust-src come from a Debian suite newer than the
//! machine's (pins.toml). They are only downloaded, through an apt state of
//! our own under the cache (its own sources list, lists and archives), so
//! the system's apt never sees that suite and cannot install from it.

use crate::ctx::Ctx;
use crate::sh;
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Debian packages the build and the boots need (bookworm).
fn packages(llvm: &str) -> Vec<String> {
    let mut p: Vec<String> = [
        "bc",
        "bison",
        "flex",
        "make",
        "gcc",
        "patch",
        "perl",
        "xz-utils",
        "libelf-dev",
        "libssl-dev",
        "cpio",
        "busybox-static",
        "qemu-system-x86",
        "git",
        // libc.a: mainline's KVM selftests are linked static for L1's
        // busybox initramfs (selftests.rs).
        "libc6-dev",
        // Building the patched QEMU (crate::qemu) from Debian's source.
        "dpkg-dev",
        "pkg-config",
        "python3",
        "ninja-build",
        "meson",
        "libglib2.0-dev",
        "libpixman-1-dev",
        "libfdt-dev",
        "zlib1g-dev",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for base in ["clang", "lld", "llvm", "libclang"] {
        p.push(if base == "libclang" {
            format!("libclang-{llvm}-dev")
        } else {
            format!("{base}-{llvm}")
        });
    }
    p
}

/// Everything a kernel build needs, as found or installed by setup.
pub struct Tools {
    /// The pristine kernel source tree (never written to).
    pub pristine: PathBuf,
    /// Kernel version of the pristine tree, e.g. `7.2.12`.
    pub kver: String,
    /// `RUST_LIB_SRC` for the kernel build.
    pub rust_lib_src: PathBuf,
    /// bindgen binary.
    pub bindgen: PathBuf,
    /// LLVM version suffix (`LLVM=-19`).
    pub llvm: String,
    /// rustup toolchain name for the kernel build.
    pub rustc: String,
}

impl Tools {
    /// A `make` invocation in `src` with `O=out` and the toolchain variables.
    pub fn make(&self, src: &Path, out: &Path) -> Command {
        let mut c = Command::new("make");
        c.arg("-C")
            .arg(src)
            .arg(format!("O={}", out.display()))
            .arg("ARCH=x86_64")
            .arg(format!("LLVM=-{}", self.llvm))
            .arg(format!("RUST_LIB_SRC={}", self.rust_lib_src.display()))
            .arg(format!("BINDGEN={}", self.bindgen.display()))
            .env("LIBCLANG_PATH", format!("/usr/lib/llvm-{}/lib", self.llvm))
            .env("RUSTUP_TOOLCHAIN", &self.rustc);
        c
    }
}

/// Runs every setup step; quick when everything is already in place.
pub fn run(ctx: &Ctx) -> Result<Tools> {
    std::fs::create_dir_all(&ctx.cache)
        .with_context(|| format!("cannot create cache directory {}", ctx.cache.display()))?;
    install_packages(ctx)?;
    check_rustc(ctx)?;
    let apt = PrivateApt::new(ctx)?;
    let (pristine, kver) = kernel_source(ctx, &apt)?;
    let rust_lib_src = rust_src(ctx, &apt)?;
    let bindgen = bindgen(ctx)?;
    kexec_tools(&ctx.cache)?;
    let l0 = crate::qemu::build(ctx)?;
    let tools = Tools {
        pristine,
        kver,
        rust_lib_src,
        bindgen,
        llvm: ctx.pins.llvm.clone(),
        rustc: ctx.pins.rustc.clone(),
    };
    rust_available(ctx, &tools)?;
    println!(
        "setup: ok: linux {}, rustc {}, rust-src {}, bindgen {}, LLVM {}, L0 QEMU with qemu/patches {} (cache {})",
        tools.kver,
        ctx.pins.rustc,
        ctx.pins.rust_src,
        ctx.pins.bindgen,
        ctx.pins.llvm,
        l0.join("usr/bin/qemu-system-x86_64").display(),
        ctx.cache.display()
    );
    Ok(tools)
}

fn is_installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .map(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).contains("ok installed"))
        .unwrap_or(false)
}

fn install_packages(ctx: &Ctx) -> Result<()> {
    if !sh::have("dpkg-query") || !sh::have("apt-get") {
        bail!("this needs a Debian system with dpkg and apt-get (bookworm or newer)");
    }
    let mut missing: Vec<String> = packages(&ctx.pins.llvm)
        .into_iter()
        .filter(|p| !is_installed(p))
        .collect();
    let private = Qemu::private_root(&ctx.cache);
    if private.join(QEMU_BIN).is_file() {
        // An earlier setup unpacked a private QEMU: keep using it.
        missing.retain(|p| p != QEMU_PKG);
    }
    if missing.is_empty() {
        return Ok(());
    }
    let uid = sh::output(Command::new("id").arg("-u"))?;
    if uid.trim() != "0" {
        bail!(
            "missing Debian packages: {}; install them as root: apt-get install {}",
            missing.join(" "),
            missing.join(" ")
        );
    }
    if missing.iter().any(|p| p == QEMU_PKG) {
        let sim = simulate(&[QEMU_PKG.to_string()])?;
        let removed = removals(&sim);
        if !removed.is_empty() {
            // The machine's QEMU packages (e.g. a backports qemu-utils)
            // break the suite's qemu-system-x86: install its libraries and
            // firmware, and unpack QEMU itself under the cache instead.
            println!(
                "setup: installing {QEMU_PKG} would remove {}; using a private copy of it under {}",
                removed.join(" "),
                private.display()
            );
            missing.retain(|p| p != QEMU_PKG);
            let deps: Vec<String> = installs(&sim)
                .into_iter()
                .filter(|p| !p.starts_with("qemu-") && !missing.contains(p))
                .collect();
            missing.extend(deps);
            apt_install(&missing)?;
            return unpack_private_qemu(&private);
        }
    }
    apt_install(&missing)
}

/// `apt-get install -s` of `pkgs` (lists updated first if they are stale).
fn simulate(pkgs: &[String]) -> Result<String> {
    let run = || {
        Command::new("apt-get")
            .args(["install", "-s", "-q", "--no-install-recommends"])
            .args(pkgs)
            .output()
    };
    let mut out = run()?;
    if !out.status.success() {
        sh::run(Command::new("apt-get").args(["-q", "update"]))?;
        out = run()?;
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Installs `missing`, never removing a package.
fn apt_install(missing: &[String]) -> Result<()> {
    println!("setup: installing {}", missing.join(" "));
    let install = |update: bool| -> Result<()> {
        if update {
            sh::run(Command::new("apt-get").args(["-q", "update"]))?;
        }
        // --no-remove: setup never takes a package away from the machine
        // (e.g. bookworm's qemu-system-x86 would replace a backports
        // qemu-utils); apt aborts instead, and we name the conflict.
        sh::run(
            Command::new("apt-get")
                .args([
                    "install",
                    "-y",
                    "-q",
                    "--no-install-recommends",
                    "--no-remove",
                ])
                .args(missing)
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )
    };
    // Lists may be missing or stale on a fresh machine: update and retry once.
    install(false).or_else(|_| install(true)).map_err(|e| {
        let removed = simulate(missing).map(|s| removals(&s)).unwrap_or_default();
        if removed.is_empty() {
            e.context("installing build dependencies failed; check the apt sources and network")
        } else {
            anyhow::anyhow!(
                "installing {} would remove {} from this machine; setup removes nothing: \
                 resolve the conflict (install matching versions of {} yourself) and run again",
                missing.join(" "),
                removed.join(" "),
                missing.join(" ")
            )
        }
    })
}

/// The Debian package of the QEMU that boots every guest.
const QEMU_PKG: &str = "qemu-system-x86";
/// The binary, relative to a root.
const QEMU_BIN: &str = "usr/bin/qemu-system-x86_64";
/// Its firmware and option ROMs, relative to a root.
const QEMU_DATA: &str = "usr/share/qemu";
/// Firmware of other packages (seabios, ipxe-qemu) it loads.
const FIRMWARE_DIRS: [&str; 2] = ["usr/share/seabios", "usr/lib/ipxe"];

/// Environment variable naming another `qemu-system-x86_64` to boot the
/// guests with, or `debian` for Debian's unpatched one (the control of
/// qemu/patches).
pub const QEMU_ENV: &str = "KVM_PROTMEM_QEMU";

/// A QEMU binary and the firmware directory it is started with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Qemu {
    /// `qemu-system-x86_64`.
    pub bin: PathBuf,
    /// Directory of its firmware (`-L`), for the private copy.
    pub data: Option<PathBuf>,
}

impl Qemu {
    fn private_root(cache: &Path) -> PathBuf {
        cache.join("qemu")
    }

    /// The QEMU that boots the guests: the binary [`QEMU_ENV`] names
    /// (`debian`: Debian's) if set, else the patched build
    /// (crate::qemu) if setup made it, else Debian's.
    pub fn find(cache: &Path) -> Qemu {
        let debian = Qemu::debian(cache);
        let patched = crate::qemu::root(cache).join(QEMU_BIN);
        match std::env::var_os(QEMU_ENV) {
            Some(v) if v == "debian" => debian,
            Some(bin) if !bin.is_empty() => Qemu {
                bin: bin.into(),
                data: Some(
                    debian
                        .data
                        .unwrap_or_else(|| Path::new("/").join(QEMU_DATA)),
                ),
            },
            _ if patched.is_file() => Qemu {
                bin: patched,
                data: None,
            },
            _ => debian,
        }
    }

    /// Debian's QEMU: the private copy under `cache` if setup made one,
    /// else the system's.
    pub fn debian(cache: &Path) -> Qemu {
        let root = Qemu::private_root(cache);
        if root.join(QEMU_BIN).is_file() {
            Qemu {
                bin: root.join(QEMU_BIN),
                data: Some(root.join(QEMU_DATA)),
            }
        } else {
            Qemu {
                bin: "qemu-system-x86_64".into(),
                data: None,
            }
        }
    }

    /// A command running this QEMU.
    pub fn command(&self) -> Command {
        let mut cmd = Command::new(&self.bin);
        if let Some(d) = &self.data {
            cmd.arg("-L").arg(d);
        }
        cmd
    }
}

/// Unpacks the suite's QEMU (binary, common and data packages) into `root`;
/// its libraries and firmware packages are installed already. The data
/// package's links into other packages (seabios, ipxe) are made absolute,
/// so they resolve to the installed firmware; links within it stay.
fn unpack_private_qemu(root: &Path) -> Result<()> {
    let debs = root.with_extension("debs");
    let pkgs = [QEMU_PKG, "qemu-system-common", "qemu-system-data"];
    let partial = sh::with_suffix(root, ".partial");
    download_unpacked(&debs, &pkgs, &partial)?;
    let data = partial.join(QEMU_DATA);
    for entry in std::fs::read_dir(&data)
        .with_context(|| format!("{} has no {QEMU_DATA}", partial.display()))?
    {
        let path = entry?.path();
        let Ok(target) = std::fs::read_link(&path) else {
            continue;
        };
        // A link within the data package stays; one into another
        // package points at the installed copy.
        if target.is_relative() && !data.join(&target).exists() {
            let abs = Path::new("/").join(QEMU_DATA).join(&target);
            std::fs::remove_file(&path)?;
            std::os::unix::fs::symlink(&abs, &path)?;
        }
    }
    // QEMU looks for firmware in its configured directories relocated
    // under its own prefix: point them at the installed firmware packages.
    for fw in FIRMWARE_DIRS {
        let link = partial.join(fw);
        if !link.exists() {
            if let Some(parent) = link.parent() {
                std::fs::create_dir_all(parent)?;
            }
            std::os::unix::fs::symlink(Path::new("/").join(fw), &link)?;
        }
    }
    let out = Command::new(partial.join(QEMU_BIN))
        .arg("--version")
        .output();
    match out {
        Ok(o) if o.status.success() => {
            let v = String::from_utf8_lossy(&o.stdout);
            println!("setup: private {}", v.lines().next().unwrap_or_default());
        }
        Ok(o) => bail!(
            "the private QEMU in {} does not run: {}",
            partial.display(),
            String::from_utf8_lossy(&o.stderr).trim()
        ),
        Err(e) => bail!(
            "the private QEMU in {} does not run: {e}",
            partial.display()
        ),
    }
    let _ = std::fs::remove_dir_all(root);
    std::fs::rename(&partial, root)?;
    let _ = std::fs::remove_dir_all(&debs);
    Ok(())
}

/// Downloads `pkgs` (from the system's apt sources) into `debs` and
/// unpacks them all into `into`; both directories are made anew.
fn download_unpacked(debs: &Path, pkgs: &[impl AsRef<str>], into: &Path) -> Result<()> {
    let names: Vec<&str> = pkgs.iter().map(AsRef::as_ref).collect();
    sh::fresh_dir(debs)?;
    sh::output(
        Command::new("apt-get")
            .current_dir(debs)
            .args(["download", "-q"])
            .args(&names),
    )
    .with_context(|| format!("downloading {} failed", names.join(" ")))?;
    sh::fresh_dir(into)?;
    for deb in std::fs::read_dir(debs)? {
        sh::run(
            Command::new("dpkg-deb")
                .arg("-x")
                .arg(deb?.path())
                .arg(into),
        )?;
    }
    Ok(())
}

/// Where setup unpacks Debian's kexec-tools (`sbin/kexec`,
/// `sbin/vmcore-dmesg`) and the libraries of it that this system lacks.
pub fn kexec_root(cache: &Path) -> PathBuf {
    cache.join("kexec")
}

/// The library directories under an unpacked package root, for `ldd`.
pub fn lib_path(root: &Path) -> String {
    ["lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu"]
        .iter()
        .map(|d| root.join(d).to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(":")
}

/// Unpacks `kexec-tools` and the libraries it depends on that are not
/// installed (the Xen control libraries on a stock Debian) into
/// [`kexec_root`], for the guests' kexec and kdump scenarios; nothing is
/// installed on this machine (the package's services would run here).
fn kexec_tools(cache: &Path) -> Result<PathBuf> {
    let root = kexec_root(cache);
    if root.join("sbin/kexec").is_file() {
        return Ok(root);
    }
    let deps = sh::output(Command::new("apt-cache").args([
        "depends",
        "--recurse",
        "--no-recommends",
        "--no-suggests",
        "--no-conflicts",
        "--no-breaks",
        "--no-replaces",
        "--no-enhances",
        "kexec-tools",
    ]))
    .context("apt-cache cannot resolve kexec-tools")?;
    let mut pkgs = vec!["kexec-tools".to_string()];
    pkgs.extend(
        deps.lines()
            .filter(|l| l.starts_with("lib") && !l.contains(':'))
            .map(str::trim)
            .filter(|p| !is_installed(p))
            .map(str::to_string),
    );
    pkgs.sort();
    pkgs.dedup();
    let debs = root.with_extension("debs");
    println!("setup: downloading {}", pkgs.join(" "));
    let partial = sh::with_suffix(&root, ".partial");
    download_unpacked(&debs, &pkgs, &partial)?;
    for bin in ["sbin/kexec", "sbin/vmcore-dmesg"] {
        let out = sh::output(
            Command::new("ldd")
                .arg(partial.join(bin))
                .env("LD_LIBRARY_PATH", lib_path(&partial)),
        )?;
        if let Some(l) = out.lines().find(|l| l.contains("not found")) {
            bail!(
                "{bin} from kexec-tools needs a library that neither this system nor the \
                 downloaded packages have: {}",
                l.trim()
            );
        }
    }
    let _ = std::fs::remove_dir_all(&root);
    std::fs::rename(&partial, &root)?;
    let _ = std::fs::remove_dir_all(&debs);
    println!("setup: kexec-tools unpacked in {}", root.display());
    Ok(root)
}

/// Packages an `apt-get -s` transcript installs (`Inst NAME [OLD] (NEW ...)`).
fn installs(sim: &str) -> Vec<String> {
    sim.lines()
        .filter_map(|l| l.strip_prefix("Inst "))
        .filter_map(|r| r.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

/// Packages an `apt-get -s` transcript removes (`Remv NAME [VERSION]`).
fn removals(sim: &str) -> Vec<String> {
    sim.lines()
        .filter_map(|l| l.strip_prefix("Remv "))
        .filter_map(|r| r.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

fn check_rustc(ctx: &Ctx) -> Result<()> {
    let want = &ctx.pins.rustc;
    let out = Command::new("rustc")
        .arg("--version")
        .env("RUSTUP_TOOLCHAIN", want)
        .output();
    match out {
        Ok(o) if o.status.success() && String::from_utf8_lossy(&o.stdout).starts_with(&format!("rustc {want}")) => Ok(()),
        Ok(o) => bail!(
            "rustc {want} is required (pins.toml) but RUSTUP_TOOLCHAIN={want} rustc --version says: {}{}; install it with `rustup toolchain install {want}`",
            String::from_utf8_lossy(&o.stdout).trim(),
            String::from_utf8_lossy(&o.stderr).trim()
        ),
        Err(e) => bail!("cannot run rustc ({e}); install rustup and `rustup toolchain install {want}`"),
    }
}

/// An apt state of our own, used only to download from a pinned suite.
pub(crate) struct PrivateApt {
    dir: PathBuf,
    updated: std::cell::Cell<bool>,
}

impl PrivateApt {
    fn new(ctx: &Ctx) -> Result<Self> {
        let list = format!(
            "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian {} main\n",
            ctx.pins.suite
        );
        PrivateApt::at(&ctx.cache.join("apt"), &list)
    }

    /// The apt state in `dir`, reading the sources `list`.
    pub(crate) fn at(dir: &Path, list: &str) -> Result<Self> {
        for d in ["lists/partial", "cache/archives/partial"] {
            std::fs::create_dir_all(dir.join(d))?;
        }
        sh::write_if_changed(&dir.join("sources.list"), list.as_bytes())?;
        Ok(PrivateApt {
            dir: dir.to_path_buf(),
            updated: false.into(),
        })
    }

    pub(crate) fn opts(&self) -> Vec<String> {
        let d = self.dir.display();
        vec![
            format!("-oDir::Etc::SourceList={d}/sources.list"),
            "-oDir::Etc::SourceParts=/dev/null".into(),
            format!("-oDir::State::Lists={d}/lists"),
            format!("-oDir::Cache={d}/cache"),
            "-oDir::State::Status=/dev/null".into(),
            "-oAPT::Architectures=amd64".into(),
            "-oAPT::Sandbox::User=root".into(),
            "-q".into(),
        ]
    }

    fn update(&self) -> Result<()> {
        if self.updated.get() {
            return Ok(());
        }
        sh::output(Command::new("apt-get").args(self.opts()).arg("update")).context(
            "cannot read the package index of the pinned suite (network or archive down?)",
        )?;
        self.updated.set(true);
        Ok(())
    }

    /// Versions of `pkg` the suite offers, newest first.
    pub(crate) fn versions(&self, pkg: &str) -> Result<Vec<String>> {
        self.update()?;
        let out = sh::output(
            Command::new("apt-cache")
                .args(self.opts())
                .args(["madison", pkg]),
        )?;
        let mut v: Vec<String> = out
            .lines()
            .filter_map(|l| l.split('|').nth(1).map(|s| s.trim().to_string()))
            .collect();
        v.dedup();
        Ok(v)
    }

    /// Downloads `pkg=version` into `dir` unless it is already there.
    fn download(&self, pkg: &str, version: &str, dir: &Path) -> Result<PathBuf> {
        let deb = dir.join(format!("{pkg}_{}_all.deb", version.replace(':', "%3a")));
        if deb.is_file() {
            return Ok(deb);
        }
        std::fs::create_dir_all(dir)?;
        println!("setup: downloading {pkg} {version}");
        sh::output(
            Command::new("apt-get")
                .current_dir(dir)
                .args(self.opts())
                .arg("download")
                .arg(format!("{pkg}={version}")),
        )
        .with_context(|| format!("downloading {pkg} {version} failed"))?;
        if !deb.is_file() {
            bail!(
                "apt-get download {pkg}={version} did not produce {}",
                deb.display()
            );
        }
        Ok(deb)
    }
}

/// Picks the pinned version if the archive still has it, else the newest of
/// the same series (saying so).
fn pick_kernel_version(pinned: &str, series: &str, offered: &[String]) -> Result<String> {
    if offered.iter().any(|v| v == pinned) {
        return Ok(pinned.to_string());
    }
    let newest = offered
        .iter()
        .find(|v| v.starts_with(&format!("{series}.")))
        .with_context(|| {
            format!("the archive offers no linux-source-{series} at all (seen: {offered:?})")
        })?;
    println!("setup: pinned linux-source-{series} {pinned} is gone from the archive; using the newest, {newest}");
    Ok(newest.clone())
}

fn kernel_source(ctx: &Ctx, apt: &PrivateApt) -> Result<(PathBuf, String)> {
    let pkg = format!("linux-source-{}", ctx.pins.linux_series);
    let debs = ctx.cache.join("debs");
    let pinned = &ctx.pins.linux_source;
    let version = if debs.join(format!("{pkg}_{pinned}_all.deb")).is_file()
        || ctx.cache.join("src").join(pinned).is_dir()
    {
        pinned.clone()
    } else {
        pick_kernel_version(pinned, &ctx.pins.linux_series, &apt.versions(&pkg)?)?
    };
    let root = ctx.cache.join("src").join(&version);
    let tree = root.join(format!("linux-source-{}", ctx.pins.linux_series));
    if !root.is_dir() {
        let deb = apt.download(&pkg, &version, &debs)?;
        let partial = sh::with_suffix(&root, ".partial");
        sh::fresh_dir(&partial)?;
        println!("setup: unpacking {pkg} {version}");
        sh::run(
            Command::new("dpkg-deb")
                .arg("-x")
                .arg(&deb)
                .arg(partial.join("deb")),
        )?;
        let tarball = partial
            .join("deb/usr/src")
            .join(format!("linux-source-{}.tar.xz", ctx.pins.linux_series));
        sh::run(
            Command::new("tar")
                .arg("-xf")
                .arg(&tarball)
                .arg("-C")
                .arg(&partial),
        )?;
        std::fs::remove_dir_all(partial.join("deb"))?;
        std::fs::rename(&partial, &root)?;
    }
    let kver = kernel_version(&tree)?;
    if !kver.starts_with(&format!("{}.", ctx.pins.linux_series)) {
        bail!(
            "{} holds Linux {kver}, not {}.x",
            tree.display(),
            ctx.pins.linux_series
        );
    }
    Ok((tree, kver))
}

/// Reads VERSION.PATCHLEVEL.SUBLEVEL from a kernel tree's Makefile.
pub fn kernel_version(tree: &Path) -> Result<String> {
    let mk = std::fs::read_to_string(tree.join("Makefile"))
        .with_context(|| format!("{} is not a kernel tree", tree.display()))?;
    let field = |name: &str| {
        mk.lines()
            .find_map(|l| {
                l.strip_prefix(name)
                    .and_then(|r| r.trim().strip_prefix('='))
            })
            .map(|v| v.trim().to_string())
            .with_context(|| format!("no {name} in {}/Makefile", tree.display()))
    };
    Ok(format!(
        "{}.{}.{}",
        field("VERSION")?,
        field("PATCHLEVEL")?,
        field("SUBLEVEL")?
    ))
}

fn rust_src(ctx: &Ctx, apt: &PrivateApt) -> Result<PathBuf> {
    let version = &ctx.pins.rust_src;
    let root = ctx.cache.join("rust-src").join(version);
    let lib = root.join("usr/lib/rustlib/src/rust/library");
    if lib.join("core").is_dir() {
        return Ok(lib);
    }
    if !apt.versions("rust-src")?.iter().any(|v| v == version) {
        bail!(
            "rust-src {version} (matching rustc {}) is no longer in {}; update rust_src and rustc in guest-kernel/pins.toml together",
            ctx.pins.rustc,
            ctx.pins.suite
        );
    }
    let deb = apt.download("rust-src", version, &ctx.cache.join("debs"))?;
    let partial = sh::with_suffix(&root, ".partial");
    sh::fresh_dir(&partial)?;
    sh::run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&partial))?;
    std::fs::rename(&partial, &root)?;
    Ok(lib)
}

fn bindgen(ctx: &Ctx) -> Result<PathBuf> {
    let root = ctx.cache.join("tools");
    let bin = root.join("bin/bindgen");
    let want = &ctx.pins.bindgen;
    let have = Command::new(&bin)
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    if have == format!("bindgen {want}") {
        return Ok(bin);
    }
    println!(
        "setup: installing bindgen-cli {want} into {}",
        root.display()
    );
    sh::run(
        Command::new("cargo")
            .args([
                "install",
                "--quiet",
                "--locked",
                "bindgen-cli",
                "--version",
                want,
                "--root",
            ])
            .arg(&root),
    )
    .context("installing bindgen-cli from crates.io failed")?;
    Ok(bin)
}

fn rust_available(ctx: &Ctx, tools: &Tools) -> Result<()> {
    let stamp = ctx.cache.join("stamps").join(format!(
        "rustavailable-{}-{}-{}-{}",
        tools.kver, tools.rustc, ctx.pins.bindgen, tools.llvm
    ));
    if stamp.is_file() {
        return Ok(());
    }
    let scratch = ctx.cache.join("scratch/rustavailable");
    std::fs::create_dir_all(&scratch)?;
    let out = sh::output(tools.make(&tools.pristine, &scratch).arg("rustavailable"))
        .context("`make rustavailable` failed: the kernel does not accept this Rust toolchain")?;
    if !out.contains("Rust is available") {
        bail!("`make rustavailable` did not say Rust is available:\n{out}");
    }
    std::fs::create_dir_all(stamp.parent().unwrap_or(&ctx.cache))?;
    std::fs::write(&stamp, out)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn apt_removals_are_named() {
        let sim = "NOTE: simulation\nRemv qemu-utils [1:8.2+dfsg-1~bpo12+1]\n\
                   Inst qemu-system-x86 (1:7.2+dfsg-7 Debian:12)\nRemv foo\n";
        assert_eq!(removals(sim), vec!["qemu-utils", "foo"]);
        assert!(removals("Inst a (1)\nConf a (1)\n").is_empty());
        assert_eq!(installs(sim), vec!["qemu-system-x86"]);
    }

    #[test]
    fn debian_qemu_is_the_systems_unless_a_private_copy_exists() {
        let cache = std::env::temp_dir().join(format!("xtask-qemu-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&cache);
        assert_eq!(
            Qemu::debian(&cache).bin,
            PathBuf::from("qemu-system-x86_64")
        );
        let bin = Qemu::private_root(&cache).join(QEMU_BIN);
        std::fs::create_dir_all(bin.parent().unwrap()).unwrap();
        std::fs::write(&bin, b"").unwrap();
        let q = Qemu::debian(&cache);
        let args: Vec<_> = q.command().get_args().map(|a| a.to_owned()).collect();
        assert_eq!(q.bin, bin);
        assert_eq!(args[0], "-L");
        assert!(args[1].to_string_lossy().ends_with("qemu/usr/share/qemu"));
        // The patched build, once made, boots the guests.
        let patched = crate::qemu::root(&cache).join(QEMU_BIN);
        if std::env::var_os(QEMU_ENV).is_none() {
            assert_eq!(Qemu::find(&cache), q);
            std::fs::create_dir_all(patched.parent().unwrap()).unwrap();
            std::fs::write(&patched, b"").unwrap();
            assert_eq!(Qemu::find(&cache).bin, patched);
        }
        std::fs::remove_dir_all(&cache).unwrap();
    }

    #[test]
    fn kernel_version_falls_back_to_newest_of_series() {
        let offered = vec![
            "7.2.14-1~bpo13+1".to_string(),
            "7.2.12-1~bpo13+1".to_string(),
        ];
        assert_eq!(
            pick_kernel_version("7.2.12-1~bpo13+1", "7.2", &offered).unwrap(),
            "7.2.12-1~bpo13+1"
        );
        assert_eq!(
            pick_kernel_version("7.2.9-1~bpo13+1", "7.2", &offered).unwrap(),
            "7.2.14-1~bpo13+1"
        );
        assert!(pick_kernel_version("7.2.9", "7.2", &["7.3.1-1".to_string()]).is_err());
    }

    #[test]
    fn package_list_names_llvm_version() {
        let p = packages("19");
        assert!(p.contains(&"clang-19".to_string()));
        assert!(p.contains(&"libclang-19-dev".to_string()));
    }
}
