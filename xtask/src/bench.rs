//! `cargo xtask bench`: the cost of protection, side by side, written to
//! `BENCHMARKS.md` with SVG plots next to it.
//!
//! Every configuration runs `runs` times, interleaved (run r of every
//! configuration before run r+1 of any), all in one L1 boot, on the same
//! kernel, initramfs and command line but for what the configuration
//! changes. Benchmarks print figures; they assert nothing about time.

use crate::ctx::Ctx;
use crate::e2e::{kv, num, stats, BASE_CMDLINE};
use crate::kernel::Kernel;
use crate::nested::{self, L2Outcome, L2Run};
use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// One configuration of the guest and the VMM.
struct Config {
    /// Column label.
    label: &'static str,
    /// L2 run name prefix: letters, digits, `-`.
    slug: &'static str,
    vmm_args: &'static [&'static str],
    /// Kernel command line beyond the common part.
    cmdline: &'static str,
}

/// The common guest command line: no KUnit, equal work for everyone;
/// `tsc=reliable` keeps the clocksource watchdog (and its warning, which
/// could land in the middle of a result line) out of the timed runs.
const COMMON: &str = "kunit.enable=0 tsc=reliable";

/// The main matrix: boot, conversion cost and disk I/O.
const MAIN: [Config; 4] = [
    Config {
        label: "unprotected",
        slug: "unprot",
        vmm_args: &[],
        cmdline: "kpm.bench",
    },
    Config {
        label: "view",
        slug: "view",
        vmm_args: &["--protect=view"],
        cmdline: "kpm.bench",
    },
    Config {
        label: "gmem",
        slug: "gmem",
        vmm_args: &["--protect=gmem"],
        cmdline: "kpm.bench",
    },
    Config {
        label: "gmem, per-page",
        slug: "perpage",
        vmm_args: &["--protect=gmem"],
        cmdline: "kpm.bench kvm_protmem=on,per-page",
    },
];

/// Bounce-pool pressure: the default pool and a 2 MiB one that must grow
/// (`SWIOTLB_DYNAMIC`). One vCPU: with 2 or more, 32 parallel readers can
/// freeze the nested L1 (the stall report showed the L2's vCPU spinning
/// in `queued_read_lock_slowpath` on `tasklist_lock` while L1's jiffies
/// stood still, as in `protected-smp4`, on Debian's QEMU without
/// qemu/patches/0001). One vCPU keeps the figures comparable with earlier
/// runs.
const PRESSURE: [Config; 2] = [
    Config {
        label: "gmem, 64 MiB pool",
        slug: "pool64",
        vmm_args: &["--protect=gmem"],
        cmdline: "kpm.pressure",
    },
    Config {
        label: "gmem, 2 MiB pool",
        slug: "pool2",
        vmm_args: &["--protect=gmem"],
        cmdline: "kpm.pressure swiotlb=1024",
    },
];

/// The network: TCP each way and HTTP requests through virtio-net, whose
/// TAP L1 sets up (`xtask/src/net.rs`); 16 MiB each way.
const NET: [Config; 3] = [
    Config {
        label: "unprotected",
        slug: "net-unprot",
        vmm_args: &["--net", "tap=kpmtap0"],
        cmdline: "kpm.net kpm.netbench kpm.netmib=16",
    },
    Config {
        label: "view",
        slug: "net-view",
        vmm_args: &["--protect=view", "--net", "tap=kpmtap0"],
        cmdline: "kpm.net kpm.netbench kpm.netmib=16",
    },
    Config {
        label: "gmem",
        slug: "net-gmem",
        vmm_args: &["--protect=gmem", "--net", "tap=kpmtap0"],
        cmdline: "kpm.net kpm.netbench kpm.netmib=16",
    },
];

/// Conversion sizes the guest measures (pages), with their names.
const CONVERT_SIZES: [(u64, &str); 3] = [(1, "4 KiB"), (512, "2 MiB"), (16384, "64 MiB")];

/// Block sizes of the disk benchmark (bytes), with their names.
const BLOCK_SIZES: [(u64, &str); 3] = [(4096, "4 KiB"), (65536, "64 KiB"), (1 << 20, "1 MiB")];

fn l2run(c: &Config, r: usize) -> L2Run {
    L2Run {
        name: format!("b-{}-{r}", c.slug),
        vmm_args: c.vmm_args.iter().map(|s| s.to_string()).collect(),
        cmdline: format!("{BASE_CMDLINE} {COMMON} {}", c.cmdline),
        timeout: 300,
        qemu: false,
    }
}

/// `bytes B t0 T0 t1 T1` (/init's timed dd, /proc/uptime seconds):
/// bytes and seconds.
pub fn parse_timed(line: &str) -> Option<(u64, f64)> {
    let bytes = word_after(line, "bytes")?.parse().ok()?;
    Some((bytes, parse_secs(line)?))
}

/// The seconds between `t0 T0` and `t1 T1` of a line.
pub fn parse_secs(line: &str) -> Option<f64> {
    let t0: f64 = word_after(line, "t0")?.parse().ok()?;
    let t1: f64 = word_after(line, "t1")?.parse().ok()?;
    Some(t1 - t0)
}

fn word_after<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let mut w = line.split_whitespace();
    w.by_ref().find(|x| *x == key)?;
    w.next()
}

/// `key value key value ...` into a map (the `bench_convert` line).
pub fn parse_pairs(line: &str) -> BTreeMap<String, u64> {
    let w: Vec<&str> = line.split_whitespace().collect();
    w.chunks(2)
        .filter_map(|p| Some((p.first()?.to_string(), p.get(1)?.parse().ok()?)))
        .collect()
}

/// The printk time of the first kernel line containing `text`.
pub fn printk_secs(console: &str, text: &str) -> Option<f64> {
    console.lines().find(|l| l.contains(text)).and_then(|l| {
        let l = l.trim_start();
        let inner = l.strip_prefix('[')?.split(']').next()?;
        inner.trim().parse().ok()
    })
}

/// What one run measured (absent figures stay out of the tables).
#[derive(Debug, Default, Clone)]
struct Run {
    to_userspace_host: Option<f64>,
    to_userspace_guest: Option<f64>,
    pool_share_calls: Option<f64>,
    boot_share_calls: Option<f64>,
    /// (pages) -> round trip cycles, hypercalls, tsc_khz
    convert: BTreeMap<u64, (f64, f64, f64)>,
    /// (op, block size) -> MiB/s
    io: BTreeMap<(&'static str, u64), f64>,
    /// MiB/s of the 4 KiB writes that first use the bounce pool after boot.
    io_cold: Option<f64>,
    device_bytes: Option<f64>,
    enable_ms: Option<f64>,
    enable_mib: Option<f64>,
    hiwater_slabs: Option<f64>,
    pool_slabs: Option<f64>,
    transient_slabs: Option<f64>,
    buffer_full: Option<f64>,
    runtime_shares: Option<f64>,
    /// Network: download and upload MiB/s, HTTP requests/s (guest clock).
    net_down: Option<f64>,
    net_up: Option<f64>,
    net_rr: Option<f64>,
    /// MiB virtio-net moved to and from guest memory (bounced when
    /// protected).
    net_mib: Option<f64>,
    /// Bounce-pool slabs used with the receive ring posted, and at peak.
    net_pool_posted: Option<f64>,
    net_pool_peak: Option<f64>,
}

fn measure(o: &L2Outcome) -> Result<Run> {
    if o.exit != Some(0) || !o.console.contains("kpm-init: done") {
        bail!(
            "benchmark run {} did not finish (VMM exit {:?}):\n{}",
            o.name,
            o.exit,
            o.tail()
        );
    }
    let v = stats(o);
    let mut r = Run {
        to_userspace_host: o.secs_to_userspace,
        to_userspace_guest: printk_secs(&o.console, "Run /init as init process"),
        ..Run::default()
    };
    // `boot-shares N pages M`: SHARE calls and pages when /init started.
    let boot_shares =
        kv(o, "boot-shares").and_then(|l| l.split_whitespace().next()?.parse::<u64>().ok());
    r.boot_share_calls = boot_shares.map(|n| n as f64);
    r.pool_share_calls = o
        .lines_after("kvm_protmem: swiotlb pool shared: ")
        .next()
        .and_then(|l| {
            l.split(" in ")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        });
    for line in o.lines_after("kpm-init: bench-convert ") {
        let p = parse_pairs(line);
        let (Some(&pages), Some(&sc), Some(&uc), Some(&h), Some(&khz)) = (
            p.get("pages"),
            p.get("share_cycles"),
            p.get("unshare_cycles"),
            p.get("hypercalls"),
            p.get("tsc_khz"),
        ) else {
            continue;
        };
        r.convert
            .insert(pages, ((sc + uc) as f64, h as f64, khz as f64));
    }
    for (op, key) in [("write", "bench-write"), ("read", "bench-read")] {
        for line in o.lines_after(&format!("kpm-init: {key} bs=")) {
            let Some((bs, rest)) = line.split_once(' ') else {
                continue;
            };
            let (Ok(bs), Some((bytes, secs))) = (bs.parse::<u64>(), parse_timed(rest)) else {
                continue;
            };
            if let Some(&(b, _)) = BLOCK_SIZES.iter().find(|(b, _)| *b == bs) {
                if secs > 0.0 {
                    r.io.insert((op, b), bytes as f64 / (1 << 20) as f64 / secs);
                }
            }
        }
    }
    r.io_cold = kv(o, "bench-write-cold")
        .and_then(|l| parse_timed(l.split_once(' ')?.1))
        .filter(|(_, secs)| *secs > 0.0)
        .map(|(bytes, secs)| bytes as f64 / (1 << 20) as f64 / secs);
    r.device_bytes =
        Some((num(&v, "bytes.read_from_guest") + num(&v, "bytes.written_to_guest")) as f64);
    if num(&v, "gmem.enables") > 0 {
        r.enable_ms = Some(num(&v, "gmem.last_enable_us") as f64 / 1000.0);
        r.enable_mib = Some(num(&v, "gmem.last_enable_bytes") as f64 / (1 << 20) as f64);
    }
    let swiotlb =
        |f: &str| kv(o, &format!("swiotlb {f}")).and_then(|s| s.trim().parse::<f64>().ok());
    r.hiwater_slabs = swiotlb("io_tlb_used_hiwater");
    r.pool_slabs = swiotlb("io_tlb_nslabs");
    r.transient_slabs = swiotlb("io_tlb_transient_nslabs");
    r.buffer_full = kv(o, "pressure-done").and_then(|s| s.split_whitespace().next()?.parse().ok());
    if let (Some(end), Some(start)) = (crate::e2e::debugfs(o, "shares"), boot_shares) {
        r.runtime_shares = Some(end.saturating_sub(start) as f64);
    }
    if kv(o, "net-if").is_some() {
        let rate = |key: &str| kv(o, key).and_then(crate::net::transfer).and_then(|t| t.2);
        r.net_down = rate("net-down");
        r.net_up = rate("net-up");
        // `requests N t0 T0 t1 T1`
        r.net_rr = kv(o, "net-rr").and_then(|l| {
            let n: f64 = l.split_whitespace().nth(1)?.parse().ok()?;
            parse_secs(l).filter(|s| *s > 0.0).map(|s| n / s)
        });
        let moved =
            num(&v, "virtio.net.requests.rx_bytes") + num(&v, "virtio.net.requests.tx_bytes");
        r.net_mib = (moved > 0).then(|| moved as f64 / (1 << 20) as f64);
        let p = crate::net::pool(o);
        r.net_pool_posted = p.posted.map(|x| x as f64);
        r.net_pool_peak = p.peak.map(|x| x as f64);
    }
    Ok(r)
}

/// Median, min and max of `v` (not empty).
fn spread(v: &[f64]) -> (f64, f64, f64) {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let n = s.len();
    let med = if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    };
    (med, s[0], s[n - 1])
}

/// Figures of one configuration, all its runs.
struct Series<'a> {
    label: &'a str,
    runs: Vec<Run>,
}

impl Series<'_> {
    fn values(&self, f: impl Fn(&Run) -> Option<f64>) -> Vec<f64> {
        self.runs.iter().filter_map(f).collect()
    }
}

/// A markdown table row set: per configuration, runs, median, min, max and
/// the ratio of its median to the first configuration's.
fn table(
    out: &mut String,
    what: &str,
    unit: &str,
    series: &[Series<'_>],
    f: impl Fn(&Run) -> Option<f64>,
    digits: usize,
) {
    let _ = writeln!(out, "\n{what}\n");
    let _ = writeln!(
        out,
        "| configuration | runs | median {unit} | min | max | ratio to {} |",
        series[0].label
    );
    let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|");
    let base = {
        let v = series[0].values(&f);
        (!v.is_empty()).then(|| spread(&v).0)
    };
    for s in series {
        let v = s.values(&f);
        if v.is_empty() {
            let _ = writeln!(out, "| {} | 0 | - | - | - | - |", s.label);
            continue;
        }
        let (med, min, max) = spread(&v);
        let ratio = match base {
            Some(b) if b != 0.0 => format!("{:.2}", med / b),
            _ => "-".into(),
        };
        let _ = writeln!(
            out,
            "| {} | {} | {med:.digits$} | {min:.digits$} | {max:.digits$} | {ratio} |",
            s.label,
            v.len()
        );
    }
}

fn median_of(s: &Series<'_>, f: impl Fn(&Run) -> Option<f64>) -> Option<f64> {
    let v = s.values(f);
    (!v.is_empty()).then(|| spread(&v).0)
}

/// The machine, in one line.
fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, m)| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map(|kib| format!("{:.0} GiB", kib as f64 / (1 << 20) as f64))
        .unwrap_or_default();
    format!("{cpu}, {cores} cores, {mem}")
}

/// `cargo xtask bench`: runs everything, writes `BENCHMARKS.md` and the
/// plots into `out`, prints the report.
pub fn run(ctx: &Ctx, k: &Kernel, vmm: &Path, runs: usize, out: &Path) -> Result<()> {
    // The repository's own generated files are ours to rewrite; any other
    // `--out` directory is claimed before the long run, not after it.
    let claim = if out == ctx.repo {
        None
    } else {
        Some(crate::sh::OutDir::claim(out)?)
    };
    if runs == 0 {
        bail!("--runs must be at least 1");
    }
    let mut l2 = Vec::new();
    let boot_run = |slug: &str, args: &[&str], r: usize| L2Run {
        name: format!("b-{slug}-{r}"),
        vmm_args: args.iter().map(|s| s.to_string()).collect(),
        cmdline: format!("{BASE_CMDLINE} {COMMON} {}", crate::bench_boot::CMDLINE),
        timeout: 300,
        qemu: false,
    };
    for r in 0..runs {
        for c in MAIN.iter().chain(&PRESSURE).chain(&NET) {
            l2.push(l2run(c, r));
        }
        for (_, slug, args) in crate::bench_boot::CONFIGS {
            l2.push(boot_run(slug, args, r));
        }
    }
    println!(
        "bench: {} L2 boots ({runs} per configuration, interleaved) in one L1 boot",
        l2.len()
    );
    let started = std::time::Instant::now();
    let (_, outcomes) = nested::run(ctx, k, vmm, &l2, false, "bench-l1.log")?;
    let mut by_cfg: BTreeMap<&str, Vec<Run>> = BTreeMap::new();
    for (c, r) in MAIN
        .iter()
        .chain(&PRESSURE)
        .chain(&NET)
        .flat_map(|c| (0..runs).map(move |r| (c, r)))
    {
        let name = format!("b-{}-{r}", c.slug);
        let o = outcomes
            .iter()
            .find(|o| o.name == name)
            .with_context(|| format!("benchmark run {name} is missing"))?;
        by_cfg.entry(c.slug).or_default().push(measure(o)?);
    }
    let series = |set: &[Config]| -> Vec<Series<'static>> {
        set.iter()
            .map(|c| Series {
                label: c.label,
                runs: by_cfg.get(c.slug).cloned().unwrap_or_default(),
            })
            .collect()
    };
    let main = series(&MAIN);
    let pressure = series(&PRESSURE);
    let mut boots = Vec::new();
    for (label, slug, _) in crate::bench_boot::CONFIGS {
        let mut v = Vec::new();
        for r in 0..runs {
            let name = format!("b-{slug}-{r}");
            let o = outcomes
                .iter()
                .find(|o| o.name == name)
                .with_context(|| format!("benchmark run {name} is missing"))?;
            v.push(crate::bench_boot::measure(o)?);
        }
        boots.push((label, v));
    }
    let net = series(&NET);
    let mut md = report(
        ctx,
        runs,
        &main,
        &pressure,
        &net,
        started.elapsed().as_secs_f64(),
    );
    md.push_str(&crate::bench_boot::section(&boots));
    std::fs::create_dir_all(out)?;
    std::fs::write(out.join("BENCHMARKS.md"), &md)?;
    plot_throughput(&main, &out.join("bench-throughput.svg"))?;
    plot_conversion(&main, &out.join("bench-conversion.svg"))?;
    plot_network(&net, &out.join("bench-network.svg"))?;
    if let Some(c) = &claim {
        c.record(&[
            "BENCHMARKS.md".into(),
            "bench-throughput.svg".into(),
            "bench-conversion.svg".into(),
            "bench-network.svg".into(),
        ])?;
    }
    println!("{md}");
    println!(
        "bench: wrote {} and its plots",
        out.join("BENCHMARKS.md").display()
    );
    let gaps = missing(&main, &pressure, &net);
    if !gaps.is_empty() {
        bail!(
            "the benchmark report has gaps (a run measured less than it should):\n  {}",
            gaps.join("\n  ")
        );
    }
    Ok(())
}

/// Figures some run lacks: every run must measure everything its
/// configuration can (the protected ones: conversions and the pool).
fn missing(main: &[Series<'_>], pressure: &[Series<'_>], net: &[Series<'_>]) -> Vec<String> {
    let mut gaps = Vec::new();
    for (i, s) in main.iter().enumerate() {
        let protected = i > 0;
        for (n, r) in s.runs.iter().enumerate() {
            let mut lacks = Vec::new();
            if r.to_userspace_host.is_none() || r.to_userspace_guest.is_none() {
                lacks.push("boot time".to_string());
            }
            for op in ["read", "write"] {
                for (bs, name) in BLOCK_SIZES {
                    if !r.io.contains_key(&(op, bs)) {
                        lacks.push(format!("{op} {name}"));
                    }
                }
            }
            if protected {
                if r.pool_share_calls.is_none() || r.boot_share_calls.is_none() {
                    lacks.push("boot SHARE calls".into());
                }
                for (pages, name) in CONVERT_SIZES {
                    if !r.convert.contains_key(&pages) {
                        lacks.push(format!("{name} conversion"));
                    }
                }
            }
            if !lacks.is_empty() {
                gaps.push(format!(
                    "{} run {}: no {}",
                    s.label,
                    n + 1,
                    lacks.join(", ")
                ));
            }
        }
    }
    for s in pressure {
        for (n, r) in s.runs.iter().enumerate() {
            if r.hiwater_slabs.is_none() || r.buffer_full.is_none() || r.runtime_shares.is_none() {
                gaps.push(format!("{} run {}: no pool figures", s.label, n + 1));
            }
        }
    }
    for (i, s) in net.iter().enumerate() {
        for (n, r) in s.runs.iter().enumerate() {
            let protected = i > 0;
            if r.net_down.is_none()
                || r.net_up.is_none()
                || r.net_rr.is_none()
                || r.net_mib.is_none()
                || (protected && (r.net_pool_posted.is_none() || r.net_pool_peak.is_none()))
            {
                gaps.push(format!(
                    "network, {} run {}: no network figures",
                    s.label,
                    n + 1
                ));
            }
        }
    }
    gaps
}

fn report(
    ctx: &Ctx,
    runs: usize,
    main: &[Series<'_>],
    pressure: &[Series<'_>],
    net: &[Series<'_>],
    secs: f64,
) -> String {
    let mut m = String::new();
    let _ = writeln!(m, "# Benchmarks\n");
    let _ = writeln!(
        m,
        "Generated by `cargo xtask bench` (do not edit; rerun it). {runs} runs per \
         configuration, interleaved, all in one L1 boot ({:.0} s in all).\n",
        secs
    );
    let _ = writeln!(m, "## Setup\n");
    let _ = writeln!(m, "- Machine (L0): {}.", machine());
    let _ = writeln!(
        m,
        "- Nested: QEMU TCG (`-cpu EPYC,+svm,+npt`, {} CPU, 3 GiB) boots our {} kernel as \
         the KVM host (L1); in it `protmem-vmm` boots the same kernel as the guest (L2, \
         512 MiB, 1 vCPU) with the busybox initramfs of \
         `tests/guest/init` and virtio-blk on the VMM's I/O thread.",
        nested::l1_cpus(),
        ctx.pins.linux_source
    );
    let _ = writeln!(
        m,
        "- Configurations: `unprotected` (no `--protect`), `view` (`--protect=view`), \
         `gmem` (`--protect=gmem`), `gmem, per-page` (`gmem` with the guest's \
         `kvm_protmem=on,per-page`: one hypercall per 4 KiB page, as pKVM guests \
         convert). Same kernel, same initramfs, `kunit.enable=0` everywhere."
    );
    let _ = writeln!(
        m,
        "- What nested TCG distorts: every absolute time and throughput (a TCG-emulated L1 \
         runs an L2 whose every exit is emulated; instructions cost differently than on \
         hardware, so a hypercall round trip is far dearer relative to a `memcpy` than on \
         a real host). What it does not: counts (hypercalls, slabs, bytes, buffer-full \
         events) are exact, and ratios of equal work measured side by side in one boot \
         compare the configurations fairly, if not with hardware's proportions."
    );
    let _ = writeln!(
        m,
        "- L0 is itself a VM here: its first touch of a page costs about 13 us (QEMU's \
         `-mem-prealloc` of 3 GiB takes 10 s). L1's RAM is preallocated before L1 boots; \
         without it, whichever L2 boot first used a stretch of L1's memory paid for it, up \
         to 1.7 s of boot time spread over every phase: all of the first round, and the \
         boots that use the most memory (guest_memfd with a large disk) in most rounds."
    );

    let _ = writeln!(m, "\n## 1. SHARE hypercalls at boot, by type\n");
    let _ = writeln!(
        m,
        "From the guest: the `swiotlb pool shared: ... in N hypercalls` line, and debugfs \
         `shares` when /init starts (every SHARE of the boot: pool, kvmclock, per-CPU PV \
         data, dynamic allocations)."
    );
    let both = [&main[2], &main[3]];
    let both: Vec<Series<'_>> = both
        .iter()
        .map(|s| Series {
            label: s.label,
            runs: s.runs.clone(),
        })
        .collect();
    table(
        &mut m,
        "Bounce pool (64 MiB):",
        "calls",
        &both,
        |r| r.pool_share_calls,
        0,
    );
    table(
        &mut m,
        "All of the boot:",
        "calls",
        &both,
        |r| r.boot_share_calls,
        0,
    );
    let (ours, pp) = (
        median_of(&both[0], |r| r.pool_share_calls),
        median_of(&both[1], |r| r.pool_share_calls),
    );
    let _ = writeln!(
        m,
        "\nGoal: at least 100x fewer SHARE calls for the boot-time pool than per-page: {}.",
        match (ours, pp) {
            (Some(o), Some(p)) if o > 0.0 => format!(
                "{:.0}x fewer ({o:.0} vs {p:.0}): {}",
                p / o,
                if p / o >= 100.0 { "met" } else { "not met" }
            ),
            _ => "no figures".into(),
        }
    );

    let _ = writeln!(m, "\n## 2. Boot to userspace, equal work\n");
    table(
        &mut m,
        "Host clock, VMM start to `kpm-init: userspace up` on L0:",
        "s",
        main,
        |r| r.to_userspace_host,
        2,
    );
    table(
        &mut m,
        "Guest clock, printk time of `Run /init as init process`:",
        "s",
        main,
        |r| r.to_userspace_guest,
        2,
    );
    let goal = |s: &Series<'_>| {
        let b = median_of(&main[0], |r| r.to_userspace_host)?;
        Some(median_of(s, |r| r.to_userspace_host)? / b)
    };
    let _ = writeln!(
        m,
        "\nGoal: protected/unprotected <= 1.10 (host clock): view {}, gmem {}.",
        goal_text(goal(&main[1]), |x| x <= 1.10),
        goal_text(goal(&main[2]), |x| x <= 1.10)
    );

    let _ = writeln!(m, "\n## 3. virtio-blk sequential direct I/O\n");
    let _ = writeln!(
        m,
        "busybox `dd` with `iflag=direct` / `oflag=direct` over the disk's bench area, \
         one pass per block size: 64 MiB at 64 KiB and 1 MiB blocks, 16 MiB at 4 KiB blocks \
         (64 MiB at 4 KiB takes about 80 s a boot under nested TCG), timed by /init with /proc/uptime (guest clock, \
         1/100 s). In the \
         protected configurations every byte is bounced through the shared swiotlb pool. \
         The disk runs before the conversion bench (section 4): under gmem, the 64 MiB it \
         shares and unshares come back as pages KVM has never mapped, and the first touch of \
         each is a nested page fault and a new guest_memfd page; 4 KiB writes that ran right \
         after it paid that cost of the conversions (0.64 of unprotected in earlier runs). \
         The passes below run on a bounce pool in use; the first use of the pool after boot \
         is measured on its own at the end of this section."
    );
    let mut worst: Option<f64> = None;
    for (op, name) in [("read", "Read"), ("write", "Write")] {
        for (bs, bs_name) in BLOCK_SIZES {
            table(
                &mut m,
                &format!("{name}, {bs_name} blocks:"),
                "MiB/s",
                main,
                |r| r.io.get(&(op, bs)).copied(),
                1,
            );
            for s in &main[1..3] {
                let b = median_of(&main[0], |r| r.io.get(&(op, bs)).copied());
                let x = median_of(s, |r| r.io.get(&(op, bs)).copied());
                if let (Some(b), Some(x)) = (b, x) {
                    let q = x / b;
                    worst = Some(worst.map_or(q, |w: f64| w.min(q)));
                }
            }
        }
    }
    table(
        &mut m,
        "Bytes the devices moved to and from guest memory (whole run; bounced when protected):",
        "MiB",
        main,
        |r| r.device_bytes.map(|b| b / (1 << 20) as f64),
        1,
    );
    let _ = writeln!(
        m,
        "\nGoal: >= 0.8 of unprotected: the worst view/gmem ratio over all block sizes \
         and both directions is {}.\n\n![throughput](bench-throughput.svg)",
        goal_text(worst, |x| x >= 0.8)
    );
    let _ = writeln!(
        m,
        "\nThe first use of the bounce pool after boot. Guest patch 0015 leaves the 64 MiB \
         pool untouched at boot (clearing it cost the boot 16384 nested page faults), and \
         swiotlb hands out its slots in turn, so until 64 MiB have been bounced each new slot \
         is a page nothing touched yet: under gmem and view alike a new page of the VMM's \
         memfd in L1 and a nested page fault. The VMM now maps what a SHARE made shared \
         before the guest runs again (`KVM_PRE_FAULT_MEMORY`, `shared_prefault` in its \
         stats, the boot breakdown's last rows), in one ioctl instead of an exit per page in \
         the middle of the first transfers. The 4 KiB writes of this table are each run's \
         first bench I/O (16 MiB over 4096 pool pages)."
    );
    table(
        &mut m,
        "Write, 4 KiB blocks, first I/O after boot (the bounce pool's first use):",
        "MiB/s",
        main,
        |r| r.io_cold,
        1,
    );

    let _ = writeln!(m, "\n## 4. Conversion cost\n");
    let _ = writeln!(
        m,
        "debugfs `kvm_protmem/bench_convert`: the guest allocates the pages (in blocks of \
         up to 4 MiB), zeroes them, and times `set_memory_decrypted()` + \
         `set_memory_encrypted()` (SHARE + UNSHARE, the whole kernel path) in guest TSC \
         cycles."
    );
    let prot: Vec<Series<'_>> = main[1..]
        .iter()
        .map(|s| Series {
            label: s.label,
            runs: s.runs.clone(),
        })
        .collect();
    for (pages, name) in CONVERT_SIZES {
        table(
            &mut m,
            &format!("{name} round trip:"),
            "cycles",
            &prot,
            |r| r.convert.get(&pages).map(|c| c.0),
            0,
        );
        table(
            &mut m,
            &format!("{name} round trip, hypercalls:"),
            "calls",
            &prot,
            |r| r.convert.get(&pages).map(|c| c.1),
            0,
        );
    }
    table(
        &mut m,
        "ENABLE in gmem, time (the VMM populates the guest_memfd with what the guest wrote before ENABLE):",
        "ms",
        &prot[1..],
        |r| r.enable_ms,
        1,
    );
    table(
        &mut m,
        "ENABLE in gmem, bytes populated:",
        "MiB",
        &prot[1..],
        |r| r.enable_mib,
        1,
    );
    let _ = writeln!(m, "\n![conversion cost](bench-conversion.svg)");

    let _ = writeln!(m, "\n## 5. Bounce-pool pressure\n");
    let _ = writeln!(
        m,
        "32 parallel direct-I/O readers of 1 MiB blocks (queue depth 32), gmem, on 1 vCPU: \
         with 2, this load froze the nested L1 (the guest's vCPU spinning on `tasklist_lock` \
         while L1 took no timer interrupt, on an L0 QEMU without qemu/patches/0001). \
         The 2 MiB pool (`swiotlb=1024`) must grow: `SWIOTLB_DYNAMIC` adds pools, which \
         the guest shares at run time. The kernel is built with `SWIOTLB_DYNAMIC=y`; a \
         run without it needs another kernel build and is not part of this command."
    );
    table(
        &mut m,
        "Peak swiotlb use (io_tlb_used_hiwater):",
        "slabs",
        pressure,
        |r| r.hiwater_slabs,
        0,
    );
    table(
        &mut m,
        "Default pool size (io_tlb_nslabs, 2 KiB slabs):",
        "slabs",
        pressure,
        |r| r.pool_slabs,
        0,
    );
    table(
        &mut m,
        "Transient pool slabs at the end (io_tlb_transient_nslabs):",
        "slabs",
        pressure,
        |r| r.transient_slabs,
        0,
    );
    table(
        &mut m,
        "`swiotlb buffer is full` messages (goal: never):",
        "count",
        pressure,
        |r| r.buffer_full,
        0,
    );
    table(
        &mut m,
        "SHARE hypercalls after boot (pool growth and other run-time shares):",
        "calls",
        pressure,
        |r| r.runtime_shares,
        0,
    );
    let full: f64 = pressure
        .iter()
        .flat_map(|s| s.values(|r| r.buffer_full))
        .sum();
    let _ = writeln!(
        m,
        "\nGoal: `swiotlb buffer is full` never occurs: {} ({full:.0} in all runs).",
        if full == 0.0 { "met" } else { "not met" }
    );
    network_section(&mut m, net);
    m
}

/// Section 6: TCP and HTTP through virtio-net, unprotected, view, gmem.
fn network_section(m: &mut String, net: &[Series<'_>]) {
    let _ = writeln!(m, "\n## 6. Network: virtio-net through the bounce pool\n");
    let _ = writeln!(
        m,
        "The guest's eth0 is the VMM's virtio-net on a TAP in L1 (`--net tap=kpmtap0`, \
         10.0.2.1/24, `xtask/src/net.rs`): it downloads 16 MiB of random data from L1's \
         busybox `httpd` with `wget`, uploads 16 MiB of random data to L1 with `nc` (both \
         checked by checksum on both sides), then makes 50 sequential HTTP requests for a \
         4 KiB page; timed by /init with /proc/uptime (guest clock, 1/100 s). virtio-net \
         offers checksum and TSO offloads both ways, mergeable receive buffers and event \
         indices; in the protected configurations every frame is bounced through the \
         guest's shared swiotlb pool, the receive ring's 256 buffers included."
    );
    table(
        m,
        "TCP, L1 -> guest (wget):",
        "MiB/s",
        net,
        |r| r.net_down,
        2,
    );
    table(m, "TCP, guest -> L1 (nc):", "MiB/s", net, |r| r.net_up, 2);
    table(
        m,
        "HTTP requests, sequential:",
        "req/s",
        net,
        |r| r.net_rr,
        1,
    );
    table(
        m,
        "Bytes virtio-net moved to and from guest memory (bounced when protected):",
        "MiB",
        net,
        |r| r.net_mib,
        1,
    );
    table(
        m,
        "Bounce-pool slabs (2 KiB) in use with the receive ring posted, before any traffic:",
        "slabs",
        &net[1..],
        |r| r.net_pool_posted,
        0,
    );
    table(
        m,
        "Bounce-pool high water after the traffic:",
        "slabs",
        &net[1..],
        |r| r.net_pool_peak,
        0,
    );
    let ratio = |s: &Series<'_>, f: fn(&Run) -> Option<f64>| {
        Some(median_of(s, f)? / median_of(&net[0], f)?)
    };
    let text = |x: Option<f64>| x.map_or("no figures".to_string(), |x| format!("{x:.2}"));
    let _ = writeln!(
        m,
        "\nRatios to unprotected (medians): download view {}, gmem {}; upload view {}, \
         gmem {}; requests view {}, gmem {}.\n\n![network](bench-network.svg)",
        text(ratio(&net[1], |r| r.net_down)),
        text(ratio(&net[2], |r| r.net_down)),
        text(ratio(&net[1], |r| r.net_up)),
        text(ratio(&net[2], |r| r.net_up)),
        text(ratio(&net[1], |r| r.net_rr)),
        text(ratio(&net[2], |r| r.net_rr)),
    );
}

/// Network figures by configuration: medians of download, upload (MiB/s)
/// and requests (req/s / 10, to share the axis), grouped by mode.
fn plot_network(net: &[Series<'_>], path: &PathBuf) -> Result<()> {
    use plotters::prelude::*;
    let root = SVGBackend::new(path, (720, 420)).into_drawing_area();
    root.fill(&WHITE)?;
    type Pick = fn(&Run) -> Option<f64>;
    let metrics: [(&str, Pick, RGBColor); 3] = [
        ("TCP L1 -> guest (MiB/s)", |r| r.net_down, BLUE),
        ("TCP guest -> L1 (MiB/s)", |r| r.net_up, RED),
        (
            "HTTP requests (req/s / 10)",
            |r| r.net_rr.map(|x| x / 10.0),
            GREEN,
        ),
    ];
    let max = net
        .iter()
        .flat_map(|s| metrics.iter().filter_map(move |(_, f, _)| median_of(s, *f)))
        .fold(1.0f64, f64::max)
        * 1.2;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "virtio-net through the bounce pool (medians)",
            ("sans-serif", 18),
        )
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(50)
        .build_cartesian_2d(-0.5f64..(net.len() as f64 - 0.5), 0f64..max)?;
    chart
        .configure_mesh()
        .x_labels(net.len())
        .x_label_formatter(&|x| {
            net.get(x.round() as usize)
                .map(|s| s.label.to_string())
                .unwrap_or_default()
        })
        .disable_x_mesh()
        .y_desc("MiB/s, req/s / 10")
        .draw()?;
    for (k, (label, f, color)) in metrics.iter().enumerate() {
        let bars: Vec<(f64, f64)> = net
            .iter()
            .enumerate()
            .filter_map(|(i, s)| median_of(s, *f).map(|v| (i as f64 - 0.3 + 0.2 * k as f64, v)))
            .collect();
        let color = *color;
        chart
            .draw_series(bars.iter().map(move |&(x, v)| {
                Rectangle::new([(x - 0.09, 0.0), (x + 0.09, v)], color.filled())
            }))?
            .label(*label)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled()));
    }
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .position(SeriesLabelPosition::UpperRight)
        .draw()?;
    root.present()?;
    Ok(())
}

fn goal_text(v: Option<f64>, ok: impl Fn(f64) -> bool) -> String {
    match v {
        Some(x) => format!("{x:.2} ({})", if ok(x) { "met" } else { "not met" }),
        None => "no figures".into(),
    }
}

/// Throughput by block size and mode: medians, read and write side by side.
fn plot_throughput(main: &[Series<'_>], path: &PathBuf) -> Result<()> {
    use plotters::prelude::*;
    let root = SVGBackend::new(path, (960, 420)).into_drawing_area();
    root.fill(&WHITE)?;
    let halves = root.split_evenly((1, 2));
    let max = main
        .iter()
        .flat_map(|s| s.runs.iter().flat_map(|r| r.io.values().copied()))
        .fold(1.0f64, f64::max)
        * 1.1;
    let colors = [BLACK, BLUE, RED, GREEN];
    for (area, (op, name)) in halves.iter().zip([("read", "read"), ("write", "write")]) {
        let mut chart = ChartBuilder::on(area)
            .caption(
                format!("virtio-blk direct {name} (median MiB/s)"),
                ("sans-serif", 18),
            )
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(50)
            .build_cartesian_2d(0f64..2.0f64, 0f64..max)?;
        chart
            .configure_mesh()
            .x_labels(3)
            .x_label_formatter(&|x| {
                BLOCK_SIZES
                    .get(x.round() as usize)
                    .map(|b| b.1.to_string())
                    .unwrap_or_default()
            })
            .x_desc("block size")
            .y_desc("MiB/s")
            .draw()?;
        let lines = main.iter().zip(colors).map(|(s, color)| {
            let pts: Vec<(f64, f64)> = BLOCK_SIZES
                .iter()
                .enumerate()
                .filter_map(|(i, (bs, _))| {
                    median_of(s, |r| r.io.get(&(op, *bs)).copied()).map(|m| (i as f64, m))
                })
                .collect();
            (s.label, color, pts)
        });
        draw_lines(&mut chart, lines, SeriesLabelPosition::UpperLeft)?;
    }
    root.present()?;
    Ok(())
}

/// SHARE+UNSHARE round trip by size: median cycles per page, log scales.
fn plot_conversion(main: &[Series<'_>], path: &PathBuf) -> Result<()> {
    use plotters::prelude::*;
    let root = SVGBackend::new(path, (720, 440)).into_drawing_area();
    root.fill(&WHITE)?;
    let per_page = |s: &Series<'_>, pages: u64| {
        median_of(s, |r| r.convert.get(&pages).map(|c| c.0 / pages as f64))
    };
    let vals: Vec<f64> = main[1..]
        .iter()
        .flat_map(|s| CONVERT_SIZES.iter().filter_map(|(p, _)| per_page(s, *p)))
        .collect();
    let lo = vals.iter().copied().fold(f64::MAX, f64::min).max(1.0) / 2.0;
    let hi = vals.iter().copied().fold(1.0f64, f64::max) * 2.0;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "SHARE + UNSHARE round trip, guest TSC cycles per 4 KiB page (median)",
            ("sans-serif", 16),
        )
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(70)
        .build_cartesian_2d(
            (0.5f64..32768f64).log_scale(),
            (lo..hi.max(lo * 10.0)).log_scale(),
        )?;
    chart
        .configure_mesh()
        .x_desc("pages converted (1 = 4 KiB, 512 = 2 MiB, 16384 = 64 MiB)")
        .y_desc("cycles per page")
        .draw()?;
    let lines = main[1..].iter().zip([BLUE, RED, GREEN]).map(|(s, color)| {
        let pts: Vec<(f64, f64)> = CONVERT_SIZES
            .iter()
            .filter_map(|(p, _)| per_page(s, *p).map(|c| (*p as f64, c)))
            .collect();
        (s.label, color, pts)
    });
    draw_lines(&mut chart, lines, SeriesLabelPosition::UpperRight)?;
    root.present()?;
    Ok(())
}

/// Draws one labelled line with dots per `(label, color, points)`, then
/// the legend at `legend`.
fn draw_lines<'a, 'b, CT>(
    chart: &mut plotters::chart::ChartContext<'b, plotters::prelude::SVGBackend<'b>, CT>,
    lines: impl Iterator<Item = (&'a str, plotters::style::RGBColor, Vec<(f64, f64)>)>,
    legend: plotters::chart::SeriesLabelPosition,
) -> Result<()>
where
    CT: plotters::coord::CoordTranslate<From = (f64, f64)>,
{
    use plotters::prelude::*;
    for (label, color, pts) in lines {
        chart
            .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))?
            .label(label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color));
        chart.draw_series(pts.iter().map(|p| Circle::new(*p, 3, color.filled())))?;
    }
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .position(legend)
        .draw()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timed_line_gives_bytes_and_seconds() {
        let (bytes, secs) = parse_timed("bytes 67108864 t0 12.50 t1 14.75").unwrap();
        assert_eq!(bytes, 67108864);
        assert!((secs - 2.25).abs() < 1e-9);
        assert_eq!(parse_timed("bytes 4096 t0 1.0"), None);
        assert_eq!(parse_timed("dd: /dev/vda: Input/output error"), None);
    }

    #[test]
    fn convert_line_pairs() {
        let p = parse_pairs(
            "pages 512 blocks 1 hypercalls 2 share_cycles 100 unshare_cycles 50 tsc_khz 2000000",
        );
        assert_eq!(p["pages"], 512);
        assert_eq!(p["hypercalls"], 2);
        assert_eq!(p["tsc_khz"], 2000000);
    }

    #[test]
    fn a_run_without_its_figures_is_a_gap() {
        let full = Run {
            to_userspace_host: Some(1.0),
            to_userspace_guest: Some(1.0),
            io: ["read", "write"]
                .iter()
                .flat_map(|op| BLOCK_SIZES.iter().map(move |(bs, _)| ((*op, *bs), 1.0)))
                .collect(),
            ..Run::default()
        };
        let main = [Series {
            label: "unprotected",
            runs: vec![full.clone()],
        }];
        assert!(missing(&main, &[], &[]).is_empty());
        // A protected configuration must also have its conversions.
        let prot = [
            Series {
                label: "unprotected",
                runs: vec![full.clone()],
            },
            Series {
                label: "gmem",
                runs: vec![full],
            },
        ];
        let gaps = missing(&prot, &[], &[]);
        assert_eq!(gaps.len(), 1, "{gaps:?}");
        assert!(gaps[0].starts_with("gmem run 1: no boot SHARE calls, 4 KiB conversion"));
    }

    #[test]
    fn a_run_is_read_from_its_console() {
        let o = L2Outcome {
            name: "b-gmem-0".into(),
            exit: Some(0),
            console: "[    2.500000] Run /init as init process\n\
                      kpm-init: boot-shares 7 pages 16393\n\
                      [    1.0] kvm_protmem: swiotlb pool shared: 64 MiB at 0x1b400000 in 1 hypercalls\n\
                      kpm-init: bench-convert pages 512 blocks 1 hypercalls 2 share_cycles 10 unshare_cycles 5 tsc_khz 2000\n\
                      kpm-init: bench-read bs=65536 bytes 67108864 t0 10.00 t1 12.00\n\
                      kpm-init: debugfs shares: 9\n\
                      kpm-init: done\n"
                .into(),
            ..L2Outcome::default()
        };
        let r = measure(&o).unwrap();
        assert_eq!(r.to_userspace_guest, Some(2.5));
        assert_eq!(
            (r.boot_share_calls, r.pool_share_calls),
            (Some(7.0), Some(1.0))
        );
        assert_eq!(r.runtime_shares, Some(2.0));
        assert_eq!(r.convert[&512], (15.0, 2.0, 2000.0));
        assert_eq!(r.io[&("read", 65536)], 32.0);
        let unfinished = L2Outcome { exit: Some(2), ..o };
        assert!(measure(&unfinished).is_err());
    }

    #[test]
    fn network_figures_are_read_from_the_console_and_stats() {
        let o = L2Outcome {
            name: "b-net-gmem-0".into(),
            exit: Some(0),
            console: "kpm-init: net-if 06:00:0a:00:02:02 mtu 1500\n\
                      kpm-init: net-pool-posted used 300 hiwater 310 nslabs 32768\n\
                      kpm-init: net-down sha ab bytes 16777216 t0 10.00 t1 18.00\n\
                      kpm-init: net-up sha cd bytes 16777216 t0 20.00 t1 24.00 reply 16777216\n\
                      kpm-init: net-rr requests 50 t0 30.00 t1 35.00\n\
                      kpm-init: net-pool-after used 300 hiwater 900 nslabs 32768 transient 0\n\
                      kpm-init: done\n"
                .into(),
            stats: Some(
                r#"{"virtio":{"net":{"requests":{"rx_bytes":16777216,"tx_bytes":16777216}}}}"#
                    .into(),
            ),
            ..L2Outcome::default()
        };
        let r = measure(&o).unwrap();
        assert_eq!(
            (r.net_down, r.net_up, r.net_rr),
            (Some(2.0), Some(4.0), Some(10.0))
        );
        assert_eq!(r.net_mib, Some(32.0));
        assert_eq!(
            (r.net_pool_posted, r.net_pool_peak),
            (Some(300.0), Some(900.0))
        );
    }

    #[test]
    fn printk_time_of_a_line() {
        let c = "[    0.100000] x\n[    1.500000] Run /init as init process\n";
        assert_eq!(printk_secs(c, "Run /init"), Some(1.5));
        assert_eq!(printk_secs(c, "nothing"), None);
    }

    #[test]
    fn spread_is_median_min_max() {
        assert_eq!(spread(&[3.0, 1.0, 2.0]), (2.0, 1.0, 3.0));
        assert_eq!(spread(&[4.0, 1.0, 2.0, 3.0]), (2.5, 1.0, 4.0));
    }

    #[test]
    fn tables_give_ratios_to_the_first_configuration() {
        let run = |s| Run {
            to_userspace_host: Some(s),
            ..Run::default()
        };
        let series = [
            Series {
                label: "a",
                runs: vec![run(2.0), run(4.0), run(3.0)],
            },
            Series {
                label: "b",
                runs: vec![run(3.3)],
            },
            Series {
                label: "c",
                runs: vec![],
            },
        ];
        let mut out = String::new();
        table(&mut out, "t", "s", &series, |r| r.to_userspace_host, 1);
        assert!(out.contains("| a | 3 | 3.0 | 2.0 | 4.0 | 1.00 |"), "{out}");
        assert!(out.contains("| b | 1 | 3.3 | 3.3 | 3.3 | 1.10 |"), "{out}");
        assert!(out.contains("| c | 0 | - |"), "{out}");
    }
}
