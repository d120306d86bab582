//! The KVM half of guest_memfd protection (`--protect=gmem`): what the host
//! must offer, the software-protected VM with its guest_memfd memslot and
//! KVM-owned protected memory (`KVM_CAP_X86_PROTECTED_MEMORY`), and
//! [`PrivateMemory`] over `KVM_SW_PROTECTED_POPULATE`.
//!
//! Both come from this project's KVM patches (`host/patches/0003-*`,
//! `0007-*`, documented in `Documentation/virt/kvm/api.rst`); the numbers
//! below are their uapi, checked against the headers by `cargo xtask test`.

use std::fs::File;
use std::io;
use std::os::fd::FromRawFd;
use std::sync::Arc;

use kvm_bindings::{
    kvm_create_guest_memfd, kvm_enable_cap, kvm_pre_fault_memory, kvm_userspace_memory_region2,
    KVM_CAP_GUEST_MEMFD, KVM_CAP_MEMORY_ATTRIBUTES, KVM_CAP_VM_TYPES, KVM_MEMORY_ATTRIBUTE_PRIVATE,
    KVM_MEM_GUEST_MEMFD, KVM_X86_SW_PROTECTED_VM,
};
use kvm_ioctls::{Kvm, VmFd};
use vmm_sys_util::ioctl::ioctl_with_mut_ref;

use crate::gmem::{GmemError, PrivateMemory};
use crate::kick;

/// `KVM_CAP_SW_PROTECTED_POPULATE` (include/uapi/linux/kvm.h, our patch).
pub const KVM_CAP_SW_PROTECTED_POPULATE: u32 = 250;
/// `KVM_CAP_X86_PROTECTED_MEMORY` (include/uapi/linux/kvm.h, our patch):
/// KVM applies the protected-memory hypercalls and locks the VMM out.
pub const KVM_CAP_X86_PROTECTED_MEMORY: u32 = 251;
/// `KVM_EXIT_HYPERCALL_APPLIED` (arch/x86/include/uapi/asm/kvm.h, our
/// patch): a `KVM_EXIT_HYPERCALL` flag, KVM already carried the call out.
pub const KVM_EXIT_HYPERCALL_APPLIED: u64 = 1 << 1;
/// `KVMIO`, the KVM ioctl type.
const KVMIO: u32 = 0xae;

/// `struct kvm_sw_protected_populate` (include/uapi/linux/kvm.h, our patch).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KvmSwProtectedPopulate {
    /// In/out: first GPA left to populate.
    pub gpa: u64,
    /// In/out: bytes left.
    pub size: u64,
    /// In/out: userspace address of the data for `gpa`.
    pub source: u64,
    /// Must be 0.
    pub flags: u64,
    /// Must be 0.
    pub padding: [u64; 4],
}

/// `KVM_SW_PROTECTED_POPULATE`: `_IOWR(KVMIO, 0xd6, struct
/// kvm_sw_protected_populate)` (direction read|write = 3).
pub const KVM_SW_PROTECTED_POPULATE: libc::c_ulong = (3 << 30)
    | ((std::mem::size_of::<KvmSwProtectedPopulate>() as libc::c_ulong) << 16)
    | ((KVMIO as libc::c_ulong) << 8)
    | 0xd6;

/// What `--protect=gmem` needs from the host and did not find.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// A capability is missing.
    #[error(
        "--protect=gmem: the host KVM lacks {what}; use --protect=view on this host \
         (private memory then stays mapped in the VMM, fenced from devices)"
    )]
    Missing {
        /// What is missing, in words.
        what: &'static str,
    },
    /// A KVM call while building the VM failed.
    #[error("--protect=gmem: {op} failed: {err}")]
    Setup {
        /// The operation.
        op: &'static str,
        /// The error.
        err: kvm_ioctls::Error,
    },
}

/// Checks that the host offers everything `--protect=gmem` uses.
pub fn check_host(kvm: &Kvm) -> Result<(), HostError> {
    let cap = |c: u32| kvm.check_extension_raw(c.into());
    let missing = |what| Err(HostError::Missing { what });
    if cap(KVM_CAP_VM_TYPES) & (1 << KVM_X86_SW_PROTECTED_VM) == 0 {
        return missing("KVM_X86_SW_PROTECTED_VM (KVM_CAP_VM_TYPES; CONFIG_KVM_SW_PROTECTED_VM and the TDP MMU)");
    }
    if cap(KVM_CAP_GUEST_MEMFD) <= 0 {
        return missing("guest_memfd (KVM_CAP_GUEST_MEMFD)");
    }
    if cap(KVM_CAP_MEMORY_ATTRIBUTES) as u32 & KVM_MEMORY_ATTRIBUTE_PRIVATE == 0 {
        return missing("private memory attributes (KVM_CAP_MEMORY_ATTRIBUTES)");
    }
    if cap(KVM_CAP_SW_PROTECTED_POPULATE) <= 0 {
        return missing(
            "KVM_SW_PROTECTED_POPULATE (the populate patch, KVM_CAP_SW_PROTECTED_POPULATE)",
        );
    }
    if cap(KVM_CAP_X86_PROTECTED_MEMORY) <= 0 {
        return missing(
            "KVM-owned protected memory (the hypercall patch, KVM_CAP_X86_PROTECTED_MEMORY)",
        );
    }
    Ok(())
}

/// Lets KVM own the private memory of `vm`, before its vCPUs exist: KVM
/// applies ENABLE, SHARE and UNSHARE itself, populating is allowed only
/// during an ENABLE, and vCPU state is locked once the guest enabled it.
pub fn enable_protected_memory(vm: &VmFd) -> Result<(), HostError> {
    let cap = kvm_enable_cap {
        cap: KVM_CAP_X86_PROTECTED_MEMORY,
        ..Default::default()
    };
    vm.enable_cap(&cap).map_err(|err| HostError::Setup {
        op: "KVM_ENABLE_CAP(KVM_CAP_X86_PROTECTED_MEMORY)",
        err,
    })
}

/// The VM type to create for `--protect=gmem`.
pub const VM_TYPE: u64 = KVM_X86_SW_PROTECTED_VM as u64;

/// Creates the guest_memfd of `size` bytes for `vm` and makes it memslot 0
/// from GPA 0, with `shared_host` (the memfd mapping) as the shared
/// backing. Returns the guest_memfd.
///
/// # Safety
///
/// `shared_host .. shared_host + size` must stay mapped for as long as the
/// VM exists (KVM accesses it for shared pages).
pub unsafe fn add_gmem_slot(vm: &VmFd, size: u64, shared_host: u64) -> Result<File, HostError> {
    let fd = vm
        .create_guest_memfd(kvm_create_guest_memfd {
            size,
            flags: 0,
            ..Default::default()
        })
        .map_err(|err| HostError::Setup {
            op: "KVM_CREATE_GUEST_MEMFD",
            err,
        })?;
    // SAFETY: KVM just returned this descriptor and nothing else owns it.
    let gmem = unsafe { File::from_raw_fd(fd) };
    let region = kvm_userspace_memory_region2 {
        slot: 0,
        flags: KVM_MEM_GUEST_MEMFD,
        guest_phys_addr: 0,
        memory_size: size,
        userspace_addr: shared_host,
        guest_memfd_offset: 0,
        guest_memfd: fd as u32,
        ..Default::default()
    };
    // SAFETY: the shared range stays mapped as long as the VM (caller); the
    // guest_memfd is owned by `gmem`, which the caller keeps with the VM.
    unsafe { vm.set_user_memory_region2(region) }.map_err(|err| HostError::Setup {
        op: "KVM_SET_USER_MEMORY_REGION2 (guest_memfd slot)",
        err,
    })?;
    Ok(gmem)
}

/// [`PrivateMemory`] of one software-protected VM.
pub struct KvmPrivate {
    vm: Arc<VmFd>,
    gmem: File,
    /// Host address of GPA 0 in the shared backing (the populate source).
    shared_host: u64,
}

impl KvmPrivate {
    /// The private side of `vm`, whose memslot 0 has `gmem` and `shared_host`.
    pub fn new(vm: Arc<VmFd>, gmem: File, shared_host: u64) -> Self {
        KvmPrivate {
            vm,
            gmem,
            shared_host,
        }
    }

    /// The guest_memfd.
    pub fn file(&self) -> &File {
        &self.gmem
    }
}

fn kvm_err(op: &'static str, gpa: u64, len: u64, err: io::Error) -> GmemError {
    GmemError::Kvm {
        op,
        start: gpa,
        end: gpa.saturating_add(len),
        err,
    }
}

impl PrivateMemory for KvmPrivate {
    fn populate(&mut self, gpa: u64, len: u64) -> Result<(), GmemError> {
        let mut arg = KvmSwProtectedPopulate {
            gpa,
            size: len,
            source: self.shared_host + gpa,
            ..Default::default()
        };
        let vm = self.vm.clone();
        populate_until_done(
            &mut arg,
            |a| {
                // SAFETY: the ioctl reads and writes exactly one
                // `KvmSwProtectedPopulate`, which `a` is; KVM reads the
                // source pages through GUP, from the shared mapping we own.
                let rc = unsafe { ioctl_with_mut_ref(&*vm, KVM_SW_PROTECTED_POPULATE, a) };
                if rc == 0 {
                    Ok(())
                } else {
                    Err(io::Error::last_os_error())
                }
            },
            kick::stopping,
        )
    }
}

// `KVM_PRE_FAULT_MEMORY` (include/uapi/linux/kvm.h), a vCPU ioctl.
mod pre_fault_nr {
    #![allow(missing_docs)]
    use super::{kvm_pre_fault_memory, KVMIO};
    vmm_sys_util::ioctl_iowr_nr!(KVM_PRE_FAULT_MEMORY, KVMIO, 0xd5, kvm_pre_fault_memory);
}
use pre_fault_nr::KVM_PRE_FAULT_MEMORY;

/// How a [`pre_fault`] ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PreFault {
    /// Every page of the range is mapped.
    Done,
    /// A signal (a kick) stopped it: the rest faults in on demand.
    Interrupted,
}

/// Maps `len` bytes at `gpa` into the guest's page tables ahead of its
/// accesses (`KVM_PRE_FAULT_MEMORY` on `vcpu`), as their attributes say:
/// private pages from the guest_memfd. KVM advances the range as it maps.
/// It changes no byte and is only worth it for pages the guest is known
/// to use: under nested virtualization each page it spares the guest is a
/// nested page fault, an exit through two hypervisors.
pub fn pre_fault(vcpu: &kvm_ioctls::VcpuFd, gpa: u64, len: u64) -> io::Result<PreFault> {
    let mut range = kvm_pre_fault_memory {
        gpa,
        size: len,
        ..Default::default()
    };
    while range.size > 0 {
        // SAFETY: the ioctl reads and writes exactly one
        // `kvm_pre_fault_memory`, which `range` is.
        let rc = unsafe { ioctl_with_mut_ref(vcpu, KVM_PRE_FAULT_MEMORY(), &mut range) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::EINTR) => Ok(PreFault::Interrupted),
                _ => Err(e),
            };
        }
    }
    Ok(PreFault::Done)
}

/// Calls `populate` until KVM has copied all of `arg`. KVM advances `arg`
/// as it copies, and a signal interrupts it (`EINTR`): a vCPU kick that
/// only looks at the vCPU goes on where KVM stopped, one that stops the
/// VM (`stopping`) ends it with [`GmemError::Interrupted`], so a reboot or
/// `--timeout` does not wait for the rest of RAM.
pub fn populate_until_done(
    arg: &mut KvmSwProtectedPopulate,
    mut populate: impl FnMut(&mut KvmSwProtectedPopulate) -> io::Result<()>,
    stopping: impl Fn() -> bool,
) -> Result<(), GmemError> {
    while arg.size > 0 {
        match populate(arg) {
            Ok(()) => break,
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => {
                if stopping() {
                    return Err(GmemError::Interrupted {
                        at: arg.gpa,
                        left: arg.size,
                    });
                }
            }
            Err(e) => return Err(kvm_err("KVM_SW_PROTECTED_POPULATE", arg.gpa, arg.size, e)),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn populate_uapi_layout() {
        // _IOWR(KVMIO, 0xd6, struct of 64 bytes): dir 3, size 64.
        assert_eq!(std::mem::size_of::<KvmSwProtectedPopulate>(), 64);
        vmm_sys_util::ioctl_iowr_nr!(POPULATE, KVMIO, 0xd6, KvmSwProtectedPopulate);
        assert_eq!(KVM_SW_PROTECTED_POPULATE, POPULATE());
        assert_eq!(KVM_SW_PROTECTED_POPULATE, 0xc040_aed6);
    }

    /// A populate that KVM interrupts after each page, and a stop that
    /// comes after `stop_after` interruptions.
    fn interrupted(stop_after: usize) -> (Result<(), GmemError>, KvmSwProtectedPopulate, usize) {
        let mut arg = KvmSwProtectedPopulate {
            gpa: 0x10_0000,
            size: 8 * 0x1000,
            source: 0x7f00_0000_0000,
            ..Default::default()
        };
        let calls = std::cell::Cell::new(0);
        let r = populate_until_done(
            &mut arg,
            |a| {
                calls.set(calls.get() + 1);
                a.gpa += 0x1000;
                a.source += 0x1000;
                a.size -= 0x1000;
                if a.size == 0 {
                    Ok(())
                } else {
                    Err(io::Error::from_raw_os_error(libc::EINTR))
                }
            },
            || calls.get() > stop_after,
        );
        (r, arg, calls.get())
    }

    #[test]
    fn populate_goes_on_after_a_kick_and_gives_up_on_a_stop() {
        let (r, arg, calls) = interrupted(usize::MAX);
        assert!(r.is_ok());
        assert_eq!((arg.size, calls), (0, 8), "every interruption resumed");
        let (r, arg, calls) = interrupted(3);
        match r {
            Err(GmemError::Interrupted { at, left }) => {
                assert_eq!((at, left), (0x10_4000, 4 * 0x1000));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!((arg.size, calls), (4 * 0x1000, 4), "no call after the stop");
        let mut arg = KvmSwProtectedPopulate {
            size: 0x1000,
            ..Default::default()
        };
        let r = populate_until_done(
            &mut arg,
            |_| Err(io::Error::from_raw_os_error(libc::EPERM)),
            || false,
        );
        assert!(matches!(r, Err(GmemError::Kvm { .. })), "{r:?}");
    }

    #[test]
    fn missing_feature_names_the_fallback() {
        let e = HostError::Missing {
            what: "KVM_SW_PROTECTED_POPULATE",
        }
        .to_string();
        assert!(
            e.contains("KVM_SW_PROTECTED_POPULATE") && e.contains("--protect=view"),
            "{e}"
        );
        assert_eq!(e.lines().count(), 1);
    }
}
