// SPDX-License-Identifier: GPL-2.0

//! The one wrapper around the KVM hypercall instruction, and around the
//! other instructions the guest executes itself: CPUID leaf 0 (the
//! vendor, which picks the instruction), the TSC read the conversion
//! benchmark times with, and reads of the KVM paravirt MSRs that register
//! per-CPU memory with the host (checked by KUnit).
//!
//! No other code of the KVM protected memory guest executes `vmcall`,
//! `vmmcall`, `cpuid`, `rdtsc` or `rdmsr`. Issuing a hypercall is
//! `unsafe` ([`Hypervisor::hypercall`]),
//! because a conversion changes which pages the host may access.
//! Crate-private: nothing outside this module crate can reach it. KVM is
//! detected with the tree's own `kvm_para_available()`.
//!
//! Why not `kvm_hypercall3()` through a `rust_helper_*`: it is an
//! `ALTERNATIVE` of `vmcall` and `vmmcall`, patched by
//! `apply_alternatives()` late in `start_kernel()`, but ENABLE is issued
//! from `setup_arch()`, before that. Unpatched, an AMD guest executes
//! `vmcall`, which KVM handles by rewriting the instruction in guest
//! memory (`KVM_X86_QUIRK_FIX_HYPERCALL_INSN`): a host write into the
//! guest's kernel text, which protection is meant to rule out. This
//! module picks the instruction from the CPU vendor instead, as the
//! alternative would.
//!
//! C header: [`arch/x86/include/asm/kvm_para.h`](srctree/arch/x86/include/asm/kvm_para.h)

use crate::abi::Hypervisor;
#[cfg(CONFIG_KVM_PROTMEM_KUNIT_TEST)]
use crate::PvFeature;
use core::arch::asm;
use kernel::{
    bindings,
    sync::atomic::{Atomic, Relaxed},
};

/// The KVM paravirt feature bits (`KVM_CPUID_FEATURES` EAX), if on KVM:
/// the tree's own detection (`kvm_para_available()`, which finds the KVM
/// CPUID leaves wherever they sit, and `kvm_arch_para_features()`).
pub(crate) fn kvm_features() -> Option<u32> {
    // SAFETY: plain calls into arch/x86/kernel/kvm.c, valid from
    // `kvm_init_platform()` on (which calls them itself); they execute
    // CPUID only.
    unsafe { bindings::kvm_para_available().then(|| bindings::kvm_arch_para_features()) }
}

/// Registers returned by CPUID.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct CpuidResult {
    eax: u32,
    ebx: u32,
    ecx: u32,
    edx: u32,
}

/// Executes CPUID for `leaf` (subleaf 0).
fn cpuid(leaf: u32) -> CpuidResult {
    let (eax, ebx, ecx, edx): (u32, u32, u32, u32);
    // SAFETY: CPUID is available on every x86-64 CPU, has no memory side
    // effects and writes only the four output registers. RBX is reserved
    // by LLVM, so it is saved in a scratch register around the instruction.
    unsafe {
        asm!(
            "mov {tmp:r}, rbx",
            "cpuid",
            "xchg {tmp:r}, rbx",
            tmp = out(reg) ebx,
            inout("eax") leaf => eax,
            inout("ecx") 0u32 => ecx,
            out("edx") edx,
            options(nostack, preserves_flags, nomem),
        );
    }
    CpuidResult { eax, ebx, ecx, edx }
}

/// Whether the CPU is AMD or Hygon (CPUID leaf 0's vendor string): those
/// take `vmmcall`, as the `X86_FEATURE_VMMCALL` alternative in
/// `kvm_hypercall*()` picks.
fn uses_vmmcall() -> bool {
    let r = cpuid(0);
    let vendor = [r.ebx, r.edx, r.ecx];
    // "AuthenticAMD", "HygonGenuine".
    vendor == [0x6874_7541, 0x6974_6e65, 0x444d_4163]
        || vendor == [0x6f67_7948, 0x6e65_476e, 0x656e_6975]
}

/// Reads the TSC after every earlier instruction has completed (`lfence;
/// rdtsc`, as `rdtsc_ordered()`), for timing.
pub(crate) fn tsc() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: RDTSC is available on every x86-64 CPU (the kernel requires
    // X86_FEATURE_TSC) and only writes EDX:EAX; LFENCE has no effect but
    // ordering.
    unsafe {
        asm!(
            "lfence",
            "rdtsc",
            out("eax") lo,
            out("edx") hi,
            options(nostack, preserves_flags, nomem),
        );
    }
    (u64::from(hi) << 32) | u64::from(lo)
}

/// The value of the KVM paravirt MSR through which this CPU registers
/// `feature`'s per-CPU data with the host (bit 0: enabled; the page
/// address above), if the host offers the feature.
#[cfg(CONFIG_KVM_PROTMEM_KUNIT_TEST)]
pub(crate) fn pv_msr(feature: PvFeature) -> Option<u64> {
    // KVM lets a guest read these MSRs when it offers the feature the
    // host checks for them (async PF: KVM_FEATURE_ASYNC_PF).
    let (bit, msr) = match feature {
        PvFeature::AsyncPf => (
            bindings::KVM_FEATURE_ASYNC_PF,
            bindings::MSR_KVM_ASYNC_PF_EN,
        ),
        PvFeature::StealTime => (
            bindings::KVM_FEATURE_STEAL_TIME,
            bindings::MSR_KVM_STEAL_TIME,
        ),
        PvFeature::Eoi => (bindings::KVM_FEATURE_PV_EOI, bindings::MSR_KVM_PV_EOI_EN),
    };
    if kvm_features()? & (1 << bit) == 0 {
        return None;
    }
    let (lo, hi): (u32, u32);
    // SAFETY: on KVM (`kvm_features()` found its signature), which offers
    // `feature`: reading its MSR does not fault. RDMSR only writes EDX:EAX.
    unsafe {
        asm!(
            "rdmsr",
            in("ecx") msr,
            out("eax") lo,
            out("edx") hi,
            options(nostack, preserves_flags, nomem),
        );
    }
    Some((u64::from(hi) << 32) | u64::from(lo))
}

/// The KVM hypercall instruction of this CPU.
///
/// # Invariants
///
/// Only constructed when the tree's detection found KVM.
pub(crate) struct Kvm {
    vmmcall: bool,
}

/// What [`Kvm::probe`] found: 0 not probed or not KVM, 1 `vmcall`, 2 `vmmcall`.
static PROBED: Atomic<u32> = Atomic::new(0);

impl Kvm {
    /// Returns the hypercall interface if running on KVM, and remembers it
    /// for [`Kvm::get`].
    pub(crate) fn probe() -> Option<Self> {
        kvm_features()?;
        let vmmcall = uses_vmmcall();
        PROBED.store(if vmmcall { 2 } else { 1 }, Relaxed);
        // INVARIANT: the KVM signature was found.
        Some(Kvm { vmmcall })
    }

    /// The interface [`Kvm::probe`] found, without executing CPUID (which
    /// traps to the host).
    pub(crate) fn get() -> Option<Self> {
        match PROBED.load(Relaxed) {
            // INVARIANT: `probe()` found the KVM signature.
            1 => Some(Kvm { vmmcall: false }),
            2 => Some(Kvm { vmmcall: true }),
            _ => None,
        }
    }
}

/// Executes the hypercall instruction `$insn` with RAX = `$nr`, RBX =
/// `$a0`, RCX = `$a1`, RDX = `$a2`; evaluates to RAX.
macro_rules! kvm_hypercall3 {
    ($insn:literal, $nr:expr, $a0:expr, $a1:expr, $a2:expr) => {{
        let ret: u64;
        // On KVM a hypercall traps to the host, which writes only RAX; the
        // protected-memory hypercalls touch no memory the compiler knows of.
        // SAFETY: only `Kvm` (type invariant: on KVM) uses this; RBX, which
        // LLVM reserves, is swapped in and out around the instruction.
        unsafe {
            asm!(
                "xchg {a0}, rbx",
                $insn,
                "xchg {a0}, rbx",
                a0 = inout(reg) $a0 => _,
                inout("rax") $nr => ret,
                in("rcx") $a1,
                in("rdx") $a2,
                options(nostack),
            );
        }
        ret
    }};
}

impl Hypervisor for Kvm {
    unsafe fn hypercall(&mut self, nr: u64, args: [u64; 3]) -> u64 {
        let [a0, a1, a2] = args;
        if self.vmmcall {
            kvm_hypercall3!("vmmcall", nr, a0, a1, a2)
        } else {
            kvm_hypercall3!("vmcall", nr, a0, a1, a2)
        }
    }
}
