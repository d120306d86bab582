// SPDX-License-Identifier: GPL-2.0

//! Host-side tests of the ABI encoding.

extern crate std;

use super::*;
use proptest::prelude::*;
use std::vec::Vec;

#[test]
fn numbers_do_not_collide_with_mainline() {
    // Mainline uses hypercalls 1..=12 and feature bits 0-7, 9-17 and 24.
    for nr in [
        KVM_HC_ENABLE_MEM_PROTECTED,
        KVM_HC_MEM_SHARE,
        KVM_HC_MEM_UNSHARE,
    ] {
        assert!(nr > 12, "hypercall {nr} collides with mainline");
    }
    assert!((18..24).contains(&KVM_FEATURE_MEM_PROTECTED));
    assert_eq!(KVM_HC_ENABLE_MEM_PROTECTED, 13);
    assert_eq!(KVM_HC_MEM_SHARE, 14);
    assert_eq!(KVM_HC_MEM_UNSHARE, 15);
}

#[test]
fn signature_spells_kvmkvmkvm() {
    let mut bytes = Vec::new();
    for w in KVM_SIGNATURE {
        bytes.extend_from_slice(&w.to_le_bytes());
    }
    assert_eq!(&bytes[..], b"KVMKVMKVM\0\0\0");
}

#[test]
fn feature_bit() {
    assert!(has_mem_protected(1 << 18));
    assert!(!has_mem_protected(!(1 << 18)));
}

#[test]
fn errors_round_trip() {
    for e in [
        Error::Permission,
        Error::NoMemory,
        Error::Fault,
        Error::Invalid,
        Error::NotSupported,
    ] {
        assert_eq!(decode_ret(e.to_ret()), Err(e));
        assert_eq!(decode_ret(encode_ret(Err(e))), Err(e));
    }
    assert_eq!(Error::NotSupported.to_ret(), -1000i64 as u64);
    assert_eq!(Error::Invalid.to_ret(), -22i64 as u64);
    assert_eq!(decode_ret(0), Ok(()));
    assert_eq!(encode_ret(Ok(())), 0);
}

#[test]
fn hostile_returns_are_failures() {
    for ret in [
        1,
        12,
        22,
        1000,
        u64::MAX - 1000,
        (-95i64) as u64,
        0x8000_0000_0000_0000,
    ] {
        assert_eq!(decode_ret(ret), Err(Error::Unexpected(ret)), "{ret:#x}");
    }
}

#[test]
fn range_validation() {
    assert_eq!(GpaRange::new(0x1001, 1), Err(Error::Invalid));
    assert_eq!(GpaRange::new(0x1000, 0), Err(Error::Invalid));
    assert_eq!(GpaRange::new(!0xfff_u64, 1), Err(Error::Invalid));
    assert_eq!(GpaRange::new(0, u64::MAX), Err(Error::Invalid));
    // 2^52 pages of 4 KiB end exactly at 2^64: that end does not fit.
    assert_eq!(GpaRange::new(0, 1 << 52), Err(Error::Invalid));
    assert_eq!(
        GpaRange::new(0, 1 << 40),
        Ok(GpaRange::from_pfn(0, 1 << 40).unwrap())
    );
    // The last page below 2^64 that still ends inside u64.
    let top = GpaRange::new(u64::MAX - 2 * PAGE_SIZE + 1, 1).unwrap();
    assert_eq!(top.end(), u64::MAX - PAGE_SIZE + 1);
    assert_eq!(GpaRange::from_pfn(u64::MAX, 1), Err(Error::Invalid));
    let r = GpaRange::new(0x20_0000, 512).unwrap();
    assert_eq!(
        (r.first_pfn(), r.end_pfn(), r.len()),
        (0x200, 0x400, 2 << 20)
    );
    assert!(r.contains(0x20_0000) && r.contains(0x3f_ffff));
    assert!(!r.contains(0x1f_ffff) && !r.contains(0x40_0000));
}

#[test]
fn decode_rejects_flags_and_foreign_numbers() {
    assert_eq!(Hypercall::decode(12, [0; 3]), None);
    assert_eq!(Hypercall::decode(16, [0; 3]), None);
    assert_eq!(
        Hypercall::decode(KVM_HC_MEM_SHARE, [0x1000, 1, 1]),
        Some(Err(Error::Invalid))
    );
    assert_eq!(
        Hypercall::decode(KVM_HC_MEM_UNSHARE, [0x1000, 0, 0]),
        Some(Err(Error::Invalid))
    );
    assert_eq!(
        Hypercall::decode(KVM_HC_ENABLE_MEM_PROTECTED, [7, 7, 7]),
        Some(Ok(Hypercall::Enable))
    );
}

/// A software host that records each call and answers with a fixed value.
struct Recorder {
    calls: Vec<(u64, [u64; 3])>,
    ret: u64,
}

impl Hypervisor for Recorder {
    unsafe fn hypercall(&mut self, nr: u64, args: [u64; 3]) -> u64 {
        self.calls.push((nr, args));
        self.ret
    }
}

#[test]
fn issue_encodes_registers_and_decodes_reply() {
    let mut hv = Recorder {
        calls: Vec::new(),
        ret: 0,
    };
    let r = GpaRange::new(0x7000, 3).unwrap();
    // The recording host changes no memory, so every call is sound.
    let call = |hv: &mut Recorder, c| {
        // SAFETY: `Recorder` only records; no page changes state.
        unsafe { issue(hv, c) }
    };
    assert_eq!(call(&mut hv, Hypercall::Enable), Ok(()));
    assert_eq!(call(&mut hv, Hypercall::Share(r)), Ok(()));
    hv.ret = Error::Fault.to_ret();
    assert_eq!(call(&mut hv, Hypercall::Unshare(r)), Err(Error::Fault));
    assert_eq!(
        hv.calls,
        [(13, [0, 0, 0]), (14, [0x7000, 3, 0]), (15, [0x7000, 3, 0])]
    );
}

proptest! {
    #[test]
    fn any_register_values_decode_consistently(nr in 10u64..20, a0: u64, a1: u64, a2: u64) {
        match Hypercall::decode(nr, [a0, a1, a2]) {
            None => prop_assert!(!Hypercall::is_ours(nr)),
            Some(Ok(call)) => {
                prop_assert_eq!(call.nr(), nr);
                if nr != KVM_HC_ENABLE_MEM_PROTECTED {
                    // A decoded range re-encodes to exactly what was passed.
                    prop_assert_eq!(call.args(), [a0, a1, a2]);
                }
            }
            Some(Err(e)) => {
                prop_assert_eq!(e, Error::Invalid);
                let bad = a2 != 0 || a0 % PAGE_SIZE != 0 || a1 == 0
                    || a1.checked_mul(PAGE_SIZE).and_then(|l| a0.checked_add(l)).is_none();
                prop_assert!(bad);
            }
        }
    }

    #[test]
    fn any_return_value_decodes_to_one_outcome(ret: u64) {
        let res = decode_ret(ret);
        prop_assert_eq!(encode_ret(res), ret);
        prop_assert_eq!(res.is_ok(), ret == 0);
    }

    #[test]
    fn contains_matches_bounds(pfn in 0u64..1 << 40, n in 1u64..1 << 20, probe: u64) {
        let r = GpaRange::from_pfn(pfn, n).unwrap();
        prop_assert_eq!(r.contains(probe), probe >= r.gpa() && probe < r.end());
    }
}
