//! Run statistics: the `--stats-json` file and the one-line summary.
//!
//! Schema (all counts are integers; map keys are decimal strings):
//!
//! ```json
//! {
//!   "exit_reason": "reset|shutdown|halt|panic|timeout|error",
//!   "exit_detail": "error text or null",
//!   "exit_code": 0,
//!   "protect": true,
//!   "hypercalls": {"13": {"0": 1}, "14": {"0": 37, "-22": 1}},
//!   "enable_count": 1,
//!   "protection_enabled": true,
//!   "pages_shared": 12, "pages_shared_peak": 16400,
//!   "device_accesses": {"allowed": 0, "denied": 0, "not_ram": 0},
//!   "bytes": {"read_from_guest": 0, "written_to_guest": 0},
//!   "probe": {"allowed": 0, "denied": 0},
//!   "mprotect_failures": 0,
//!   "virtio": {"blk": {"transport": {...}, "requests": {...}} or null,
//!              "rng": {"transport": {...}, "requests": {...}} or null},
//!   "exits": {"io_in": 0, "io_out": 0, "mmio_read": 0, "mmio_write": 0,
//!             "hypercall": 0, "mmio_unhandled": 0},
//!   "console_bytes": 0
//! }
//! ```

use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde::Serialize;
use vm_superio::Trigger;

use crate::exit::{ExitCounts, Machine, StopReason};
use crate::hypercalls::ResultCounts;
use crate::virtio::blk::BlockStats;
use crate::virtio::rng::RngStats;
use crate::virtio::TransportStats;

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

/// One virtio device's counters.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct DeviceEntry<S> {
    /// Transport counters.
    pub transport: TransportStats,
    /// Device counters.
    pub requests: S,
}

/// Counters of the virtio devices present.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct VirtioStats {
    /// virtio-blk, if present.
    pub blk: Option<DeviceEntry<BlockStats>>,
    /// virtio-rng, if present.
    pub rng: Option<DeviceEntry<RngStats>>,
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
    /// Hypercall results by number and signed return value.
    pub hypercalls: ResultCounts,
    /// Successful ENABLEs.
    pub enable_count: u64,
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
    /// virtio devices.
    pub virtio: VirtioStats,
    /// vCPU exits.
    pub exits: ExitCounts,
    /// Bytes the guest wrote to the console.
    pub console_bytes: u64,
}

impl Stats {
    /// Stats of a VMM that stopped before or without a machine.
    pub fn stopped(reason: &StopReason, protect: bool) -> Self {
        Stats {
            exit_reason: reason.name(),
            exit_detail: match reason {
                StopReason::Error(e) => Some(e.clone()),
                _ => None,
            },
            exit_code: reason.exit_code(),
            protect,
            ..Default::default()
        }
    }

    /// Collects the counters of `m` after it stopped for `reason`.
    pub fn collect<T: Trigger, W: Write>(
        m: &Machine<T, W>,
        reason: &StopReason,
        protect: bool,
    ) -> Self {
        let a = m.prot.stats();
        Stats {
            hypercalls: m.hypercalls.results().clone(),
            enable_count: m.prot.enable_count(),
            protection_enabled: m.prot.enabled(),
            pages_shared: m.prot.shared_pages(),
            pages_shared_peak: m.prot.shared_peak(),
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
            virtio: VirtioStats {
                blk: m.blk.as_ref().map(|t| DeviceEntry {
                    transport: t.stats(),
                    requests: t.device().stats(),
                }),
                rng: m.rng.as_ref().map(|t| DeviceEntry {
                    transport: t.stats(),
                    requests: t.device().stats(),
                }),
            },
            exits: m.exits,
            console_bytes: m.serial.console().bytes(),
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
             probe allowed={} denied={}",
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
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exit::tests::machine;
    use crate::exit::Exit;
    use hypercall::{KVM_HC_ENABLE_MEM_PROTECTED, KVM_HC_MEM_SHARE};

    #[test]
    fn json_has_the_documented_shape() {
        let mut m = machine(true);
        let mut ret = 0;
        for (nr, a0) in [
            (KVM_HC_ENABLE_MEM_PROTECTED, 0),
            (KVM_HC_MEM_SHARE, 0x1000),
            (KVM_HC_MEM_SHARE, 0x1001),
        ] {
            m.handle_exit(Exit::Hypercall {
                nr,
                args: [a0, 1, 0, 0, 0, 0],
                ret: &mut ret,
            });
        }
        let s = Stats::collect(&m, &StopReason::Reset, true);
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

    #[test]
    fn error_stats_carry_the_detail() {
        let s = Stats::stopped(&StopReason::Error("boom".into()), false);
        assert_eq!((s.exit_reason, s.exit_code), ("error", 1));
        assert!(s.summary().contains("exit=error (boom) code=1"));
    }
}
