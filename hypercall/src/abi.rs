// SPDX-License-Identifier: GPL-2.0

//! KVM protected-memory paravirtual ABI: feature bit, hypercall numbers,
//! argument and error encoding.
//!
//! This file is the single definition of the interface between a protected
//! guest and its host. Cargo builds it as the `hypercall` crate (host VMM,
//! tests); the kernel build compiles the very same file into the guest, as
//! the `abi` module of the KVM protected memory guest. It must stay
//! `no_std`, free of allocation and free of crate-level attributes.
//!
//! C header: [`include/uapi/linux/kvm_para.h`](srctree/include/uapi/linux/kvm_para.h)
//! and [`arch/x86/include/uapi/asm/kvm_para.h`](srctree/arch/x86/include/uapi/asm/kvm_para.h).
//!
//! | name | value | a0 | a1 | a2 |
//! |---|---|---|---|---|
//! | `KVM_FEATURE_MEM_PROTECTED` | CPUID 0x40000001 EAX bit 18 | | | |
//! | `KVM_HC_ENABLE_MEM_PROTECTED` | 13 | | | |
//! | `KVM_HC_MEM_SHARE` | 14 | GPA, 4 KiB aligned | pages, >= 1 | flags, 0 |
//! | `KVM_HC_MEM_UNSHARE` | 15 | GPA, 4 KiB aligned | pages, >= 1 | flags, 0 |
//!
//! After ENABLE returns 0 all guest RAM is private. SHARE makes a range
//! accessible to the host, UNSHARE takes it back. ENABLE may be issued again
//! (reboot, kexec): it makes all memory private and drops every share. The
//! contents of a range are unspecified after SHARE or UNSHARE; ENABLE keeps
//! all contents.

/// CPUID leaf that returns the "KVMKVMKVM\0\0\0" signature in EBX, ECX, EDX.
pub const KVM_CPUID_SIGNATURE: u32 = 0x4000_0000;

/// The KVM signature as CPUID returns it in EBX, ECX and EDX.
pub const KVM_SIGNATURE: [u32; 3] = [0x4b4d_564b, 0x564b_4d56, 0x0000_004d];

/// CPUID leaf (relative to the KVM base) whose EAX holds the feature bits.
pub const KVM_CPUID_FEATURES: u32 = 0x4000_0001;

/// EAX bit of [`KVM_CPUID_FEATURES`]: the host offers protected memory.
pub const KVM_FEATURE_MEM_PROTECTED: u32 = 18;

/// Make all guest RAM private. No arguments.
pub const KVM_HC_ENABLE_MEM_PROTECTED: u64 = 13;

/// Share a range of guest pages with the host: a0 = GPA, a1 = pages, a2 = 0.
pub const KVM_HC_MEM_SHARE: u64 = 14;

/// Make a range of guest pages private again: a0 = GPA, a1 = pages, a2 = 0.
pub const KVM_HC_MEM_UNSHARE: u64 = 15;

/// log2 of the page size the hypercalls count in.
pub const PAGE_SHIFT: u32 = 12;

/// The page size the hypercalls count in (4 KiB, whatever the guest maps).
pub const PAGE_SIZE: u64 = 1 << PAGE_SHIFT;

/// `KVM_EPERM`: SHARE or UNSHARE before ENABLE, or while another vCPU's
/// ENABLE is in progress.
pub const KVM_EPERM: u64 = 1;

/// `KVM_ENOMEM`: the host could not allocate what the conversion needs.
pub const KVM_ENOMEM: u64 = 12;

/// `KVM_EFAULT`: the range is not entirely guest RAM.
pub const KVM_EFAULT: u64 = 14;

/// `KVM_EINVAL`: unaligned GPA, zero pages, overflowing range, nonzero flags.
pub const KVM_EINVAL: u64 = 22;

/// `KVM_ENOSYS`: the host does not offer this hypercall.
pub const KVM_ENOSYS: u64 = 1000;

/// Why a protected-memory hypercall failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Error {
    /// `-KVM_EPERM`: SHARE or UNSHARE before ENABLE, or during another
    /// vCPU's ENABLE.
    Permission,
    /// `-KVM_ENOMEM`: the host ran out of memory; nothing changed.
    NoMemory,
    /// `-KVM_EFAULT`: the range is not entirely guest RAM.
    Fault,
    /// `-KVM_EINVAL`: malformed arguments.
    Invalid,
    /// `-KVM_ENOSYS`: the host does not offer the hypercall.
    NotSupported,
    /// A value this ABI does not define, kept as the host returned it.
    ///
    /// A guest must treat it as a failure: the host is not trusted.
    Unexpected(u64),
}

impl Error {
    /// The value a host returns in RAX for this error.
    pub const fn to_ret(self) -> u64 {
        match self {
            Error::Permission => KVM_EPERM.wrapping_neg(),
            Error::NoMemory => KVM_ENOMEM.wrapping_neg(),
            Error::Fault => KVM_EFAULT.wrapping_neg(),
            Error::Invalid => KVM_EINVAL.wrapping_neg(),
            Error::NotSupported => KVM_ENOSYS.wrapping_neg(),
            Error::Unexpected(ret) => ret,
        }
    }

    /// The error's name as the uapi header spells it.
    pub const fn name(self) -> &'static str {
        match self {
            Error::Permission => "KVM_EPERM",
            Error::NoMemory => "KVM_ENOMEM",
            Error::Fault => "KVM_EFAULT",
            Error::Invalid => "KVM_EINVAL",
            Error::NotSupported => "KVM_ENOSYS",
            Error::Unexpected(_) => "unexpected",
        }
    }
}

/// Decodes the value a host returned in RAX.
///
/// Zero is success; the errors of this ABI map to their variants;
/// anything else (a host may refuse with any value) is
/// [`Error::Unexpected`].
pub const fn decode_ret(ret: u64) -> Result<(), Error> {
    match ret.wrapping_neg() {
        0 => Ok(()),
        KVM_EPERM => Err(Error::Permission),
        KVM_ENOMEM => Err(Error::NoMemory),
        KVM_EFAULT => Err(Error::Fault),
        KVM_EINVAL => Err(Error::Invalid),
        KVM_ENOSYS => Err(Error::NotSupported),
        _ => Err(Error::Unexpected(ret)),
    }
}

/// Encodes a result as the value a host returns in RAX.
pub const fn encode_ret(res: Result<(), Error>) -> u64 {
    match res {
        Ok(()) => 0,
        Err(e) => e.to_ret(),
    }
}

/// A non-empty range of whole 4 KiB guest-physical pages.
///
/// # Invariants
///
/// `gpa` is a multiple of [`PAGE_SIZE`], `npages >= 1`, and
/// `gpa + npages * PAGE_SIZE` does not overflow `u64`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GpaRange {
    gpa: u64,
    npages: u64,
}

impl GpaRange {
    /// Checks a GPA and page count the way the host must.
    ///
    /// Returns [`Error::Invalid`] for an unaligned GPA, zero pages, or a range
    /// whose end does not fit in 64 bits.
    pub const fn new(gpa: u64, npages: u64) -> Result<Self, Error> {
        if gpa & (PAGE_SIZE - 1) != 0 || npages == 0 {
            return Err(Error::Invalid);
        }
        let Some(len) = npages.checked_mul(PAGE_SIZE) else {
            return Err(Error::Invalid);
        };
        if gpa.checked_add(len).is_none() {
            return Err(Error::Invalid);
        }
        // INVARIANT: checked above.
        Ok(GpaRange { gpa, npages })
    }

    /// The range of pages `first_pfn .. first_pfn + npages`.
    pub const fn from_pfn(first_pfn: u64, npages: u64) -> Result<Self, Error> {
        if first_pfn > (u64::MAX >> PAGE_SHIFT) {
            return Err(Error::Invalid);
        }
        Self::new(first_pfn << PAGE_SHIFT, npages)
    }

    /// First guest-physical address of the range.
    pub const fn gpa(&self) -> u64 {
        self.gpa
    }

    /// Number of 4 KiB pages in the range (at least one).
    pub const fn npages(&self) -> u64 {
        self.npages
    }

    /// First page frame number of the range.
    pub const fn first_pfn(&self) -> u64 {
        self.gpa >> PAGE_SHIFT
    }

    /// One past the last page frame number of the range.
    pub const fn end_pfn(&self) -> u64 {
        self.first_pfn() + self.npages
    }

    /// Length of the range in bytes.
    pub const fn len(&self) -> u64 {
        // No overflow: type invariant.
        self.npages * PAGE_SIZE
    }

    /// Always false: a range has at least one page (type invariant).
    pub const fn is_empty(&self) -> bool {
        false
    }

    /// One past the last guest-physical address of the range.
    ///
    /// Saturates at `u64::MAX` for a range that ends at the top of the
    /// address space.
    pub const fn end(&self) -> u64 {
        self.gpa.saturating_add(self.len())
    }

    /// Whether `gpa` lies inside the range.
    pub const fn contains(&self, gpa: u64) -> bool {
        gpa >= self.gpa && gpa - self.gpa < self.len()
    }
}

/// A protected-memory hypercall with its arguments.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hypercall {
    /// `KVM_HC_ENABLE_MEM_PROTECTED`.
    Enable,
    /// `KVM_HC_MEM_SHARE`.
    Share(GpaRange),
    /// `KVM_HC_MEM_UNSHARE`.
    Unshare(GpaRange),
}

impl Hypercall {
    /// The hypercall number (RAX).
    pub const fn nr(&self) -> u64 {
        match self {
            Hypercall::Enable => KVM_HC_ENABLE_MEM_PROTECTED,
            Hypercall::Share(_) => KVM_HC_MEM_SHARE,
            Hypercall::Unshare(_) => KVM_HC_MEM_UNSHARE,
        }
    }

    /// The arguments a0, a1, a2 (RBX, RCX, RDX).
    pub const fn args(&self) -> [u64; 3] {
        match self {
            Hypercall::Enable => [0; 3],
            Hypercall::Share(r) | Hypercall::Unshare(r) => [r.gpa, r.npages, 0],
        }
    }

    /// The hypercall's name as the uapi header spells it.
    pub const fn name(&self) -> &'static str {
        match self {
            Hypercall::Enable => "KVM_HC_ENABLE_MEM_PROTECTED",
            Hypercall::Share(_) => "KVM_HC_MEM_SHARE",
            Hypercall::Unshare(_) => "KVM_HC_MEM_UNSHARE",
        }
    }

    /// Whether `nr` is one of this ABI's hypercall numbers.
    pub const fn is_ours(nr: u64) -> bool {
        matches!(
            nr,
            KVM_HC_ENABLE_MEM_PROTECTED | KVM_HC_MEM_SHARE | KVM_HC_MEM_UNSHARE
        )
    }

    /// Decodes what a guest passed, as a host must before acting on it.
    ///
    /// Returns `None` when `nr` is not a protected-memory hypercall, and
    /// `Some(Err(Error::Invalid))` for malformed arguments.
    pub const fn decode(nr: u64, args: [u64; 3]) -> Option<Result<Self, Error>> {
        let [gpa, npages, flags] = args;
        let share = nr == KVM_HC_MEM_SHARE;
        match nr {
            KVM_HC_ENABLE_MEM_PROTECTED => Some(Ok(Hypercall::Enable)),
            KVM_HC_MEM_SHARE | KVM_HC_MEM_UNSHARE => {
                if flags != 0 {
                    return Some(Err(Error::Invalid));
                }
                match GpaRange::new(gpa, npages) {
                    Ok(r) if share => Some(Ok(Hypercall::Share(r))),
                    Ok(r) => Some(Ok(Hypercall::Unshare(r))),
                    Err(e) => Some(Err(e)),
                }
            }
            _ => None,
        }
    }
}

/// Executes hypercalls: the `vmcall`/`vmmcall` instruction in a guest, or
/// a software host in tests.
///
/// Issuing one is `unsafe`: a protected-memory hypercall changes which
/// guest pages the host may read and write. SHARE exposes a page's
/// contents; UNSHARE and ENABLE take pages away from the host (and, on a
/// guest_memfd host, discard their contents on the other side), breaking
/// any device or host mapping that still uses them.
pub trait Hypervisor {
    /// Issues hypercall `nr` with arguments a0..a2 and returns RAX.
    ///
    /// # Safety
    ///
    /// If `nr` and `args` name a valid conversion, the caller must own
    /// every page in it: no data that must stay private may be in a page
    /// it shares, and nothing (the host, a device, the guest's own DMA
    /// mappings) may still rely on a page it makes private. Calls the
    /// host must refuse (bad arguments) change nothing.
    unsafe fn hypercall(&mut self, nr: u64, args: [u64; 3]) -> u64;
}

/// Issues `call` through `hv` and decodes the host's reply.
///
/// # Safety
///
/// As [`Hypervisor::hypercall`], for the pages `call` names (all guest
/// RAM for [`Hypercall::Enable`]).
pub unsafe fn issue<H: Hypervisor + ?Sized>(hv: &mut H, call: Hypercall) -> Result<(), Error> {
    // SAFETY: the caller owns the pages `call` names.
    decode_ret(unsafe { hv.hypercall(call.nr(), call.args()) })
}

/// Whether CPUID leaf `KVM_CPUID_FEATURES` EAX advertises protected memory.
pub const fn has_mem_protected(features_eax: u32) -> bool {
    features_eax & (1 << KVM_FEATURE_MEM_PROTECTED) != 0
}
