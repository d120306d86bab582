//! Protected-memory hypercall handling (`KVM_EXIT_HYPERCALL`).
//!
//! KVM forwards hypercalls 13, 14 and 15 to userspace once the VMM enables
//! them in `KVM_CAP_EXIT_HYPERCALL`; this module decides the value KVM
//! writes back to the guest's RAX. Numbers, argument checks and error
//! encodings all come from the `hypercall` ABI crate. The handler also
//! carries the test-only failure knobs and counts every result.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use hypercall::{
    Error as AbiError, Hypercall, KVM_HC_ENABLE_MEM_PROTECTED, KVM_HC_MEM_SHARE, KVM_HC_MEM_UNSHARE,
};
use serde::Serialize;

use crate::protection::{Protection, ProtectionError};

/// `KVM_HC_MAP_GPA_RANGE` (include/uapi/linux/kvm_para.h): the one hypercall
/// a stock kernel forwards. Not part of this project's ABI; this VMM keeps it
/// enabled when offered and answers it with `-KVM_ENOSYS`.
pub const KVM_HC_MAP_GPA_RANGE: u64 = 12;

/// `KVM_CAP_EXIT_HYPERCALL` bits `--protect` needs: hypercalls 13, 14, 15.
pub const REQUIRED_EXIT_MASK: u64 =
    (1 << KVM_HC_ENABLE_MEM_PROTECTED) | (1 << KVM_HC_MEM_SHARE) | (1 << KVM_HC_MEM_UNSHARE);

/// The `KVM_CAP_EXIT_HYPERCALL` mask to enable, given the mask that
/// `KVM_CHECK_EXTENSION(KVM_CAP_EXIT_HYPERCALL)` returned: ours, plus
/// `KVM_HC_MAP_GPA_RANGE` if offered.
pub fn exit_hypercall_mask(offered: u64) -> Result<u64, HypercallError> {
    if offered & REQUIRED_EXIT_MASK != REQUIRED_EXIT_MASK {
        return Err(HypercallError::HostLacksPatch {
            found: offered,
            need: REQUIRED_EXIT_MASK,
        });
    }
    Ok(REQUIRED_EXIT_MASK | (offered & (1 << KVM_HC_MAP_GPA_RANGE)))
}

/// Errors of the hypercall module.
#[derive(Debug, thiserror::Error)]
pub enum HypercallError {
    /// ENABLE could not make the device view private: the VMM must stop.
    #[error("KVM_HC_ENABLE_MEM_PROTECTED could not revoke device access: {0}")]
    Enable(#[from] ProtectionError),
    /// UNSHARE could not close the device view: the VMM must stop.
    #[error("KVM_HC_MEM_UNSHARE could not revoke device access: {0}")]
    Revoke(ProtectionError),
    /// KVM does not forward the protected-memory hypercalls.
    #[error(
        "KVM_CAP_EXIT_HYPERCALL offers hypercall mask {found:#x}, --protect needs {need:#x} \
         (hypercalls 13, 14, 15): the host kernel lacks the KVM protected-memory patch"
    )]
    HostLacksPatch {
        /// Mask KVM reported.
        found: u64,
        /// Mask needed.
        need: u64,
    },
    /// A `--fail-share`/`--fail-unshare` value did not parse.
    #[error("bad failure policy {0:?}: expected `always` or `every:N` with N >= 1")]
    BadPolicy(String),
}

/// When a test knob makes SHARE or UNSHARE fail.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum FailPolicy {
    /// Never (the default).
    #[default]
    Never,
    /// Every call.
    Always,
    /// Every N-th call (the N-th, 2N-th, ...).
    Every(u64),
}

impl FailPolicy {
    /// Whether call number `n` (counting from 1) fails.
    pub fn fails(self, n: u64) -> bool {
        match self {
            FailPolicy::Never => false,
            FailPolicy::Always => true,
            FailPolicy::Every(k) => n % k == 0,
        }
    }
}

impl FromStr for FailPolicy {
    type Err = HypercallError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "always" {
            return Ok(FailPolicy::Always);
        }
        s.strip_prefix("every:")
            .and_then(|n| n.parse::<u64>().ok())
            .filter(|&n| n >= 1)
            .map(FailPolicy::Every)
            .ok_or_else(|| HypercallError::BadPolicy(s.to_string()))
    }
}

impl fmt::Display for FailPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FailPolicy::Never => write!(f, "never"),
            FailPolicy::Always => write!(f, "always"),
            FailPolicy::Every(n) => write!(f, "every:{n}"),
        }
    }
}

/// Test-only failure injection.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FailKnobs {
    /// ENABLE returns `-KVM_ENOSYS` (the only error the ABI lists for it)
    /// and changes nothing.
    pub enable: bool,
    /// SHARE calls that pass argument and state checks fail with
    /// `-KVM_EFAULT` per this policy, changing nothing.
    pub share: FailPolicy,
    /// Same for UNSHARE.
    pub unshare: FailPolicy,
    /// `--hostile`: every ENABLE, SHARE and UNSHARE gets 0 and the VMM
    /// keeps its side as it was (after ENABLE under guest_memfd it
    /// populates, keeping its copy: without that the guest would only
    /// crash). The lie of a VMM that was taken over.
    pub lie: bool,
}

/// Hypercall results by number, then by the signed value returned.
pub type ResultCounts = BTreeMap<u64, BTreeMap<i64, u64>>;

/// One ENABLE hypercall, as the stats file lists it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct EnableRecord {
    /// Boot of the VM it came from (1 = first boot, 2 after one reboot...).
    pub boot: u64,
    /// Pages shared just before it (0 before a boot's first ENABLE: a reboot
    /// clears the map).
    pub pages_shared_before: u64,
    /// The value returned in RAX, signed (0, -1000 with `--fail-enable`).
    pub result: i64,
}

/// Most ENABLE records kept: a guest that calls ENABLE in a loop must not
/// grow the VMM without bound. Later ones are counted in
/// [`HypercallHandler::enables_dropped`] (the result counts see them all).
pub const MAX_ENABLE_RECORDS: usize = 64;

/// Decides protected-memory hypercalls and counts their results.
#[derive(Debug)]
pub struct HypercallHandler {
    knobs: FailKnobs,
    share_calls: u64,
    unshare_calls: u64,
    results: ResultCounts,
    boot: u64,
    enables: Vec<EnableRecord>,
    enables_dropped: u64,
}

impl Default for HypercallHandler {
    fn default() -> Self {
        Self::new(FailKnobs::default())
    }
}

impl HypercallHandler {
    /// A handler with the given test knobs, in boot 1.
    pub fn new(knobs: FailKnobs) -> Self {
        HypercallHandler {
            knobs,
            share_calls: 0,
            unshare_calls: 0,
            results: ResultCounts::new(),
            boot: 1,
            enables: Vec::new(),
            enables_dropped: 0,
        }
    }

    /// Results so far: `{nr: {ret: count}}`.
    pub fn results(&self) -> &ResultCounts {
        &self.results
    }

    /// The first [`MAX_ENABLE_RECORDS`] ENABLEs, in order, over all boots.
    pub fn enables(&self) -> &[EnableRecord] {
        &self.enables
    }

    /// ENABLEs past [`MAX_ENABLE_RECORDS`], not recorded one by one.
    pub fn enables_dropped(&self) -> u64 {
        self.enables_dropped
    }

    /// Tags the following ENABLEs with boot number `boot`. Counters and the
    /// `every:N` knobs keep counting over the whole run.
    pub fn start_boot(&mut self, boot: u64) {
        self.boot = boot;
    }

    /// Handles hypercall `nr` with arguments `args`; returns the guest's RAX.
    ///
    /// An error means the VMM can no longer keep its promise (ENABLE could
    /// not revoke access) and must stop.
    pub fn handle(
        &mut self,
        prot: &mut Protection,
        nr: u64,
        args: [u64; 3],
    ) -> Result<u64, HypercallError> {
        let shared_before = prot.shared_pages();
        if self.knobs.lie {
            return self.lie(prot, nr, shared_before);
        }
        let res = match Hypercall::decode(nr, args) {
            None => Err(AbiError::NotSupported),
            Some(Err(e)) => Err(e),
            Some(Ok(Hypercall::Enable)) if self.knobs.enable => Err(AbiError::NotSupported),
            Some(Ok(Hypercall::Enable)) => {
                self.record(nr, 0);
                self.record_enable(shared_before, 0);
                prot.enable()?;
                return Ok(0);
            }
            Some(Ok(call @ (Hypercall::Share(_) | Hypercall::Unshare(_)))) => {
                let res = self.share_or_unshare(prot, call);
                if let Some(e) = prot.take_revoke_failure() {
                    return Err(HypercallError::Revoke(e));
                }
                res
            }
        };
        let ret = hypercall::encode_ret(res);
        self.record(nr, ret);
        if nr == KVM_HC_ENABLE_MEM_PROTECTED {
            self.record_enable(shared_before, ret);
        }
        Ok(ret)
    }

    /// `--hostile`: 0 for every protected-memory hypercall, nothing done but
    /// populating at ENABLE under guest_memfd.
    fn lie(
        &mut self,
        prot: &mut Protection,
        nr: u64,
        shared_before: u64,
    ) -> Result<u64, HypercallError> {
        if !Hypercall::is_ours(nr) {
            let ret = AbiError::NotSupported.to_ret();
            self.record(nr, ret);
            return Ok(ret);
        }
        if nr == KVM_HC_ENABLE_MEM_PROTECTED {
            prot.populate_keeping_copies()?;
            self.record_enable(shared_before, 0);
        }
        self.record(nr, 0);
        Ok(0)
    }

    fn record_enable(&mut self, pages_shared_before: u64, ret: u64) {
        if self.enables.len() >= MAX_ENABLE_RECORDS {
            self.enables_dropped += 1;
            return;
        }
        self.enables.push(EnableRecord {
            boot: self.boot,
            pages_shared_before,
            result: ret as i64,
        });
    }

    fn share_or_unshare(&mut self, prot: &mut Protection, call: Hypercall) -> Result<(), AbiError> {
        if !prot.enabled() {
            return Err(AbiError::Permission);
        }
        let (counter, policy) = match call {
            Hypercall::Share(_) => (&mut self.share_calls, self.knobs.share),
            _ => (&mut self.unshare_calls, self.knobs.unshare),
        };
        *counter += 1;
        if policy.fails(*counter) {
            return Err(AbiError::Fault);
        }
        match call {
            Hypercall::Share(r) => prot.share(r),
            Hypercall::Unshare(r) => prot.unshare(r),
            Hypercall::Enable => Ok(()),
        }
    }

    fn record(&mut self, nr: u64, ret: u64) {
        *self
            .results
            .entry(nr)
            .or_default()
            .entry(ret as i64)
            .or_default() += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hypercall::{KVM_EFAULT, KVM_EINVAL, KVM_ENOSYS, KVM_EPERM, PAGE_SIZE};
    use proptest::prelude::*;
    use vm_memory::{GuestAddress, GuestMemoryMmap};

    const NPAGES: u64 = 32;

    fn prot() -> Protection {
        let view =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), (NPAGES * PAGE_SIZE) as usize)])
                .unwrap();
        Protection::new(view)
    }

    fn neg(e: u64) -> u64 {
        e.wrapping_neg()
    }

    #[test]
    fn exit_mask_needs_the_patch() {
        assert_eq!(REQUIRED_EXIT_MASK, 0xe000);
        let err = exit_hypercall_mask(0x1000).unwrap_err().to_string();
        assert!(err.contains("KVM_CAP_EXIT_HYPERCALL"), "{err}");
        assert!(err.contains("0x1000") && err.contains("0xe000"), "{err}");
        assert!(
            err.contains("lacks the KVM protected-memory patch"),
            "{err}"
        );
        assert!(exit_hypercall_mask(0x6000).is_err(), "13 missing");
        assert_eq!(exit_hypercall_mask(0xf000).unwrap(), 0xf000, "keeps 12");
        assert_eq!(exit_hypercall_mask(0xe000).unwrap(), 0xe000);
        assert_eq!(
            exit_hypercall_mask(0x1_e000).unwrap(),
            0xe000,
            "nothing unknown"
        );
    }

    #[test]
    fn policy_parsing() {
        assert_eq!("always".parse::<FailPolicy>().unwrap(), FailPolicy::Always);
        assert_eq!(
            "every:3".parse::<FailPolicy>().unwrap(),
            FailPolicy::Every(3)
        );
        for bad in ["every:0", "every:", "sometimes", "every:-1", ""] {
            let err = bad.parse::<FailPolicy>().unwrap_err();
            assert!(err.to_string().contains(&format!("{bad:?}")), "{err}");
        }
        assert!(FailPolicy::Every(3).fails(6));
        assert!(!FailPolicy::Every(3).fails(4));
        assert_eq!(FailPolicy::Every(2).to_string(), "every:2");
    }

    #[test]
    fn lifecycle_and_result_counts() {
        let mut p = prot();
        let mut h = HypercallHandler::default();
        let share = |h: &mut HypercallHandler, p: &mut Protection, gpa, n, f| {
            h.handle(p, KVM_HC_MEM_SHARE, [gpa, n, f]).unwrap()
        };
        assert_eq!(
            share(&mut h, &mut p, 0, 1, 0),
            neg(KVM_EPERM),
            "before ENABLE"
        );
        assert_eq!(
            h.handle(&mut p, KVM_HC_ENABLE_MEM_PROTECTED, [0; 3])
                .unwrap(),
            0
        );
        assert_eq!(share(&mut h, &mut p, 0x2000, 4, 0), 0);
        assert_eq!(
            share(&mut h, &mut p, 0x2001, 4, 0),
            neg(KVM_EINVAL),
            "unaligned"
        );
        assert_eq!(
            share(&mut h, &mut p, 0x2000, 0, 0),
            neg(KVM_EINVAL),
            "no pages"
        );
        assert_eq!(
            share(&mut h, &mut p, 0x2000, 1, 1),
            neg(KVM_EINVAL),
            "flags"
        );
        assert_eq!(
            share(&mut h, &mut p, (NPAGES - 1) * PAGE_SIZE, 2, 0),
            neg(KVM_EFAULT)
        );
        assert_eq!(share(&mut h, &mut p, !0xfff_u64, 2, 0), neg(KVM_EINVAL));
        assert_eq!(
            h.handle(&mut p, KVM_HC_MEM_UNSHARE, [0x3000, 1, 0])
                .unwrap(),
            0
        );
        assert_eq!(p.shared_pages(), 3);
        assert_eq!(
            h.handle(&mut p, KVM_HC_MAP_GPA_RANGE, [0, 1, 0]).unwrap(),
            neg(KVM_ENOSYS)
        );
        let r = h.results();
        assert_eq!(r[&KVM_HC_MEM_SHARE][&0], 1);
        assert_eq!(r[&KVM_HC_MEM_SHARE][&-22], 4);
        assert_eq!(r[&KVM_HC_MEM_SHARE][&-14], 1);
        assert_eq!(r[&KVM_HC_MEM_SHARE][&-1], 1);
        assert_eq!(r[&KVM_HC_ENABLE_MEM_PROTECTED][&0], 1);
        assert_eq!(r[&KVM_HC_MAP_GPA_RANGE][&-1000], 1);
    }

    #[test]
    fn knobs_fail_without_changing_state() {
        let mut p = prot();
        let knobs = FailKnobs {
            enable: true,
            share: FailPolicy::Every(2),
            unshare: FailPolicy::Always,
            lie: false,
        };
        let mut h = HypercallHandler::new(knobs);
        assert_eq!(
            h.handle(&mut p, KVM_HC_ENABLE_MEM_PROTECTED, [0; 3])
                .unwrap(),
            neg(KVM_ENOSYS)
        );
        assert!(!p.enabled());
        p.enable().unwrap();
        let rets: Vec<u64> = (0..4)
            .map(|i| {
                h.handle(&mut p, KVM_HC_MEM_SHARE, [i * PAGE_SIZE, 1, 0])
                    .unwrap()
            })
            .collect();
        assert_eq!(rets, [0, neg(KVM_EFAULT), 0, neg(KVM_EFAULT)]);
        assert_eq!(p.shared_pages(), 2);
        assert_eq!(
            h.handle(&mut p, KVM_HC_MEM_UNSHARE, [0, 1, 0]).unwrap(),
            neg(KVM_EFAULT)
        );
        assert_eq!(p.shared_pages(), 2);
    }

    #[test]
    fn a_lying_vmm_says_yes_and_keeps_everything() {
        let mut p = prot();
        let mut h = HypercallHandler::new(FailKnobs {
            lie: true,
            ..Default::default()
        });
        for (nr, args) in [
            (KVM_HC_ENABLE_MEM_PROTECTED, [0; 3]),
            (KVM_HC_MEM_SHARE, [0x2000, 2, 0]),
            (KVM_HC_MEM_UNSHARE, [0x2000, 1, 0]),
            (KVM_HC_MEM_SHARE, [0x2001, 0, 7]),
        ] {
            assert_eq!(h.handle(&mut p, nr, args).unwrap(), 0, "{nr}");
        }
        assert!(!p.enabled(), "nothing made private on the VMM's side");
        assert_eq!(p.shared_pages(), 0);
        assert_eq!(
            h.enables(),
            [EnableRecord {
                boot: 1,
                pages_shared_before: 0,
                result: 0
            }]
        );
        assert_eq!(
            h.handle(&mut p, KVM_HC_MAP_GPA_RANGE, [0; 3]).unwrap(),
            neg(KVM_ENOSYS),
            "not a protected-memory hypercall"
        );
    }

    #[test]
    fn enables_are_recorded_with_boot_and_prior_shares() {
        let mut p = prot();
        let enable = |h: &mut HypercallHandler, p: &mut Protection| {
            h.handle(p, KVM_HC_ENABLE_MEM_PROTECTED, [0; 3]).unwrap()
        };
        let mut h = HypercallHandler::default();
        assert_eq!(enable(&mut h, &mut p), 0);
        h.handle(&mut p, KVM_HC_MEM_SHARE, [0x2000, 5, 0]).unwrap();
        assert_eq!(enable(&mut h, &mut p), 0, "kexec: ENABLE again");
        h.handle(&mut p, KVM_HC_MEM_SHARE, [0x2000, 2, 0]).unwrap();
        p.reset().unwrap();
        h.start_boot(2);
        h.handle(&mut p, KVM_HC_MEM_SHARE, [0x2000, 1, 0]).unwrap();
        assert_eq!(enable(&mut h, &mut p), 0);
        let rec = |boot, pages_shared_before, result| EnableRecord {
            boot,
            pages_shared_before,
            result,
        };
        assert_eq!(h.enables(), [rec(1, 0, 0), rec(1, 5, 0), rec(2, 0, 0)]);
        assert_eq!(h.results()[&KVM_HC_ENABLE_MEM_PROTECTED][&0], 3);

        let mut h = HypercallHandler::new(FailKnobs {
            enable: true,
            ..Default::default()
        });
        assert_eq!(enable(&mut h, &mut p), neg(KVM_ENOSYS));
        assert_eq!(h.enables(), [rec(1, 0, -1000)], "failed ENABLEs too");
        for _ in 0..MAX_ENABLE_RECORDS + 10 {
            enable(&mut h, &mut p);
        }
        assert_eq!(h.enables().len(), MAX_ENABLE_RECORDS, "bounded");
        assert_eq!(h.enables_dropped(), 11);
        h.enables = h.enables[..1].to_vec();
        let v = serde_json::to_value(h.enables()).unwrap();
        assert_eq!(
            v,
            serde_json::json!([{"boot": 1, "pages_shared_before": 0, "result": -1000}])
        );
    }

    fn arb_call() -> impl Strategy<Value = (u64, [u64; 3])> {
        let nr = prop_oneof![
            Just(KVM_HC_ENABLE_MEM_PROTECTED),
            Just(KVM_HC_MEM_SHARE),
            Just(KVM_HC_MEM_SHARE),
            Just(KVM_HC_MEM_UNSHARE),
            Just(KVM_HC_MEM_UNSHARE),
            any::<u64>(),
        ];
        let gpa = prop_oneof![
            (0..NPAGES + 2).prop_map(|p| p * PAGE_SIZE),
            any::<u64>(),
            Just(!0xfff_u64),
        ];
        let npages = prop_oneof![0..NPAGES + 2, any::<u64>()];
        let flags = prop_oneof![Just(0u64), any::<u64>()];
        (nr, gpa, npages, flags).prop_map(|(nr, g, n, f)| (nr, [g, n, f]))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        #[test]
        fn fuzz_never_panics_and_keeps_invariants(
            calls in proptest::collection::vec(arb_call(), 1..48),
            share in prop_oneof![Just(FailPolicy::Never), (1u64..4).prop_map(FailPolicy::Every)],
        ) {
            let mut p = prot();
            let mut h = HypercallHandler::new(FailKnobs { share, ..Default::default() });
            let allowed = [0, neg(KVM_EPERM), neg(KVM_EFAULT), neg(KVM_EINVAL), neg(KVM_ENOSYS)];
            let mut total = 0;
            for (nr, args) in calls {
                let before = p.shared_pages();
                let ret = h.handle(&mut p, nr, args).unwrap();
                total += 1;
                prop_assert!(allowed.contains(&ret), "nr {} args {:?} -> {:#x}", nr, args, ret);
                if ret != 0 && nr != KVM_HC_ENABLE_MEM_PROTECTED {
                    prop_assert_eq!(p.shared_pages(), before, "a failed call changed state");
                }
                prop_assert!(p.shared_pages() <= NPAGES);
                prop_assert!(p.shared_peak() >= p.shared_pages());
            }
            let counted: u64 = h.results().values().flat_map(|m| m.values()).sum();
            prop_assert_eq!(counted, total);
        }
    }
}
