//! Run statistics: the `--stats-json` file and the one-line summary.
//!
//! Schema (all counts are integers; map keys are decimal strings). Every
//! count covers the whole run, over all boots (`--reboots`); `exit_*` is how
//! the last boot ended, `protection_enabled` and `pages_shared` its state
//! then.
//!
//! ```json
//! {
//!   "exit_reason": "reset|shutdown|halt|panic|timeout|error",
//!   "exit_detail": "error text or null",
//!   "exit_code": 0,
//!   "protect": true,
//!   "boots": 2,
//!   "hypercalls": {"13": {"0": 2}, "14": {"0": 37, "-22": 1}},
//!   "enable_count": 2,
//!   "enables": [{"boot": 1, "pages_shared_before": 0, "result": 0},
//!               {"boot": 2, "pages_shared_before": 0, "result": 0}],
//!   "resets": [{"boot": 1, "reason": "reset", "pages_shared": 19,
//!               "protection_enabled": true}],
//!   "protection_enabled": true,
//!   "pages_shared": 12, "pages_shared_peak": 16400,
//!   "device_accesses": {"allowed": 0, "denied": 0, "not_ram": 0},
//!   "bytes": {"read_from_guest": 0, "written_to_guest": 0},
//!   "probe": {"allowed": 0, "denied": 0},
//!   "mprotect_failures": 0,
//!   "shared_prefault": {"bytes": 67108864, "us": 41000, "incomplete": 0},
//!   "virtio": {"blk": {"transport": {...}, "requests": {...}},
//!              "rng": {"transport": {...}, "requests": {...}}},
//!   "exits": {"io_in": 0, "io_out": 0, "mmio_read": 0, "mmio_write": 0,
//!             "hypercall": 0, "mmio_unhandled": 0},
//!   "console_bytes": 0, "console_dropped": 0
//! }
//! ```
//!
//! `boots` is 1 + the reboots done (0 only if the VMM failed before
//! booting). `enables` has one entry per ENABLE hypercall, failed ones
//! included, with the boot it came from and the pages shared just before it;
//! since a reboot clears the shared map, a boot's first ENABLE always finds 0
//! there. `resets` has one entry per reboot done: the boot that ended, how
//! (`reset`: i8042 or reset event, `shutdown`: triple fault), and the shares
//! and protection state it left, which the reboot dropped.

use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::Value;
use vm_superio::Trigger;

use crate::cli::{BlkIo, ProtectMode};
use crate::exit::{locked, ExitCounts, Machine, ResetRecord, StopReason};
use crate::gmem::GmemStats;
use crate::hypercalls::{EnableRecord, ResultCounts};

/// Errors writing the stats file.
#[derive(Debug, thiserror::Error)]
pub enum StatsError {
    /// Creating or writing the file failed.
    #[error("writing stats to {path}: {err}")]
    Write {
        /// The file.
        path: PathBuf,
        /// What failed.
        err: io::Error,
    },
}

/// Device accesses through the checked view.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct DeviceAccesses {
    /// Served.
    pub allowed: u64,
    /// Refused: private page.
    pub denied: u64,
    /// Refused: not RAM.
    pub not_ram: u64,
}

/// Bytes moved by devices.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct BytesMoved {
    /// Read from guest memory.
    pub read_from_guest: u64,
    /// Written to guest memory.
    pub written_to_guest: u64,
}

/// Probe-device checks.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct ProbeCounts {
    /// Found shared.
    pub allowed: u64,
    /// Found private or not RAM.
    pub denied: u64,
}

/// Pre-faults after SHAREs.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct SharedPrefault {
    /// Bytes mapped.
    pub bytes: u64,
    /// Microseconds (host clock) taken, in all.
    pub us: u64,
    /// Pre-faults KVM refused or a signal cut short.
    pub incomplete: u64,
}

/// Everything the stats file holds.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Stats {
    /// Why the VM stopped.
    pub exit_reason: &'static str,
    /// Error text for `error`.
    pub exit_detail: Option<String>,
    /// Process exit code.
    pub exit_code: i32,
    /// `--protect` given.
    pub protect: bool,
    /// Its mode: `gmem` or `view` (absent without `--protect`).
    pub protect_mode: Option<&'static str>,
    /// guest_memfd figures (`--protect=gmem`), over all boots.
    pub gmem: Option<GmemStats>,
    /// Where virtio-blk requests were served (`--blk-io`), if there is a disk.
    pub blk_io: Option<&'static str>,
    /// Boots run: 1 + reboots done.
    pub boots: u64,
    /// Hypercall results by number and signed return value.
    pub hypercalls: ResultCounts,
    /// Successful ENABLEs.
    pub enable_count: u64,
    /// The ENABLE hypercalls, in order (the first 64).
    pub enables: Vec<EnableRecord>,
    /// ENABLEs after the first 64, only counted.
    pub enables_dropped: u64,
    /// Every reboot done, in order.
    pub resets: Vec<ResetRecord>,
    /// Protection enabled at exit.
    pub protection_enabled: bool,
    /// Pages shared at exit.
    pub pages_shared: u64,
    /// Most pages shared at once.
    pub pages_shared_peak: u64,
    /// Device accesses.
    pub device_accesses: DeviceAccesses,
    /// Bytes moved by devices (rings included).
    pub bytes: BytesMoved,
    /// Probe checks.
    pub probe: ProbeCounts,
    /// `mprotect` failures.
    pub mprotect_failures: u64,
    /// SHARE/UNSHARE refused: too many runs of shared pages.
    pub run_limit_refusals: u64,
    /// Pre-faults after SHAREs (`KVM_PRE_FAULT_MEMORY` of the range made
    /// shared): bytes mapped, microseconds taken, how many stopped early.
    pub shared_prefault: SharedPrefault,
    /// virtio devices present, by key (`blk`, `rng`, `net`): each
    /// `{"transport": {...}, "requests": {...}}`.
    pub virtio: BTreeMap<&'static str, Value>,
    /// vCPU exits.
    pub exits: ExitCounts,
    /// Bytes the guest wrote to the console.
    pub console_bytes: u64,
    /// KVM's own counters of the VMs and vCPUs (`KVM_GET_STATS_FD`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kvm: Option<crate::kvm_stats::KvmCounters>,
    /// Console bytes dropped because the output did not keep up (a
    /// stalled stdout).
    pub console_dropped: u64,
    /// `--hostile`: every attempt of the compromised VMM, in order.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hostile: Option<Vec<crate::hostile::Attempt>>,
}

impl Stats {
    /// Stats of a VMM that stopped before or without a machine.
    pub fn stopped(reason: &StopReason, protect: Option<ProtectMode>) -> Self {
        Stats {
            exit_reason: reason.name(),
            exit_detail: match reason {
                StopReason::Error(e) => Some(e.clone()),
                _ => None,
            },
            exit_code: reason.exit_code(),
            protect: protect.is_some(),
            protect_mode: protect.map(ProtectMode::name),
            ..Default::default()
        }
    }

    /// Collects the counters of `m` after it stopped for `reason`.
    pub fn collect<T: Trigger>(
        m: &Machine<T>,
        reason: &StopReason,
        protect: Option<ProtectMode>,
        blk_io: Option<BlkIo>,
    ) -> Self {
        let (boots, hypercalls) = (locked(&m.boots), locked(&m.hypercalls));
        let virtio = m.bus.stats().into_iter().collect();
        let (console_bytes, console_dropped) = {
            let s = locked(&m.serial);
            (s.console().bytes(), s.console().sink().dropped())
        };
        let prot = m.prot();
        let a = prot.stats();
        Stats {
            boots: boots.current(),
            hypercalls: hypercalls.results().clone(),
            enable_count: prot.enable_count(),
            enables: hypercalls.enables().to_vec(),
            enables_dropped: hypercalls.enables_dropped(),
            resets: boots.resets().to_vec(),
            protection_enabled: prot.enabled(),
            pages_shared: prot.shared_pages(),
            pages_shared_peak: prot.shared_peak(),
            device_accesses: DeviceAccesses {
                allowed: a.allowed,
                denied: a.denied,
                not_ram: a.not_ram,
            },
            bytes: BytesMoved {
                read_from_guest: a.bytes_read,
                written_to_guest: a.bytes_written,
            },
            probe: ProbeCounts {
                allowed: a.probe_allowed,
                denied: a.probe_denied,
            },
            mprotect_failures: a.mprotect_failures,
            run_limit_refusals: a.run_limit_refusals,
            shared_prefault: SharedPrefault {
                bytes: a.bytes_prefaulted_shared,
                us: a.shared_prefault_us,
                incomplete: a.shared_prefaults_incomplete,
            },
            virtio,
            exits: m.exits.snapshot(),
            console_bytes,
            console_dropped,
            gmem: prot.gmem_stats(),
            blk_io: blk_io.map(BlkIo::name),
            ..Self::stopped(reason, protect)
        }
    }

    /// Writes the JSON file.
    pub fn write_json(&self, path: &Path) -> Result<(), StatsError> {
        let err = |err| StatsError::Write {
            path: path.to_path_buf(),
            err,
        };
        let mut f = File::create(path).map_err(err)?;
        serde_json::to_writer_pretty(&mut f, self).map_err(|e| err(e.into()))?;
        f.write_all(b"\n").map_err(err)
    }

    /// One line for stderr.
    pub fn summary(&self) -> String {
        let calls: u64 = self.hypercalls.values().flat_map(|m| m.values()).sum();
        let detail = self
            .exit_detail
            .as_deref()
            .map(|d| format!(" ({d})"))
            .unwrap_or_default();
        format!(
            "protmem-vmm: exit={}{detail} code={} protect={} hypercalls={calls} enable={} \
             shared={} peak={} device allowed={} denied={} bytes read={} written={} \
             probe allowed={} denied={} boots={}",
            self.exit_reason,
            self.exit_code,
            self.protect,
            self.enable_count,
            self.pages_shared,
            self.pages_shared_peak,
            self.device_accesses.allowed,
            self.device_accesses.denied,
            self.bytes.read_from_guest,
            self.bytes.written_to_guest,
            self.probe.allowed,
            self.probe.denied,
            self.boots,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exit::tests::machine;
    use crate::exit::{Action, Boots, Exit};
    use hypercall::{KVM_HC_ENABLE_MEM_PROTECTED, KVM_HC_MEM_SHARE};
    use serde_json::json;

    #[test]
    fn json_has_the_documented_shape() {
        let m = machine(true);
        let mut ret = 0;
        for (nr, a0) in [
            (KVM_HC_ENABLE_MEM_PROTECTED, 0),
            (KVM_HC_MEM_SHARE, 0x1000),
            (KVM_HC_MEM_SHARE, 0x1001),
        ] {
            m.handle_exit(Exit::Hypercall {
                applied: false,
                nr,
                args: [a0, 1, 0, 0, 0, 0],
                ret: &mut ret,
            });
        }
        let s = Stats::collect(
            &m,
            &StopReason::Reset,
            Some(ProtectMode::View),
            Some(BlkIo::Thread),
        );
        let v: serde_json::Value = serde_json::to_value(&s).unwrap();
        assert_eq!(v["hypercalls"]["13"]["0"], 1);
        assert_eq!(v["hypercalls"]["14"]["0"], 1);
        assert_eq!(v["hypercalls"]["14"]["-22"], 1);
        assert_eq!(v["exit_reason"], "reset");
        assert_eq!(v["exit_code"], 0);
        assert_eq!(v["enable_count"], 1);
        assert_eq!(v["pages_shared"], 1);
        assert_eq!(v["pages_shared_peak"], 1);
        assert_eq!(v["device_accesses"]["denied"], 0);
        assert_eq!(v["virtio"]["blk"]["requests"]["ok"], 0);
        assert_eq!(v["exits"]["hypercall"], 3);
        let line = s.summary();
        assert!(
            line.starts_with("protmem-vmm: exit=reset code=0 protect=true hypercalls=3"),
            "{line}"
        );

        let path = std::env::temp_dir().join(format!("protmem-stats-{}.json", std::process::id()));
        s.write_json(&path).unwrap();
        let back: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(back, v);
        let err = s
            .write_json(Path::new("/nonexistent/dir/stats.json"))
            .unwrap_err();
        assert!(err.to_string().contains("/nonexistent/dir/stats.json"));
    }

    type TestMachine = crate::exit::tests::TestMachine;

    fn hypercall(m: &TestMachine, nr: u64, gpa: u64, npages: u64) {
        let mut ret = 0;
        m.handle_exit(Exit::Hypercall {
            applied: false,
            nr,
            args: [gpa, npages, 0, 0, 0, 0],
            ret: &mut ret,
        });
    }

    fn i8042_reset(m: &TestMachine) -> Action {
        m.handle_exit(Exit::IoOut {
            port: 0x64,
            size: 1,
            data: &[0xfe],
        })
    }

    #[test]
    fn boots_and_enables_over_a_reboot() {
        let m = machine(true);
        *locked(&m.boots) = Boots::new(1);
        let s = Stats::collect(
            &m,
            &StopReason::Reset,
            Some(ProtectMode::View),
            Some(BlkIo::Thread),
        );
        assert_eq!((s.boots, s.enables.len(), s.resets.len()), (1, 0, 0));

        hypercall(&m, KVM_HC_ENABLE_MEM_PROTECTED, 0, 0);
        hypercall(&m, KVM_HC_MEM_SHARE, 0x1000, 4);
        hypercall(&m, KVM_HC_MEM_SHARE, 0x8000, 1);
        hypercall(&m, KVM_HC_ENABLE_MEM_PROTECTED, 0, 0);
        hypercall(&m, KVM_HC_MEM_SHARE, 0x2000, 2);
        assert_eq!(i8042_reset(&m), Action::Reboot(StopReason::Reset));
        m.reset(&StopReason::Reset).unwrap();
        hypercall(&m, KVM_HC_ENABLE_MEM_PROTECTED, 0, 0);
        hypercall(&m, KVM_HC_MEM_SHARE, 0x3000, 3);
        assert_eq!(i8042_reset(&m), Action::Stop(StopReason::Reset));

        let s = Stats::collect(
            &m,
            &StopReason::Reset,
            Some(ProtectMode::View),
            Some(BlkIo::Thread),
        );
        let v = serde_json::to_value(&s).unwrap();
        assert_eq!(v["boots"], 2);
        assert_eq!(
            v["enables"],
            json!([
                {"boot": 1, "pages_shared_before": 0, "result": 0},
                {"boot": 1, "pages_shared_before": 5, "result": 0},
                {"boot": 2, "pages_shared_before": 0, "result": 0},
            ])
        );
        assert_eq!(
            v["resets"],
            json!([{"boot": 1, "reason": "reset", "pages_shared": 2, "protection_enabled": true}])
        );
        assert_eq!(v["enable_count"], 3, "cumulative");
        assert_eq!(v["hypercalls"]["13"]["0"], 3);
        assert_eq!(v["hypercalls"]["14"]["0"], 4);
        assert_eq!(v["pages_shared"], 3, "the last boot's shares");
        assert_eq!(v["pages_shared_peak"], 5);
        assert_eq!(
            (&v["exit_reason"], &v["exit_code"]),
            (&json!("reset"), &json!(0))
        );
        assert!(s.summary().ends_with(" boots=2"), "{}", s.summary());

        let none = serde_json::to_value(Stats::stopped(&StopReason::Timeout, None)).unwrap();
        assert_eq!((&none["boots"], &none["enables"]), (&json!(0), &json!([])));
    }

    #[test]
    fn error_stats_carry_the_detail() {
        let s = Stats::stopped(&StopReason::Error("boom".into()), None);
        assert_eq!((s.exit_reason, s.exit_code), ("error", 1));
        assert!(s.summary().contains("exit=error (boom) code=1"));
    }
}
