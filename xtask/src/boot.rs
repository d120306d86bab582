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

/// What [`run_console`] does when a guest goes silent: after `after`
/// without a console line it samples the guest CPU through QEMU's HMP
/// monitor, names the kernel function it is in, and stops the run, so a
/// hang ends with where it hung rather than at the overall timeout.
pub struct Stall {
    /// QEMU's `-monitor unix:PATH,server=on,wait=off` socket.
    pub monitor: PathBuf,
    /// The guest kernel's `System.map`, to name addresses.
    pub system_map: PathBuf,
    /// Silence before the guest counts as hung.
    pub after: Duration,
}

impl Stall {
    /// The QEMU arguments that open the monitor.
    pub fn qemu_args(&self) -> [String; 2] {
        [
            "-monitor".to_string(),
            format!("unix:{},server=on,wait=off", self.monitor.display()),
        ]
    }

    /// Samples the CPU `n` times, 0.5 s apart (one line per sample), then
    /// scans its stack for kernel text addresses: a rough backtrace.
    fn sample(&self, n: usize) -> Vec<String> {
        let map = std::fs::read_to_string(&self.system_map).unwrap_or_default();
        let syms = symbols(&map);
        let mut rsp = None;
        let mut lines: Vec<String> = (0..n)
            .map(|i| {
                if i > 0 {
                    std::thread::sleep(Duration::from_millis(500));
                }
                match hmp(&self.monitor, "info registers") {
                    Ok(regs) => {
                        rsp = reg(&regs, "RSP").zip(reg(&regs, "RDI"));
                        describe_regs(&regs, &syms)
                    }
                    Err(e) => format!("monitor: {e:#}"),
                }
            })
            .collect();
        if let Some((rsp, rdi)) = rsp {
            // The stack through the CPU's page tables, and through the
            // direct map's physical address (when the CPU is in a nested
            // guest, the virtual walk is the guest's).
            let mut cmds = vec![format!("x /256gx {rsp:#x}")];
            if let Some(phys) = rsp.checked_sub(DIRECT_MAP).filter(|p| *p < 1 << 40) {
                cmds.push(format!("xp /256gx {phys:#x}"));
            }
            for cmd in cmds {
                match hmp(&self.monitor, &cmd) {
                    Ok(dump) => {
                        let frames = stack_text(&dump, &syms);
                        if frames.is_empty() {
                            let head: Vec<&str> = dump.lines().skip(1).take(2).collect();
                            lines.push(format!("`{cmd}`: no text addresses; {}", head.join(" | ")));
                        } else {
                            lines.push(format!("`{cmd}`: {}", frames.join(" < ")));
                        }
                    }
                    Err(e) => lines.push(format!("`{cmd}`: monitor: {e:#}")),
                }
            }
            let all = all_symbols(&map);
            lines.push(format!(
                "RDI (a lock's address, in a lock slow path) {rdi:#x} = {}",
                symbolize(&all, rdi)
            ));
        }
        // Whether the L1 kernel still counts time: its jiffies, read twice
        // through the physical address of the kernel image (loaded at
        // 16 MiB, mapped at __START_KERNEL_map + 16 MiB).
        if let Some(&(va, _)) = symbols_named(&map, "jiffies_64").first() {
            let phys = va.wrapping_sub(KERNEL_MAP);
            let read = || {
                hmp(&self.monitor, &format!("xp /1gx {phys:#x}"))
                    .ok()
                    .and_then(|d| {
                        d.lines()
                            .nth(1)
                            .and_then(|l| l.split_whitespace().nth(1))
                            .map(str::to_string)
                    })
            };
            let a = read();
            std::thread::sleep(Duration::from_secs(2));
            let b = read();
            lines.push(format!(
                "L1 jiffies_64 at phys {phys:#x}: {} then, 2 s later, {}",
                a.as_deref().unwrap_or("?"),
                b.as_deref().unwrap_or("?")
            ));
        }
        lines
    }
}

/// `__START_KERNEL_map`: the kernel image's virtual base.
const KERNEL_MAP: u64 = 0xffff_ffff_8000_0000;

/// The addresses of the symbols called `name`.
fn symbols_named(map: &str, name: &str) -> Vec<(u64, String)> {
    map.lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            let addr = u64::from_str_radix(it.next()?, 16).ok()?;
            let _kind = it.next()?;
            (it.next()? == name).then(|| (addr, name.to_string()))
        })
        .collect()
}

/// x86-64's direct map of physical memory (without KASLR).
const DIRECT_MAP: u64 = 0xffff_8880_0000_0000;

/// The symbols of a `System.map` whose type `keep` accepts, sorted by
/// address.
fn map_symbols(map: &str, keep: impl Fn(&str) -> bool) -> Vec<(u64, &str)> {
    let mut v: Vec<(u64, &str)> = map
        .lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            let addr = u64::from_str_radix(it.next()?, 16).ok()?;
            let kind = it.next()?;
            let name = it.next()?;
            keep(kind).then_some((addr, name))
        })
        .collect();
    v.sort_unstable();
    v
}

/// Every symbol of a `System.map` (text and data), sorted by address.
fn all_symbols(map: &str) -> Vec<(u64, &str)> {
    map_symbols(map, |_| true)
}

/// The text symbols of a `System.map`, sorted by address.
fn symbols(map: &str) -> Vec<(u64, &str)> {
    map_symbols(map, |kind| matches!(kind, "t" | "T" | "w" | "W"))
}

/// `name+0xoff` for `addr`, when it is in the kernel's text.
fn symbolize(syms: &[(u64, &str)], addr: u64) -> String {
    match syms.partition_point(|&(a, _)| a <= addr) {
        0 => format!("{addr:#x}"),
        i if addr - syms[i - 1].0 < 0x10_0000 => {
            format!("{}+{:#x}", syms[i - 1].1, addr - syms[i - 1].0)
        }
        _ => format!("{addr:#x}"),
    }
}

/// One HMP command over the monitor socket; returns its output.
fn hmp(sock: &Path, command: &str) -> Result<String> {
    use std::io::Read;
    let mut s = std::os::unix::net::UnixStream::connect(sock)
        .with_context(|| format!("cannot connect to {}", sock.display()))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let mut read_prompt =
        |s: &mut std::os::unix::net::UnixStream, got: &mut Vec<u8>| -> Result<()> {
            while !got.ends_with(b"(qemu) ") {
                let n = s.read(&mut buf).context("monitor read")?;
                if n == 0 {
                    bail!("monitor closed");
                }
                got.extend_from_slice(&buf[..n]);
            }
            Ok(())
        };
    read_prompt(&mut s, &mut got)?;
    got.clear();
    s.write_all(format!("{command}\n").as_bytes())?;
    read_prompt(&mut s, &mut got)?;
    let text = String::from_utf8_lossy(&got).replace('\r', "");
    // The monitor echoes the command with terminal escapes: drop them.
    let mut clean = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.peek() == Some(&'[') {
                chars.next();
                while let Some(&n) = chars.peek() {
                    chars.next();
                    if n.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
            continue;
        }
        clean.push(c);
    }
    Ok(clean)
}

/// Register `name` from `info registers`.
fn reg(regs: &str, name: &str) -> Option<u64> {
    let i = regs.find(&format!("{name}="))?;
    let v = &regs[i + name.len() + 1..];
    let end = v.find(|c: char| !c.is_ascii_hexdigit()).unwrap_or(v.len());
    u64::from_str_radix(&v[..end], 16).ok()
}

/// The kernel text addresses in an `x /Ngx` dump, named, innermost first.
fn stack_text(dump: &str, syms: &[(u64, &str)]) -> Vec<String> {
    let (lo, hi) = match (syms.first(), syms.last()) {
        (Some(a), Some(b)) => (a.0, b.0 + 0x10_0000),
        _ => return Vec::new(),
    };
    dump.lines()
        .filter_map(|l| l.split_once(':').map(|(_, v)| v))
        .flat_map(|v| v.split_whitespace())
        .filter_map(|w| u64::from_str_radix(w.trim_start_matches("0x"), 16).ok())
        .filter(|&a| a >= lo && a < hi)
        .map(|a| symbolize(syms, a))
        .collect()
}

/// RIP (named), RSP, CR3 and whether interrupts are on, from `info
/// registers`.
fn describe_regs(regs: &str, syms: &[(u64, &str)]) -> String {
    let field = |name: &str| reg(regs, name);
    match field("RIP") {
        Some(rip) => format!(
            "RIP {} ({rip:#x}) RSP {:#x} CR3 {:#x} IF {} HLT {}",
            symbolize(syms, rip),
            field("RSP").unwrap_or(0),
            field("CR3").unwrap_or(0),
            field("RFL").map_or("?".to_string(), |f| ((f >> 9) & 1).to_string()),
            field("HLT").map_or("?".to_string(), |f| f.to_string()),
        ),
        None => format!("no RIP in `info registers`: {}", regs.trim()),
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
    run_console_watched(cmd, log, echo, timeout, None)
}

/// [`run_console`], stopping early with a [`Stall`] report when the guest
/// goes silent.
pub fn run_console_watched(
    cmd: &mut Command,
    log: &Path,
    echo: bool,
    timeout: Duration,
    stall: Option<&Stall>,
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
    let mut last_line = Instant::now();
    while end.is_none() {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(line) => {
                last_line = Instant::now();
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
        if let Some(st) = stall.filter(|st| end.is_none() && last_line.elapsed() > st.after) {
            let mut report = vec![format!(
                "xtask: no console output for {}s: the guest CPU, sampled through the QEMU monitor:",
                st.after.as_secs()
            )];
            report.extend(st.sample(8).into_iter().map(|l| format!("xtask:   {l}")));
            for line in report {
                writeln!(file, "{line}")?;
                println!("{line}");
                text.push_str(&line);
                text.push('\n');
            }
            let _ = child.kill();
            let _ = child.wait();
            end = Some(End::TimedOut);
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
    cpus: u32,
    mem: &str,
    kernel: &Path,
    initrd: &Path,
    append: &str,
) -> Command {
    let mut cmd = Qemu::find(&ctx.cache).command();
    cmd.args([
        "-accel",
        "tcg",
        "-cpu",
        cpu,
        "-m",
        mem,
        "-smp",
        &cpus.to_string(),
    ])
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
    let mut cmd = qemu_tcg(
        ctx,
        "qemu64",
        1,
        "512M",
        &k.bzimage,
        &initrd,
        cmdline.trim(),
    );
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stalled_cpu_is_named() {
        let map =
            "ffffffff81000000 T _stext\nffffffff81001000 t do_spin\nffffffff82000000 D some_data\n";
        let syms = symbols(map);
        let regs = "RAX=0000000000000000 RBX=0000000000000001\nRSI=0 RDI=0 RBP=0 RSP=ffffc90000003e00\nRIP=ffffffff81001010 RFL=00000246 [---Z-P-] CPL=0 II=0 A20=1 SMM=0 HLT=0\nCR0=80050033 CR2=0 CR3=0000000001234000 CR4=00350ef0\n";
        let d = describe_regs(regs, &syms);
        assert!(
            d.starts_with("RIP do_spin+0x10 (0xffffffff81001010)"),
            "{d}"
        );
        assert!(d.contains("CR3 0x1234000 IF 1 HLT 0"), "{d}");
        assert_eq!(symbolize(&syms, 0x1000), "0x1000");
        let dump = "ffffc90000003e00: 0x0000000000000001 0xffffffff81001020\nffffc90000003e10: 0xffffffff81000010 0xffff888000000000\n";
        assert_eq!(stack_text(dump, &syms), ["do_spin+0x20", "_stext+0x10"]);
    }
}
