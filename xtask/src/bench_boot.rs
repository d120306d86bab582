//! The boot breakdown of `cargo xtask bench`: where a protected boot
//! spends the time an unprotected one does not.
//!
//! Boot-only runs (`kpm.bootonly`: /init resets the guest as soon as it
//! starts) of the unprotected, view and gmem configurations, interleaved
//! with the rest of the benchmark. From each: the guest's printk times of
//! lines every configuration prints, which cut the boot into phases, and
//! the counters of the VMM and of KVM (its binary statistics, read by the
//! VMM at exit) for the boot alone.

use crate::bench::printk_secs;
use crate::e2e::{num, stats};
use crate::nested::L2Outcome;
use anyhow::{bail, Result};
use std::fmt::Write as _;

/// The boot-only configurations: (label, slug, VMM arguments).
pub const CONFIGS: [(&str, &str, &[&str]); 3] = [
    ("unprotected", "bunprot", &[]),
    ("view", "bview", &["--protect=view"]),
    ("gmem", "bgmem", &["--protect=gmem"]),
];

/// The guest command line of a boot-only run, beyond the bench's common part.
pub const CMDLINE: &str = "kpm.bootonly";

/// Phase boundaries: printk lines every configuration prints, in boot order.
/// The first phase starts at 0 (the kernel's first line).
const MARKS: [(&str, &str); 5] = [
    (
        "Built 1 zonelists",
        "setup_arch(): memory map, ENABLE, the bounce pool's allocation",
    ),
    (
        "printk: legacy console",
        "the early page and slab allocators",
    ),
    (
        "Memory:",
        "the console's backlog, mm_core_init(): the pool is shared",
    ),
    ("Freeing unused kernel image", "initcalls: devices, drivers"),
    ("Run /init as init process", "freeing init memory, /init"),
];

/// Counters for the table: (label, path in the stats file).
const COUNTERS: [(&str, &str); 15] = [
    ("KVM: exits", "kvm.vcpu.exits"),
    ("KVM: page faults taken (`pf_taken`)", "kvm.vcpu.pf_taken"),
    ("KVM: page faults fixed (`pf_fixed`)", "kvm.vcpu.pf_fixed"),
    ("KVM: emulated instructions", "kvm.vcpu.insn_emulation"),
    ("KVM: MMIO exits", "kvm.vcpu.mmio_exits"),
    ("KVM: I/O exits", "kvm.vcpu.io_exits"),
    ("KVM: hypercalls", "kvm.vcpu.hypercalls"),
    ("KVM: halt exits", "kvm.vcpu.halt_exits"),
    ("KVM: 4 KiB mappings at exit", "kvm.vm.pages_4k"),
    ("VMM: hypercall exits", "exits.hypercall"),
    (
        "VMM: ENABLE, populating the guest_memfd (µs)",
        "gmem.last_enable_us",
    ),
    (
        "VMM: bytes mapped ahead after ENABLE (`KVM_PRE_FAULT_MEMORY`)",
        "gmem.bytes_prefaulted",
    ),
    ("VMM: mapping them ahead (µs)", "gmem.last_prefault_us"),
    (
        "VMM: bytes mapped ahead after SHAREs (the bounce pool)",
        "shared_prefault.bytes",
    ),
    ("VMM: mapping them ahead (µs)", "shared_prefault.us"),
];

/// What one boot-only run measured.
#[derive(Clone, Debug, Default)]
pub struct BootRun {
    /// Guest seconds of each phase (MARKS order).
    pub phases: Vec<Option<f64>>,
    /// Counter values (COUNTERS order).
    pub counters: Vec<Option<f64>>,
}

/// Measures a boot-only run.
pub fn measure(o: &L2Outcome) -> Result<BootRun> {
    if o.exit != Some(0) || !o.console.contains("kpm-init: done") {
        bail!(
            "boot-only run {} did not finish (VMM exit {:?}):\n{}",
            o.name,
            o.exit,
            o.tail()
        );
    }
    let mut phases = Vec::new();
    let mut prev = Some(0.0);
    for (mark, _) in MARKS {
        let t = printk_secs(&o.console, mark);
        phases.push(match (prev, t) {
            (Some(a), Some(b)) if b >= a => Some(b - a),
            _ => None,
        });
        prev = t;
    }
    let v = stats(o);
    let has_kvm = v.get("kvm").is_some();
    let counters = COUNTERS
        .iter()
        .map(|(_, path)| (has_kvm || !path.starts_with("kvm.")).then(|| num(&v, path) as f64))
        .collect();
    Ok(BootRun { phases, counters })
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

/// The report's section: one table of phases and counters, medians per
/// configuration, and each protected configuration's excess over the
/// unprotected one.
pub fn section(series: &[(&str, Vec<BootRun>)]) -> String {
    let mut m = String::new();
    let runs = series.iter().map(|(_, r)| r.len()).min().unwrap_or(0);
    let _ = writeln!(
        m,
        "\n## Boot breakdown\n\nBoot-only runs (`kpm.bootonly`: /init resets the guest at once), \
         {runs} per configuration, interleaved with the rest. Phases on the guest clock \
         (printk time of lines every configuration prints); counters for the boot alone: \
         the VMM's, and KVM's own (its binary statistics, read by the VMM when the guest \
         resets). Medians; `+` columns: excess over unprotected.\n"
    );
    let labels: Vec<&str> = series.iter().map(|(l, _)| *l).collect();
    let _ = write!(m, "| | {} |", labels.join(" | "));
    for l in labels.iter().skip(1) {
        let _ = write!(m, " + {l} |");
    }
    let _ = writeln!(m);
    let _ = writeln!(m, "|---|{}", "---:|".repeat(2 * labels.len() - 1));
    let mut row = |name: String, pick: &dyn Fn(&BootRun) -> Option<f64>, digits: usize| {
        let meds: Vec<Option<f64>> = series
            .iter()
            .map(|(_, runs)| median(runs.iter().filter_map(pick).collect()))
            .collect();
        let cell = |v: Option<f64>| v.map_or("-".to_string(), |x| format!("{x:.digits$}"));
        let _ = write!(m, "| {name} |");
        for v in &meds {
            let _ = write!(m, " {} |", cell(*v));
        }
        for v in meds.iter().skip(1) {
            let d = match (v, meds[0]) {
                (Some(a), Some(b)) => Some(a - b),
                _ => None,
            };
            let _ = write!(
                m,
                " {} |",
                d.map_or("-".to_string(), |x| format!("{x:+.digits$}"))
            );
        }
        let _ = writeln!(m);
    };
    let mut from = "kernel start";
    for (i, (mark, what)) in MARKS.iter().enumerate() {
        row(
            format!("{from} -> `{mark}` (s): {what}"),
            &|r: &BootRun| r.phases.get(i).copied().flatten(),
            2,
        );
        from = mark;
    }
    row(
        "total to `Run /init` (s)".into(),
        &|r: &BootRun| {
            let v: Vec<f64> = r.phases.iter().copied().collect::<Option<Vec<f64>>>()?;
            Some(v.iter().sum())
        },
        2,
    );
    for (i, (name, _)) in COUNTERS.iter().enumerate() {
        row(
            name.to_string(),
            &|r: &BootRun| r.counters.get(i).copied().flatten(),
            0,
        );
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    fn boot(times: [f64; 5], exits: u64) -> L2Outcome {
        let mut console = String::from("[    0.000000] Linux version x\n");
        for ((mark, _), t) in MARKS.iter().zip(times) {
            console.push_str(&format!("[{t:12.6}] {mark} ...\n"));
        }
        console.push_str("kpm-init: done\n");
        L2Outcome {
            name: "b".into(),
            exit: Some(0),
            console,
            stats: Some(
                serde_json::json!({"kvm": {"vcpu": {"exits": exits}, "vm": {}},
                                    "exits": {"hypercall": 3}})
                .to_string(),
            ),
            ..Default::default()
        }
    }

    #[test]
    fn phases_and_counters() {
        let r = measure(&boot([0.2, 0.3, 1.0, 2.0, 2.5], 1234)).unwrap();
        let p: Vec<f64> = r.phases.iter().map(|x| x.unwrap()).collect();
        assert!(
            (p[0] - 0.2).abs() < 1e-9 && (p[2] - 0.7).abs() < 1e-9,
            "{p:?}"
        );
        assert_eq!(r.counters[0], Some(1234.0));
        assert_eq!(r.counters[9], Some(3.0));
        let s = section(&[
            ("unprotected", vec![r.clone()]),
            (
                "gmem",
                vec![measure(&boot([1.2, 1.3, 2.0, 3.0, 3.5], 2000)).unwrap()],
            ),
        ]);
        assert!(
            s.contains("| total to `Run /init` (s) | 2.50 | 3.50 | +1.00 |"),
            "{s}"
        );
        assert!(s.contains("| KVM: exits | 1234 | 2000 | +766 |"), "{s}");
    }

    #[test]
    fn an_unfinished_boot_is_an_error() {
        let mut o = boot([0.1; 5], 1);
        o.exit = Some(2);
        assert!(measure(&o).is_err());
    }
}
