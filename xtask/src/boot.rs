//! Booting guests under QEMU TCG and watching their console.

use crate::ctx::Ctx;
use crate::initramfs;
use crate::kernel::Kernel;
use crate::ktap::{self, Status, Summary};
use crate::setup::Qemu;
use crate::sh;
use anyhow::{bail, Context, Result};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// KUnit suites every boot of our kernel must report.
pub const EXPECTED_SUITES: &[&str] = &[
    "kvm_protmem_abi",
    "kvm_protmem_policy",
    "kvm_protmem_ranges",
    "kvm_protmem_live",
    "rust_doctests_kernel",
];

/// Start of the dmesg line of a guest whose host does not offer the feature.
pub const NOT_OFFERED: &str = "kvm_protmem: not offered by the host";

/// Line `/init` prints when it reached its end.
pub const INIT_DONE: &str = "kpm-init: done";

/// How a console session ended.
#[derive(Debug, PartialEq, Eq)]
pub enum End {
    /// The process exited with this code.
    Exited(Option<i32>),
    /// It was killed at the timeout.
    TimedOut,
}

/// A finished console session.
pub struct Console {
    pub text: String,
    pub log: PathBuf,
    pub end: End,
    pub elapsed: Duration,
    /// Host wall-clock arrival time of each `kpm-` marker line.
    pub markers: Vec<(Duration, String)>,
}

impl Console {
    pub fn tail(&self, n: usize) -> String {
        sh::tail(&self.text, n)
    }
}

/// Runs `cmd`, copying its stdout and stderr line by line to `log` (and to
/// the terminal when `echo`), until it exits or `timeout` passes.
pub fn run_console(
    cmd: &mut Command,
    log: &Path,
    echo: bool,
    timeout: Duration,
) -> Result<Console> {
    if let Some(d) = log.parent() {
        std::fs::create_dir_all(d)?;
    }
    let mut file =
        std::fs::File::create(log).with_context(|| format!("cannot create {}", log.display()))?;
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let start = Instant::now();
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot start `{}`", sh::show(cmd)))?;
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let mut readers = Vec::new();
    let out = child.stdout.take().context("no stdout pipe")?;
    let err = child.stderr.take().context("no stderr pipe")?;
    for pipe in [
        Box::new(out) as Box<dyn std::io::Read + Send>,
        Box::new(err),
    ] {
        let tx = tx.clone();
        readers.push(std::thread::spawn(move || {
            let mut r = BufReader::new(pipe);
            let mut buf = Vec::new();
            while r
                .read_until(b'\n', &mut buf)
                .map(|n| n > 0)
                .unwrap_or(false)
            {
                let _ = tx.send(
                    String::from_utf8_lossy(&buf)
                        .trim_end_matches(['\n', '\r'])
                        .to_string(),
                );
                buf.clear();
            }
        }));
    }
    drop(tx);
    let mut text = String::new();
    let mut markers = Vec::new();
    let mut end = None;
    while end.is_none() {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(line) => {
                writeln!(file, "{line}")?;
                if echo {
                    println!("  | {line}");
                }
                if line.starts_with("kpm-") {
                    markers.push((start.elapsed(), line.clone()));
                }
                text.push_str(&line);
                text.push('\n');
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                end = Some(End::Exited(child.wait()?.code()));
            }
        }
        if end.is_none() && start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            end = Some(End::TimedOut);
        }
    }
    for r in readers {
        let _ = r.join();
    }
    Ok(Console {
        text,
        log: log.to_path_buf(),
        end: end.unwrap_or(End::TimedOut),
        elapsed: start.elapsed(),
        markers,
    })
}

/// A QEMU TCG command that boots `kernel` with `initrd`, one vCPU, no
/// devices but a serial console on stdio, and exits when the guest resets.
pub fn qemu_tcg(
    ctx: &Ctx,
    cpu: &str,
    mem: &str,
    kernel: &Path,
    initrd: &Path,
    append: &str,
) -> Command {
    let mut cmd = Qemu::find(&ctx.cache).command();
    cmd.args(["-accel", "tcg", "-cpu", cpu, "-m", mem, "-smp", "1"])
        .args([
            "-nodefaults",
            "-display",
            "none",
            "-serial",
            "stdio",
            "-no-reboot",
        ])
        .arg("-kernel")
        .arg(kernel)
        .arg("-initrd")
        .arg(initrd)
        .arg("-append")
        .arg(append);
    cmd
}

/// Result of a single-level TCG boot with KUnit.
pub struct KunitBoot {
    pub console: Console,
    pub ktap: Summary,
}

impl KunitBoot {
    /// Prints the KUnit summary; fails on any failure or missing suite, or
    /// when the guest did not reach the end of `/init`.
    pub fn check(&self) -> Result<()> {
        println!("{}", self.ktap.summary_line());
        if let Err(e) = self.ktap.check(EXPECTED_SUITES) {
            bail!(
                "{e:#}\n--- console tail ({}) ---\n{}",
                self.console.log.display(),
                self.console.tail(30)
            );
        }
        Ok(())
    }

    /// Checks what a boot without the feature must show: the "not offered"
    /// line, no conversion at all in debugfs, the live suite skipped.
    pub fn check_feature_absent(&self) -> Result<()> {
        let text = &self.console.text;
        let mut problems = Vec::new();
        if !text.contains(NOT_OFFERED) {
            problems.push(format!("no `{NOT_OFFERED}` line"));
        }
        for counter in ["shares", "unshares", "pages_shared", "failures"] {
            let line = format!("kpm-init: debugfs {counter}: 0");
            if !text.lines().any(|l| l.trim_end() == line) {
                problems.push(format!("debugfs {counter} is not 0 (no `{line}`)"));
            }
        }
        let live_ran = self
            .ktap
            .cases
            .iter()
            .any(|c| c.suite == "kvm_protmem_live" && c.status != Status::Skip);
        if live_ran {
            problems.push("kvm_protmem_live ran instead of skipping".into());
        }
        if !problems.is_empty() {
            bail!(
                "feature-absent boot: {}\n(log: {})",
                problems.join("; "),
                self.console.log.display()
            );
        }
        println!("boot: feature absent: `{NOT_OFFERED}`, 0 hypercalls, live suite skipped");
        Ok(())
    }
}

/// Boots `k` under QEMU TCG (single level: the KVM paravirt interface, and
/// so protected memory, is absent) and parses its KUnit output.
pub fn tcg_kunit(
    ctx: &Ctx,
    k: &Kernel,
    echo: bool,
    timeout: u64,
    append: &str,
) -> Result<KunitBoot> {
    let work = ctx.cache.join("boot");
    std::fs::create_dir_all(&work)?;
    let initrd = work.join("guest.cpio");
    std::fs::write(&initrd, initramfs::busybox(&ctx.repo, &[])?)?;
    let cmdline = format!("console=ttyS0 panic=-1 kunit.enable=1 {append}");
    let mut cmd = qemu_tcg(ctx, "qemu64", "512M", &k.bzimage, &initrd, cmdline.trim());
    println!("boot: QEMU TCG, single level (timeout {timeout}s)");
    let console = run_console(
        &mut cmd,
        &ctx.logs().join("boot-tcg.log"),
        echo,
        Duration::from_secs(timeout),
    )?;
    println!(
        "boot: console log {} ({}s)",
        console.log.display(),
        console.elapsed.as_secs()
    );
    let problem = match console.end {
        End::TimedOut => Some(format!("no shutdown within {timeout}s")),
        End::Exited(Some(0)) if console.text.contains(INIT_DONE) => None,
        End::Exited(code) if !console.text.contains(INIT_DONE) => {
            Some(format!("QEMU exited ({code:?}) before /init finished"))
        }
        End::Exited(code) => Some(format!("QEMU exited with {code:?}")),
    };
    if let Some(p) = problem {
        bail!(
            "boot failed: {p}\n--- console tail ({}) ---\n{}",
            console.log.display(),
            console.tail(40)
        );
    }
    let ktap = ktap::parse(&console.text);
    Ok(KunitBoot { console, ktap })
}
