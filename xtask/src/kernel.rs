//! `cargo xtask kernel`: overlay, configuration from fragments, incremental
//! out-of-tree build with progress.

use crate::ctx::Ctx;
use crate::overlay::{self, Overlay};
use crate::setup::Tools;
use crate::sh;
use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Configuration fragments merged onto `make tinyconfig`, in order.
pub const FRAGMENTS: &[&str] = &[
    "guest-kernel/config/guest.config",
    "guest-kernel/config/host.config",
    "guest-kernel/config/protmem.config",
];

/// A built kernel.
pub struct Kernel {
    /// The tree the kernel was built from (pristine + overlay).
    pub tree: PathBuf,
    /// The `O=` build directory.
    pub build: PathBuf,
    /// The bootable image.
    pub bzimage: PathBuf,
}

/// Lays the overlay, configures if needed and builds incrementally.
pub fn build(ctx: &Ctx, tools: &Tools) -> Result<Kernel> {
    let tree = ctx.cache.join("tree").join(&tools.kver);
    let out = ctx.cache.join("build").join(&tools.kver);
    let ov = Overlay::load(&ctx.repo)?;
    let applied = overlay::apply(
        &ov,
        &tools.pristine,
        &tree,
        &ctx.cache.join("scratch/patch"),
    )?;
    println!(
        "kernel: overlay: {} files managed ({} patches), {} rewritten",
        applied.managed,
        ov.patches.len(),
        applied.written.len()
    );
    for f in &applied.written {
        println!("kernel:   updated {}", f.display());
    }
    std::fs::create_dir_all(&out)?;
    configure(ctx, tools, &ov, &tree, &out)?;
    make_with_progress(ctx, tools, &tree, &out)?;
    check_config(ctx, &out)?;
    let bzimage = out.join("arch/x86/boot/bzImage");
    if !bzimage.is_file() {
        bail!("the build finished but {} is missing", bzimage.display());
    }
    println!("kernel: {}", bzimage.display());
    Ok(Kernel {
        tree,
        build: out,
        bzimage,
    })
}

/// Parses a config fragment into wanted symbol values (`n` for "is not set").
pub fn parse_fragment(text: &str) -> BTreeMap<String, String> {
    let mut m = BTreeMap::new();
    for l in text.lines() {
        let l = l.trim();
        if let Some(rest) = l.strip_prefix("# ") {
            if let Some(sym) = rest.strip_suffix(" is not set") {
                m.insert(sym.to_string(), "n".to_string());
            }
        } else if let Some((k, v)) = l.split_once('=') {
            if k.starts_with("CONFIG_") {
                m.insert(k.to_string(), v.to_string());
            }
        }
    }
    m
}

/// Requested options that the final `.config` does not have, one message each.
pub fn missing_options(wanted: &BTreeMap<String, String>, config: &str) -> Vec<String> {
    let have = parse_fragment(config);
    wanted
        .iter()
        .filter_map(|(k, v)| {
            let got = have.get(k).map(String::as_str).unwrap_or("n");
            (got != v).then(|| format!("{k}={v} requested, but .config has {k}={got}"))
        })
        .collect()
}

fn configure(ctx: &Ctx, tools: &Tools, ov: &Overlay, tree: &Path, out: &Path) -> Result<()> {
    let mut h = Sha256::new();
    h.update(tools.kver.as_bytes());
    h.update(tools.rustc.as_bytes());
    h.update(tools.llvm.as_bytes());
    for f in FRAGMENTS
        .iter()
        .map(|f| ctx.repo.join(f))
        .chain(ov.config_inputs())
    {
        h.update(f.to_string_lossy().as_bytes());
        h.update(std::fs::read(&f).with_context(|| format!("cannot read {}", f.display()))?);
    }
    let hash = format!("{:x}", h.finalize());
    let stamp = out.join(".kpm-config-hash");
    if out.join(".config").is_file() && std::fs::read_to_string(&stamp).unwrap_or_default() == hash
    {
        return Ok(());
    }
    println!(
        "kernel: configuring (tinyconfig + {})",
        FRAGMENTS.join(" + ")
    );
    sh::output(tools.make(tree, out).arg("tinyconfig"))?;
    sh::output(
        Command::new(tree.join("scripts/kconfig/merge_config.sh"))
            .current_dir(tree)
            .args(["-m", "-O"])
            .arg(out)
            .arg(out.join(".config"))
            .args(FRAGMENTS.iter().map(|f| ctx.repo.join(f))),
    )?;
    sh::output(tools.make(tree, out).arg("olddefconfig"))?;
    check_config(ctx, out)?;
    std::fs::write(&stamp, hash)?;
    Ok(())
}

/// Fails naming every requested option that did not survive.
fn check_config(ctx: &Ctx, out: &Path) -> Result<()> {
    let config = std::fs::read_to_string(out.join(".config"))?;
    let mut missing = Vec::new();
    for f in FRAGMENTS {
        let text = std::fs::read_to_string(ctx.repo.join(f))?;
        for m in missing_options(&parse_fragment(&text), &config) {
            missing.push(format!("  {m} ({f})"));
        }
    }
    if !missing.is_empty() {
        // Force a reconfiguration next time.
        let _ = std::fs::remove_file(out.join(".kpm-config-hash"));
        bail!(
            "kernel configuration lost requested options (unmet dependencies?):\n{}",
            missing.join("\n")
        );
    }
    Ok(())
}

/// Runs `make bzImage`, printing a progress line every few seconds and the
/// error lines with the log tail when it fails.
fn make_with_progress(ctx: &Ctx, tools: &Tools, tree: &Path, out: &Path) -> Result<()> {
    std::fs::create_dir_all(ctx.logs())?;
    let log_path = ctx.logs().join("kernel-build.log");
    let mut log = std::fs::File::create(&log_path)?;
    let jobs = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2);
    let mut cmd = tools.make(tree, out);
    cmd.arg(format!("-j{jobs}"))
        .arg("bzImage")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let start = Instant::now();
    println!(
        "kernel: make -j{jobs} bzImage (log: {})",
        log_path.display()
    );
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot start `{}`", sh::show(&cmd)))?;
    let stderr = child.stderr.take().context("no stderr pipe")?;
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let tx2 = tx.clone();
    let stdout = child.stdout.take().context("no stdout pipe")?;
    let t1 = std::thread::spawn(move || {
        for l in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    let t2 = std::thread::spawn(move || {
        for l in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx2.send(l);
        }
    });
    let mut steps = 0usize;
    let mut last = String::new();
    let mut text = String::new();
    let mut next = Instant::now() + Duration::from_secs(10);
    loop {
        match rx.recv_timeout(Duration::from_millis(500)) {
            Ok(l) => {
                writeln!(log, "{l}")?;
                if is_step(&l) {
                    steps += 1;
                    last = l.trim().to_string();
                }
                text.push_str(&l);
                text.push('\n');
                if text.len() > 1 << 20 {
                    text.drain(..text.len() - (1 << 19));
                }
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
        }
        if Instant::now() >= next {
            println!(
                "kernel: {steps} steps built ({}s), last: {last}",
                start.elapsed().as_secs()
            );
            next = Instant::now() + Duration::from_secs(15);
        }
    }
    let _ = (t1.join(), t2.join());
    let status = child.wait()?;
    if !status.success() {
        let errors = error_blocks(&text, 120);
        bail!(
            "kernel build failed ({status}) after {}s; errors:\n{}\n--- log tail ---\n{}\n(full log: {})",
            start.elapsed().as_secs(),
            errors,
            sh::tail(&text, 30),
            log_path.display()
        );
    }
    println!(
        "kernel: built in {}s ({steps} steps)",
        start.elapsed().as_secs()
    );
    Ok(())
}

/// The compiler's error and warning messages in a build log: each block
/// from an `error`/`warning` line to the next blank line, at most `max`
/// lines in all; make's own `***` lines when there is nothing else.
fn error_blocks(text: &str, max: usize) -> String {
    let mut out = Vec::new();
    let mut inside = false;
    for l in text.lines() {
        if l.starts_with("error") || l.contains(": error:") || l.starts_with("warning") {
            inside = true;
        } else if l.trim().is_empty() {
            inside = false;
        }
        if inside && out.len() < max {
            out.push(l);
        }
    }
    if out.is_empty() {
        out = text
            .lines()
            .filter(|l| l.contains("***"))
            .take(20)
            .collect();
    }
    out.join("\n")
}

/// Whether a kbuild output line reports one build step (`  CC      foo.o`).
fn is_step(l: &str) -> bool {
    let t = l.trim_start();
    l.starts_with("  ")
        && t.split_whitespace().next().is_some_and(|w| {
            w.len() >= 2
                && w.chars()
                    .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_' || c == '-')
        })
}

/// `cargo xtask series --bisect`: builds the pinned tree after each patch
/// of the exported series, incrementally, in a scratch tree and build
/// directory of its own, with the configuration of the main build; reports
/// each step with the state of our options and fails at the first one that
/// does not build. After the last patch the configuration must equal the
/// main build's, or the steps did not build what `cargo xtask kernel` does.
///
/// Both directories are made anew on every run: the scratch tree is hard
/// linked to the pristine one, whose files keep their old mtimes, so
/// objects left from an earlier run would look newer than the sources a
/// later run reverts to and make would not rebuild them.
pub fn bisect(ctx: &Ctx, tools: &Tools, ex: &crate::series::Exported) -> Result<()> {
    let root = ctx.cache.join("bisect");
    let tree = root.join("tree");
    let out = root.join("build");
    sh::fresh_dir(&root)?;
    sh::run(
        Command::new("cp")
            .arg("-al")
            .arg(&tools.pristine)
            .arg(&tree),
    )?;
    std::fs::create_dir_all(&out)?;
    let config = ctx.cache.join("build").join(&tools.kver).join(".config");
    let build = |step: &str| -> Result<()> {
        // The main build's configuration, again at every step: options of
        // the series appear as soon as a patch adds their Kconfig.
        std::fs::copy(&config, out.join(".config"))
            .with_context(|| format!("cannot copy {}", config.display()))?;
        sh::output(tools.make(&tree, &out).arg("olddefconfig"))?;
        let start = Instant::now();
        sh::output(tools.make(&tree, &out).args(["-j2", "bzImage"]))
            .with_context(|| format!("bisect: the build fails after {step}"))?;
        let have = std::fs::read_to_string(out.join(".config"))?;
        println!(
            "bisect: {step}: builds ({}s; {})",
            start.elapsed().as_secs(),
            options_state(&have)
        );
        Ok(())
    };
    build("the pristine base")?;
    for p in &ex.patches {
        // `patch` writes each file anew, so the hard links into the
        // pristine tree are never written through.
        sh::run(
            Command::new("patch")
                .current_dir(&tree)
                .args(["-p1", "-s", "--no-backup-if-mismatch", "-i"])
                .arg(p),
        )
        .with_context(|| format!("bisect: {} does not apply", p.display()))?;
        let name = p
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        build(&name)?;
    }
    let main = std::fs::read_to_string(&config)?;
    let last = std::fs::read_to_string(out.join(".config"))?;
    let differ = config_differences(&main, &last);
    if !differ.is_empty() {
        bail!(
            "bisect: after the last patch the configuration differs from {}:\n  {}",
            config.display(),
            differ.join("\n  ")
        );
    }
    println!(
        "bisect: the pristine base and every one of the {} patches build; \
         the last step's configuration equals the main build's",
        ex.patches.len()
    );
    Ok(())
}

/// `CONFIG_X=y` or `CONFIG_X unset` for each of [`OUR_OPTIONS`], as a
/// `.config` text has them.
fn options_state(config: &str) -> String {
    OUR_OPTIONS
        .iter()
        .map(|o| {
            let set = config
                .lines()
                .find_map(|l| l.strip_prefix(o).and_then(|r| r.strip_prefix('=')));
            match set {
                Some(v) => format!("{}={v}", o.trim_start_matches("CONFIG_")),
                None => format!("{} unset", o.trim_start_matches("CONFIG_")),
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The option settings (`CONFIG_...=` lines) in which two `.config` texts
/// differ, as `-line` (only in `a`) and `+line` (only in `b`).
fn config_differences(a: &str, b: &str) -> Vec<String> {
    let set = |t: &str| -> BTreeSet<String> {
        t.lines()
            .filter(|l| l.starts_with("CONFIG_"))
            .map(str::to_string)
            .collect()
    };
    let (a, b) = (set(a), set(b));
    a.difference(&b)
        .map(|l| format!("-{l}"))
        .chain(b.difference(&a).map(|l| format!("+{l}")))
        .collect()
}

/// Our Kconfig options: they must vanish when their dependencies go.
const OUR_OPTIONS: &[&str] = &[
    "CONFIG_KVM_PROTMEM_GUEST",
    "CONFIG_KVM_PROTMEM_REQUIRE",
    "CONFIG_KVM_PROTMEM_KUNIT_TEST",
];

/// `cargo xtask lint`: the kernel's own Rust checks over the built tree,
/// each printed as it passes.
pub fn lint(ctx: &Ctx, tools: &Tools, k: &Kernel) -> Result<()> {
    sh::output(tools.make(&k.tree, &k.build).arg("rustfmtcheck"))?;
    println!("lint: make rustfmtcheck: formatted");
    let index = rustdoc(ctx, tools, k)?;
    println!(
        "lint: rustdoc of {OUR_RUST_DIR}: 0 warnings ({})",
        index.display()
    );
    println!("lint: {}", clippy(tools, k)?);
    Ok(())
}

/// Where our Rust guest lives in the tree (one crate: `kvm_protmem.rs` and
/// its modules).
pub const OUR_RUST_DIR: &str = "arch/x86/coco/kvm";

/// `make CLIPPY=1` of [`OUR_RUST_DIR`] on the existing build tree: our crate
/// compiled by clippy-driver with the kernel's own lint set (the
/// `-Wclippy::*` list of its Makefile). Fails on any warning or error.
/// Our object is removed first so that it is always checked; the next
/// kernel build compiles it again with rustc (and relinks).
pub fn clippy(tools: &Tools, k: &Kernel) -> Result<String> {
    let obj = k.build.join(OUR_RUST_DIR).join("kvm_protmem.o");
    let _ = std::fs::remove_file(&obj);
    let mut cmd = tools.make(&k.tree, &k.build);
    cmd.arg("CLIPPY=1").arg(format!("{OUR_RUST_DIR}/"));
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot start `{}`", sh::show(&cmd)))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let checked = text
        .lines()
        .any(|l| l.trim_start().starts_with("CLIPPY") && l.contains(OUR_RUST_DIR));
    let findings: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("warning") || l.starts_with("error"))
        .collect();
    if !out.status.success() || !findings.is_empty() {
        bail!(
            "`{}`: {} finding(s):\n{}",
            sh::show(&cmd),
            findings.len(),
            sh::tail(&text, 60)
        );
    }
    if !checked {
        bail!(
            "`{}` did not run clippy on {OUR_RUST_DIR}:\n{}",
            sh::show(&cmd),
            sh::tail(&text, 20)
        );
    }
    Ok(format!(
        "make CLIPPY=1 {OUR_RUST_DIR}/: 0 warnings (kernel lint set)"
    ))
}

/// rustdoc over our crate on the existing build tree. `make rustdoc`
/// documents only the crates under rust/, so this runs rustdoc the way
/// its `cmd_rustdoc` does, with the flags kbuild compiled our object with
/// (from its `.cmd` file: target, cfgs, lints, `--extern kernel`),
/// documenting private items too, since everything of ours is crate-private.
/// Fails on any rustdoc warning (broken intra-doc links, unescaped
/// backticks, ...). Returns the output directory.
pub fn rustdoc(ctx: &Ctx, tools: &Tools, k: &Kernel) -> Result<PathBuf> {
    let cmd_file = k.build.join(OUR_RUST_DIR).join(".kvm_protmem.o.cmd");
    let text = std::fs::read_to_string(&cmd_file).with_context(|| {
        format!(
            "cannot read {} (build the kernel first)",
            cmd_file.display()
        )
    })?;
    let line = text
        .lines()
        .find(|l| l.starts_with("savedcmd_"))
        .and_then(|l| l.split_once(":= "))
        .map(|(_, c)| c)
        .with_context(|| format!("{} has no saved command", cmd_file.display()))?;
    // `ENV=... rustc FLAGS FILE ; objtool ...`: keep the environment and the
    // flags, drop what only compiling does.
    let compile = line.split(" ; ").next().unwrap_or(line);
    let (env, flags) = compile
        .split_once(" rustc ")
        .or_else(|| compile.split_once(" clippy-driver "))
        .with_context(|| format!("no rustc in {}", cmd_file.display()))?;
    let mut kept = Vec::new();
    let mut words = flags.split_whitespace();
    while let Some(w) = words.next() {
        if w == "--out-dir" {
            words.next();
        } else if !(w.starts_with("--emit=")
            || w.starts_with("--remap-path-scope=")
            || w.starts_with("-Zbinary_dep_depinfo"))
        {
            kept.push(w);
        }
    }
    let out = ctx.cache.join("rustdoc");
    sh::fresh_dir(&out)?;
    let script = format!(
        "{env} rustdoc {} -Zunstable-options --document-private-items \
         -Cunsafe-allow-abi-mismatch=fixed-x18 --output {}",
        kept.join(" "),
        out.display()
    );
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(&script)
        .current_dir(&k.build)
        .env("RUSTUP_TOOLCHAIN", &tools.rustc)
        // As the kernel's Makefile exports: its flags are unstable ones.
        .env("RUSTC_BOOTSTRAP", "1")
        .stdin(Stdio::null());
    let res = cmd
        .output()
        .with_context(|| format!("cannot start `{script}`"))?;
    let err = String::from_utf8_lossy(&res.stderr);
    if !res.status.success()
        || err
            .lines()
            .any(|l| l.starts_with("warning") || l.starts_with("error"))
    {
        bail!("rustdoc of {OUR_RUST_DIR}:\n{}", sh::tail(&err, 60));
    }
    let index = out.join("kvm_protmem/index.html");
    if !index.is_file() {
        bail!("rustdoc of {OUR_RUST_DIR} wrote no {}", index.display());
    }
    Ok(index)
}

/// The Kconfig checks: with `RUST=n`, and with `KVM_GUEST=n`, our options
/// disappear after `olddefconfig`, and every other option the fragments
/// request keeps its value (but those that depend on the disabled one by
/// nature, named here). Runs Kconfig only, in scratch build directories.
/// Returns one line per case.
pub fn kconfig_checks(ctx: &Ctx, tools: &Tools, k: &Kernel) -> Result<Vec<String>> {
    let cases: &[(&str, &[&str])] = &[
        ("CONFIG_RUST", &["CONFIG_RUST_KERNEL_DOCTESTS"]),
        ("CONFIG_KVM_GUEST", &[]),
    ];
    let mut wanted = BTreeMap::new();
    for f in FRAGMENTS {
        let p = ctx.repo.join(f);
        let text =
            std::fs::read_to_string(&p).with_context(|| format!("cannot read {}", p.display()))?;
        wanted.extend(parse_fragment(&text));
    }
    let config = std::fs::read_to_string(k.build.join(".config"))?;
    let mut lines = Vec::new();
    for (sym, dependents) in cases {
        let dir = ctx
            .cache
            .join("kconfig-check")
            .join(sym.trim_start_matches("CONFIG_"));
        std::fs::create_dir_all(&dir)?;
        let edited: String = config
            .lines()
            .map(|l| {
                if l.starts_with(&format!("{sym}=")) {
                    format!("# {sym} is not set")
                } else {
                    l.to_string()
                }
            })
            .collect::<Vec<_>>()
            .join("\n");
        std::fs::write(dir.join(".config"), edited + "\n")?;
        sh::output(tools.make(&k.tree, &dir).arg("olddefconfig"))
            .with_context(|| format!("olddefconfig with {sym}=n"))?;
        let after = parse_fragment(&std::fs::read_to_string(dir.join(".config"))?);
        let value = |s: &str| after.get(s).map(String::as_str).unwrap_or("n");
        let kept: Vec<&str> = OUR_OPTIONS
            .iter()
            .copied()
            .filter(|o| value(o) != "n")
            .collect();
        if !kept.is_empty() {
            bail!(
                "with {sym}=n, {} stay set after olddefconfig",
                kept.join(", ")
            );
        }
        let changed: Vec<String> = wanted
            .iter()
            .filter(|(s, _)| {
                s.as_str() != *sym
                    && !OUR_OPTIONS.contains(&s.as_str())
                    && !dependents.contains(&s.as_str())
            })
            .filter(|(s, v)| value(s) != v.as_str())
            .map(|(s, v)| format!("{s}={v} became {}", value(s)))
            .collect();
        if !changed.is_empty() {
            bail!(
                "with {sym}=n, requested options changed: {}",
                changed.join(", ")
            );
        }
        lines.push(format!(
            "{sym}=n: our {} options gone, the other {} requested options unchanged",
            OUR_OPTIONS.len(),
            wanted.len() - 1 - dependents.len()
        ));
    }
    Ok(lines)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fragments_parse() {
        let m = parse_fragment(
            "# c\nCONFIG_A=y\n# CONFIG_B is not set\nCONFIG_C=\"x\"\nCONFIG_D=0x10\n",
        );
        assert_eq!(m["CONFIG_A"], "y");
        assert_eq!(m["CONFIG_B"], "n");
        assert_eq!(m["CONFIG_C"], "\"x\"");
        assert_eq!(m.len(), 4);
    }

    #[test]
    fn lost_options_are_named() {
        let wanted = parse_fragment("CONFIG_A=y\nCONFIG_B=y\n# CONFIG_C is not set\n");
        let cfg = "CONFIG_A=y\n# CONFIG_B is not set\n";
        assert_eq!(
            missing_options(&wanted, cfg),
            ["CONFIG_B=y requested, but .config has CONFIG_B=n"]
        );
    }

    #[test]
    fn repository_fragments_are_well_formed() {
        let ctx = Ctx::new().unwrap();
        for f in FRAGMENTS {
            let text = std::fs::read_to_string(ctx.repo.join(f)).unwrap();
            let n = text
                .lines()
                .filter(|l| {
                    let unset = l.starts_with("# CONFIG_") && l.ends_with(" is not set");
                    unset || (!l.trim().is_empty() && !l.starts_with('#'))
                })
                .count();
            assert_eq!(
                parse_fragment(&text).len(),
                n,
                "{f} has lines that are not options"
            );
        }
    }

    #[test]
    fn error_blocks_keep_rustc_context() {
        let log = "  CC a.o\nerror[E0308]: mismatched types\n  --> x.rs:1:1\n   |\n\n  CC b.o\nmake: *** [x] Error 1\n";
        let e = error_blocks(log, 50);
        assert!(
            e.contains("mismatched types") && e.contains("x.rs:1:1"),
            "{e}"
        );
        assert!(!e.contains("CC b.o"));
        assert_eq!(
            error_blocks("make: *** [x] Error 1\n", 50),
            "make: *** [x] Error 1"
        );
    }

    #[test]
    fn build_steps_are_counted() {
        assert!(is_step("  CC      arch/x86/kernel/kvm.o"));
        assert!(is_step("  RUSTC L rust/kernel.o"));
        assert!(!is_step("arch/x86/kernel/kvm.c:1: error: x"));
        assert!(!is_step("make[1]: Entering directory"));
    }

    #[test]
    fn bisect_reports_our_options_and_config_differences() {
        let step =
            "CONFIG_KVM=y\nCONFIG_KVM_PROTMEM_GUEST=y\n# CONFIG_KVM_PROTMEM_REQUIRE is not set\n";
        assert_eq!(
            options_state(step),
            "KVM_PROTMEM_GUEST=y, KVM_PROTMEM_REQUIRE unset, KVM_PROTMEM_KUNIT_TEST unset"
        );
        assert_eq!(
            options_state("CONFIG_KVM_PROTMEM_GUEST_X=y\n"),
            "KVM_PROTMEM_GUEST unset, KVM_PROTMEM_REQUIRE unset, KVM_PROTMEM_KUNIT_TEST unset"
        );
        let main = "CONFIG_A=y\nCONFIG_B=\"x\"\n# CONFIG_C is not set\n";
        assert!(
            config_differences(main, "# other comment\nCONFIG_B=\"x\"\nCONFIG_A=y\n").is_empty()
        );
        assert_eq!(
            config_differences(main, "CONFIG_A=y\nCONFIG_B=\"y\"\nCONFIG_C=y\n"),
            ["-CONFIG_B=\"x\"", "+CONFIG_B=\"y\"", "+CONFIG_C=y"]
        );
    }
}
