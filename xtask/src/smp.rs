//! SMP L2 guests on the nested path (issue 21): 2- and 4-vCPU guests under
//! our VMM and under QEMU/KVM, judged on what the L0 freeze used to stop.
//!
//! Every boot of an SMP guest has one vCPU spin for another (the boot CPU
//! in `cpuhp_ap_sync_alive`, later IPIs in `smp_call_function_many_cond`);
//! with one L1 CPU the vCPU waited for only runs once L1's timer interrupt
//! takes the spinning one out of L2. The pinned disk readers add IPIs and
//! cross-CPU waits. A lost L1 timer interrupt freezes all of L1: the stall
//! report (boot.rs) ends that L1 boot and names the spin.
//!
//! `cargo xtask test` runs each once; `cargo xtask soak N --scenario
//! smp2,smp4,smp2-qemu,smp4-qemu` runs N rounds of them in one L1 boot
//! (qemu/README.md has the figures).

use crate::e2e::{kernel_lines, kv, row, scenario, Row, Scenario, MADT_SMP};
use crate::nested::{self, L2Outcome};

/// No KUnit: the I/O checks, then one pinned disk reader per online CPU.
const WORKLOAD: &str = "kunit.enable=0 kpm.readers";

/// Passes of each reader (tests/guest/init).
const PASSES: usize = 3;

/// The four SMP boots: our VMM (`--protect`) and QEMU/KVM, 2 and 4 vCPUs.
pub fn scenarios() -> Vec<Scenario> {
    vec![
        vmm(
            "smp2",
            "--protect with 2 vCPUs: both up, a pinned disk reader on each reads intact data, the run ends by itself",
            "2",
            judge::<2>,
        ),
        vmm(
            "smp4",
            "--protect with 4 vCPUs: all up, a pinned disk reader on each reads intact data, the run ends by itself",
            "4",
            judge::<4>,
        ),
        qemu(
            "smp2-qemu",
            "control: the same 2-vCPU guest under QEMU/KVM (-smp 2) in the same L1",
            "2",
            judge::<2>,
        ),
        qemu(
            "smp4-qemu",
            "control: the same 4-vCPU guest under QEMU/KVM (-smp 4) in the same L1",
            "4",
            judge::<4>,
        ),
    ]
}

fn vmm(
    name: &'static str,
    expect: &'static str,
    cpus: &str,
    judge: fn(&L2Outcome) -> Vec<Row>,
) -> Scenario {
    scenario(
        name,
        expect,
        &["--protect", "--cpus", cpus],
        WORKLOAD,
        judge,
    )
}

/// QEMU inside L1 takes its `-smp` from `--cpus` (nested::l1_script).
fn qemu(
    name: &'static str,
    expect: &'static str,
    cpus: &str,
    judge: fn(&L2Outcome) -> Vec<Row>,
) -> Scenario {
    let mut s = scenario(name, expect, &["--cpus", cpus], WORKLOAD, judge);
    s.run.qemu = true;
    s
}

/// The run ended by itself, and [`cpu_rows`].
fn judge<const CPUS: usize>(o: &L2Outcome) -> Vec<Row> {
    let done = o.console.contains(crate::boot::INIT_DONE);
    let mut rows = vec![row(
        "the guest reached the end of /init and its VMM exited 0",
        done && o.exit == Some(0),
        format!(
            "VMM exit {:?}; {}",
            o.exit,
            o.secs_total
                .map_or("no exit marker".to_string(), |t| format!("{t:.1}s"))
        ),
    )];
    rows.extend(cpu_rows(o, CPUS));
    rows
}

/// What every SMP boot with `kpm.readers` must show: the MADT gave the
/// guest its `cpus` CPUs, all came online, and the disk reader pinned to
/// each read the known data `PASSES` times.
pub fn cpu_rows(o: &L2Outcome, cpus: usize) -> Vec<Row> {
    let online = kv(o, "cpus-online").unwrap_or("none").trim();
    let known = nested::known_sha256();
    // A kernel message may cut into a reader's line (mended) or follow it
    // without a newline: compare the 64 hex digits only.
    let reads = o.mended_lines_after("kpm-init: reader ");
    let good = reads
        .iter()
        .filter_map(|l| l.split_whitespace().nth(2))
        .filter(|sum| sum.get(..64) == Some(known.as_str()))
        .count();
    let on: std::collections::BTreeSet<&str> = reads
        .iter()
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    let allowing = format!("CPU topo: Allowing {cpus} present CPUs plus 0 hotplug CPUs");
    vec![
        row(
            "the guest takes its CPUs from ACPI: the MADT lists every vCPU",
            kernel_lines(o, MADT_SMP) == 1 && kernel_lines(o, &allowing) == 1,
            format!(
                "`{MADT_SMP}` {}x, `{allowing}` {}x",
                kernel_lines(o, MADT_SMP),
                kernel_lines(o, &allowing)
            ),
        ),
        row(
            "the guest brought every vCPU online",
            online == cpus.to_string(),
            format!("cpus-online {online} of {cpus}"),
        ),
        row(
            "a disk reader pinned to every CPU, in parallel, reads the known data",
            good == cpus * PASSES && on.len() == cpus,
            format!(
                "{good} of {} reads intact, on {} CPUs",
                cpus * PASSES,
                on.len()
            ),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemu_runs_take_their_cpus_from_the_vmm_arguments() {
        let s = scenarios();
        let names: Vec<&str> = s.iter().map(|s| s.name).collect();
        assert_eq!(names, ["smp2", "smp4", "smp2-qemu", "smp4-qemu"]);
        assert!(s[3].run.qemu && s[3].run.vmm_args == ["--cpus", "4"]);
        let script = nested::l1_script(&[s[3].run.clone()], false);
        assert!(script.contains("-smp 4 "), "{script}");
    }

    #[test]
    fn a_frozen_run_fails_every_row() {
        let o = L2Outcome {
            name: "smp4".into(),
            console: "kpm-init: userspace up\n".into(),
            ..Default::default()
        };
        assert!(judge::<4>(&o).iter().all(|r| !r.ok));
    }
}
