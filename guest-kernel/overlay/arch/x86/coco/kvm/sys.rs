// SPDX-License-Identifier: GPL-2.0

//! The C side of the kernel that the KVM protected memory guest touches,
//! each in one wrapper: the rest of the guest names no `bindings::` item.
//!
//! Safe wrappers where the C function has no precondition the caller
//! could break; `unsafe` ones, with a `# Safety` section, where it has.
//!
//! C headers: [`arch/x86/include/asm/set_memory.h`](srctree/arch/x86/include/asm/set_memory.h),
//! [`include/linux/cc_platform.h`](srctree/include/linux/cc_platform.h),
//! [`arch/x86/include/asm/x86_init.h`](srctree/arch/x86/include/asm/x86_init.h)

use core::ptr::addr_of;
use kernel::{
    bindings,
    ffi::{c_int, c_uint, c_ulong, c_void},
    prelude::*,
};

/// `PAGE_SIZE`.
pub(crate) const PAGE_SIZE: usize = bindings::PAGE_SIZE;
/// `PAGE_SHIFT`.
pub(crate) const PAGE_SHIFT: u32 = bindings::PAGE_SHIFT;
/// `NR_CPUS`: the most CPUs this kernel can run.
pub(crate) const NR_CPUS: usize = bindings::NR_CPUS as usize;
/// `MAX_PAGE_ORDER`: the largest block the page allocator hands out.
pub(crate) const MAX_PAGE_ORDER: u32 = bindings::MAX_PAGE_ORDER;

/// Physical address behind a mapped kernel virtual address.
///
/// # Safety
///
/// `vaddr` must be mapped in the kernel page tables.
pub(crate) unsafe fn virt_to_phys(vaddr: usize) -> u64 {
    // SAFETY: the caller guarantees a mapping; `slow_virt_to_phys()` walks
    // the page tables (direct map, vmalloc, kernel image alike).
    unsafe { bindings::slow_virt_to_phys(vaddr as *mut c_void) }
}

/// Whether the kernel is still booting (`system_state == SYSTEM_BOOTING`).
pub(crate) fn booting() -> bool {
    // `system_state` is a plain enum that the kernel updates with plain
    // stores (boot CPU during init, any CPU at shutdown).
    // SAFETY: a volatile read of an aligned word cannot tear.
    unsafe {
        core::ptr::read_volatile(addr_of!(bindings::system_state))
            == bindings::system_states_SYSTEM_BOOTING
    }
}

/// Size of the default swiotlb pool in bytes.
pub(crate) fn swiotlb_size() -> usize {
    // SAFETY: only reads the configured pool size.
    unsafe { bindings::swiotlb_size_or_default() }
}

/// `set_memory_enc_stop_conversion()`: waits for conversions in flight
/// and stops new ones (before kexec); on the crash path it only tries the
/// lock. False if a conversion was still in flight.
pub(crate) fn stop_conversions() -> bool {
    // SAFETY: plain call; it only takes the conversion lock (or tries it
    // while an oops is in progress).
    unsafe { bindings::set_memory_enc_stop_conversion() }
}

/// `cc_vendor` values.
pub(crate) const CC_VENDOR_AMD: c_uint = bindings::cc_vendor_CC_VENDOR_AMD;
/// Intel TDX.
pub(crate) const CC_VENDOR_INTEL: c_uint = bindings::cc_vendor_CC_VENDOR_INTEL;

/// `enum kvm_protmem_pv`: the paravirt features whose data the host writes
/// into the per-CPU decrypted section.
pub(crate) const PV_ASYNC_PF: c_uint = bindings::kvm_protmem_pv_KVM_PROTMEM_PV_ASYNC_PF;
/// Steal time.
pub(crate) const PV_STEAL_TIME: c_uint = bindings::kvm_protmem_pv_KVM_PROTMEM_PV_STEAL_TIME;
/// PV EOI.
pub(crate) const PV_EOI: c_uint = bindings::kvm_protmem_pv_KVM_PROTMEM_PV_EOI;

/// The confidential-computing vendor and whether memory encryption is
/// active (`cc_platform_has(CC_ATTR_MEM_ENCRYPT)`), as early boot left
/// them.
pub(crate) fn cc_platform() -> (c_uint, bool) {
    // SAFETY: `cc_vendor` is written only in early boot on the boot CPU
    // (SEV, TDX, Hyper-V set it before `setup_arch()` gets here), and
    // `cc_platform_has()` only reads it and the vendor's own state.
    unsafe {
        (
            bindings::cc_vendor,
            bindings::cc_platform_has(bindings::cc_attr_CC_ATTR_MEM_ENCRYPT),
        )
    }
}

/// The `x86_platform.guest` hooks of a KVM protected-memory guest.
pub(crate) struct GuestHooks {
    /// `enc_status_change_prepare`.
    pub prepare: unsafe extern "C" fn(c_ulong, c_int, bool) -> c_int,
    /// `enc_status_change_finish`.
    pub finish: unsafe extern "C" fn(c_ulong, c_int, bool) -> c_int,
    /// `enc_tlb_flush_required`.
    pub tlb_flush_required: extern "C" fn(bool) -> bool,
    /// `enc_cache_flush_required`.
    pub cache_flush_required: extern "C" fn() -> bool,
    /// `enc_kexec_begin`.
    pub kexec_begin: extern "C" fn(),
    /// `enc_kexec_finish`.
    pub kexec_finish: extern "C" fn(),
}

/// Makes this a `CC_VENDOR_KVM` guest and installs `hooks`.
///
/// # Safety
///
/// Single-threaded early boot, once, after ENABLE succeeded and before
/// anything calls `set_memory_*()` or decides on `cc_vendor`.
pub(crate) unsafe fn take_cc_platform(hooks: GuestHooks) {
    // SAFETY: nothing else runs (caller); the hooks are installed before
    // anything can call them (no `set_memory_*()` before `mm_core_init()`).
    unsafe {
        bindings::cc_vendor = bindings::cc_vendor_CC_VENDOR_KVM;
        let guest = &mut (*core::ptr::addr_of_mut!(bindings::x86_platform)).guest;
        guest.enc_status_change_prepare = Some(hooks.prepare);
        guest.enc_status_change_finish = Some(hooks.finish);
        guest.enc_tlb_flush_required = Some(hooks.tlb_flush_required);
        guest.enc_cache_flush_required = Some(hooks.cache_flush_required);
        guest.enc_kexec_begin = Some(hooks.kexec_begin);
        guest.enc_kexec_finish = Some(hooks.kexec_finish);
    }
}

/// The used head of `.bss..decrypted` (kvmclock's boot-time pages) as a
/// virtual address range.
pub(crate) fn bss_decrypted_used() -> (usize, usize) {
    // Linker symbols: only their addresses are taken.
    (
        addr_of!(bindings::__start_bss_decrypted) as usize,
        addr_of!(bindings::__start_bss_decrypted_unused) as usize,
    )
}

/// Stops the kernel with `why` (a complete line, no format directives).
pub(crate) fn panic(why: &CStr) -> ! {
    // SAFETY: `why` is a NUL-terminated format without conversions.
    unsafe { bindings::panic(why.as_char_ptr()) }
}

/// The TSC frequency in kHz (0 before calibration).
pub(crate) fn tsc_khz() -> u32 {
    // SAFETY: a plain read of a value set once at boot.
    unsafe { bindings::tsc_khz }
}

/// `2^order` physically contiguous pages from the page allocator, freed
/// on drop unless leaked.
pub(crate) struct Block {
    addr: c_ulong,
    order: u32,
}

impl Block {
    /// Allocates `2^order` pages (`order` at most [`MAX_PAGE_ORDER`]).
    pub(crate) fn alloc(order: u32) -> Option<Block> {
        // SAFETY: plain page allocation; freed in `drop()`.
        let addr = unsafe {
            bindings::get_free_pages_noprof(bindings::GFP_KERNEL, order.min(MAX_PAGE_ORDER))
        };
        (addr != 0).then_some(Block {
            addr,
            order: order.min(MAX_PAGE_ORDER),
        })
    }

    /// Pages in the block.
    pub(crate) fn pages(&self) -> usize {
        1 << self.order
    }

    /// Fills the block with zeroes.
    pub(crate) fn zero(&mut self) {
        // SAFETY: the block's pages are ours (allocated above) and mapped
        // in the direct map.
        unsafe { core::ptr::write_bytes(self.addr as *mut u8, 0, self.pages() << PAGE_SHIFT) };
    }

    /// `set_memory_decrypted()` of the whole block: shares it with the
    /// host. Returns the C error code.
    ///
    /// # Safety
    ///
    /// Nothing private may be in the block ([`Block::zero`]).
    pub(crate) unsafe fn share(&mut self) -> c_int {
        // SAFETY: our pages, holding nothing private (caller).
        unsafe { bindings::set_memory_decrypted(self.addr, self.pages() as c_int) }
    }

    /// `set_memory_encrypted()` of the whole block: makes it private.
    ///
    /// # Safety
    ///
    /// No device or host mapping may still use the block as shared.
    pub(crate) unsafe fn unshare(&mut self) -> c_int {
        // SAFETY: our pages, no longer used as shared (caller).
        unsafe { bindings::set_memory_encrypted(self.addr, self.pages() as c_int) }
    }

    /// Never frees the block: its state is unknown (a refused conversion).
    pub(crate) fn leak(self) {
        core::mem::forget(self);
    }
}

impl Drop for Block {
    fn drop(&mut self) {
        // SAFETY: allocated in `alloc()` with this order; private and
        // unused again (a block in doubt is leaked, never dropped).
        unsafe { bindings::free_pages(self.addr, self.order) };
    }
}
