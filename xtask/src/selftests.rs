//! Mainline's KVM selftests on our host kernel: a chosen list from
//! `tools/testing/selftests/kvm` of the tree the kernel is built from,
//! built static against that tree's uapi headers, run in L1 in the same
//! boot as the end-to-end scenarios, and judged one row per test.
//!
//! The L1 script runs each test with a timeout and prints one line per
//! test, `kpm-selftest: result NAME | exit RC | l1-secs S | SUMMARY`, the
//! summary being the test's own last TAP or kselftest line (`# Totals:`,
//! `1..0 # SKIP ...`, `not ok ...`) or the location of its failed
//! assertion. Between `kpm-selftest: start NAME` and that line come the
//! test's output, the L1 kernel's log lines of its run (`kpm-selftest:
//! dmesg ...`) and, when an assertion failed, its backtrace addresses
//! (`kpm-selftest: backtrace ...`), which are symbolised here.
//!
//! A test passes with exit 0 and no kernel warning in its run (the script
//! reads L1's kernel log with `dmesg -c`, so each test sees only its own).
//! A skip (exit 4, `KSFT_SKIP`, or a skipped subtest) and a failure that
//! the L0 platform causes (shown as `xfail`) are accepted only for the
//! reason listed with the test below, and only when the facts that reason
//! rests on hold in this L1: its CPU flags (what QEMU TCG's model offers)
//! and KVM's module parameters, which the script prints first. Any other
//! exit, skip or kernel warning fails the run, and with it `cargo xtask
//! test`.

use crate::ctx::Ctx;
use crate::e2e::{Row, Scenario};
use crate::initramfs::Initramfs;
use crate::kernel::Kernel;
use crate::nested::{L2Outcome, L2Run};
use crate::sh;
use anyhow::{bail, Context, Result};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Instant, SystemTime};

/// Name of the run in the L1 script and of the scenario that judges it.
pub const RUN: &str = "kvm-selftests";

/// The selftests' directory in the kernel tree.
const SRC: &str = "tools/testing/selftests/kvm";

/// Where the tests sit in the L1 initramfs.
const L1_DIR: &str = "selftests";

/// A skip or a failure we understand: text the test prints (after `# SKIP`
/// for a skip, anywhere in its output for a failure), why it happens here,
/// and the facts of L1 that must hold for that explanation (see [`holds`]).
pub struct Known {
    pub says: &'static str,
    pub because: &'static str,
    pub when: &'static [&'static str],
}

/// One run of one selftest.
pub struct Selftest {
    /// The binary, relative to `tools/testing/selftests/kvm`.
    pub bin: &'static str,
    /// Its arguments (words without quotes).
    pub args: &'static str,
    /// What of this project it guards.
    pub guards: &'static str,
    /// Seconds before L1's `timeout` stops it.
    pub timeout: u64,
    /// The skips (of the whole test or of subtests) expected here.
    pub skips: &'static [Known],
    /// A failure that the L0 platform (QEMU TCG's SVM model) causes: the
    /// run shows it as `xfail` with the explanation instead of failing.
    pub xfail: Option<Known>,
}

impl Selftest {
    const fn new(bin: &'static str, args: &'static str, guards: &'static str) -> Self {
        Selftest {
            bin,
            args,
            guards,
            timeout: 120,
            skips: &[],
            xfail: None,
        }
    }

    const fn timeout(self, timeout: u64) -> Self {
        Selftest { timeout, ..self }
    }

    const fn skips(self, skips: &'static [Known]) -> Self {
        Selftest { skips, ..self }
    }

    const fn xfail(self, k: Known) -> Self {
        Selftest {
            xfail: Some(k),
            ..self
        }
    }

    /// The name of the run: the binary and its arguments.
    pub fn name(&self) -> String {
        if self.args.is_empty() {
            self.bin.to_string()
        } else {
            format!("{} {}", self.bin, self.args)
        }
    }
}

use Selftest as T;

/// The selftests that run, in order.
pub const LIST: &[Selftest] = &[
    // guest_memfd and memory attributes: what --protect=gmem builds on
    // (patch 0003 populates guest_memfd, the VMM converts through
    // KVM_SET_MEMORY_ATTRIBUTES).
    T::new(
        "guest_memfd_test",
        "",
        "guest_memfd: create, mmap, fallocate/punch, flags, THP, memslot binding",
    ),
    T::new(
        "set_memory_region_test",
        "",
        "memslots: add, move, delete, KVM_SET_USER_MEMORY_REGION2, guest_memfd slots",
    )
    .timeout(240),
    T::new(
        "pre_fault_memory_test",
        "",
        "KVM_PRE_FAULT_MEMORY, also on a SW-protected VM with private memory",
    ),
    T::new(
        "x86/private_mem_conversions_test",
        "",
        "SW-protected VM: shared<->private through KVM_HC_MAP_GPA_RANGE exits (the path patch 0001 refactors), data checked on both sides",
    )
    .timeout(180),
    T::new(
        "x86/private_mem_conversions_test",
        "-n 4",
        "the same, 4 vCPUs converting at once",
    )
    .timeout(240),
    T::new(
        "x86/private_mem_conversions_test",
        "-n 4 -m 2",
        "the same, 4 vCPUs, the guest_memfd split over 2 memslots",
    )
    .timeout(240),
    T::new(
        "x86/private_mem_conversions_test",
        "-n 2 -s anonymous_thp",
        "the same, 2 vCPUs, THP-backed shared memory",
    )
    .timeout(240),
    T::new(
        "x86/private_mem_kvm_exits_test",
        "",
        "KVM_EXIT_MEMORY_FAULT for private accesses without guest_memfd backing",
    ),
    T::new(
        "memslot_modification_stress_test",
        "",
        "memslot changes while vCPUs fault pages in",
    ),
    T::new("kvm_binary_stats_test", "", "VM and vCPU binary stats"),
    // Hypercalls: patches 0001/0002 change the KVM_EXIT_HYPERCALL path.
    T::new(
        "x86/fix_hypercall_test",
        "",
        "VMCALL/VMMCALL patching and KVM_X86_QUIRK_FIX_HYPERCALL_INSN",
    ),
    T::new(
        "x86/kvm_pv_test",
        "",
        "PV feature enforcement: hypercalls and MSRs without their CPUID bit fail",
    ),
    T::new(
        "x86/userspace_msr_exit_test",
        "",
        "MSR exits to userspace, also of emulated RDMSR/WRMSR (forced emulation)",
    ),
    T::new("x86/userspace_io_test", "", "string I/O exits to userspace"),
    T::new("x86/sync_regs_test", "", "register state shared through kvm_run"),
    T::new(
        "coalesced_io_test",
        "",
        "MMIO and PIO exits, coalesced rings",
    ),
    // The emulator: patch 0004 makes it read private memory.
    T::new(
        "x86/fastops_test",
        "",
        "emulated ALU instructions against native results (forced emulation)",
    ),
    T::new(
        "x86/exit_on_emulation_failure_test",
        "",
        "KVM_EXIT_INTERNAL_ERROR when the emulator fails",
    ),
    T::new(
        "x86/nested_emulation_test",
        "",
        "forced emulation of intercepted instructions in a nested guest",
    )
    .xfail(Known {
        says: "Wanted insn_len '2' for 'pause', got '",
        because: "the test reads the instruction length from the nested VMCB's next_rip, which only NRIPS fills: QEMU TCG's SVM has no NRIP save, so L1's KVM offers none",
        when: &["!nrip_save", "kvm_amd.nrips=0"],
    }),
    T::new(
        "x86/debug_regs",
        "",
        "guest debug: INT3, hardware breakpoints, single-step, also over emulated instructions",
    )
    .xfail(Known {
        says: "Unhandled exception '0x3'",
        because: "the first check (INT3 with KVM_GUESTDBG_USE_SW_BP) needs the #BP intercept, which QEMU TCG's SVM does not apply to INT3 (raise_interrupt2() checks only SVM_EXIT_SWINT for `int`-type events): the guest takes its own #BP",
        when: &[],
    }),
    T::new(
        "x86/smaller_maxphyaddr_emulation_test",
        "",
        "emulated accesses to GPAs above a smaller guest MAXPHYADDR",
    )
    .skips(&[Known {
        says: "KVM_CAP_SMALLER_MAXPHYADDR",
        because: "kvm_amd allows a smaller MAXPHYADDR only without NPT (allow_smaller_maxphyaddr = !npt_enabled); L1 runs kvm_amd.npt=1",
        when: &["kvm_amd.npt=Y"],
    }]),
    T::new(
        "x86/pmu_counters_test",
        "",
        "PMU counters, also counting emulated instructions (forced emulation)",
    )
    .skips(&[Known {
        says: "kvm_is_pmu_enabled()",
        because: "QEMU TCG gives L1 no PMU (perf finds no GP counters), so KVM turns enable_pmu off",
        when: &["kvm.enable_pmu=N"],
    }]),
    T::new("x86/set_sregs_test", "", "segment and control register checks"),
    T::new("x86/smm_test", "", "SMM entry and RSM (emulated)"),
    T::new("x86/state_test", "", "save and restore of vCPU state"),
    T::new("x86/cpuid_test", "", "KVM_SET_CPUID2/KVM_GET_CPUID2"),
    T::new("x86/platform_info_test", "", "MSR_PLATFORM_INFO and CPUID faulting"),
    T::new("x86/hwcr_msr_test", "", "MSR_K7_HWCR writes"),
    T::new(
        "x86/msrs_test",
        "",
        "MSR reads and writes from the guest and from userspace",
    )
    .xfail(Known {
        says: "Wanted 0x56789000 from RDMSR(0x175), got 0x123456789000",
        because: "KVM passes SYSENTER_ESP/EIP through to an AMD guest (svm.c: AMD hardware keeps 32 bits); QEMU TCG's SVM keeps all 64 (helper_wrmsr: env->sysenter_esp = val)",
        when: &[],
    }),
    T::new("x86/feature_msrs_test", "", "feature MSRs"),
    T::new("x86/triple_fault_event_test", "", "triple fault as an event"),
    // TSC and kvmclock: patch 0005 keeps a valid TSC multiplier when a
    // rate cannot be set.
    T::new("x86/tsc_msrs_test", "", "TSC and TSC_ADJUST MSRs"),
    T::new(
        "x86/kvm_clock_test",
        "",
        "kvmclock and KVM_SET_CLOCK; fails here without patch 0005 (KVM's TSC multiplier left at 0)",
    ),
    T::new(
        "x86/tsc_scaling_sync",
        "",
        "a per-VM TSC rate and its sync across vCPUs",
    )
    .skips(&[Known {
        says: "KVM_CAP_VM_TSC_CONTROL",
        because: "QEMU TCG's SVM has no TSC scaling, so KVM offers no TSC control",
        when: &["!tsc_scale", "kvm_amd.tsc_scaling=0"],
    }]),
    T::new(
        "system_counter_offset_test",
        "",
        "KVM_VCPU_TSC_OFFSET",
    ),
    T::new("steal_time", "", "steal time, one of the guest's per-CPU PV pages"),
    T::new("x86/xapic_state_test", "", "xAPIC state"),
    T::new("x86/apic_bus_clock_test", "", "APIC bus clock"),
];

/// Where the build went: set by [`add`], read by the judge to symbolise
/// backtraces.
static BUILT: OnceLock<PathBuf> = OnceLock::new();

/// Why the build failed, if it did: set by [`add`], shown by the judge.
static BUILD_ERROR: OnceLock<String> = OnceLock::new();

/// The distinct binaries of [`LIST`].
fn binaries() -> Vec<&'static str> {
    let set: BTreeSet<&str> = LIST.iter().map(|t| t.bin).collect();
    set.into_iter().collect()
}

/// Builds the binaries of [`LIST`] statically from `k.tree`, against its
/// own uapi headers, incrementally, into `$KVM_PROTMEM_CACHE/selftests`;
/// returns the directory that holds them.
pub fn build(ctx: &Ctx, k: &Kernel) -> Result<PathBuf> {
    let root = ctx.cache.join("selftests");
    let hdr = root.join("hdr");
    let out = root.join("kvm");
    std::fs::create_dir_all(&out)?;
    std::fs::create_dir_all(ctx.logs())?;
    let log_path = ctx.logs().join("selftests-build.log");
    let log = std::fs::File::create(&log_path)
        .with_context(|| format!("cannot create {}", log_path.display()))?;
    let start = Instant::now();
    let mtime = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let bins = binaries();
    let before: Vec<Option<SystemTime>> = bins.iter().map(|b| mtime(&out.join(b))).collect();
    let jobs = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2);
    let make = |cmd: &mut Command| -> Result<()> {
        let status = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log.try_clone()?)
            .status()
            .with_context(|| format!("cannot start `{}`", sh::show(cmd)))?;
        if !status.success() {
            let text = std::fs::read_to_string(&log_path).unwrap_or_default();
            bail!(
                "`{}` failed ({status})\n--- {} ---\n{}",
                sh::show(cmd),
                log_path.display(),
                sh::tail(&text, 30)
            );
        }
        Ok(())
    };
    // The uapi headers of the tree the kernel is built from (with our KVM
    // patches), in HDR/usr/include: `make headers` rewrites only headers
    // that changed (`headers_install` would copy them onto themselves with
    // rsync).
    make(
        Command::new("make")
            .arg("-C")
            .arg(&k.tree)
            .arg(format!("O={}", hdr.display()))
            .args(["ARCH=x86_64", "-s", "headers"]),
    )?;
    // Static, so that L1's initramfs needs no libraries; make rebuilds only
    // what changed (the objects depend on the installed headers).
    make(
        Command::new("make")
            .arg("-C")
            .arg(k.tree.join(SRC))
            .arg(format!("OUTPUT={}", out.display()))
            .arg(format!(
                "KHDR_INCLUDES=-isystem {}",
                hdr.join("usr/include").display()
            ))
            .args(["EXTRA_CFLAGS=-static", "LDFLAGS=-static"])
            .arg(format!("-j{jobs}"))
            .args(bins.iter().map(|b| out.join(b))),
    )?;
    let rebuilt = bins
        .iter()
        .zip(&before)
        .filter(|(b, old)| mtime(&out.join(b)) != **old)
        .count();
    println!(
        "selftests: {} binaries from {}, {rebuilt} (re)built, {:.1}s (log: {})",
        bins.len(),
        k.tree.join(SRC).display(),
        start.elapsed().as_secs_f64(),
        log_path.display()
    );
    Ok(out)
}

/// Builds the selftests and puts them into the L1 initramfs under
/// `/selftests`, with an `addr2line` that prints the backtrace addresses
/// of a failed assertion for the host to symbolise. A build that fails
/// fails this run's rows (the judge names the error), not the L1 boot:
/// the scenarios after it still run.
pub fn add(ctx: &Ctx, k: &Kernel, i: &mut Initramfs) {
    let out = match build(ctx, k) {
        Ok(out) => out,
        Err(e) => {
            println!("selftests: not built: {e:#}");
            let _ = BUILD_ERROR.set(format!("{e:#}"));
            return;
        }
    };
    i.dir(L1_DIR)
        .dir(&format!("{L1_DIR}/x86"))
        .dir(&format!("{L1_DIR}/bin"));
    for b in binaries() {
        if let Err(e) = i.copy(&format!("{L1_DIR}/{b}"), 0o755, &out.join(b)) {
            let _ = BUILD_ERROR.set(format!("{e:#}"));
        }
    }
    i.file(
        &format!("{L1_DIR}/bin/addr2line"),
        0o755,
        b"#!/bin/sh\necho \"kpm-selftest: backtrace $*\"\n",
    );
    let _ = BUILT.set(out);
}

/// The run that the scenario list carries: no L2 boot, the L1 script runs
/// [`script`] in its place.
pub fn scenario() -> Scenario {
    Scenario {
        name: RUN,
        expect: "mainline KVM selftests (static, from the tree the kernel is built from) on our L1 host kernel: each passes, or skips / fails on the L0 platform for a reason understood here; no kernel warning",
        run: L2Run {
            name: RUN.to_string(),
            vmm_args: Vec::new(),
            cmdline: String::new(),
            timeout: LIST.iter().map(|t| t.timeout + 5).sum(),
            qemu: false,
        },
        judge,
    }
}

/// The L1 script's part for the selftests: each test with its timeout,
/// its output, the kernel's log lines of its run, one result line.
pub fn script() -> String {
    // The facts the explanations of skips and L0 failures rest on: L1's
    // CPU flags (what QEMU TCG's model offers) and KVM's parameters.
    let mut s = format!(
        "echo 'kpm-l1: begin {RUN}'\n\
         echo \"kpm-selftest: cpu-flags $(grep -m1 '^flags' /proc/cpuinfo | cut -d: -f2)\"\n\
         for m in kvm kvm_amd; do\n\
         \techo \"kpm-selftest: params $m $(cd /sys/module/$m/parameters && grep -H . * | tr '\\n' ' ')\"\n\
         done\n\
         dmesg -c >/dev/null\n\
         read start rest </proc/uptime\n"
    );
    for t in LIST {
        let name = t.name();
        s.push_str(&format!(
            "echo 'kpm-selftest: start {name}'\n\
             read t0 rest </proc/uptime\n\
             {{ PATH=/{L1_DIR}/bin:$PATH timeout {timeout} /{L1_DIR}/{bin} {args} </dev/null 2>&1; echo $? >/tmp/kst.rc; }} | tee /tmp/kst.out\n\
             read t1 rest </proc/uptime\n\
             dmesg -c | sed 's/^/kpm-selftest: dmesg /'\n\
             secs=$(awk \"BEGIN {{ printf \\\"%.1f\\\", $t1 - $t0 }}\")\n\
             sum=$(grep -E '{SUMMARY_RE}' /tmp/kst.out | tail -n 1)\n\
             echo \"kpm-selftest: result {name} | exit $(cat /tmp/kst.rc) | l1-secs $secs | ${{sum:--}}\"\n",
            timeout = t.timeout,
            bin = t.bin,
            args = t.args,
        ));
    }
    s.push_str(&format!(
        "rm -f /tmp/kst.out /tmp/kst.rc\n\
         read end rest </proc/uptime\n\
         echo \"kpm-selftest: done | l1-secs $(awk \"BEGIN {{ printf \\\"%.1f\\\", $end - $start }}\")\"\n\
         echo \"kpm-l1: exit {RUN} 0\"\n\
         echo 'kpm-l1: end {RUN}'\n"
    ));
    s
}

/// Lines a test's summary is taken from (extended regular expression): the
/// kselftest totals, a skip, a failed TAP test, the location of a failed
/// `TEST_ASSERT` (`  file.c:123: expression`).
const SUMMARY_RE: &str = r"^# Totals:|# SKIP|^not ok |^  [^ ]+\.[ch]:[0-9]+: ";

/// What one test left in the L1 log.
#[derive(Debug, Default, PartialEq)]
pub struct Outcome {
    pub name: String,
    /// Exit code, if the result line came.
    pub exit: Option<i32>,
    /// L1 seconds the test took (from L1's /proc/uptime).
    pub l1_secs: Option<f64>,
    pub summary: String,
    /// The test's output.
    pub output: Vec<String>,
    /// Kernel log lines of its run.
    pub dmesg: Vec<String>,
    /// Arguments of the `addr2line` the failed assertion ran.
    pub backtrace: Option<String>,
}

/// Splits the run's console into one [`Outcome`] per started test.
pub fn parse(console: &str) -> Vec<Outcome> {
    let mut out: Vec<Outcome> = Vec::new();
    for line in console.lines() {
        let l = line.trim_end_matches('\r');
        if let Some(name) = l.strip_prefix("kpm-selftest: start ") {
            out.push(Outcome {
                name: name.to_string(),
                ..Default::default()
            });
            continue;
        }
        let Some(o) = out.last_mut().filter(|o| o.exit.is_none()) else {
            continue;
        };
        if let Some(d) = l.strip_prefix("kpm-selftest: dmesg ") {
            o.dmesg.push(d.to_string());
        } else if let Some((_, b)) = l.split_once("kpm-selftest: backtrace ") {
            // The test pipes addr2line's output through `cat -n`.
            o.backtrace = Some(b.to_string());
        } else if let Some(r) = l.strip_prefix("kpm-selftest: result ") {
            let f: Vec<&str> = r.splitn(4, " | ").collect();
            if f.len() == 4 && f[0] == o.name {
                o.exit = f[1]
                    .strip_prefix("exit ")
                    .and_then(|c| c.trim().parse().ok());
                o.l1_secs = f[2]
                    .strip_prefix("l1-secs ")
                    .and_then(|c| c.trim().parse().ok());
                o.summary = f[3].to_string();
            }
        } else {
            o.output.push(l.to_string());
        }
    }
    out
}

/// What L1 said of itself before the tests: its CPU flags and KVM's
/// module parameters (`kvm_amd.npt` -> `Y`).
#[derive(Debug, Default)]
pub struct Facts {
    pub flags: BTreeSet<String>,
    pub params: std::collections::BTreeMap<String, String>,
}

impl Facts {
    pub fn parse(console: &str) -> Self {
        let mut f = Facts::default();
        for l in console.lines().map(|l| l.trim_end_matches('\r')) {
            if let Some(flags) = l.strip_prefix("kpm-selftest: cpu-flags ") {
                f.flags = flags.split_whitespace().map(str::to_string).collect();
            } else if let Some(rest) = l.strip_prefix("kpm-selftest: params ") {
                let mut w = rest.split_whitespace();
                let module = w.next().unwrap_or_default();
                for p in w {
                    if let Some((k, v)) = p.split_once(':') {
                        f.params.insert(format!("{module}.{k}"), v.to_string());
                    }
                }
            }
        }
        f
    }
}

/// Whether every fact of `when` holds: `flag` and `!flag` test L1's CPU
/// flags, `module.param=value` a KVM parameter. Err says what L1 has
/// instead.
pub fn holds(when: &[&str], facts: &Facts) -> std::result::Result<(), String> {
    for w in when {
        let err = if let Some((k, v)) = w.split_once('=') {
            let have = facts.params.get(k).map_or("nothing", String::as_str);
            (have != v).then(|| format!("{w}, but L1 has {k}={have}"))
        } else if facts.flags.is_empty() {
            Some(format!("{w}, but L1's CPU flags are unknown"))
        } else if let Some(flag) = w.strip_prefix('!') {
            facts
                .flags
                .contains(flag)
                .then(|| format!("{w}, but L1's CPU has {flag}"))
        } else {
            (!facts.flags.contains(*w)).then(|| format!("{w}, but L1's CPU lacks it"))
        };
        if let Some(e) = err {
            return Err(e);
        }
    }
    Ok(())
}

/// `KSFT_SKIP`.
const KSFT_SKIP: i32 = 4;

/// Each skip the test reports: the text after `# SKIP` (kselftest), or a
/// whole line in which the test says it skips part of itself without TAP
/// (`print_skip()`'s `..., skipping test`, `pr_info("Skipping tests for
/// ...")`, `"will skip ..."`).
fn skip_reasons(o: &Outcome) -> Vec<String> {
    o.output
        .iter()
        .filter_map(|l| match l.split_once("# SKIP") {
            Some((_, r)) => Some(r.trim().to_string()),
            None => {
                let low = l.to_lowercase();
                (low.contains("skipping") || low.contains("will skip"))
                    .then(|| l.trim().to_string())
            }
        })
        .collect()
}

/// Kernel log lines that mean KVM (or anything) went wrong in the run.
fn kernel_trouble(o: &Outcome) -> Option<&str> {
    const BAD: [&str; 7] = [
        "WARNING:",
        "BUG:",
        "Oops",
        "general protection fault",
        "Call Trace:",
        "kernel BUG",
        "Kernel panic",
    ];
    o.dmesg
        .iter()
        .find(|l| BAD.iter().any(|b| l.contains(b)))
        .map(String::as_str)
}

/// The failed assertion's location and message, on one line.
fn assertion(o: &Outcome) -> Option<String> {
    let at = o
        .output
        .iter()
        .position(|l| l.contains("==== Test Assertion Failure ===="))?;
    let lines: Vec<&str> = o.output[at + 1..]
        .iter()
        .map(|l| l.trim())
        .filter(|l| !l.is_empty() && !l.starts_with("pid=") && !l.contains("kpm-selftest:"))
        .take(2)
        .collect();
    Some(lines.join("; "))
}

/// The top frames of a failed assertion's backtrace, symbolised with the
/// host's `addr2line` on the binary that ran.
fn symbolise(o: &Outcome, t: &Selftest) -> Option<String> {
    let dir = BUILT.get()?;
    let args = o.backtrace.as_deref()?;
    let addrs: Vec<&str> = args
        .split_whitespace()
        .skip_while(|a| *a != "-fpai")
        .skip(1)
        .collect();
    let out = sh::output(
        Command::new("addr2line")
            .args(["-s", "-f", "-p", "-i", "-a", "-e"])
            .arg(dir.join(t.bin))
            .args(&addrs),
    )
    .ok()?;
    let frames: Vec<&str> = out
        .lines()
        .filter_map(|l| l.split_once(": ").map(|(_, f)| f))
        .take(3)
        .collect();
    Some(frames.join(" <- "))
}

/// Judges one test: (verdict, figure); the verdict is `pass`, `skip`,
/// `xfail` or `FAIL`.
fn verdict(t: &Selftest, o: Option<&Outcome>, facts: &Facts) -> (&'static str, String) {
    if let Some(e) = BUILD_ERROR.get() {
        return (
            "FAIL",
            format!("not built: {}", e.lines().next().unwrap_or("")),
        );
    }
    let Some(o) = o else {
        return ("FAIL", "never started (L1 stopped before it)".into());
    };
    let Some(exit) = o.exit else {
        return ("FAIL", "no result line (L1 stopped during it)".into());
    };
    let secs = o.l1_secs.map_or("-".into(), |s| format!("{s:.1}s"));
    if let Some(k) = kernel_trouble(o) {
        return ("FAIL", format!("exit {exit}, {secs}; kernel: {k}"));
    }
    // Every skip, of the test or of a subtest, must be one we understand,
    // on an L1 where its explanation holds.
    let skips = skip_reasons(o);
    let mut why = Vec::new();
    for r in &skips {
        let Some(k) = t.skips.iter().find(|k| r.contains(k.says)) else {
            return (
                "FAIL",
                format!("exit {exit}, {secs}; skip not understood here: {r}"),
            );
        };
        if let Err(e) = holds(k.when, facts) {
            return (
                "FAIL",
                format!("exit {exit}, {secs}; skip `{r}` is explained by {e}"),
            );
        }
        if !why.contains(&k.because) {
            why.push(k.because);
        }
    }
    match exit {
        0 => {
            let sub = if skips.is_empty() {
                String::new()
            } else {
                format!("; {} subtests skipped: {}", skips.len(), why.join("; "))
            };
            ("pass", format!("{secs}; {}{sub}", o.summary))
        }
        KSFT_SKIP if !skips.is_empty() => (
            "skip",
            format!("{}: {}", skips[skips.len() - 1], why.join("; ")),
        ),
        KSFT_SKIP => ("FAIL", format!("exit 4 without a SKIP line, {secs}")),
        124 | 143 => (
            "FAIL",
            format!(
                "timed out after {}s; last line: {}",
                t.timeout,
                o.output.last().map_or("-", |l| l.as_str())
            ),
        ),
        _ => {
            let what = assertion(o).unwrap_or_else(|| o.summary.clone());
            if let Some(k) = &t.xfail {
                if o.output.iter().any(|l| l.contains(k.says)) {
                    return match holds(k.when, facts) {
                        Ok(()) => (
                            "xfail",
                            format!("L0 platform: {}; test says: {what}", k.because),
                        ),
                        Err(e) => (
                            "FAIL",
                            format!("exit {exit}; {what}; the L0 explanation needs {e}"),
                        ),
                    };
                }
            }
            let bt = symbolise(o, t)
                .map(|b| format!("; at {b}"))
                .unwrap_or_default();
            ("FAIL", format!("exit {exit}, {secs}; {what}{bt}"))
        }
    }
}

/// The scenario's judge: one row per test of [`LIST`], then one for the
/// whole set (it ran to its end; counts and L1 time).
pub fn judge(run: &L2Outcome) -> Vec<Row> {
    let outcomes = parse(&run.console);
    let facts = Facts::parse(&run.console);
    let mut rows: Vec<Row> = LIST
        .iter()
        .map(|t| {
            let name = t.name();
            let (v, figure) = verdict(t, outcomes.iter().find(|o| o.name == name), &facts);
            Row {
                check: name,
                ok: v != "FAIL",
                figure,
                shown_as: (v != "pass" && v != "FAIL").then_some(v),
            }
        })
        .collect();
    let count = |label: Option<&str>, ok: bool| {
        rows.iter()
            .filter(|r| r.ok == ok && (!ok || r.shown_as == label))
            .count()
    };
    let done = run
        .lines_after("kpm-selftest: done | l1-secs ")
        .next()
        .and_then(|s| s.trim().parse::<f64>().ok());
    let figure = format!(
        "{} pass, {} skip, {} xfail, {} FAIL; {}",
        count(None, true),
        count(Some("skip"), true),
        count(Some("xfail"), true),
        count(None, false),
        done.map_or("the set did not finish".to_string(), |s| {
            format!("{s:.1}s of L1 time")
        }),
    );
    rows.push(Row {
        check: format!("the whole set ({} runs) ran to its end", LIST.len()),
        ok: done.is_some(),
        figure,
        shown_as: None,
    });
    rows
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOG: &str = "\
kpm-selftest: cpu-flags fpu svm npt
kpm-selftest: params kvm enable_pmu:N force_emulation_prefix:1
kpm-selftest: params kvm_amd npt:Y nrips:0
kpm-selftest: start a
TAP version 13
1..2
ok 1 one
ok 2 # SKIP no frobnicator
# Totals: pass:1 fail:0 xfail:0 xpass:0 skip:1 error:0
kpm-selftest: dmesg [   12.0] kvm: something harmless
kpm-selftest: result a | exit 0 | l1-secs 1.5 | # Totals: pass:1 fail:0 xfail:0 xpass:0 skip:1 error:0
kpm-selftest: start b
==== Test Assertion Failure ====
  x86/b.c:42: r == 0
  pid=7 tid=7 errno=22 - Invalid argument
     1\tkpm-selftest: backtrace -s -e /proc/7/exe -fpai 401000 402000
  Wanted 0, got -22
kpm-selftest: result b | exit 254 | l1-secs 0.2 |   x86/b.c:42: r == 0
kpm-selftest: start c
";

    const fn known(says: &'static str, when: &'static [&'static str]) -> Known {
        Known {
            says,
            because: "TCG has none",
            when,
        }
    }

    #[test]
    fn parse_splits_tests_and_reads_result_lines() {
        let o = parse(LOG);
        assert_eq!(o.len(), 3);
        assert_eq!(o[0].name, "a");
        assert_eq!(o[0].exit, Some(0));
        assert_eq!(o[0].l1_secs, Some(1.5));
        assert_eq!(o[0].dmesg, ["[   12.0] kvm: something harmless"]);
        assert!(o[0].summary.starts_with("# Totals: pass:1"));
        assert_eq!(skip_reasons(&o[0]), ["no frobnicator"]);
        let quiet = Outcome {
            output: vec![
                "Skipping tests for KVM_MEM_GUEST_MEMFD memory regions".into(),
                "will skip SMM test with VMX enabled".into(),
                "No frobnicator, skipping test".into(),
                "Testing KVM_RUN with zero added memory regions".into(),
            ],
            ..Default::default()
        };
        assert_eq!(skip_reasons(&quiet).len(), 3);
        assert_eq!(o[1].exit, Some(254));
        assert_eq!(
            o[1].backtrace.as_deref(),
            Some("-s -e /proc/7/exe -fpai 401000 402000")
        );
        assert_eq!(
            assertion(&o[1]).as_deref(),
            Some("x86/b.c:42: r == 0; Wanted 0, got -22")
        );
        assert_eq!(o[2].exit, None, "c never finished");
    }

    #[test]
    fn facts_and_conditions() {
        let f = Facts::parse(LOG);
        assert!(holds(
            &["svm", "!nrip_save", "kvm_amd.nrips=0", "kvm.enable_pmu=N"],
            &f
        )
        .is_ok());
        assert_eq!(
            holds(&["!npt"], &f).unwrap_err(),
            "!npt, but L1's CPU has npt"
        );
        assert_eq!(
            holds(&["kvm_amd.npt=N"], &f).unwrap_err(),
            "kvm_amd.npt=N, but L1 has kvm_amd.npt=Y"
        );
        assert!(holds(&["tsc_scale"], &f).is_err());
        assert!(
            holds(&["!tsc_scale"], &Facts::default()).is_err(),
            "no facts, no excuse"
        );
    }

    #[test]
    fn verdicts() {
        let o = parse(LOG);
        let f = Facts::parse(LOG);
        const RIGHT: &[Known] = &[known("frobnicator", &["!nrip_save"])];
        const WRONG: &[Known] = &[known("frobnicator", &["nrip_save"])];
        let a = T::new("a", "", "").skips(RIGHT);
        let (v, fig) = verdict(&a, Some(&o[0]), &f);
        assert_eq!(v, "pass", "{fig}");
        assert!(fig.contains("1 subtests skipped: TCG has none"), "{fig}");
        // The same skip without an explanation, or where it does not hold,
        // fails.
        assert_eq!(verdict(&T::new("a", "", ""), Some(&o[0]), &f).0, "FAIL");
        let wrong = T::new("a", "", "").skips(WRONG);
        assert_eq!(verdict(&wrong, Some(&o[0]), &f).0, "FAIL");
        let (v, fig) = verdict(&T::new("b", "", ""), Some(&o[1]), &f);
        assert_eq!(v, "FAIL");
        assert!(fig.contains("exit 254") && fig.contains("b.c:42"), "{fig}");
        // A failure the L0 platform explains.
        let b = T::new("b", "", "").xfail(known("Wanted 0, got -22", &["kvm_amd.nrips=0"]));
        let (v, fig) = verdict(&b, Some(&o[1]), &f);
        assert_eq!(v, "xfail", "{fig}");
        assert!(fig.starts_with("L0 platform: TCG has none"), "{fig}");
        let b = T::new("b", "", "").xfail(known("Wanted 0, got -22", &["kvm_amd.nrips=1"]));
        assert_eq!(verdict(&b, Some(&o[1]), &f).0, "FAIL");
        let b = T::new("b", "", "").xfail(known("something else", &[]));
        assert_eq!(verdict(&b, Some(&o[1]), &f).0, "FAIL");
        assert_eq!(verdict(&a, Some(&o[2]), &f).0, "FAIL");
        assert_eq!(verdict(&a, None, &f).0, "FAIL");
    }

    #[test]
    fn whole_test_skip_needs_a_known_reason_and_warnings_fail() {
        let log = "kpm-selftest: cpu-flags svm\n\
                   kpm-selftest: start s\n1..0 # SKIP - Requirement not met: frobnicator\n\
                   kpm-selftest: result s | exit 4 | l1-secs 0.1 | 1..0 # SKIP - Requirement not met: frobnicator\n\
                   kpm-selftest: start w\nkpm-selftest: dmesg WARNING: CPU: 0 PID: 9 at arch/x86/kvm/x86.c:1\n\
                   kpm-selftest: result w | exit 0 | l1-secs 0.1 | -\n";
        let o = parse(log);
        let f = Facts::parse(log);
        const NO_TSC_SCALE: &[Known] = &[known("frobnicator", &["!tsc_scale"])];
        let s = T::new("s", "", "").skips(NO_TSC_SCALE);
        let (v, fig) = verdict(&s, Some(&o[0]), &f);
        assert_eq!(v, "skip");
        assert!(fig.contains("frobnicator: TCG has none"), "{fig}");
        assert_eq!(verdict(&T::new("s", "", ""), Some(&o[0]), &f).0, "FAIL");
        let (v, fig) = verdict(&T::new("w", "", ""), Some(&o[1]), &f);
        assert_eq!(v, "FAIL");
        assert!(fig.contains("WARNING"), "{fig}");
    }

    #[test]
    fn judge_rows_and_the_whole_set() {
        let mut run = L2Outcome::default();
        let rows = judge(&run);
        assert_eq!(rows.len(), LIST.len() + 1);
        assert!(rows.iter().all(|r| !r.ok));
        assert!(rows[LIST.len()].figure.ends_with("the set did not finish"));
        for t in LIST {
            let n = t.name();
            run.console += &format!(
                "kpm-selftest: start {n}\nkpm-selftest: result {n} | exit 0 | l1-secs 1.0 | -\n"
            );
        }
        run.console += "kpm-selftest: done | l1-secs 42.0\n";
        let rows = judge(&run);
        assert!(rows.iter().all(|r| r.ok && r.shown_as.is_none()));
        assert_eq!(
            rows[LIST.len()].figure,
            format!(
                "{} pass, 0 skip, 0 xfail, 0 FAIL; 42.0s of L1 time",
                LIST.len()
            )
        );
    }

    #[test]
    fn names_are_unique_and_the_script_parses() {
        let names: BTreeSet<String> = LIST.iter().map(Selftest::name).collect();
        assert_eq!(names.len(), LIST.len());
        assert!(LIST.iter().all(|t| !t.name().contains(['|', '\'', '"'])));
        let s = script();
        assert!(s.contains("timeout 120 /selftests/x86/kvm_pv_test  </dev/null"));
        if sh::have("busybox") {
            let out = Command::new("busybox")
                .args(["sh", "-n", "-c", &s])
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }

    #[test]
    fn the_script_reports_what_a_test_did() {
        if !sh::have("busybox") {
            return;
        }
        // The script's head and one test, with a shell that skips as the
        // test: what L1 prints goes through parse().
        let tmp = std::env::temp_dir().join(format!("xtask-kst-{}", std::process::id()));
        std::fs::create_dir_all(&tmp).unwrap();
        let full = script();
        let head: Vec<&str> = full
            .lines()
            .take_while(|l| !l.starts_with("echo 'kpm-selftest: start "))
            .collect();
        let body: Vec<&str> = full
            .lines()
            .skip_while(|l| !l.starts_with("echo 'kpm-selftest: start guest_memfd_test'"))
            .take_while(|l| !l.starts_with("echo 'kpm-selftest: start set_memory_region_test'"))
            .collect();
        let text = format!("{}\n{}", head.join("\n"), body.join("\n"))
            .replace(
                "/selftests/guest_memfd_test",
                "sh -c 'echo \"1..0 # SKIP - nope\"; exit 4'",
            )
            .replace("dmesg -c", "echo '[ 1.0] kvm: hello'")
            .replace("/tmp/kst", &tmp.join("kst").display().to_string());
        let out = Command::new("busybox")
            .args(["sh", "-c", &text])
            .output()
            .unwrap();
        std::fs::remove_dir_all(&tmp).unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let o = parse(&text);
        assert_eq!(o.len(), 1, "{text}");
        assert_eq!(o[0].exit, Some(4), "{text}");
        assert_eq!(o[0].summary, "1..0 # SKIP - nope", "{text}");
        assert_eq!(o[0].dmesg, ["[ 1.0] kvm: hello"], "{text}");
        assert!(o[0].l1_secs.is_some(), "{text}");
        assert!(!Facts::parse(&text).flags.is_empty(), "{text}");
    }
}
