// SPDX-License-Identifier: GPL-2.0

//! KUnit suites of the KVM protected memory guest.
//!
//! `kvm_protmem_abi`, `kvm_protmem_policy` and `kvm_protmem_ranges` need
//! no host; the suite
//! `kvm_protmem_live` runs against the real host when protection is on and
//! skips, rather than passes, when it is off.

use kernel::bindings;

/// Marks the running KUnit case skipped, with `reason` as its comment.
fn skip(reason: &[u8]) {
    // SAFETY: `kunit_get_current_test()` is always safe to call.
    let test = unsafe { bindings::kunit_get_current_test() };
    if test.is_null() {
        return;
    }
    // SAFETY: `test` is the running test case, owned by KUnit for the
    // duration of this call; only its status fields are written.
    unsafe {
        (*test).status = bindings::kunit_status_KUNIT_SKIPPED;
        let comment = &mut (*test).status_comment;
        let n = reason.len().min(comment.len() - 1);
        for (d, s) in comment.iter_mut().zip(&reason[..n]) {
            *d = *s;
        }
        comment[n] = 0;
    }
}

/// Skips the running case with `reason` unless protection is enabled;
/// returns whether it skipped.
fn skip_unless_enabled(reason: &[u8]) -> bool {
    if super::state() == super::State::Enabled {
        return false;
    }
    skip(reason);
    true
}

#[kernel::macros::kunit_tests(kvm_protmem_abi)]
mod abi_tests {
    use crate::abi::*;
    use kernel::bindings;

    #[test]
    fn uapi_header_matches_abi() {
        assert_eq!(
            u64::from(bindings::KVM_HC_ENABLE_MEM_PROTECTED),
            KVM_HC_ENABLE_MEM_PROTECTED
        );
        assert_eq!(u64::from(bindings::KVM_HC_MEM_SHARE), KVM_HC_MEM_SHARE);
        assert_eq!(u64::from(bindings::KVM_HC_MEM_UNSHARE), KVM_HC_MEM_UNSHARE);
        assert_eq!(
            bindings::KVM_FEATURE_MEM_PROTECTED,
            KVM_FEATURE_MEM_PROTECTED
        );
        assert_eq!(u64::from(bindings::KVM_ENOSYS), KVM_ENOSYS);
        assert_eq!(u64::from(bindings::KVM_EINVAL), KVM_EINVAL);
        assert_eq!(u64::from(bindings::KVM_EFAULT), KVM_EFAULT);
        assert_eq!(u64::from(bindings::KVM_EPERM), KVM_EPERM);
        assert_eq!(u64::from(bindings::KVM_ENOMEM), KVM_ENOMEM);
        assert_eq!(bindings::KVM_CPUID_FEATURES, KVM_CPUID_FEATURES);
        assert_eq!(bindings::KVM_CPUID_SIGNATURE, KVM_CPUID_SIGNATURE);
    }

    #[test]
    fn return_values_decode() {
        assert_eq!(decode_ret(0), Ok(()));
        assert_eq!(
            decode_ret(KVM_ENOSYS.wrapping_neg()),
            Err(Error::NotSupported)
        );
        assert_eq!(decode_ret(KVM_EINVAL.wrapping_neg()), Err(Error::Invalid));
        assert_eq!(decode_ret(KVM_EFAULT.wrapping_neg()), Err(Error::Fault));
        assert_eq!(decode_ret(KVM_EPERM.wrapping_neg()), Err(Error::Permission));
        assert_eq!(decode_ret(KVM_ENOMEM.wrapping_neg()), Err(Error::NoMemory));
        // A hostile or newer host: never mistaken for success.
        assert_eq!(decode_ret(1), Err(Error::Unexpected(1)));
        assert_eq!(decode_ret(1 << 63), Err(Error::Unexpected(1 << 63)));
        // -1 is -KVM_EPERM, not garbage.
        assert_eq!(decode_ret(u64::MAX), Err(Error::Permission));
        assert_eq!(encode_ret(Err(Error::Invalid)), KVM_EINVAL.wrapping_neg());
    }

    #[test]
    fn ranges_are_checked() -> Result<(), Error> {
        assert_eq!(GpaRange::new(0x1001, 1), Err(Error::Invalid));
        assert_eq!(GpaRange::new(0x1000, 0), Err(Error::Invalid));
        assert_eq!(GpaRange::new(0, 1 << 52), Err(Error::Invalid));
        assert_eq!(GpaRange::new(!0xfff_u64, 1), Err(Error::Invalid));
        let r = GpaRange::new(0x20_0000, 512)?;
        assert_eq!(r.first_pfn(), 0x200);
        assert_eq!(r.end_pfn(), 0x400);
        assert!(r.contains(0x3f_ffff) && !r.contains(0x40_0000));
        Ok(())
    }

    #[test]
    fn host_decodes_what_guest_encodes() -> Result<(), Error> {
        let share = Hypercall::Share(GpaRange::new(0x7000, 3)?);
        assert_eq!(share.nr(), 14);
        assert_eq!(share.args(), [0x7000, 3, 0]);
        assert_eq!(Hypercall::decode(share.nr(), share.args()), Some(Ok(share)));
        assert_eq!(
            Hypercall::decode(KVM_HC_MEM_UNSHARE, [0x7000, 3, 1]),
            Some(Err(Error::Invalid))
        );
        assert_eq!(Hypercall::decode(KVM_HC_MAP_GPA_RANGE_NR, [0; 3]), None);
        Ok(())
    }

    /// Mainline's MAP_GPA_RANGE: not ours.
    const KVM_HC_MAP_GPA_RANGE_NR: u64 = bindings::KVM_HC_MAP_GPA_RANGE as u64;
}

#[kernel::macros::kunit_tests(kvm_protmem_policy)]
mod policy_tests {
    use crate::{other_cc_platform, parse_param, Mode};
    use kernel::bindings;

    #[test]
    fn kvm_protmem_parameter_values() {
        assert_eq!(Mode::parse(b"off"), Some(Mode::Off));
        assert_eq!(Mode::parse(b"on"), Some(Mode::On));
        assert_eq!(Mode::parse(b"require"), Some(Mode::Require));
        assert_eq!(Mode::parse(b"required"), None);
        assert_eq!(Mode::parse(b""), None);
        let default = if cfg!(CONFIG_KVM_PROTMEM_REQUIRE) {
            Mode::Require
        } else {
            Mode::On
        };
        assert_eq!(Mode::DEFAULT, default);
    }

    #[test]
    fn param_takes_a_mode_and_the_per_page_option() {
        assert_eq!(parse_param(b"on"), Some((Mode::On, false)));
        assert_eq!(parse_param(b"on,per-page"), Some((Mode::On, true)));
        assert_eq!(
            parse_param(b"require,per-page"),
            Some((Mode::Require, true))
        );
        assert_eq!(parse_param(b"per-page"), None);
        assert_eq!(parse_param(b"on,per-page,x"), None);
        assert_eq!(parse_param(b"on,"), None);
    }

    #[test]
    fn negative_page_count_is_refused() {
        use crate::ranges::Direction;
        let before = crate::stats();
        for dir in [Direction::Share, Direction::Unshare] {
            // SAFETY: a negative count is refused before the range is
            // looked at; 0x1000 is never dereferenced.
            let rc = unsafe { crate::hook_convert(0x1000, -1, dir) };
            assert_eq!(rc, kernel::error::code::EINVAL.to_errno());
        }
        let after = crate::stats();
        assert_eq!(
            (after.shares, after.unshares),
            (before.shares, before.unshares)
        );
        // No hypercall was made, so nothing failed.
        assert_eq!(after.failures, before.failures);
    }

    #[test]
    fn next_kernel_told_to_opt_out_is_found() {
        use crate::cmdline_opts_out;
        assert!(cmdline_opts_out(b"console=ttyS0 kvm_protmem=off"));
        assert!(cmdline_opts_out(b"kvm_protmem=off,per-page quiet\0"));
        assert!(!cmdline_opts_out(b""));
        assert!(!cmdline_opts_out(b"console=ttyS0 kvm_protmem=on"));
        assert!(!cmdline_opts_out(b"kvm_protmem=require"));
        // The last valid value wins; an invalid one changes nothing.
        assert!(!cmdline_opts_out(b"kvm_protmem=off kvm_protmem=on"));
        assert!(cmdline_opts_out(b"kvm_protmem=on kvm_protmem=off"));
        assert!(cmdline_opts_out(b"kvm_protmem=off kvm_protmem=bogus"));
        // Only whole words, and only kernel parameters (before `--`).
        assert!(!cmdline_opts_out(b"xkvm_protmem=off"));
        assert!(!cmdline_opts_out(b"init=/init -- kvm_protmem=off"));
        assert!(cmdline_opts_out(b"a=b\tkvm_protmem=off\nquiet"));
    }

    #[test]
    fn kexec_refusals_name_their_reason() {
        use crate::KexecRefusal::{Image, Load, OptOut};
        assert!(Load.reason().contains("kexec_file_load (kexec -s)"));
        assert!(Image.reason().contains("XLF_KVM_PROTMEM"));
        assert!(OptOut.reason().contains("kvm_protmem=off"));
    }

    #[test]
    fn pv_features_follow_the_c_enum() {
        use crate::PvFeature;
        assert_eq!(
            PvFeature::from_c(bindings::kvm_protmem_pv_KVM_PROTMEM_PV_ASYNC_PF),
            Some(PvFeature::AsyncPf)
        );
        assert_eq!(
            PvFeature::from_c(bindings::kvm_protmem_pv_KVM_PROTMEM_PV_STEAL_TIME),
            Some(PvFeature::StealTime)
        );
        assert_eq!(
            PvFeature::from_c(bindings::kvm_protmem_pv_KVM_PROTMEM_PV_EOI),
            Some(PvFeature::Eoi)
        );
        assert_eq!(PvFeature::from_c(3), None);
        assert_eq!(PvFeature::StealTime.name(), "steal time");
    }

    #[test]
    fn another_cc_platform_is_never_overridden() {
        use bindings::cc_vendor_CC_VENDOR_NONE as NONE;
        use bindings::{cc_vendor_CC_VENDOR_AMD as AMD, cc_vendor_CC_VENDOR_INTEL as INTEL};
        assert_eq!(other_cc_platform(NONE, false), None);
        // AMD without SEV: the vendor is set, nothing is encrypted.
        assert_eq!(other_cc_platform(AMD, false), None);
        assert_eq!(other_cc_platform(AMD, true), Some("AMD SEV"));
        assert_eq!(other_cc_platform(INTEL, true), Some("Intel TDX"));
        assert!(other_cc_platform(0x7f, true).is_some());
    }
}

#[kernel::macros::kunit_tests(kvm_protmem_ranges)]
mod range_tests {
    use crate::abi::{Error, Hypercall, Hypervisor};
    use crate::ranges::*;
    use core::cell::RefCell;

    /// A software host that accepts everything and counts calls.
    struct Host {
        calls: u64,
        fail_at: u64,
    }

    impl Hypervisor for Host {
        unsafe fn hypercall(&mut self, nr: u64, args: [u64; 3]) -> u64 {
            self.calls += 1;
            match Hypercall::decode(nr, args) {
                Some(Ok(_)) if self.calls == self.fail_at => Error::Fault.to_ret(),
                Some(Ok(_)) => 0,
                Some(Err(e)) => e.to_ret(),
                None => Error::NotSupported.to_ret(),
            }
        }
    }

    #[test]
    fn coalescing_follows_physical_layout() {
        let mut it = coalesce([5u64, 6, 7, 9, 3], 8);
        assert_eq!(it.next(), Some(PfnRun { pfn: 5, npages: 3 }));
        assert_eq!(it.next(), Some(PfnRun { pfn: 9, npages: 1 }));
        assert_eq!(it.next(), Some(PfnRun { pfn: 3, npages: 1 }));
        assert_eq!(it.next(), None);
        assert_eq!(coalesce(0u64..5, 2).count(), 3);
    }

    #[test]
    fn pool_of_64_mib_takes_one_hypercall() {
        let mut host = Host {
            calls: 0,
            fail_at: 0,
        };
        let book = RefCell::new(Ledger::<4>::new());
        let n = (64u64 << 20) >> 12;
        // SAFETY: the software host changes no memory.
        let res = unsafe { convert(&mut host, 0x10000..0x10000 + n, Direction::Share, &book) };
        assert_eq!(res, Ok(1));
        assert_eq!(host.calls, 1);
        assert_eq!(book.borrow().stats.pages_shared, n);
    }

    #[test]
    fn refusal_leaks_the_request_until_rolled_back() {
        let mut host = Host {
            calls: 0,
            fail_at: 2,
        };
        let book = RefCell::new(Ledger::<4>::new());
        // SAFETY: the software host changes no memory.
        let res = unsafe { convert(&mut host, [1u64, 2, 5, 9], Direction::Share, &book) };
        assert!(res.is_err());
        assert_eq!(book.borrow().stats.failures, 1);
        assert_eq!(book.borrow().stats.pages_leaked, 4);
        assert_eq!(book.borrow().stats.pages_shared, 2);
        // The caller makes the range private again: nothing is lost.
        // SAFETY: as above.
        let res = unsafe { convert(&mut host, [1u64, 2, 5, 9], Direction::Unshare, &book) };
        assert_eq!(res, Ok(3));
        assert_eq!(book.borrow().stats.pages_leaked, 0);
        assert_eq!(book.borrow().stats.pages_shared, 0);
    }

    #[test]
    fn range_set_splits_and_merges() {
        let mut s = RangeSet::<3>::new();
        assert_eq!(
            s.insert(PfnRun {
                pfn: 10,
                npages: 10
            }),
            Ok(10)
        );
        assert_eq!(s.remove(PfnRun { pfn: 12, npages: 2 }), Ok(2));
        assert_eq!(s.runs().len(), 2);
        assert_eq!(s.insert(PfnRun { pfn: 11, npages: 4 }), Ok(2));
        assert_eq!(
            s.runs(),
            [PfnRun {
                pfn: 10,
                npages: 10
            }]
        );
    }
}

#[kernel::macros::kunit_tests(kvm_protmem_live)]
mod live_tests {
    use super::{skip, skip_unless_enabled};
    use crate::{abi, boot_pool, is_shared, stats, virt_to_pfn};
    use core::ptr::addr_of;
    use kernel::{
        bindings,
        cpu::{nr_cpu_ids, CpuId},
        cpumask::Cpumask,
        error::from_err_ptr,
        ffi::{c_int, c_void},
        page::PAGE_SIZE,
        prelude::*,
        sync::atomic::{Acquire, Atomic, Relaxed, Release},
        time::{Instant, Monotonic},
    };

    #[test]
    fn pool_is_shared() {
        if skip_unless_enabled(b"protection is off") {
            return;
        }
        let pool = boot_pool();
        assert!(pool.is_some());
        if let Some((start, n)) = pool {
            assert!(n > 0);
            assert!((start..start + n).all(is_shared));
        }
    }

    /// Every per-CPU page this CPU registered with the host (async PF,
    /// steal time, PV EOI MSRs) is shared; if the host refused to share
    /// the per-CPU section, none is registered. Steal time is always
    /// registered when offered and shared (no command line turns it off).
    #[test]
    fn pv_msrs_point_into_shared_pages_or_are_off() {
        use crate::{hv::pv_msr, percpu_shared, PvFeature};
        if skip_unless_enabled(b"protection is off") {
            return;
        }
        let shared = percpu_shared();
        for f in [PvFeature::AsyncPf, PvFeature::StealTime, PvFeature::Eoi] {
            let Some(msr) = pv_msr(f) else {
                continue;
            };
            let on = msr & 1 != 0;
            if shared {
                assert!(!on || is_shared(msr >> abi::PAGE_SHIFT));
                if f == PvFeature::StealTime {
                    assert!(on);
                }
            } else {
                assert!(!on);
            }
        }
    }

    #[test]
    fn set_memory_round_trip_issues_hypercalls() {
        if skip_unless_enabled(b"protection is off") {
            return;
        }
        // SAFETY: plain page allocation; freed below.
        let addr = unsafe { bindings::get_zeroed_page_noprof(bindings::GFP_KERNEL) };
        assert!(addr != 0);
        if addr == 0 {
            return;
        }
        // SAFETY: `addr` is a mapped page of the direct map we own.
        let pfn = unsafe { virt_to_pfn(addr as usize) };
        let before = stats();
        assert!(!is_shared(pfn));
        // SAFETY: `addr` is a page we own.
        assert_eq!(unsafe { bindings::set_memory_decrypted(addr, 1) }, 0);
        let mid = stats();
        assert_eq!(mid.shares, before.shares + 1);
        assert_eq!(mid.pages_shared, before.pages_shared + 1);
        assert!(is_shared(pfn));
        // SAFETY: as above.
        assert_eq!(unsafe { bindings::set_memory_encrypted(addr, 1) }, 0);
        let after = stats();
        assert_eq!(after.unshares, before.unshares + 1);
        assert_eq!(after.pages_shared, before.pages_shared);
        assert!(!is_shared(pfn));
        // SAFETY: the page is private again and ours to free.
        unsafe { bindings::free_pages(addr, 0) };
    }

    /// Round trips (a share and an unshare) each CPU makes in the stress.
    const STRESS_ROUNDS: u64 = 100;
    /// Each CPU converts 1, 2, 4, 8 and 16 pages of its own block in turn.
    const STRESS_ORDER: u32 = 4;

    /// One CPU's part of the stress: written by its threads, read by the
    /// test after they are done.
    struct Worker {
        done: Atomic<bool>,
        failed: Atomic<bool>,
        conversions: Atomic<u64>,
        hypercalls: Atomic<u64>,
        /// The block's first page frame; 0 until the block exists.
        pfn: Atomic<u64>,
        /// The block's address in the direct map, published with `pfn`.
        addr: Atomic<usize>,
        /// Reads the reader on this CPU made across the next CPU's page
        /// boundaries.
        reads: Atomic<u64>,
        /// The worker of the next CPU (read by this CPU's reader); set
        /// before the threads start.
        next: Atomic<usize>,
    }

    /// The stress thread: allocates a block on its CPU, converts pieces of
    /// it back and forth and waits to be stopped; the test frees the block
    /// once every thread is stopped (the readers look at it until then).
    ///
    /// # Safety
    ///
    /// `data` is a `Worker` that outlives the thread.
    unsafe extern "C" fn stress_thread(data: *mut c_void) -> c_int {
        // SAFETY: the caller's `Worker` outlives this thread.
        let w = unsafe { &*data.cast::<Worker>() };
        // SAFETY: plain page allocation; the test frees it.
        let addr = unsafe { bindings::get_free_pages_noprof(bindings::GFP_KERNEL, STRESS_ORDER) };
        if addr == 0 {
            w.failed.store(true, Relaxed);
        } else {
            w.addr.store(addr, Relaxed);
            // SAFETY: `addr` is a mapped page of the direct map we own.
            w.pfn.store(unsafe { virt_to_pfn(addr) }, Release);
            for i in 0..STRESS_ROUNDS {
                let n = 1 << (i % u64::from(STRESS_ORDER + 1));
                // SAFETY: the block is ours and holds nothing private; it
                // is made private again before it is freed or reused.
                let ok = unsafe {
                    bindings::set_memory_decrypted(addr, n) == 0
                        && bindings::set_memory_encrypted(addr, n) == 0
                };
                if !ok {
                    w.failed.store(true, Relaxed);
                    break;
                }
                w.conversions.fetch_add(2, Relaxed);
                // The block is physically contiguous: one call each way.
                w.hypercalls.fetch_add(2, Relaxed);
            }
        }
        w.done.store(true, Release);
        // `kthread_stop()` must find this thread alive.
        // SAFETY: plain calls from the thread itself.
        while !unsafe { bindings::kthread_should_stop() } {
            // SAFETY: as above.
            unsafe { bindings::schedule_timeout_uninterruptible(1) };
        }
        0
    }

    /// The reader thread: until stopped, reads 8 bytes across every page
    /// boundary of the next CPU's block while that CPU converts it, as
    /// `load_unaligned_zeropad()` legitimately does. What it reads of a
    /// page that is being converted is meaningless; that the reads neither
    /// fault the guest nor stop the VM is the point (a vCPU that loses the
    /// race with a conversion may see a memory fault the VMM must retry).
    ///
    /// # Safety
    ///
    /// `data` is a `Worker` that outlives the thread, and its `next` a
    /// `Worker` whose block is freed only after this thread is stopped.
    unsafe extern "C" fn reader_thread(data: *mut c_void) -> c_int {
        // SAFETY: the caller's `Worker` outlives this thread.
        let w = unsafe { &*data.cast::<Worker>() };
        // SAFETY: set before the threads started, outlives them (caller).
        let next = unsafe { &*(w.next.load(Relaxed) as *const Worker) };
        // SAFETY: plain calls from the thread itself.
        while !unsafe { bindings::kthread_should_stop() } {
            if next.pfn.load(Acquire) != 0 && !next.done.load(Acquire) {
                let base = next.addr.load(Relaxed);
                for page in 1..(1usize << STRESS_ORDER) {
                    let at = base + page * PAGE_SIZE - 4;
                    // The next worker's block stays in the direct map until
                    // the test frees it, after this thread stopped.
                    // SAFETY: `at..at + 8` lies inside that mapped block.
                    let v = unsafe { core::ptr::read_unaligned(at as *const u64) };
                    core::hint::black_box(v);
                }
                w.reads.fetch_add((1 << STRESS_ORDER) - 1, Relaxed);
                // No yield: the kernel preempts (PREEMPT_LAZY at least),
                // and the worker of this CPU gets its share.
                continue;
            }
            // SAFETY: a plain sleep in process context.
            unsafe { bindings::schedule_timeout_uninterruptible(1) };
        }
        0
    }

    #[test]
    fn every_cpu_converts_its_own_pages_concurrently() {
        if skip_unless_enabled(b"protection is off") {
            return;
        }
        // Exactness under concurrency needs a host that converts: one that
        // has already refused this boot (a test host failing shares on
        // purpose) would fail the stress for a reason it does not test.
        if stats().failures > 0 {
            skip(b"the host has refused conversions this boot");
            return;
        }
        let empty = || Worker {
            done: Atomic::new(false),
            failed: Atomic::new(false),
            conversions: Atomic::new(0),
            hypercalls: Atomic::new(0),
            pfn: Atomic::new(0),
            addr: Atomic::new(0),
            reads: Atomic::new(0),
            next: Atomic::new(0),
        };
        // SAFETY: `__cpu_online_mask` is a valid static cpumask; CPUs do
        // not go offline during boot-time KUnit.
        let online = unsafe { Cpumask::from_raw(addr_of!(bindings::__cpu_online_mask)) };
        let cpus: Result<KVec<CpuId>, _> = (0..nr_cpu_ids())
            .filter_map(CpuId::from_u32)
            .filter(|&c| online.test(c))
            .try_fold(KVec::new(), |mut v, c| v.push(c, GFP_KERNEL).map(|()| v));
        assert!(cpus.is_ok());
        let Ok(cpus) = cpus else {
            return;
        };
        let mut workers = KVec::new();
        for _ in 0..cpus.len() {
            assert!(workers.push(empty(), GFP_KERNEL).is_ok());
        }
        if workers.len() != cpus.len() {
            return;
        }
        // Each CPU's reader reads the next CPU's block (with one CPU, its
        // own: still a conversion racing with reads across its pages).
        for (i, w) in workers.iter().enumerate() {
            let next = &workers[(i + 1) % workers.len()];
            w.next.store(core::ptr::from_ref(next) as usize, Relaxed);
        }
        let before = stats();
        let start = Instant::<Monotonic>::now();
        let mut tasks = KVec::new();
        let mut spawned = 0;
        for (w, cpu) in workers.iter().zip(cpus.iter()) {
            let threads = [
                (
                    stress_thread as unsafe extern "C" fn(*mut c_void) -> c_int,
                    c"kpm_stress/%u",
                ),
                (reader_thread, c"kpm_reader/%u"),
            ];
            for (f, name) in threads {
                // SAFETY: `w` and the worker its `next` names outlive the
                // thread: every thread is stopped below before `workers` is
                // dropped or any block freed.
                let task = unsafe {
                    bindings::kthread_create_on_cpu(
                        Some(f),
                        core::ptr::from_ref(w).cast_mut().cast(),
                        cpu.as_u32(),
                        name.as_char_ptr(),
                    )
                };
                let task = from_err_ptr(task);
                assert!(task.is_ok());
                let Ok(task) = task else {
                    break;
                };
                assert!(tasks.push(task, GFP_KERNEL).is_ok());
                // SAFETY: `task` was just created and not yet woken.
                unsafe { bindings::wake_up_process(task) };
            }
            spawned += 1;
        }
        // At most 60 s of the L1 clock; a lost wakeup fails, never hangs.
        for _ in 0..6000 {
            if workers.iter().take(spawned).all(|w| w.done.load(Acquire)) {
                break;
            }
            // SAFETY: plain sleep in process context.
            unsafe { bindings::msleep(10) };
        }
        let finished = workers.iter().take(spawned).all(|w| w.done.load(Acquire));
        let elapsed = start.elapsed();
        for &task in tasks.iter() {
            // SAFETY: each thread waits for this stop before it exits.
            unsafe { bindings::kthread_stop(task) };
        }
        // No thread looks at a block any more.
        for w in workers.iter() {
            let addr = w.addr.load(Relaxed);
            if addr != 0 && !w.failed.load(Relaxed) {
                // SAFETY: the block is private again and ours to free.
                unsafe { bindings::free_pages(addr, STRESS_ORDER) };
            }
        }
        assert!(finished);
        assert_eq!(tasks.len(), 2 * cpus.len());
        let after = stats();
        let conversions: u64 = workers.iter().map(|w| w.conversions.load(Relaxed)).sum();
        let hypercalls: u64 = workers.iter().map(|w| w.hypercalls.load(Relaxed)).sum();
        let reads: u64 = workers.iter().map(|w| w.reads.load(Relaxed)).sum();
        for w in workers.iter() {
            assert!(!w.failed.load(Relaxed));
            assert_eq!(w.conversions.load(Relaxed), 2 * STRESS_ROUNDS);
            let pfn = w.pfn.load(Relaxed);
            assert!(!(pfn..pfn + (1 << STRESS_ORDER)).any(is_shared));
        }
        // The readers ran while the blocks were being converted.
        assert!(reads > 0);
        // Every conversion reached the host, and the ledger is exact.
        assert!(after.shares + after.unshares - before.shares - before.unshares >= hypercalls);
        assert_eq!(after.pages_shared, before.pages_shared);
        assert_eq!(after.failures, before.failures);
        assert_eq!(after.pages_leaked, before.pages_leaked);
        pr_info!(
            "stress: {} CPUs x {} conversions each: {} conversions, {} hypercalls, {} reads across page boundaries in {} ms\n",
            cpus.len(),
            2 * STRESS_ROUNDS,
            conversions,
            hypercalls,
            reads,
            elapsed.as_millis()
        );
    }

    /// The reference VMM's probe device (host/vmm/src/probe.rs): write a GPA
    /// at 0x00, read 1/0 (device view may/may not access it) at 0x08 and
    /// the first 8 bytes at 0x10; 0x18 holds the magic "prob".
    const PROBE_BASE: u64 = 0xd000_f000;
    const PROBE_MAGIC: u64 = 0x626f_7270;

    /// Asks the probe about `gpa`: (allowed, bytes seen).
    ///
    /// # Safety
    ///
    /// `probe` must be the ioremapped probe window.
    unsafe fn probe(probe: *mut kernel::ffi::c_void, gpa: u64) -> (u64, u64) {
        let base = probe.cast::<u8>();
        // SAFETY: registers inside the 4 KiB window (caller).
        unsafe {
            bindings::writeq(gpa, base.cast());
            (
                bindings::readq(base.add(8).cast()),
                bindings::readq(base.add(16).cast()),
            )
        }
    }

    #[test]
    fn device_view_cannot_read_private_memory() {
        if skip_unless_enabled(b"protection is off") {
            return;
        }
        // SAFETY: mapping an MMIO window; unmapped below.
        let win = unsafe { bindings::ioremap(PROBE_BASE, 0x1000) };
        assert!(!win.is_null());
        if win.is_null() {
            return;
        }
        // SAFETY: inside the window.
        let magic = unsafe { bindings::readl(win.cast::<u8>().add(0x18).cast()) };
        if u64::from(magic) != PROBE_MAGIC {
            // SAFETY: mapped above.
            unsafe { bindings::iounmap(win) };
            skip(b"no probe device (not the reference VMM)");
            return;
        }
        const SECRET: u64 = 0x5ec2_e75e_c2e7_5ec2;
        // SAFETY: plain page allocation; freed below.
        let addr = unsafe { bindings::get_zeroed_page_noprof(bindings::GFP_KERNEL) };
        assert!(addr != 0);
        if addr == 0 {
            return;
        }
        // SAFETY: `addr` is our mapped page.
        let gpa = unsafe { virt_to_pfn(addr) } << abi::PAGE_SHIFT;
        // SAFETY: our page, 8-byte aligned.
        unsafe { core::ptr::write_volatile(addr as *mut u64, SECRET) };
        // SAFETY: `win` is the probe window.
        let (allowed, seen) = unsafe { probe(win, gpa) };
        assert_eq!(allowed, 0);
        assert_eq!(seen, 0);
        // A shared page is visible: the probe is not blind.
        if let Some((pool, _)) = boot_pool() {
            // SAFETY: as above.
            assert_eq!(unsafe { probe(win, pool << abi::PAGE_SHIFT) }.0, 1);
        }
        // SAFETY: our page.
        assert_eq!(unsafe { bindings::set_memory_decrypted(addr, 1) }, 0);
        // SAFETY: our page; contents are unspecified after SHARE.
        unsafe { core::ptr::write_volatile(addr as *mut u64, SECRET) };
        // SAFETY: as above.
        assert_eq!(unsafe { probe(win, gpa) }, (1, SECRET));
        // SAFETY: our page.
        assert_eq!(unsafe { bindings::set_memory_encrypted(addr, 1) }, 0);
        // SAFETY: as above.
        assert_eq!(unsafe { probe(win, gpa) }, (0, 0));
        // SAFETY: private again, ours to free; the window is ours to unmap.
        unsafe {
            bindings::free_pages(addr, 0);
            bindings::iounmap(win);
        }
    }

    #[test]
    fn streaming_dma_lands_in_the_bounce_pool() {
        if skip_unless_enabled(b"protection is off") {
            return;
        }
        let Some((pool, pages)) = boot_pool() else {
            assert!(false);
            return;
        };
        // SAFETY: called from a running test case.
        let dev = unsafe {
            bindings::kunit_device_register(
                bindings::kunit_get_current_test(),
                c"kvm_protmem_dma".as_char_ptr(),
            )
        };
        assert!(!dev.is_null() && (dev as usize) < usize::MAX - 4095);
        if dev.is_null() || (dev as usize) >= usize::MAX - 4095 {
            return;
        }
        const DATA: u64 = 0x0123_4567_89ab_cdef;
        // SAFETY: a fresh device owned by this test (KUnit frees it at the
        // end); its masks are set before any mapping. The page is ours.
        unsafe {
            (*dev).coherent_dma_mask = u64::MAX;
            (*dev).dma_mask = &raw mut (*dev).coherent_dma_mask;
            let addr = bindings::get_zeroed_page_noprof(bindings::GFP_KERNEL);
            assert!(addr != 0);
            if addr == 0 {
                return;
            }
            core::ptr::write_volatile(addr as *mut u64, DATA);
            let phys = virt_to_pfn(addr) << abi::PAGE_SHIFT;
            let dma = bindings::dma_map_phys(
                dev,
                phys,
                64,
                bindings::dma_data_direction_DMA_TO_DEVICE,
                0,
            );
            assert!(dma != u64::MAX);
            let slot = dma >> abi::PAGE_SHIFT;
            // The device gets a bounce slot in the shared pool, not the page.
            assert!(slot >= pool && slot < pool + pages);
            assert!(dma != phys);
            // The bounce slot holds the data (copied at map time).
            let bounced =
                core::ptr::read_volatile((dma as usize + bindings::page_offset_base) as *const u64);
            assert_eq!(bounced, DATA);
            bindings::dma_unmap_phys(dev, dma, 64, bindings::dma_data_direction_DMA_TO_DEVICE, 0);
            bindings::free_pages(addr, 0);
        }
    }

    #[test]
    fn hypercalls_reject_bad_arguments() {
        if skip_unless_enabled(b"protection is off") {
            return;
        }
        let Some(mut kvm) = crate::hv::Kvm::get() else {
            assert!(false);
            return;
        };
        // Unaligned GPA and nonzero flags: the host must refuse, not act.
        use abi::Hypervisor as _;
        // SAFETY: malformed arguments, which the host refuses without
        // converting anything.
        let ret = unsafe { kvm.hypercall(abi::KVM_HC_MEM_SHARE, [0x1001, 1, 0]) };
        assert_eq!(abi::decode_ret(ret), Err(abi::Error::Invalid));
        // SAFETY: as above.
        let ret = unsafe { kvm.hypercall(abi::KVM_HC_MEM_UNSHARE, [0x1000, 1, 7]) };
        assert_eq!(abi::decode_ret(ret), Err(abi::Error::Invalid));
    }
}
