// SPDX-License-Identifier: GPL-2.0

//! KVM protected memory: guest support.
//!
//! Early in boot, from `kvm_init_platform()`, [`kvm_protmem_init`] looks for
//! `KVM_FEATURE_MEM_PROTECTED`, makes all guest RAM private with
//! `KVM_HC_ENABLE_MEM_PROTECTED` and turns the guest into a confidential
//! computing guest of vendor `CC_VENDOR_KVM`. From then on
//! `cc_platform_has(CC_ATTR_GUEST_MEM_ENCRYPT)` is true, so the x86 code
//! forces all DMA through the swiotlb bounce pool and makes virtio require
//! `VIRTIO_F_ACCESS_PLATFORM`, and `set_memory_decrypted()` /
//! `set_memory_encrypted()` reach the hooks installed here, which turn the
//! physical pages behind the virtual range into as few `KVM_HC_MEM_SHARE` /
//! `KVM_HC_MEM_UNSHARE` hypercalls as their layout allows. No page table
//! bit changes: privacy is enforced by the host.
//!
//! Failure policy: the host is not trusted. A conversion the host refuses
//! fails `set_memory_*()` with -EIO, whose callers leak the pages; the pages
//! are counted here and the first failure WARNs. If the boot-time bounce
//! pool cannot be shared, DMA cannot work: this says so in one precise
//! line, and `mem_encrypt_init()` stops the boot.
//!
//! `kvm_protmem=require` (or `CONFIG_KVM_PROTMEM_REQUIRE`) turns a host
//! that does not offer protection, or refuses ENABLE, into a panic with
//! one precise line instead of an unprotected boot; `kvm_protmem=off`
//! opts out. Under another confidential-computing platform (SEV, TDX) the
//! feature is never taken, whatever the host offers.
//!
//! Stable dmesg lines (tests grep them), all prefixed `kvm_protmem: `:
//! `enabled: ...`, `not offered by the host...`, `not offered: ... is
//! active`, `disabled on the command line...`, `enable failed: ...`,
//! `protection required (kvm_protmem=require) but ...` (panic),
//! `swiotlb pool shared: ...`, `share failed: ...`, `unshare failed: ...`,
//! `kvmclock disabled: ...`, `<feature> disabled: its per-CPU page is not
//! shared`, `kexec: refusing ...`.
//!
//! C header: [`arch/x86/include/asm/kvm_protmem.h`](srctree/arch/x86/include/asm/kvm_protmem.h)

use kernel::{
    debugfs::{Dir, File},
    ffi::{c_char, c_int, c_uint, c_ulong, c_void},
    prelude::*,
    sync::atomic::{Atomic, Relaxed},
};

#[path = "hypercall_abi.rs"]
pub mod abi;
mod bench;
pub(crate) mod hv;
#[path = "share_ranges.rs"]
pub mod ranges;
pub(crate) mod sys;

use abi::Hypercall;
use ranges::{Book, Direction, Failed, Ledger, Stats};

module! {
    type: KvmProtmem,
    name: "kvm_protmem",
    authors: ["KVM protected memory developers"],
    description: "KVM protected memory guest support",
    license: "GPL",
}

const _: () = assert!(sys::PAGE_SIZE as u64 == abi::PAGE_SIZE);

/// What early boot decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum State {
    /// Early boot did not run: not a KVM guest.
    Unprobed = 0,
    /// The host does not offer the feature.
    NotOffered = 1,
    /// `kvm_protmem=off`.
    OptedOut = 2,
    /// The host refused `KVM_HC_ENABLE_MEM_PROTECTED`.
    EnableFailed = 3,
    /// All guest memory is private.
    Enabled = 4,
}

static STATE: Atomic<u32> = Atomic::new(State::Unprobed as u32);

/// The current state.
pub fn state() -> State {
    match STATE.load(Relaxed) {
        1 => State::NotOffered,
        2 => State::OptedOut,
        3 => State::EnableFailed,
        4 => State::Enabled,
        _ => State::Unprobed,
    }
}

fn set_state(s: State) {
    STATE.store(s as u32, Relaxed);
}

impl State {
    fn describe(self) -> &'static str {
        match self {
            State::Unprobed | State::NotOffered => "not offered",
            State::OptedOut => "disabled",
            State::EnableFailed => "enable failed",
            State::Enabled => "enabled",
        }
    }
}

/// Runs the shared-range set can hold: one per possible CPU (its per-CPU
/// decrypted page: steal time, async PF, PV EOI; per-CPU areas are apart,
/// so these never coalesce), and 256 more for the bounce pool, the
/// decrypted sections, DMA-coherent buffers and dynamic pools. A set that
/// is full still converts; it only counts the frames as `untracked`.
const MAX_RUNS: usize = sys::NR_CPUS + 256;

/// Failures logged one by one; later ones are only counted.
const LOGGED_FAILURES: u64 = 10;

kernel::sync::global_lock! {
    // SAFETY: `lock_init()` initializes it before any use; early boot and
    // the module initializer both call it before touching the lock.
    unsafe(uninit) static SHARED: SpinLock<Ledger<MAX_RUNS>> = Ledger::new();
}

static LOCK_READY: Atomic<bool> = Atomic::new(false);

/// The ledger behind `SHARED`: [`ranges::convert`] takes the spinlock only
/// to record a result, so conversions from different CPUs reach the host
/// in parallel and no CPU spins behind another's host round trip.
struct SharedBook;

impl Book<MAX_RUNS> for SharedBook {
    fn with<R>(&self, f: impl FnOnce(&mut Ledger<MAX_RUNS>) -> R) -> R {
        f(&mut SHARED.lock())
    }
}

fn lock_init() {
    if !LOCK_READY.xchg(true, Relaxed) {
        // SAFETY: the flag makes this the only call; it happens on the boot
        // CPU, first in early boot or else in the module initializer.
        unsafe { SHARED.init() };
    }
}

/// A copy of the counters.
pub fn stats() -> Stats {
    SHARED.lock().stats
}

/// Whether frame `pfn` is recorded as shared.
pub fn is_shared(pfn: u64) -> bool {
    SHARED.lock().set.contains(pfn)
}

/// Physical frame behind a mapped kernel virtual address.
///
/// # Safety
///
/// `vaddr` must be mapped in the kernel page tables.
unsafe fn virt_to_pfn(vaddr: usize) -> u64 {
    // SAFETY: the caller guarantees a mapping.
    unsafe { sys::virt_to_phys(vaddr) >> abi::PAGE_SHIFT }
}

/// First frame and size of the boot-time swiotlb pool, once shared.
static POOL_PFN: Atomic<u64> = Atomic::new(0);
static POOL_PAGES: Atomic<u64> = Atomic::new(0);

/// The boot-time swiotlb pool as (first frame, frames), once shared.
pub fn boot_pool() -> Option<(u64, u64)> {
    let n = POOL_PAGES.load(Relaxed);
    (n > 0).then(|| (POOL_PFN.load(Relaxed), n))
}

/// Cleared by the first share that reaches the hooks.
static FIRST_HOOK_SHARE: Atomic<bool> = Atomic::new(true);

/// Whether a share of `npages` through the hooks is the default swiotlb
/// pool, which `swiotlb_update_mem_attributes()` shares from
/// `mem_encrypt_init()`: `set_memory_*()` works only once the page
/// allocator is up, this file shares its own early pages without the
/// hooks, and `mem_encrypt_init()` is the first caller after that, so the
/// pool is the first share the hooks see, of the pool's size, during
/// `start_kernel()`. The pool itself is private to swiotlb.c.
///
/// Only the `swiotlb pool shared` line and [`boot_pool`] depend on this:
/// a failure to share the pool stops the boot in `mem_encrypt_init()`.
fn is_default_pool_share(npages: usize) -> bool {
    if !FIRST_HOOK_SHARE.xchg(false, Relaxed) {
        return false;
    }
    sys::booting() && npages as u64 * abi::PAGE_SIZE == sys::swiotlb_size() as u64
}

/// Converts the pages behind `[vaddr, vaddr + npages * PAGE_SIZE)`;
/// returns the hypercalls issued.
///
/// # Safety
///
/// The range must be mapped in the kernel page tables.
unsafe fn convert_virt(vaddr: usize, npages: usize, dir: Direction) -> Result<u64, Failed> {
    let Some(mut kvm) = hv::Kvm::get() else {
        let nth = SharedBook.with(|l| {
            l.stats.failures += 1;
            l.stats.failures
        });
        return Err(Failed {
            run: ranges::PfnRun { pfn: 0, npages: 0 },
            error: abi::Error::NotSupported,
            done: 0,
            nth,
        });
    };
    let page = abi::PAGE_SIZE as usize;
    // SAFETY: every page of the range is mapped (caller).
    let frames = (0..npages).map(move |i| unsafe { virt_to_pfn(vaddr + i * page) });
    // SAFETY: the caller (a `set_memory_*()` hook or early boot) owns the
    // range: it shares pages that hold nothing private and makes private
    // pages it no longer hands to the host.
    unsafe { ranges::convert_in_runs_of(&mut kvm, frames, dir, &SharedBook, run_limit()) }
}

/// Logs a failure (the first ten of the boot one by one) and WARNs on the
/// first: exactly once, however failures race.
fn report_failure(dir: Direction, vaddr: usize, npages: usize, f: &Failed) {
    let what = match dir {
        Direction::Share => "share",
        Direction::Unshare => "unshare",
    };
    let failures = f.nth;
    if failures <= LOGGED_FAILURES {
        pr_err!(
            "{what} failed: {npages} pages at {vaddr:#x}: host returned {} ({:#x}) for pfn {:#x}+{}; pages leaked\n",
            f.error.name(),
            f.error.to_ret(),
            f.run.pfn,
            f.run.npages
        );
    }
    if failures == 1 {
        kernel::warn_on!(true);
    }
}

/// Shares or unshares for a hook; maps failure to -EIO.
///
/// # Safety
///
/// The range must be mapped in the kernel page tables.
unsafe fn hook_convert(vaddr: c_ulong, npages: c_int, dir: Direction) -> c_int {
    let Ok(npages) = usize::try_from(npages) else {
        // A negative count is a caller bug: refuse it rather than report
        // a conversion that never happened.
        pr_err!(
            "refusing a conversion of {} pages at {:#x}\n",
            npages,
            vaddr
        );
        return EINVAL.to_errno();
    };
    let pool = dir == Direction::Share && is_default_pool_share(npages);
    // SAFETY: the range is mapped (caller).
    match unsafe { convert_virt(vaddr, npages, dir) } {
        Ok(calls) => {
            if pool {
                // SAFETY: as above.
                let first = unsafe { virt_to_pfn(vaddr) };
                POOL_PFN.store(first, Relaxed);
                POOL_PAGES.store(npages as u64, Relaxed);
                pr_info!(
                    "swiotlb pool shared: {} MiB at {:#x} in {} hypercalls\n",
                    (npages as u64 * abi::PAGE_SIZE) >> 20,
                    first << abi::PAGE_SHIFT,
                    calls
                );
            }
            0
        }
        Err(f) => {
            if pool {
                // `mem_encrypt_init()` stops the boot on this -EIO.
                pr_emerg!(
                    "swiotlb pool not shared: host returned {} ({:#x}) for pfn {:#x}+{} of {} MiB at {:#x}\n",
                    f.error.name(),
                    f.error.to_ret(),
                    f.run.pfn,
                    f.run.npages,
                    (npages as u64 * abi::PAGE_SIZE) >> 20,
                    vaddr
                );
            }
            report_failure(dir, vaddr, npages, &f);
            EIO.to_errno()
        }
    }
}

/// `x86_platform.guest.enc_status_change_prepare`: unshare before
/// `set_memory_encrypted()` returns the pages to private use.
///
/// # Safety
///
/// Called by `__set_memory_enc_pgtable()` with a mapped kernel range.
unsafe extern "C" fn enc_status_change_prepare(vaddr: c_ulong, npages: c_int, enc: bool) -> c_int {
    if !enc {
        return 0;
    }
    // SAFETY: the range is mapped (caller).
    unsafe { hook_convert(vaddr, npages, Direction::Unshare) }
}

/// `x86_platform.guest.enc_status_change_finish`: share after
/// `set_memory_decrypted()`.
///
/// # Safety
///
/// Called by `__set_memory_enc_pgtable()` with a mapped kernel range.
unsafe extern "C" fn enc_status_change_finish(vaddr: c_ulong, npages: c_int, enc: bool) -> c_int {
    if enc {
        return 0;
    }
    // SAFETY: the range is mapped (caller).
    unsafe { hook_convert(vaddr, npages, Direction::Share) }
}

/// No page table bit changes, so no TLB flush is needed.
extern "C" fn enc_tlb_flush_required(_enc: bool) -> bool {
    false
}

/// No encryption, so no cache flush is needed.
extern "C" fn enc_cache_flush_required() -> bool {
    false
}

/// Before kexec: stop new conversions and wait for those in flight.
extern "C" fn enc_kexec_begin() {
    if !sys::stop_conversions() {
        pr_warn!("kexec: conversions still in flight\n");
    }
}

/// Before jumping to the next kernel: make all memory private again and
/// drop every share, so that the next kernel starts clean.
///
/// Also the kdump path (`native_machine_crash_shutdown()`), where the other
/// CPUs were stopped by NMI, possibly inside a conversion that holds the
/// `SHARED` lock, or this CPU crashed holding it: so this takes no lock.
/// The host's ENABLE drops every share by itself; the range set dies with
/// this kernel, and nothing reads it after this point.
extern "C" fn enc_kexec_finish() {
    let Some(mut kvm) = hv::Kvm::get() else {
        return;
    };
    // SAFETY: the kernel is handing over to the next one: no device or
    // host mapping of a shared page may outlive it.
    match unsafe { abi::issue(&mut kvm, Hypercall::Enable) } {
        Ok(()) => pr_info!("kexec: all memory private again\n"),
        Err(e) => pr_err!("kexec: re-enable failed: host returned {}\n", e.name()),
    }
}

/// What `kvm_protmem=` asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// `off`: never enable, even if offered.
    Off,
    /// `on`: enable when offered, else boot unprotected (with a line).
    On,
    /// `require`: enable, or stop the boot with one precise panic line.
    Require,
}

impl Mode {
    /// The mode without a `kvm_protmem=` parameter.
    pub const DEFAULT: Mode = if cfg!(CONFIG_KVM_PROTMEM_REQUIRE) {
        Mode::Require
    } else {
        Mode::On
    };

    /// Parses a `kvm_protmem=` value.
    pub fn parse(v: &[u8]) -> Option<Mode> {
        match v {
            b"off" => Some(Mode::Off),
            b"on" => Some(Mode::On),
            b"require" => Some(Mode::Require),
            _ => None,
        }
    }

    fn encode(self) -> u32 {
        match self {
            Mode::Off => 1,
            Mode::On => 2,
            Mode::Require => 3,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Mode::Off => "off",
            Mode::On => "on",
            Mode::Require => "require",
        }
    }
}

/// Parses a whole `kvm_protmem=` value: a mode, then options after commas
/// (`per-page`: one hypercall per 4 KiB page, see [`run_limit`]).
pub fn parse_param(v: &[u8]) -> Option<(Mode, bool)> {
    let mut parts = v.split(|&b| b == b',');
    let mode = Mode::parse(parts.next()?)?;
    let mut per_page = false;
    for p in parts {
        match p {
            b"per-page" => per_page = true,
            _ => return None,
        }
    }
    Some((mode, per_page))
}

/// The `kvm_protmem=` mode, as [`Mode::encode`] gives it; 0 when the
/// parameter was not given.
static MODE: Atomic<u32> = Atomic::new(0);

/// 1 with `kvm_protmem=...,per-page`.
static PER_PAGE: Atomic<u32> = Atomic::new(0);

/// Most pages per SHARE/UNSHARE hypercall: a run of up to 1 GiB, or one
/// page in per-page mode (`kvm_protmem=on,per-page`), which converts page
/// by page as pKVM guests do. That mode exists for the benchmarks, to
/// measure what coalescing saves; it protects the same.
pub fn run_limit() -> u64 {
    if PER_PAGE.load(Relaxed) != 0 {
        1
    } else {
        ranges::MAX_RUN_PAGES
    }
}

/// The `kvm_protmem=` mode (the default without the parameter).
pub fn mode() -> Mode {
    match MODE.load(Relaxed) {
        1 => Mode::Off,
        2 => Mode::On,
        3 => Mode::Require,
        _ => Mode::DEFAULT,
    }
}

/// `kvm_protmem=`: the `early_param()` handler, registered in
/// `arch/x86/kernel/kvm.c`. `parse_early_param()` runs it before
/// `kvm_init_platform()` calls [`kvm_protmem_init`].
///
/// # Safety
///
/// `arg` is null or a NUL-terminated string, as `parse_early_param()`
/// passes it.
#[export]
#[link_section = ".init.text"]
pub unsafe extern "C" fn kvm_protmem_setup(arg: *mut c_char) -> c_int {
    let mode = if arg.is_null() {
        None
    } else {
        // SAFETY: a NUL-terminated string that outlives this call (caller).
        parse_param(unsafe { CStr::from_char_ptr(arg) }.to_bytes())
    };
    match mode {
        Some((m, per_page)) => {
            MODE.store(m.encode(), Relaxed);
            PER_PAGE.store(u32::from(per_page), Relaxed);
        }
        None => pr_warn!(
            "ignoring unknown kvm_protmem= value (use off, on or require, optionally \
             followed by ,per-page); mode {}\n",
            Mode::DEFAULT.name()
        ),
    }
    0
}

/// The other confidential-computing platform that is active, if any: SEV
/// or TDX (or a Hyper-V isolated VM) encrypt memory and own `cc_vendor`
/// and the `x86_platform.guest` hooks, so protection must not take them.
/// `encrypting` is `cc_platform_has(CC_ATTR_MEM_ENCRYPT)` before this
/// module touched `cc_vendor`; the vendor alone says nothing (x86 sets
/// `CC_VENDOR_AMD` on any AMD CPU whose kernel supports SME, active or not).
pub fn other_cc_platform(vendor: c_uint, encrypting: bool) -> Option<&'static str> {
    if !encrypting {
        return None;
    }
    Some(match vendor {
        sys::CC_VENDOR_AMD => "AMD SEV",
        sys::CC_VENDOR_INTEL => "Intel TDX",
        _ => "another confidential-computing platform",
    })
}

/// Shares the pages of `[start, end)` during early boot; logs failures.
fn share_section(what: &str, start: usize, end: usize) -> bool {
    let page = abi::PAGE_SIZE as usize;
    let start = start & !(page - 1);
    let npages = end.saturating_sub(start).div_ceil(page);
    if npages == 0 {
        return true;
    }
    // SAFETY: the section is part of the mapped kernel image.
    if let Err(f) = unsafe { convert_virt(start, npages, Direction::Share) } {
        report_failure(Direction::Share, start, npages, &f);
        pr_err!("{what}: the host cannot update it\n");
        return false;
    }
    true
}

/// Set when kvmclock's boot pages could not be shared: the host's clock
/// updates would then never reach the guest (with a guest_memfd host they
/// land in a different page), and a pvclock that never advances stops
/// time. 0: usable.
static KVMCLOCK_UNSHARED: Atomic<u32> = Atomic::new(0);

/// Whether kvmclock may be used; `kvmclock_init()` asks before it
/// registers its memory with the host, and falls back to the TSC.
#[export]
pub extern "C" fn kvm_protmem_kvmclock_usable() -> bool {
    KVMCLOCK_UNSHARED.load(Relaxed) == 0
}

/// Detects the feature and enables protection; called once, early, on the
/// boot CPU from `kvm_init_platform()`.
///
/// # Safety
///
/// Must be called once, from `setup_arch()` on the boot CPU, before
/// anything shares memory with the host or sets up DMA.
#[export]
#[link_section = ".init.text"]
pub unsafe extern "C" fn kvm_protmem_init() {
    lock_init();
    let mode = mode();
    let Some(features) = hv::kvm_features() else {
        set_state(State::NotOffered);
        pr_info!("not offered by the host (no KVM signature)\n");
        return;
    };
    if !abi::has_mem_protected(features) {
        set_state(State::NotOffered);
        pr_info!("not offered by the host\n");
        return;
    }
    let (vendor, encrypting) = sys::cc_platform();
    if let Some(other) = other_cc_platform(vendor, encrypting) {
        set_state(State::NotOffered);
        pr_warn!(
            "not offered: {} is active (cc_vendor {}); leaving it alone\n",
            other,
            vendor
        );
        return;
    }
    if mode == Mode::Off {
        set_state(State::OptedOut);
        pr_info!("disabled on the command line (kvm_protmem=off)\n");
        return;
    }
    let Some(mut kvm) = hv::Kvm::probe() else {
        set_state(State::NotOffered);
        return;
    };
    // SAFETY: early boot, before anything was shared: making all RAM
    // private takes nothing from the host that it relies on.
    if let Err(e) = unsafe { abi::issue(&mut kvm, Hypercall::Enable) } {
        set_state(State::EnableFailed);
        let next = if mode == Mode::Require {
            "protection is required: the boot stops"
        } else {
            "booting unprotected"
        };
        pr_warn!(
            "enable failed: host returned {} ({:#x}); {}\n",
            e.name(),
            e.to_ret(),
            next
        );
        return;
    }
    // SAFETY: single-threaded early boot, once, right after ENABLE; no
    // `set_memory_*()` before `mm_core_init()`, and nothing has yet made a
    // decision on `cc_vendor` that this changes.
    unsafe {
        sys::take_cc_platform(sys::GuestHooks {
            prepare: enc_status_change_prepare,
            finish: enc_status_change_finish,
            tlb_flush_required: enc_tlb_flush_required,
            cache_flush_required: enc_cache_flush_required,
            kexec_begin: enc_kexec_begin,
            kexec_finish: enc_kexec_finish,
        })
    };
    set_state(State::Enabled);
    pr_info!("enabled: all guest memory is private, DMA bounces through swiotlb\n");
    if run_limit() == 1 {
        pr_info!("per-page mode: one hypercall per 4 KiB page (kvm_protmem=...,per-page)\n");
    }
    // kvmclock's boot-time pages (hv_clock_boot, wall_clock).
    let (start, end) = sys::bss_decrypted_used();
    if !share_section("kvmclock", start, end) {
        KVMCLOCK_UNSHARED.store(1, Relaxed);
        pr_err!("kvmclock disabled: its pages are not shared\n");
    }
}

/// Set when the host refused a share of the per-CPU PV data (async PF
/// reason, steal time, PV EOI). The three live in the per-CPU decrypted
/// section, page-aligned and padded to whole pages in every CPU's area,
/// so a refusal leaves a whole CPU's page, with all three, private; the
/// features are global, so none of them is used on any CPU. 0: shared.
static PERCPU_UNSHARED: Atomic<u32> = Atomic::new(0);

/// Shares the page(s) of per-CPU data the host writes (steal time, async
/// PF reason, PV EOI), for every possible CPU, from
/// `sev_map_percpu_data()` (`kvm_guest_percpu_init()`, on the boot CPU
/// before it chooses those features). After a refusal it shares nothing more:
/// the features that would use the section stay off
/// ([`kvm_protmem_pv_usable`]).
///
/// # Safety
///
/// `ptr..ptr + size` must be mapped kernel memory in a
/// `DEFINE_PER_CPU_DECRYPTED` section, which holds nothing private.
#[export]
pub unsafe extern "C" fn kvm_protmem_share_early(ptr: *mut c_void, size: c_ulong) {
    if !percpu_shared() {
        return;
    }
    let start = ptr as usize;
    if !share_section("per-cpu PV data", start, start + size) {
        PERCPU_UNSHARED.store(1, Relaxed);
    }
}

/// Whether every share of the per-CPU PV data succeeded.
pub fn percpu_shared() -> bool {
    PERCPU_UNSHARED.load(Relaxed) == 0
}

/// A paravirt feature whose data the host writes into the per-CPU
/// decrypted section (`enum kvm_protmem_pv`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PvFeature {
    /// Async page faults (`apf_reason`).
    AsyncPf,
    /// Steal time (`steal_time`), and what reads its preempted flag.
    StealTime,
    /// PV EOI (`kvm_apic_eoi`).
    Eoi,
}

impl PvFeature {
    /// The feature `kvm.c` names, if it is one.
    pub fn from_c(v: c_uint) -> Option<Self> {
        match v {
            sys::PV_ASYNC_PF => Some(PvFeature::AsyncPf),
            sys::PV_STEAL_TIME => Some(PvFeature::StealTime),
            sys::PV_EOI => Some(PvFeature::Eoi),
            _ => None,
        }
    }

    /// The name in the `... disabled` line.
    pub fn name(self) -> &'static str {
        match self {
            PvFeature::AsyncPf => "async PF",
            PvFeature::StealTime => "steal time",
            PvFeature::Eoi => "PV EOI",
        }
    }
}

/// Whether `kvm_guest_percpu_init()` may turn on paravirt feature
/// `feature` (an `enum kvm_protmem_pv`): not when the host refused to
/// share the per-CPU page it writes, which it would then write where the
/// guest never looks (with a guest_memfd host, into other memory): async
/// PF would never complete, PV EOI would read stale bits, steal time
/// would stay 0. Says so, once per feature (it is asked once, at boot).
#[export]
#[link_section = ".init.text"]
pub extern "C" fn kvm_protmem_pv_usable(feature: c_uint) -> bool {
    if percpu_shared() {
        return true;
    }
    let name = PvFeature::from_c(feature).map_or("unknown PV feature", PvFeature::name);
    pr_err!("{name} disabled: its per-CPU page is not shared\n");
    false
}

/// What a protected guest refuses to kexec into, and why.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KexecRefusal {
    /// `kexec_load`: the kernel cannot inspect what it loads.
    Load,
    /// An image without `XLF_KVM_PROTMEM`: a kernel that cannot enable
    /// protection itself.
    Image,
    /// `kvm_protmem=off` on the next kernel's command line.
    OptOut,
}

impl KexecRefusal {
    /// The reason, as the `kexec: refusing ...` line gives it.
    pub fn reason(self) -> &'static str {
        match self {
            KexecRefusal::Load => {
                "kexec_load: the kernel cannot check the image; use kexec_file_load (kexec -s)"
            }
            KexecRefusal::Image => concat!(
                "a kernel without KVM protected memory support (no XLF_KVM_PROTMEM): ",
                "it would start with all memory private"
            ),
            KexecRefusal::OptOut => {
                "kvm_protmem=off for the next kernel: it would start with all memory private"
            }
        }
    }
}

/// Whether a kexec may go ahead. A protected guest hands over with all
/// memory private (`enc_kexec_finish()` issues ENABLE, which drops every
/// share, in the kdump path too): the next kernel must enable protection
/// and share what the host must see, or its kvmclock stops and its
/// devices never reach their buffers. Says why when it may not.
fn kexec_allowed(refusal: Option<KexecRefusal>) -> bool {
    let Some(r) = refusal.filter(|_| state() == State::Enabled) else {
        return true;
    };
    pr_err!("kexec: refusing {}\n", r.reason());
    false
}

/// `machine_kexec_prepare()` for `kexec_load`: a protected guest refuses
/// it, since the kernel cannot tell what the segments hold.
#[export]
pub extern "C" fn kvm_protmem_kexec_load_ok() -> bool {
    kexec_allowed(Some(KexecRefusal::Load))
}

/// `bzImage64_probe()` for `kexec_file_load` (and `kexec -s -p`):
/// `protmem_kernel` says whether the image's setup header has
/// `XLF_KVM_PROTMEM`.
#[export]
pub extern "C" fn kvm_protmem_kexec_image_ok(protmem_kernel: bool) -> bool {
    kexec_allowed((!protmem_kernel).then_some(KexecRefusal::Image))
}

/// Whether a kernel command line turns protection off: its `kvm_protmem=`
/// values, as the next kernel's `parse_early_param()` reads them (up to
/// `--`; the last valid value wins, an invalid one changes nothing). A
/// command line built into the next kernel is not seen here.
pub fn cmdline_opts_out(cmdline: &[u8]) -> bool {
    cmdline
        .split(|b| b.is_ascii_whitespace() || *b == 0)
        .take_while(|w| *w != b"--")
        .filter_map(|w| parse_param(w.strip_prefix(b"kvm_protmem=")?))
        .last()
        .is_some_and(|(m, _)| m == Mode::Off)
}

/// `bzImage64_load()`: a protected guest refuses a next kernel told to
/// stay unprotected.
///
/// # Safety
///
/// `cmdline` is null, or points to `len` readable bytes.
#[export]
pub unsafe extern "C" fn kvm_protmem_kexec_cmdline_ok(
    cmdline: *const c_char,
    len: c_ulong,
) -> bool {
    let text: &[u8] = if cmdline.is_null() {
        &[]
    } else {
        // SAFETY: `len` readable bytes (caller), only read here.
        unsafe { core::slice::from_raw_parts(cmdline.cast::<u8>(), len) }
    };
    kexec_allowed(cmdline_opts_out(text).then_some(KexecRefusal::OptOut))
}

/// Keeps the debugfs directory alive.
struct KvmProtmem {
    _dir: Dir,
    _files: KVec<Pin<KBox<File<()>>>>,
}

/// A debugfs file: name and what it prints.
type Show = fn(&Ledger<MAX_RUNS>) -> u64;

const COUNTERS: [(&CStr, Show); 6] = [
    (c"shares", |s| s.stats.shares),
    (c"unshares", |s| s.stats.unshares),
    (c"pages_shared", |s| s.stats.pages_shared),
    (c"failures", |s| s.stats.failures),
    (c"pages_leaked", |s| s.stats.pages_leaked),
    (c"untracked", |s| s.stats.untracked),
];

macro_rules! counter_file {
    ($dir:expr, $i:literal) => {
        KBox::pin_init(
            $dir.read_callback_file(COUNTERS[$i].0, (), &|(): &(), f| {
                writeln!(f, "{}", (COUNTERS[$i].1)(&SHARED.lock()))
            }),
            GFP_KERNEL,
        )?
    };
}

/// With `kvm_protmem=require` (or `KVM_PROTMEM_REQUIRE`), stops the boot
/// unless protection is enabled, with one precise panic line.
///
/// Runs from this module's initializer: late enough that the console
/// shows the line (a panic in `setup_arch()` would reset silently), early
/// enough that no device driver has probed (arch/ initcalls run before
/// drivers/ ones at the same level) and long before userspace.
fn require_protection(mode: Mode, state: State) {
    if mode != Mode::Require || state == State::Enabled {
        return;
    }
    let why: &CStr = match state {
        State::EnableFailed => c"kvm_protmem: protection required (kvm_protmem=require) but the host refused ENABLE; refusing to boot unprotected\n",
        State::OptedOut => return,
        _ => c"kvm_protmem: protection required (kvm_protmem=require) but the host does not offer it; refusing to boot unprotected\n",
    };
    sys::panic(why);
}

impl kernel::Module for KvmProtmem {
    fn init(_module: &'static ThisModule) -> Result<Self> {
        lock_init();
        if state() == State::Unprobed {
            set_state(State::NotOffered);
            pr_info!("not offered by the host (not running on KVM)\n");
        }
        require_protection(mode(), state());
        let dir = Dir::new(c"kvm_protmem");
        let mut files = KVec::new();
        files.push(
            KBox::pin_init(
                dir.read_callback_file(c"state", (), &|(): &(), f| {
                    writeln!(f, "{}", state().describe())
                }),
                GFP_KERNEL,
            )?,
            GFP_KERNEL,
        )?;
        files.push(
            KBox::pin_init(
                dir.read_callback_file(c"shared_runs", (), &|(): &(), f| {
                    for r in SHARED.lock().set.runs() {
                        writeln!(f, "{:#x} {}", r.pfn << abi::PAGE_SHIFT, r.npages)?;
                    }
                    Ok(())
                }),
                GFP_KERNEL,
            )?,
            GFP_KERNEL,
        )?;
        files.push(counter_file!(dir, 0), GFP_KERNEL)?;
        files.push(counter_file!(dir, 1), GFP_KERNEL)?;
        files.push(counter_file!(dir, 2), GFP_KERNEL)?;
        files.push(counter_file!(dir, 3), GFP_KERNEL)?;
        files.push(counter_file!(dir, 4), GFP_KERNEL)?;
        files.push(counter_file!(dir, 5), GFP_KERNEL)?;
        files.push(
            KBox::pin_init(
                dir.read_write_callback_file(c"bench_convert", (), &bench::show, &bench::write),
                GFP_KERNEL,
            )?,
            GFP_KERNEL,
        )?;
        Ok(KvmProtmem {
            _dir: dir,
            _files: files,
        })
    }
}

#[cfg(CONFIG_KVM_PROTMEM_KUNIT_TEST)]
mod tests;
