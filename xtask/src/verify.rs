//! `cargo xtask verify LOG`: reads a guest's console log or `dmesg` output
//! and says whether the guest runs protected and healthy.
//!
//! Users boot our guest on their own hosts; this is the check the
//! scenarios make on the guest's side, from the stable `kvm_protmem: `
//! lines alone (the scenarios use it too, see `e2e.rs`). Host-side facts
//! (what the VMM mapped, denied accesses) are not in a guest log and are
//! not claimed here.

use anyhow::{bail, Result};
use std::path::Path;

/// What early boot decided, as the guest said it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// `kvm_protmem: enabled: ...`
    Enabled,
    /// `kvm_protmem: not offered ...`
    NotOffered,
    /// `kvm_protmem: disabled on the command line ...`
    OptedOut,
    /// `kvm_protmem: enable failed: ...`
    EnableFailed,
    /// No state line: not our kernel, or the log starts too late.
    Unknown,
}

/// The verdict on one log.
#[derive(Debug)]
pub struct Verdict {
    pub state: State,
    /// The state line, as printed.
    pub state_line: String,
    /// `kvm_protmem=` from the command line, if given.
    pub mode: Option<String>,
    /// `swiotlb pool shared: ...`, the part after the prefix.
    pub pool: Option<String>,
    /// `swiotlb pool not shared: ...`.
    pub pool_refused: Option<String>,
    /// `Memory Encryption Features active: KVM protected memory`.
    pub cc_active: bool,
    /// kvmclock fell back to the TSC because its pages stayed private.
    pub kvmclock_unshared: bool,
    /// The per-CPU PV data (steal time, async PF, PV EOI) stayed private.
    pub percpu_unshared: bool,
    /// The PV features left off for it (`<feature> disabled: its per-CPU
    /// page is not shared`).
    pub pv_off: Vec<String>,
    /// `share failed:`/`unshare failed:` lines (the first ten of a boot).
    pub failures: usize,
    /// Pages those lines leaked.
    pub leaked_logged: u64,
    /// The debugfs counters, when the log carries them (our test /init
    /// prints them as `kpm-init: debugfs NAME: N`).
    pub debugfs_failures: Option<u64>,
    pub debugfs_leaked: Option<u64>,
    pub debugfs_shared: Option<u64>,
    /// WARNINGs raised from our code.
    pub warnings: usize,
    /// The panic line, if the guest panicked.
    pub panic: Option<String>,
    /// The guest booted more than once in this log (a reboot or kexec):
    /// the verdict is on the last boot.
    pub boots: usize,
}

/// The text after the console timestamp, or the line itself.
fn body(line: &str) -> &str {
    let l = line.trim_start();
    if let Some(rest) = l.strip_prefix('[') {
        if let Some(end) = rest.find("] ") {
            if rest[..end]
                .trim()
                .chars()
                .all(|c| c.is_ascii_digit() || c == '.')
            {
                return &rest[end + 2..];
            }
        }
    }
    l
}

/// The kernel's own lines: echoes of dmesg by our test /init
/// (`kpm-init: dmesg ...`) are dropped when the kernel's console lines are
/// there, so nothing counts twice, and used when they are all there is.
fn kernel_lines(log: &str) -> Vec<&str> {
    let direct: Vec<&str> = log
        .lines()
        .map(body)
        .filter(|l| !l.contains("kpm-init: dmesg "))
        .collect();
    if direct.iter().any(|l| l.contains("kvm_protmem: ")) {
        return direct;
    }
    log.lines()
        .map(|l| match l.find("kpm-init: dmesg ") {
            Some(i) => &l[i + "kpm-init: dmesg ".len()..],
            None => body(l),
        })
        .collect()
}

fn after<'a>(line: &'a str, prefix: &str) -> Option<&'a str> {
    line.find(prefix).map(|i| &line[i + prefix.len()..])
}

/// Reads a console log or `dmesg` output.
pub fn assess(log: &str) -> Verdict {
    let all = kernel_lines(log);
    // The last boot: from the last "Linux version" line on.
    let boots = all
        .iter()
        .filter(|l| l.starts_with("Linux version "))
        .count();
    let start = all
        .iter()
        .rposition(|l| l.starts_with("Linux version "))
        .unwrap_or(0);
    let lines = &all[start..];
    let mut v = Verdict {
        state: State::Unknown,
        state_line: String::new(),
        mode: None,
        pool: None,
        pool_refused: None,
        cc_active: false,
        kvmclock_unshared: false,
        percpu_unshared: false,
        pv_off: Vec::new(),
        failures: 0,
        leaked_logged: 0,
        debugfs_failures: None,
        debugfs_leaked: None,
        debugfs_shared: None,
        warnings: 0,
        panic: None,
        boots,
    };
    let debugfs = |name: &str| -> Option<u64> {
        log.lines()
            .filter_map(|l| after(l, &format!("kpm-init: debugfs {name}: ")))
            .next_back()
            .and_then(|n| n.trim().parse().ok())
    };
    v.debugfs_failures = debugfs("failures");
    v.debugfs_leaked = debugfs("pages_leaked");
    v.debugfs_shared = debugfs("pages_shared");
    for l in lines {
        if let Some(cmd) = after(l, "Kernel command line: ") {
            v.mode = cmd
                .split_whitespace()
                .filter_map(|w| w.strip_prefix("kvm_protmem="))
                .next_back()
                .map(str::to_string);
        }
        if l.contains("Memory Encryption Features active: KVM protected memory") {
            v.cc_active = true;
        }
        if let Some(p) = after(l, "Kernel panic - not syncing: ") {
            v.panic.get_or_insert_with(|| p.trim().to_string());
        }
        if l.starts_with("WARNING: ") && l.contains("kvm_protmem") {
            v.warnings += 1;
        }
        let Some(m) = after(l, "kvm_protmem: ") else {
            continue;
        };
        let state = if m.starts_with("enabled") {
            Some(State::Enabled)
        } else if m.starts_with("not offered") {
            Some(State::NotOffered)
        } else if m.starts_with("disabled on the command line") {
            Some(State::OptedOut)
        } else if m.starts_with("enable failed") {
            Some(State::EnableFailed)
        } else {
            None
        };
        if let Some(s) = state {
            // "not running on KVM" from the module initializer only fills
            // in a state early boot did not set.
            if v.state == State::Unknown || s != State::NotOffered {
                v.state = s;
                v.state_line = m.trim().to_string();
            }
        }
        if let Some(p) = m.strip_prefix("swiotlb pool shared: ") {
            v.pool = Some(p.trim().to_string());
        }
        if let Some(p) = m.strip_prefix("swiotlb pool not shared: ") {
            v.pool_refused = Some(p.trim().to_string());
        }
        if m.starts_with("kvmclock disabled") {
            v.kvmclock_unshared = true;
        }
        if m.starts_with("per-cpu PV data: the host cannot update it") {
            v.percpu_unshared = true;
        }
        if let Some(f) = m
            .trim_end()
            .strip_suffix(" disabled: its per-CPU page is not shared")
        {
            v.pv_off.push(f.to_string());
        }
        if let Some(rest) = m
            .strip_prefix("share failed: ")
            .or_else(|| m.strip_prefix("unshare failed: "))
        {
            v.failures += 1;
            v.leaked_logged += rest
                .split_whitespace()
                .next()
                .and_then(|n| n.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    v
}

impl Verdict {
    /// Protected, the bounce pool shared, nothing refused, no panic.
    pub fn healthy(&self) -> bool {
        self.state == State::Enabled
            && self.pool.is_some()
            && self.pool_refused.is_none()
            && !self.kvmclock_unshared
            && !self.percpu_unshared
            && self.failures == 0
            && self.debugfs_failures.unwrap_or(0) == 0
            && self.debugfs_leaked.unwrap_or(0) == 0
            && self.warnings == 0
            && self.panic.is_none()
    }

    /// One line for a scenario table.
    pub fn summary(&self) -> String {
        format!(
            "verify: {} ({:?}; pool {}; {} failures, {} pages leaked logged{})",
            if self.healthy() {
                "protected and healthy"
            } else {
                "NOT protected and healthy"
            },
            self.state,
            if self.pool.is_some() {
                "shared"
            } else {
                "not shared"
            },
            self.failures,
            self.leaked_logged,
            self.panic
                .as_ref()
                .map(|p| format!("; panic: {p}"))
                .unwrap_or_default()
        )
    }

    /// The verdict table: (what, ok, detail).
    pub fn rows(&self) -> Vec<(&'static str, bool, String)> {
        let state = match self.state {
            State::Unknown => {
                "no `kvm_protmem:` state line: not our kernel, or the log starts after early boot"
                    .to_string()
            }
            _ => self.state_line.clone(),
        };
        let mut rows = vec![
            ("state", self.state == State::Enabled, state),
            (
                "kvm_protmem= setting",
                true,
                match &self.mode {
                    Some(m) => format!("kvm_protmem={m}"),
                    None => "not given (the Kconfig default)".to_string(),
                },
            ),
            (
                "confidential-computing platform",
                self.cc_active || self.state != State::Enabled,
                if self.cc_active {
                    "Memory Encryption Features active: KVM protected memory".to_string()
                } else {
                    "no `Memory Encryption Features active: KVM protected memory` line".to_string()
                },
            ),
            (
                "bounce pool shared",
                self.pool.is_some() && self.pool_refused.is_none(),
                match (&self.pool, &self.pool_refused) {
                    (_, Some(r)) => format!("refused: {r}"),
                    (Some(p), None) => p.clone(),
                    (None, None) => "no `swiotlb pool shared` line".to_string(),
                },
            ),
            (
                "kvmclock and per-CPU PV pages shared",
                !self.kvmclock_unshared && !self.percpu_unshared,
                match (self.kvmclock_unshared, self.percpu_unshared) {
                    (false, false) => "no failure reported".to_string(),
                    (k, p) => format!(
                        "{}{}",
                        if k {
                            "kvmclock disabled (TSC used) "
                        } else {
                            ""
                        },
                        if p {
                            format!("per-CPU PV data private (off: {})", self.pv_off.join(", "))
                        } else {
                            String::new()
                        }
                    ),
                },
            ),
            (
                "conversion failures",
                self.failures == 0 && self.debugfs_failures.unwrap_or(0) == 0,
                format!(
                    "{} logged{}",
                    self.failures,
                    self.debugfs_failures
                        .map(|n| format!(", debugfs failures {n}"))
                        .unwrap_or_default()
                ),
            ),
            (
                "leaked pages",
                self.leaked_logged == 0 && self.debugfs_leaked.unwrap_or(0) == 0,
                format!(
                    "{} in logged failures{}",
                    self.leaked_logged,
                    self.debugfs_leaked
                        .map(|n| format!(", debugfs pages_leaked {n}"))
                        .unwrap_or_default()
                ),
            ),
            (
                "warnings from kvm_protmem",
                self.warnings == 0,
                self.warnings.to_string(),
            ),
            (
                "no panic",
                self.panic.is_none(),
                self.panic.clone().unwrap_or_else(|| "none".to_string()),
            ),
        ];
        if let Some(n) = self.debugfs_shared {
            rows.push(("pages shared now (debugfs)", true, n.to_string()));
        }
        rows
    }
}

/// `cargo xtask verify LOG`.
pub fn run(log: &Path) -> Result<()> {
    let bytes =
        std::fs::read(log).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", log.display()))?;
    let text = String::from_utf8_lossy(&bytes);
    let v = assess(&text);
    println!("verify {}:", log.display());
    if v.boots > 1 {
        println!(
            "  ({} boots in this log; the verdict is on the last)",
            v.boots
        );
    }
    let rows = v.rows();
    let width = rows.iter().map(|r| r.0.len()).max().unwrap_or(10);
    for (what, ok, detail) in &rows {
        println!(
            "  {what:<width$}  {}  {detail}",
            if *ok { "ok  " } else { "FAIL" }
        );
    }
    if v.healthy() {
        println!("verdict: protected and healthy");
        Ok(())
    } else {
        bail!("verdict: NOT protected and healthy ({})", log.display())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEALTHY: &str = "\
[    0.000000] Linux version 7.2.12 (x) #1 SMP
[    0.000000] Kernel command line: console=ttyS0 kvm_protmem=require
[    0.000000] kvm_protmem: enabled: all guest memory is private, DMA bounces through swiotlb
[    0.200000] Memory Encryption Features active: KVM protected memory
[    0.210000] kvm_protmem: swiotlb pool shared: 64 MiB at 0x3c000000 in 1 hypercalls
kpm-init: dmesg kvm_protmem: enabled: all guest memory is private, DMA bounces through swiotlb
kpm-init: debugfs pages_shared: 16400
kpm-init: debugfs failures: 0
kpm-init: debugfs pages_leaked: 0
";

    #[test]
    fn a_healthy_protected_boot_passes() {
        let v = assess(HEALTHY);
        assert!(v.healthy(), "{v:?}");
        assert_eq!(v.state, State::Enabled);
        assert_eq!(v.mode.as_deref(), Some("require"));
        assert_eq!(v.debugfs_shared, Some(16400));
        assert_eq!(v.boots, 1);
    }

    #[test]
    fn failures_and_leaks_fail_the_verdict() {
        let log = format!(
            "{HEALTHY}[    9.0] kvm_protmem: share failed: 3 pages at 0xffff888004268000: host returned KVM_EFAULT (0xfffffffffffffff2) for pfn 0x4268+3; pages leaked\n\
             [    9.1] WARNING: CPU: 0 PID: 1 at arch/x86/coco/kvm/kvm_protmem.rs:230 kvm_protmem::report_failure\n"
        );
        let v = assess(&log);
        assert!(!v.healthy());
        assert_eq!((v.failures, v.leaked_logged, v.warnings), (1, 3, 1));
    }

    #[test]
    fn unprotected_and_refused_boots_fail() {
        let v = assess("[0.0] Linux version 7.2\n[0.1] kvm_protmem: not offered by the host\n");
        assert_eq!(v.state, State::NotOffered);
        assert!(!v.healthy());
        let v = assess("[0.0] kvm_protmem: enable failed: host returned KVM_ENOSYS (0xffffffffffffffd8); booting unprotected\n");
        assert_eq!(v.state, State::EnableFailed);
        let v = assess(
            "[0.0] kvm_protmem: enabled: x\n[0.2] kvm_protmem: swiotlb pool not shared: host returned KVM_EFAULT\n\
             [0.2] Kernel panic - not syncing: Cannot decrypt the SWIOTLB bounce buffer; DMA would not work\n",
        );
        assert!(!v.healthy());
        assert!(v.pool_refused.is_some());
        assert!(v.panic.as_deref().unwrap().starts_with("Cannot decrypt"));
        assert_eq!(assess("nothing here\n").state, State::Unknown);
    }

    #[test]
    fn echoed_dmesg_alone_is_read_and_never_counted_twice() {
        let echoed = "kpm-init: dmesg kvm_protmem: enabled: all private\n\
                      kpm-init: dmesg kvm_protmem: swiotlb pool shared: 64 MiB at 0x1000 in 1 hypercalls\n";
        assert!(assess(echoed).healthy());
        let both = format!(
            "{}[1.0] kvm_protmem: share failed: 2 pages at 0x1: x; pages leaked\nkpm-init: dmesg kvm_protmem: share failed: 2 pages at 0x1: x; pages leaked\n",
            HEALTHY
        );
        assert_eq!(assess(&both).failures, 1);
    }

    #[test]
    fn private_per_cpu_data_and_the_features_left_off_are_reported() {
        let log = format!(
            "{HEALTHY}[0.1] kvm_protmem: per-cpu PV data: the host cannot update it\n\
             [0.1] kvm_protmem: steal time disabled: its per-CPU page is not shared\n\
             [0.1] kvm_protmem: PV EOI disabled: its per-CPU page is not shared\n"
        );
        let v = assess(&log);
        assert!(!v.healthy());
        assert!(v.percpu_unshared);
        assert_eq!(v.pv_off, ["steal time", "PV EOI"]);
        let row = v
            .rows()
            .into_iter()
            .find(|r| r.0.starts_with("kvmclock"))
            .unwrap();
        assert!(!row.1);
        assert!(row.2.contains("(off: steal time, PV EOI)"), "{}", row.2);
    }

    #[test]
    fn the_last_boot_of_a_log_is_judged() {
        let log = format!(
            "[0.0] Linux version 7.2\n[0.1] kvm_protmem: enable failed: host returned KVM_ENOSYS; booting unprotected\n{HEALTHY}"
        );
        let v = assess(&log);
        assert_eq!(v.boots, 2);
        assert!(v.healthy());
    }
}
