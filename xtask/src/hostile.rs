//! The hostile-VMM scenarios: the VMM, with `--hostile`, behaves as one
//! that has been taken over once the guest holds a secret in private
//! memory (host/vmm/src/hostile.rs), and the judges check what KVM made of
//! every attempt and what the guest finds afterwards.
//!
//! - `hostile` (`--protect`, guest_memfd, KVM_CAP_X86_PROTECTED_MEMORY):
//!   every attempt is refused with its errno, the lies change nothing, the
//!   guest's private data is intact and the VMM holds no copy of it.
//! - `hostile-view` (`--protect=view`): what that mode cannot stop: the VMM
//!   reads the vCPUs' registers and finds and rewrites the secret, which
//!   the guest then sees changed.

use crate::e2e::{debugfs, kv, row, scan_row, scenario, stats, Row, Scenario};
use crate::nested::{self, L2Outcome};

/// The guest keeps a secret and random bytes while the VMM attacks.
const CMDLINE: &str = "kunit.enable=0 kpm.secret=c0ffee5ec2e7 kpm.hostile";

/// Every attempt of the VMM under guest_memfd and the errno KVM must give.
/// vCPU attempts are made by every vCPU thread (`vcpu0 ...` with one vCPU).
pub const REFUSED: &[(&str, &str)] = &[
    ("vcpu0 KVM_GET_REGS (read the registers)", "EPERM"),
    ("vcpu0 KVM_SET_REGS", "EPERM"),
    ("vcpu0 KVM_GET_SREGS", "EPERM"),
    ("vcpu0 KVM_SET_SREGS", "EPERM"),
    ("vcpu0 KVM_GET_FPU", "EPERM"),
    ("vcpu0 KVM_GET_XSAVE (vector registers)", "EPERM"),
    ("vcpu0 KVM_GET_XCRS", "EPERM"),
    ("vcpu0 KVM_GET_DEBUGREGS", "EPERM"),
    ("vcpu0 KVM_GET_MSRS (LSTAR)", "EPERM"),
    ("vcpu0 KVM_SET_MSRS (LSTAR)", "EPERM"),
    ("vcpu0 KVM_GET_LAPIC", "EPERM"),
    ("vcpu0 KVM_GET_VCPU_EVENTS", "EPERM"),
    (
        "vcpu0 KVM_TRANSLATE (walk the guest's page tables)",
        "EPERM",
    ),
    ("vcpu0 KVM_SET_GUEST_DEBUG (single-step)", "EPERM"),
    ("vcpu0 KVM_SET_MP_STATE", "EPERM"),
    (
        "KVM_SET_MEMORY_ATTRIBUTES (all RAM shared, to write the guest's private pages)",
        "EPERM",
    ),
    (
        "fallocate(PUNCH_HOLE) of the guest_memfd (zero the guest's private pages)",
        "EPERM",
    ),
    (
        "KVM_SW_PROTECTED_POPULATE (write chosen bytes into private pages)",
        "EPERM",
    ),
    (
        "KVM_SET_USER_MEMORY_REGION2 (delete the guest's RAM slot)",
        "EPERM",
    ),
    (
        "KVM_SET_USER_MEMORY_REGION (map VMM memory where the guest could run it)",
        "EPERM",
    ),
    (
        "KVM_CREATE_VCPU (a vCPU that starts where the VMM wants)",
        "EPERM",
    ),
    (
        "KVM_ENABLE_CAP(KVM_CAP_X86_USER_SPACE_MSR) (see the guest's MSR writes)",
        "EINVAL",
    ),
];

/// The secret search, by its attempt name.
const SEARCH: &str = "find and overwrite the guest's secret in the VMM's mappings of guest RAM";

/// The two scenarios.
pub fn scenarios() -> Vec<Scenario> {
    vec![
        scenario(
            "hostile",
            "a compromised VMM (--protect, guest_memfd): it lies about every conversion, then tries to read and change vCPU state and private memory; KVM refuses each attempt with its errno, the guest's private data stays intact and nowhere in the VMM",
            &["--protect"],
            CMDLINE,
            judge_hostile,
        ),
        scenario(
            "hostile-view",
            "the same compromised VMM under --protect=view: it reads the vCPU registers and finds and rewrites the guest's secret, which the guest sees changed: what view mode cannot stop",
            &["--protect=view"],
            CMDLINE,
            judge_hostile_view,
        ),
    ]
}

/// The VMM's attempts from its stats file (its stderr lines may be cut by
/// the guest's console on the shared L1 console): (op, `refused (ERRNO)`
/// or `done (WHAT)`).
fn attempts(o: &L2Outcome) -> Vec<(String, String)> {
    let v = stats(o);
    let Some(list) = v.get("hostile").and_then(|h| h.as_array()) else {
        return Vec::new();
    };
    list.iter()
        .filter_map(|a| {
            let op = a.get("op")?.as_str()?.to_string();
            let outcome = match (a.get("refused"), a.get("done")) {
                (Some(e), _) => format!("refused ({})", e.as_str()?),
                (None, Some(d)) => format!("done ({})", d.as_str()?),
                _ => return None,
            };
            Some((op, outcome))
        })
        .collect()
}

fn outcome<'a>(all: &'a [(String, String)], op: &str) -> Option<&'a str> {
    all.iter()
        .find(|(o, _)| o == op)
        .map(|(_, out)| out.as_str())
}

/// Rows both scenarios share: the guest booted believing it is protected,
/// and the VMM answered every conversion 0 without converting its side.
fn common_rows(o: &L2Outcome) -> Vec<Row> {
    let v = stats(o);
    let up = o.console.contains("kpm-init: userspace up");
    let enabled = o.console.contains("kvm_protmem: enabled");
    let (enable_ok, enable_all) = crate::e2e::calls(&v, 13);
    let (unshare_ok, unshare_all) = crate::e2e::calls(&v, 15);
    let shared = crate::e2e::num(&v, "pages_shared");
    vec![
        row(
            "the guest boots believing it is protected",
            up && enabled,
            format!("userspace {up}, dmesg `enabled` {enabled}"),
        ),
        row(
            "the VMM lied: 0 to every ENABLE and UNSHARE, nothing made private on its side",
            enable_ok >= 1
                && enable_ok == enable_all
                && unshare_ok == unshare_all
                && shared == 0
                && !attempts(o).is_empty(),
            format!(
                "ENABLE 0 x{enable_ok}/{enable_all}, UNSHARE 0 x{unshare_ok}/{unshare_all}; the VMM's map shares {shared} pages (it never closed one)"
            ),
        ),
    ]
}

/// After the attack: the guest checked its private data, and still works.
fn after_rows(o: &L2Outcome, intact: bool) -> Vec<Row> {
    let check = kv(o, "hostile-check").unwrap_or("none");
    let known = nested::known_sha256();
    let read = kv(o, "disk-read-after")
        .and_then(|s| s.split_whitespace().next())
        .unwrap_or("none");
    let mut rows = vec![if intact {
        row(
            "the guest reads its secret and 256 KiB of random private bytes back intact",
            check.starts_with("private data intact"),
            check.to_string(),
        )
    } else {
        row(
            "the guest sees its secret changed by the VMM",
            check == "private data changed",
            check.to_string(),
        )
    }];
    rows.push(row(
        "after the attack the guest still runs and reads its disk",
        read == known && o.exit == Some(0),
        format!(
            "sha256 {}, VMM exit {:?}",
            &read[..read.len().min(16)],
            o.exit
        ),
    ));
    rows
}

fn judge_hostile(o: &L2Outcome) -> Vec<Row> {
    let mut rows = common_rows(o);
    let all = attempts(o);
    for (op, errno) in REFUSED {
        let got = outcome(&all, op).unwrap_or("not attempted");
        rows.push(row(
            &format!("KVM refuses: {op}"),
            got == format!("refused ({errno})"),
            got.to_string(),
        ));
    }
    let done: Vec<&str> = all
        .iter()
        .filter(|(op, out)| out.starts_with("done") && op != SEARCH)
        .map(|(op, _)| op.as_str())
        .collect();
    rows.push(row(
        "no attempt on vCPU state or private memory succeeded",
        done.is_empty() && all.len() > REFUSED.len(),
        if done.is_empty() {
            format!("{} attempts, all refused", all.len() - 1)
        } else {
            done.join("; ")
        },
    ));
    let search = outcome(&all, SEARCH).unwrap_or("not attempted");
    rows.push(row(
        "the VMM's own mappings of guest RAM hold no copy of the secret to overwrite",
        search == "done (0 hits overwritten)",
        search.to_string(),
    ));
    rows.push(scan_row(o, false));
    rows.extend(after_rows(o, true));
    rows.push(row(
        "the guest is still protected after the attack",
        kv(o, "hostile-state") == Some("enabled") && debugfs(o, "pages_leaked").unwrap_or(0) == 0,
        format!("state {:?}", kv(o, "hostile-state")),
    ));
    rows
}

fn judge_hostile_view(o: &L2Outcome) -> Vec<Row> {
    let mut rows = common_rows(o);
    let all = attempts(o);
    let regs = outcome(&all, "vcpu0 KVM_GET_REGS (read the registers)").unwrap_or("none");
    let set = outcome(&all, "vcpu0 KVM_SET_REGS").unwrap_or("none");
    rows.push(row(
        "the VMM reads and writes the vCPU's registers (no lock without KVM-owned memory)",
        regs.starts_with("done (rip 0x") && set.starts_with("done"),
        format!("GET {regs}; SET {set}"),
    ));
    let search = outcome(&all, SEARCH).unwrap_or("not attempted");
    let hits = search
        .strip_prefix("done (")
        .and_then(|s| s.split_whitespace().next())
        .and_then(|n| n.parse::<u64>().ok())
        .unwrap_or(0);
    rows.push(row(
        "the VMM finds the guest's secret in its own mapping and overwrites it",
        hits > 0,
        search.to_string(),
    ));
    rows.extend(after_rows(o, false));
    rows
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome_with(attempts: &[(&str, &str, &str)]) -> L2Outcome {
        let list: Vec<serde_json::Value> = attempts
            .iter()
            .map(|(op, kind, what)| serde_json::json!({ "op": op, *kind: what }))
            .collect();
        L2Outcome {
            name: "hostile".into(),
            stats: Some(serde_json::json!({ "hostile": list }).to_string()),
            ..Default::default()
        }
    }

    #[test]
    fn attempts_come_from_the_stats_file() {
        let o = outcome_with(&[
            (
                "vcpu0 KVM_GET_REGS (read the registers)",
                "refused",
                "EPERM",
            ),
            (SEARCH, "done", "0 hits overwritten"),
        ]);
        let all = attempts(&o);
        assert_eq!(all.len(), 2);
        assert_eq!(
            outcome(&all, "vcpu0 KVM_GET_REGS (read the registers)"),
            Some("refused (EPERM)")
        );
        assert_eq!(outcome(&all, SEARCH), Some("done (0 hits overwritten)"));
        assert!(attempts(&L2Outcome::default()).is_empty());
    }

    #[test]
    fn a_succeeding_attempt_fails_the_judge() {
        let mut list: Vec<(&str, &str, &str)> = REFUSED
            .iter()
            .map(|(op, errno)| (*op, "refused", *errno))
            .collect();
        list.push((SEARCH, "done", "0 hits overwritten"));
        let row_ok = |rows: &[Row], prefix: &str| {
            rows.iter()
                .find(|r| r.check.starts_with(prefix))
                .map(|r| r.ok)
        };
        let good = judge_hostile(&outcome_with(&list));
        assert_eq!(row_ok(&good, "no attempt on vCPU state"), Some(true));
        assert_eq!(row_ok(&good, "KVM refuses: vcpu0 KVM_SET_REGS"), Some(true));
        assert_eq!(row_ok(&good, "the VMM's own mappings"), Some(true));
        let bad: Vec<(&str, &str, &str)> = list
            .iter()
            .map(|&(op, k, w)| {
                if op == "vcpu0 KVM_SET_REGS" {
                    (op, "done", "registers written")
                } else {
                    (op, k, w)
                }
            })
            .collect();
        let rows = judge_hostile(&outcome_with(&bad));
        assert_eq!(row_ok(&rows, "no attempt on vCPU state"), Some(false));
        assert_eq!(
            row_ok(&rows, "KVM refuses: vcpu0 KVM_SET_REGS"),
            Some(false)
        );
    }
}
