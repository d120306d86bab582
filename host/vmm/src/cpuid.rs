//! The guest's CPUID: KVM's supported set, made safe for a guest kernel,
//! with the KVM paravirt leaves and, with `--protect`, the protected-memory
//! feature bit.
//!
//! What a guest relies on is set explicitly rather than inherited from
//! whatever `KVM_GET_SUPPORTED_CPUID` of the host kernel reports, so the
//! guest sees the same machine on every host:
//! - leaf 1: HYPERVISOR (a stock 6.1 host does not report it, and without
//!   it Linux never looks for the KVM leaves), TSC_DEADLINE when the
//!   in-kernel LAPIC emulates it, APIC id and logical processor count;
//! - leaves 0x40000000/1: the KVM signature and exactly the paravirt
//!   features this VMM supports ([`KVM_PV_FEATURES`]), as far as the host
//!   offers them; leaf 0x40000010: the TSC and APIC bus rates in kHz;
//! - topology consistent with `--cpus`: one package of `nr_vcpus` cores,
//!   one thread each (leaves 0xB and 0x1F, 4, 0x80000008, 0x8000001E).
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

/// Leaf 1 ECX: TSC-deadline timer mode of the local APIC.
const ECX_TSC_DEADLINE: u32 = 1 << 24;
/// Leaf 1 ECX: running under a hypervisor.
const ECX_HYPERVISOR: u32 = 1 << 31;
/// Leaf 4: deterministic cache parameters (cores per package in EAX).
const LEAF_CACHE: u32 = 4;
/// Leaf 0x40000010: TSC and APIC bus frequencies (kHz).
const LEAF_TIMING: u32 = 0x4000_0010;
/// Leaf 0x80000008: address sizes and core count (ECX).
const LEAF_EXT_SIZES: u32 = 0x8000_0008;
/// Leaf 0x8000001E: extended APIC id, core and node ids (AMD).
const LEAF_EXT_APIC: u32 = 0x8000_001e;
/// KVM's local APIC timer runs at 1 GHz (one tick per nanosecond).
const APIC_BUS_KHZ: u32 = 1_000_000;

/// The KVM paravirt features (CPUID 0x40000001 EAX) this VMM offers when
/// the host has them: kvmclock (0, 3) and its stable bit (24), NOP_IO_DELAY
/// (1), async page faults (4, 10, 14), steal time (5), PV EOI (6), PV
/// unhalt (7), PV TLB flush (9), PV IPIs (11), poll control (12) and PV
/// sched yield (13). Not offered: MSI_EXT_DEST_ID (15, needs a split
/// irqchip), HC_MAP_GPA_RANGE (16, this VMM does not serve it),
/// MIGRATION_CONTROL (17); bit 18 is ours, set by `--protect` alone.
pub const KVM_PV_FEATURES: u32 = (1 << 0)
    | (1 << 1)
    | (1 << 3)
    | (1 << 4)
    | (1 << 5)
    | (1 << 6)
    | (1 << 7)
    | (1 << 9)
    | (1 << 10)
    | (1 << 11)
    | (1 << 12)
    | (1 << 13)
    | (1 << 14)
    | (1 << 24);

/// What to adapt the supported CPUID to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CpuidConfig {
    /// This vCPU's id, also its APIC id.
    pub vcpu_id: u32,
    /// Number of vCPUs.
    pub nr_vcpus: u32,
    /// Advertise `KVM_FEATURE_MEM_PROTECTED`.
    pub protect: bool,
    /// The in-kernel LAPIC emulates the TSC-deadline timer
    /// (`KVM_CAP_TSC_DEADLINE_TIMER`).
    pub tsc_deadline: bool,
    /// The guest's TSC rate in kHz (`KVM_GET_TSC_KHZ`), 0 if unknown.
    pub tsc_khz: u32,
}

/// Bits needed to number `n` items (the APIC id shift of a level).
fn id_bits(n: u32) -> u32 {
    n.max(1).next_power_of_two().trailing_zeros()
}

/// Adapts KVM's supported CPUID entries for one vCPU.
pub fn patch(supported: &[kvm_cpuid_entry2], cfg: CpuidConfig) -> Vec<kvm_cpuid_entry2> {
    let max_basic = supported
        .iter()
        .find(|e| e.function == 0)
        .map_or(0, |e| e.eax);
    let mut out: Vec<kvm_cpuid_entry2> = supported
        .iter()
        .filter(|e| {
            !matches!(e.function, LEAF_XSAVE | LEAF_TOPOLOGY | LEAF_TOPOLOGY_V2)
                && !(KVM_CPUID_SIGNATURE..=LEAF_TIMING).contains(&e.function)
        })
        .copied()
        .collect();
    let cores = cfg.nr_vcpus.max(1);
    for e in &mut out {
        match e.function {
            LEAF_FEATURES => {
                e.ecx &= !(ECX_FMA | ECX_XSAVE | ECX_OSXSAVE | ECX_AVX | ECX_F16C);
                e.ecx |= ECX_HYPERVISOR;
                if cfg.tsc_deadline {
                    e.ecx |= ECX_TSC_DEADLINE;
                } else {
                    e.ecx &= !ECX_TSC_DEADLINE;
                }
                e.ebx = (e.ebx & 0x0000_ffff) | (cfg.vcpu_id << 24) | ((cores & 0xff) << 16);
                if cores > 1 {
                    e.edx |= EDX_HTT;
                } else {
                    e.edx &= !EDX_HTT;
                }
            }
            LEAF_CACHE => {
                // EAX[31:26]: addressable core ids in the package - 1.
                let ids = cores.next_power_of_two() - 1;
                e.eax = (e.eax & 0x03ff_ffff) | ((ids & 0x3f) << 26);
                // EAX[25:14]: threads sharing this cache - 1; the level
                // (EAX[7:5]) 3 is shared by the package, 1 and 2 per core.
                let sharing = if (e.eax >> 5) & 7 == 3 { ids } else { 0 };
                e.eax = (e.eax & !(0xfff << 14)) | ((sharing & 0xfff) << 14);
            }
            LEAF_EXT_FEATURES if e.index == 0 => {
                e.ebx &= !L7_EBX_XSTATE;
                e.ecx &= !L7_ECX_XSTATE;
                e.edx &= !L7_EDX_XSTATE;
            }
            LEAF_EXT_FEATURES if e.index == 1 => e.eax &= !L7_1_EAX_XSTATE,
            LEAF_EXT_SIZES => {
                // ECX[15:12]: APIC id bits for cores; ECX[7:0]: cores - 1.
                e.ecx = (e.ecx & !0xf0ff) | (id_bits(cores) << 12) | ((cores - 1) & 0xff);
            }
            LEAF_EXT_APIC => {
                // One thread per core, one node.
                e.eax = cfg.vcpu_id;
                e.ebx = cfg.vcpu_id & 0xff;
                e.ecx = 0;
            }
            _ => {}
        }
    }
    for leaf in [LEAF_TOPOLOGY, LEAF_TOPOLOGY_V2] {
        if leaf <= max_basic && supported.iter().any(|e| e.function == leaf) {
            out.extend(topology(leaf, cfg.vcpu_id, cores));
        }
    }
    let mut features = supported
        .iter()
        .find(|e| e.function == KVM_CPUID_FEATURES)
        .map_or(0, |e| e.eax)
        & KVM_PV_FEATURES;
    if cfg.protect {
        features |= 1 << KVM_FEATURE_MEM_PROTECTED;
    }
    let [ebx, ecx, edx] = KVM_SIGNATURE;
    out.push(leaf(KVM_CPUID_SIGNATURE, [LEAF_TIMING, ebx, ecx, edx]));
    out.push(leaf(KVM_CPUID_FEATURES, [features, 0, 0, 0]));
    out.push(leaf(LEAF_TIMING, [cfg.tsc_khz, APIC_BUS_KHZ, 0, 0]));
    out
}

/// A leaf without subleaves.
fn leaf(function: u32, [eax, ebx, ecx, edx]: [u32; 4]) -> kvm_cpuid_entry2 {
    kvm_cpuid_entry2 {
        function,
        eax,
        ebx,
        ecx,
        edx,
        ..Default::default()
    }
}

/// Extended topology leaf `leaf` (0xB or 0x1F) of vCPU `id` in a package
/// of `cores` single-thread cores: subleaf 0 the SMT level, 1 the core
/// level, 2 the invalid level that ends the list.
fn topology(leaf: u32, id: u32, cores: u32) -> [kvm_cpuid_entry2; 3] {
    const SMT: u32 = 1 << 8;
    const CORE: u32 = 2 << 8;
    let sub = |index: u32, eax: u32, ebx: u32, ecx: u32| kvm_cpuid_entry2 {
        function: leaf,
        index,
        flags: FLAG_SIGNIFICANT_INDEX,
        eax,
        ebx,
        ecx,
        edx: id,
        ..Default::default()
    };
    [
        sub(0, 0, 1, SMT),
        sub(1, id_bits(cores), cores, 1 | CORE),
        sub(2, 0, 0, 2),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(function: u32, index: u32, regs: [u32; 4]) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            flags: if matches!(function, LEAF_XSAVE | LEAF_TOPOLOGY | 4) {
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

    fn cfg(vcpu_id: u32, nr_vcpus: u32, protect: bool) -> CpuidConfig {
        CpuidConfig {
            vcpu_id,
            nr_vcpus,
            protect,
            tsc_deadline: true,
            tsc_khz: 2_300_000,
        }
    }

    #[test]
    fn xsave_is_hidden_and_leaf_d_dropped() {
        let out = patch(&supported(), cfg(2, 4, false));
        let l1 = find(&out, 1, 0).unwrap();
        assert_eq!(l1.ecx & (7 << 26), 0);
        assert_eq!(
            l1.ecx & (ECX_FMA | ECX_F16C),
            0,
            "AVX-state extensions hidden with AVX"
        );
        assert_eq!(
            l1.ecx,
            0xc2f8_2203 | ECX_TSC_DEADLINE,
            "other bits (hypervisor, ...) kept"
        );
        assert_eq!(l1.ebx >> 24, 2, "APIC id");
        assert_eq!((l1.ebx >> 16) & 0xff, 4);
        assert_ne!(l1.edx & EDX_HTT, 0);
        assert!(out.iter().all(|x| x.function != 0xd));
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
    }

    #[test]
    fn hypervisor_and_tsc_deadline_are_explicit() {
        // A stock host kernel reports neither HYPERVISOR nor TSC_DEADLINE.
        let mut bare = supported();
        bare[1].ecx &= !(ECX_HYPERVISOR | ECX_TSC_DEADLINE);
        let out = patch(&bare, cfg(0, 1, false));
        let l1 = find(&out, 1, 0).unwrap();
        assert_ne!(l1.ecx & ECX_HYPERVISOR, 0);
        assert_ne!(l1.ecx & ECX_TSC_DEADLINE, 0);
        let mut no_deadline = cfg(0, 1, false);
        no_deadline.tsc_deadline = false;
        let l1 = find(&patch(&supported(), no_deadline), 1, 0).unwrap();
        assert_eq!(
            l1.ecx & ECX_TSC_DEADLINE,
            0,
            "not offered without the LAPIC support"
        );
        assert_ne!(l1.ecx & ECX_HYPERVISOR, 0);
    }

    #[test]
    fn kvm_leaves_and_protected_bit() {
        let on = patch(&supported(), cfg(0, 1, true));
        let sig = find(&on, KVM_CPUID_SIGNATURE, 0).unwrap();
        assert_eq!(
            [sig.eax, sig.ebx, sig.ecx, sig.edx],
            [LEAF_TIMING, 0x4b4d_564b, 0x564b_4d56, 0x4d]
        );
        let f = find(&on, KVM_CPUID_FEATURES, 0).unwrap();
        assert!(hypercall::has_mem_protected(f.eax));
        assert_eq!(
            f.eax,
            (0x0101_fefb & KVM_PV_FEATURES) | (1 << KVM_FEATURE_MEM_PROTECTED),
            "the host's PV bits that this VMM supports, and ours"
        );
        assert_eq!(
            f.eax & (1 << 15 | 1 << 16 | 1 << 17),
            0,
            "MSI_EXT_DEST_ID, MAP_GPA_RANGE, MIGRATION_CONTROL"
        );
        let t = find(&on, LEAF_TIMING, 0).unwrap();
        assert_eq!([t.eax, t.ebx], [2_300_000, APIC_BUS_KHZ]);
        let off = patch(&supported(), cfg(0, 1, false));
        let f = find(&off, KVM_CPUID_FEATURES, 0).unwrap();
        assert!(
            !hypercall::has_mem_protected(f.eax),
            "a patched KVM's bit is not passed on"
        );
        assert_eq!(find(&off, 1, 0).unwrap().edx & EDX_HTT, 0);
        let n = |v: &[kvm_cpuid_entry2], f: u32| v.iter().filter(|e| e.function == f).count();
        assert_eq!(n(&off, KVM_CPUID_SIGNATURE), 1, "one entry per KVM leaf");
        assert_eq!(n(&off, KVM_CPUID_FEATURES), 1);
    }

    #[test]
    fn kvm_leaves_are_added_when_missing() {
        let bare: Vec<_> = supported()
            .into_iter()
            .filter(|x| x.function < 0x4000_0000)
            .collect();
        let out = patch(&bare, cfg(0, 1, true));
        let sig = find(&out, KVM_CPUID_SIGNATURE, 0).unwrap();
        assert_eq!([sig.ebx, sig.ecx, sig.edx], KVM_SIGNATURE);
        assert_eq!(
            find(&out, KVM_CPUID_FEATURES, 0).unwrap().eax,
            1 << KVM_FEATURE_MEM_PROTECTED
        );
    }

    #[test]
    fn topology_matches_the_vcpu_count() {
        let mut sup = supported();
        sup.push(e(4, 0, [0x121, 0, 0, 0]));
        sup.push(e(4, 3, [0x163, 0, 0, 0]));
        sup.push(e(LEAF_EXT_SIZES, 0, [0x3030, 0, 0x7003, 0]));
        sup.push(e(LEAF_EXT_APIC, 0, [5, 0x105, 0x300, 0]));
        for (id, n) in [(0, 1), (3, 4), (2, 3)] {
            let out = patch(&sup, cfg(id, n, true));
            let smt = find(&out, 0xb, 0).unwrap();
            let core = find(&out, 0xb, 1).unwrap();
            let end = find(&out, 0xb, 2).unwrap();
            assert_eq!([smt.eax, smt.ebx, smt.ecx >> 8, smt.edx], [0, 1, 1, id]);
            let bits = n.next_power_of_two().trailing_zeros();
            assert_eq!(
                [core.eax, core.ebx, core.ecx, core.edx],
                [bits, n, 0x201, id]
            );
            assert_eq!((end.ebx, end.ecx >> 8), (0, 0), "end of the list");
            assert_eq!(out.iter().filter(|x| x.function == 0xb).count(), 3);
            let sizes = find(&out, LEAF_EXT_SIZES, 0).unwrap();
            assert_eq!(sizes.ecx & 0xff, n - 1, "cores - 1");
            assert_eq!((sizes.ecx >> 12) & 0xf, bits);
            let l2 = find(&out, 4, 0).unwrap();
            let l3 = find(&out, 4, 3).unwrap();
            assert_eq!(l2.eax >> 26, n.next_power_of_two() - 1);
            assert_eq!((l2.eax >> 14) & 0xfff, 0, "L1/L2 per core");
            assert_eq!(
                (l3.eax >> 14) & 0xfff,
                n.next_power_of_two() - 1,
                "L3 shared"
            );
            let apic = find(&out, LEAF_EXT_APIC, 0).unwrap();
            assert_eq!([apic.eax, apic.ebx, apic.ecx], [id, id, 0]);
        }
    }
}
