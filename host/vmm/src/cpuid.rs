//! The guest's CPUID: KVM's supported set, made safe for a guest kernel,
//! with the KVM paravirt leaves and, with `--protect`, the protected-memory
//! feature bit.
//!
//! XSAVE is hidden (PLATFORM.md TRAP 2): under nested TCG the sizes in leaf
//! 0xD do not match what the guest kernel computes, and it panics. So leaf 1
//! loses XSAVE, OSXSAVE and AVX, leaf 0xD is dropped, and leaf 7 loses the
//! features whose register state lives in XSAVE components (AVX2, AVX-512,
//! PKU, AMX), so the guest sees a consistent CPU without them.

use hypercall::{
    KVM_CPUID_FEATURES, KVM_CPUID_SIGNATURE, KVM_FEATURE_MEM_PROTECTED, KVM_SIGNATURE,
};
use kvm_bindings::kvm_cpuid_entry2;

/// Leaf 1: version and feature information.
const LEAF_FEATURES: u32 = 1;
/// Leaf 0xB: extended topology.
const LEAF_TOPOLOGY: u32 = 0xb;
/// Leaf 0xD: XSAVE state components.
const LEAF_XSAVE: u32 = 0xd;
/// Leaf 0x1F: V2 extended topology.
const LEAF_TOPOLOGY_V2: u32 = 0x1f;
/// Leaf 1 ECX bits hidden from the guest: XSAVE, OSXSAVE, AVX, and the
/// VEX-encoded extensions that need AVX state (FMA, F16C); without them the
/// guest reports "CPU0 has 'fma' enabled but 'avx' disabled".
const ECX_FMA: u32 = 1 << 12;
const ECX_XSAVE: u32 = 1 << 26;
const ECX_OSXSAVE: u32 = 1 << 27;
const ECX_AVX: u32 = 1 << 28;
const ECX_F16C: u32 = 1 << 29;
/// Leaf 7: structured extended features.
const LEAF_EXT_FEATURES: u32 = 7;
/// Leaf 7.0 EBX: AVX2, AVX512F, DQ, IFMA, PF, ER, CD, BW, VL.
const L7_EBX_XSTATE: u32 = (1 << 5)
    | (1 << 16)
    | (1 << 17)
    | (1 << 21)
    | (1 << 26)
    | (1 << 27)
    | (1 << 28)
    | (1 << 30)
    | (1 << 31);
/// Leaf 7.0 ECX: AVX512_VBMI, PKU, OSPKE, AVX512_VBMI2, VNNI, BITALG, VPOPCNTDQ.
const L7_ECX_XSTATE: u32 =
    (1 << 1) | (1 << 3) | (1 << 4) | (1 << 6) | (1 << 11) | (1 << 12) | (1 << 14);
/// Leaf 7.0 EDX: AVX512_4VNNIW, 4FMAPS, AMX_BF16, AVX512_FP16, AMX_TILE, AMX_INT8.
const L7_EDX_XSTATE: u32 = (1 << 2) | (1 << 3) | (1 << 22) | (1 << 23) | (1 << 24) | (1 << 25);
/// Leaf 7.1 EAX: AVX_VNNI, AVX512_BF16.
const L7_1_EAX_XSTATE: u32 = (1 << 4) | (1 << 5);
/// Leaf 1 EDX: more than one logical processor per package.
const EDX_HTT: u32 = 1 << 28;
/// `KVM_CPUID_FLAG_SIGNIFCANT_INDEX`: the entry depends on ECX.
const FLAG_SIGNIFICANT_INDEX: u32 = 1;

/// What to adapt the supported CPUID to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CpuidConfig {
    /// This vCPU's id, also its APIC id.
    pub vcpu_id: u32,
    /// Number of vCPUs.
    pub nr_vcpus: u32,
    /// Advertise `KVM_FEATURE_MEM_PROTECTED`.
    pub protect: bool,
}

/// Adapts KVM's supported CPUID entries for one vCPU.
pub fn patch(supported: &[kvm_cpuid_entry2], cfg: CpuidConfig) -> Vec<kvm_cpuid_entry2> {
    let mut out: Vec<kvm_cpuid_entry2> = supported
        .iter()
        .filter(|e| e.function != LEAF_XSAVE)
        .copied()
        .collect();
    for e in &mut out {
        match e.function {
            LEAF_FEATURES => {
                e.ecx &= !(ECX_FMA | ECX_XSAVE | ECX_OSXSAVE | ECX_AVX | ECX_F16C);
                e.ebx = (e.ebx & 0x0000_ffff) | (cfg.vcpu_id << 24) | ((cfg.nr_vcpus & 0xff) << 16);
                if cfg.nr_vcpus > 1 {
                    e.edx |= EDX_HTT;
                } else {
                    e.edx &= !EDX_HTT;
                }
            }
            LEAF_EXT_FEATURES if e.index == 0 => {
                e.ebx &= !L7_EBX_XSTATE;
                e.ecx &= !L7_ECX_XSTATE;
                e.edx &= !L7_EDX_XSTATE;
            }
            LEAF_EXT_FEATURES if e.index == 1 => e.eax &= !L7_1_EAX_XSTATE,
            LEAF_TOPOLOGY | LEAF_TOPOLOGY_V2 => e.edx = cfg.vcpu_id,
            _ => {}
        }
    }
    let signature = entry(&mut out, KVM_CPUID_SIGNATURE);
    signature.eax = KVM_CPUID_FEATURES;
    [signature.ebx, signature.ecx, signature.edx] = KVM_SIGNATURE;
    let features = entry(&mut out, KVM_CPUID_FEATURES);
    let bit = 1 << KVM_FEATURE_MEM_PROTECTED;
    if cfg.protect {
        features.eax |= bit;
    } else {
        features.eax &= !bit;
    }
    out
}

/// The entry for `function` (index 0), added zeroed if KVM did not report it.
fn entry(entries: &mut Vec<kvm_cpuid_entry2>, function: u32) -> &mut kvm_cpuid_entry2 {
    let pos = entries.iter().position(|e| {
        e.function == function && (e.flags & FLAG_SIGNIFICANT_INDEX == 0 || e.index == 0)
    });
    let pos = pos.unwrap_or_else(|| {
        entries.push(kvm_cpuid_entry2 {
            function,
            ..Default::default()
        });
        entries.len() - 1
    });
    &mut entries[pos]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(function: u32, index: u32, regs: [u32; 4]) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            flags: if function == LEAF_XSAVE || function == LEAF_TOPOLOGY {
                1
            } else {
                0
            },
            eax: regs[0],
            ebx: regs[1],
            ecx: regs[2],
            edx: regs[3],
            ..Default::default()
        }
    }

    fn find(v: &[kvm_cpuid_entry2], f: u32, i: u32) -> Option<kvm_cpuid_entry2> {
        v.iter().find(|x| x.function == f && x.index == i).copied()
    }

    fn supported() -> Vec<kvm_cpuid_entry2> {
        vec![
            e(0, 0, [0x1f, 0x6874_7541, 0x444d_4163, 0x6974_6e65]),
            e(
                1,
                0,
                [
                    0x00a2_0f12,
                    0x0001_0800,
                    0xfef8_3203 | (7 << 26),
                    0x178b_fbff,
                ],
            ),
            e(
                7,
                0,
                [
                    0,
                    0x219c_07ab | (1 << 5) | (1 << 16),
                    0x0040_0004 | (1 << 3),
                    0x10,
                ],
            ),
            e(7, 1, [0x30, 0, 0, 0]),
            e(0xb, 0, [1, 1, 0x100, 0]),
            e(0xb, 1, [0, 0, 0x201, 0]),
            e(0xd, 0, [0x7, 0x340, 0x340, 0]),
            e(0xd, 1, [0xf, 0x240, 0, 0]),
            e(
                KVM_CPUID_SIGNATURE,
                0,
                [KVM_CPUID_FEATURES, 0x4b4d_564b, 0x564b_4d56, 0x4d],
            ),
            e(KVM_CPUID_FEATURES, 0, [0x0101_fefb | (1 << 18), 0, 0, 0]),
        ]
    }

    #[test]
    fn xsave_is_hidden_and_leaf_d_dropped() {
        let cfg = CpuidConfig {
            vcpu_id: 2,
            nr_vcpus: 4,
            protect: false,
        };
        let out = patch(&supported(), cfg);
        let l1 = find(&out, 1, 0).unwrap();
        assert_eq!(l1.ecx & (7 << 26), 0);
        assert_eq!(
            l1.ecx & (ECX_FMA | ECX_F16C),
            0,
            "AVX-state extensions hidden with AVX"
        );
        assert_eq!(l1.ecx, 0xc2f8_2203, "other bits (hypervisor, ...) kept");
        assert_eq!(l1.ebx >> 24, 2, "APIC id");
        assert_eq!((l1.ebx >> 16) & 0xff, 4);
        assert_ne!(l1.edx & EDX_HTT, 0);
        assert!(out.iter().all(|x| x.function != 0xd));
        assert_eq!(find(&out, 0xb, 1).unwrap().edx, 2, "x2APIC id");
        let l7 = find(&out, 7, 0).unwrap();
        assert_eq!(
            l7.ebx,
            0x219c_07ab & !L7_EBX_XSTATE,
            "AVX2, AVX512F gone; SMEP, BMI kept"
        );
        assert_ne!(l7.ebx & (1 << 7), 0, "SMEP kept");
        assert_eq!(l7.ecx, 0x0040_0004, "PKU gone, UMIP and RDPID kept");
        assert_eq!(l7.edx, 0x10);
        assert_eq!(find(&out, 7, 1).unwrap().eax, 0);
        assert_eq!(out.len(), supported().len() - 2);
    }

    #[test]
    fn kvm_leaves_and_protected_bit() {
        let on = patch(
            &supported(),
            CpuidConfig {
                vcpu_id: 0,
                nr_vcpus: 1,
                protect: true,
            },
        );
        let sig = find(&on, KVM_CPUID_SIGNATURE, 0).unwrap();
        assert_eq!(
            [sig.eax, sig.ebx, sig.ecx, sig.edx],
            [0x4000_0001, 0x4b4d_564b, 0x564b_4d56, 0x4d]
        );
        let f = find(&on, KVM_CPUID_FEATURES, 0).unwrap();
        assert!(hypercall::has_mem_protected(f.eax));
        assert_eq!(f.eax & 0xffff, 0xfefb, "KVM's own bits kept");
        let off = patch(
            &supported(),
            CpuidConfig {
                vcpu_id: 0,
                nr_vcpus: 1,
                protect: false,
            },
        );
        let f = find(&off, KVM_CPUID_FEATURES, 0).unwrap();
        assert!(
            !hypercall::has_mem_protected(f.eax),
            "a patched KVM's bit is not passed on"
        );
        assert_eq!(find(&off, 1, 0).unwrap().edx & EDX_HTT, 0);
    }

    #[test]
    fn kvm_leaves_are_added_when_missing() {
        let bare: Vec<_> = supported()
            .into_iter()
            .filter(|x| x.function < 0x4000_0000)
            .collect();
        let out = patch(
            &bare,
            CpuidConfig {
                vcpu_id: 0,
                nr_vcpus: 1,
                protect: true,
            },
        );
        let sig = find(&out, KVM_CPUID_SIGNATURE, 0).unwrap();
        assert_eq!([sig.ebx, sig.ecx, sig.edx], KVM_SIGNATURE);
        assert_eq!(
            find(&out, KVM_CPUID_FEATURES, 0).unwrap().eax,
            1 << KVM_FEATURE_MEM_PROTECTED
        );
    }
}
