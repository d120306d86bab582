// SPDX-License-Identifier: GPL-2.0

//! Host-side tests of the range logic, with a software host.

extern crate std;

use super::*;
use core::cell::RefCell;
use hypercall::{Error, Hypercall, Hypervisor};
use proptest::prelude::*;
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use std::vec::Vec;

fn runs(frames: &[u64], max: u64) -> Vec<PfnRun> {
    coalesce(frames.iter().copied(), max).collect()
}

#[test]
fn coalesces_contiguous_frames() {
    assert_eq!(runs(&[], 8), []);
    assert_eq!(runs(&[5], 8), [PfnRun { pfn: 5, npages: 1 }]);
    assert_eq!(
        runs(&[5, 6, 7, 9, 10, 3], 8),
        [
            PfnRun { pfn: 5, npages: 3 },
            PfnRun { pfn: 9, npages: 2 },
            PfnRun { pfn: 3, npages: 1 }
        ]
    );
    // Descending frames (a vmalloc area backed backwards) never merge.
    assert_eq!(runs(&[4, 3, 2], 8).len(), 3);
    // The bound splits a long run.
    assert_eq!(
        runs(&[0, 1, 2, 3, 4], 2),
        [
            PfnRun { pfn: 0, npages: 2 },
            PfnRun { pfn: 2, npages: 2 },
            PfnRun { pfn: 4, npages: 1 }
        ]
    );
    assert_eq!(runs(&[0, 1], 0).len(), 2);
    // No overflow at the top of the frame space.
    assert_eq!(runs(&[u64::MAX, 0], 8).len(), 2);
}

/// A software host: answers like the reference VMM and records calls.
#[derive(Default)]
struct Host {
    calls: Vec<Hypercall>,
    /// Fail the call with this index (0-based).
    fail_at: Option<usize>,
}

/// [`convert`] over a software host, which changes no memory.
fn unsafe_convert<H, I, const N: usize>(
    host: &mut H,
    frames: I,
    dir: Direction,
    book: &impl Book<N>,
) -> Result<u64, Failed>
where
    H: Hypervisor,
    I: IntoIterator<Item = u64>,
    I::IntoIter: Clone,
{
    // SAFETY: the software hosts only record calls; no memory changes
    // state.
    unsafe { convert(host, frames, dir, book) }
}

/// A ledger for one thread.
fn ledger<const N: usize>() -> RefCell<Ledger<N>> {
    RefCell::new(Ledger::new())
}

impl Hypervisor for Host {
    unsafe fn hypercall(&mut self, nr: u64, args: [u64; 3]) -> u64 {
        let i = self.calls.len();
        match Hypercall::decode(nr, args) {
            Some(Ok(c)) => self.calls.push(c),
            Some(Err(e)) => return e.to_ret(),
            None => return Error::NotSupported.to_ret(),
        }
        if self.fail_at == Some(i) {
            Error::Fault.to_ret()
        } else {
            0
        }
    }
}

#[test]
fn a_64_mib_pool_takes_one_share() {
    // The default swiotlb pool is one physically contiguous memblock
    // allocation: 64 MiB is 16384 frames.
    let mut host = Host::default();
    let book = ledger::<8>();
    let base = 0x3c00_0000 >> 12;
    let n = (64 << 20) >> 12;
    let done = unsafe_convert(&mut host, base..base + n, Direction::Share, &book).unwrap();
    assert_eq!(done, 1);
    assert_eq!(host.calls.len(), 1);
    let l = book.borrow();
    assert_eq!(l.stats.shares, 1);
    assert_eq!(l.stats.pages_shared, 16384);
    // 4 GiB contiguous would take 4 calls at the 1 GiB bound.
    let mut host = Host::default();
    let n4 = (4u64 << 30) >> 12;
    let done = unsafe_convert(&mut host, 0..n4, Direction::Share, &ledger::<8>()).unwrap();
    assert_eq!(done, 4);
}

#[test]
fn per_page_mode_takes_one_call_per_page_and_the_ledger_still_coalesces() {
    let mut host = Host::default();
    let book = ledger::<8>();
    let base = 0x3c00_0000 >> 12;
    let n = 512;
    // SAFETY: the software host only records calls.
    let done = unsafe { convert_in_runs_of(&mut host, base..base + n, Direction::Share, &book, 1) };
    assert_eq!(done, Ok(n));
    assert_eq!(host.calls.len() as u64, n);
    assert!(host
        .calls
        .iter()
        .enumerate()
        .all(|(i, c)| *c
            == Hypercall::Share(hypercall::GpaRange::from_pfn(base + i as u64, 1).unwrap())));
    let l = book.borrow();
    assert_eq!((l.stats.shares, l.stats.pages_shared), (n, n));
    assert_eq!(
        l.set.runs().len(),
        1,
        "adjacent pages are one run in the ledger"
    );
    // A limit of 0 means 1, beyond MAX_RUN_PAGES means MAX_RUN_PAGES.
    let mut host = Host::default();
    // SAFETY: as above.
    let done = unsafe { convert_in_runs_of(&mut host, 0..3, Direction::Share, &ledger::<8>(), 0) };
    assert_eq!(done, Ok(3));
    let mut host = Host::default();
    let n4 = (4u64 << 30) >> 12;
    // SAFETY: as above.
    let done =
        unsafe { convert_in_runs_of(&mut host, 0..n4, Direction::Share, &ledger::<8>(), u64::MAX) };
    assert_eq!(done, Ok(4));
}

#[test]
fn share_then_unshare_round_trip() {
    let mut host = Host::default();
    let book = ledger::<8>();
    // A vmalloc buffer backed by two physical pieces.
    let frames = [100, 101, 102, 200, 201];
    unsafe_convert(&mut host, frames, Direction::Share, &book).unwrap();
    assert_eq!(book.borrow().stats.pages_shared, 5);
    assert_eq!(book.borrow().set.runs().len(), 2);
    unsafe_convert(&mut host, frames, Direction::Unshare, &book).unwrap();
    let l = book.borrow();
    assert_eq!(l.stats.pages_shared, 0);
    assert_eq!((l.stats.shares, l.stats.unshares), (2, 2));
    let expect = [
        Hypercall::Share(hypercall::GpaRange::from_pfn(100, 3).unwrap()),
        Hypercall::Share(hypercall::GpaRange::from_pfn(200, 2).unwrap()),
        Hypercall::Unshare(hypercall::GpaRange::from_pfn(100, 3).unwrap()),
        Hypercall::Unshare(hypercall::GpaRange::from_pfn(200, 2).unwrap()),
    ];
    assert_eq!(host.calls, expect);
}

#[test]
fn refused_conversion_stops_and_leaks_the_request() {
    let mut host = Host {
        fail_at: Some(1),
        ..Host::default()
    };
    let book = ledger::<8>();
    let err = unsafe_convert(&mut host, [1, 2, 5, 9], Direction::Share, &book).unwrap_err();
    assert_eq!(
        err,
        Failed {
            run: PfnRun { pfn: 5, npages: 1 },
            error: Error::Fault,
            done: 1,
            nth: 1,
        }
    );
    // The third run was never asked for.
    assert_eq!(host.calls.len(), 2);
    let l = book.borrow();
    assert_eq!(l.stats.failures, 1);
    assert_eq!(l.stats.pages_leaked, 4);
    // What the host did accept is recorded as shared.
    assert_eq!(l.stats.pages_shared, 2);
    assert!(l.set.contains(1) && l.set.contains(2) && !l.set.contains(5));
}

#[test]
fn a_rolled_back_share_is_not_leaked() {
    // `swiotlb_alloc_tlb()`: a share fails half way, the caller makes the
    // range private again and frees it. The pages are not lost.
    let mut host = Host {
        fail_at: Some(1),
        ..Host::default()
    };
    let book = ledger::<8>();
    let frames = [1, 2, 5, 9];
    unsafe_convert(&mut host, frames, Direction::Share, &book).unwrap_err();
    assert_eq!(book.borrow().stats.pages_leaked, 4);
    unsafe_convert(&mut host, frames, Direction::Unshare, &book).unwrap();
    let l = book.borrow();
    assert_eq!(l.stats.pages_leaked, 0);
    assert_eq!(l.stats.pages_shared, 0);
    assert_eq!(l.leaked.pages(), 0);
    // A failure counts once, and the second failure is the second.
    drop(l);
    let mut host = Host {
        fail_at: Some(0),
        ..Host::default()
    };
    let err = unsafe_convert(&mut host, [7, 8], Direction::Unshare, &book).unwrap_err();
    assert_eq!(err.nth, 2);
    // A failed unshare that is never retried stays leaked.
    assert_eq!(book.borrow().stats.pages_leaked, 2);
}

#[test]
fn leaked_frames_beyond_the_ledger_stay_counted() {
    let mut host = Host {
        fail_at: Some(0),
        ..Host::default()
    };
    let book = ledger::<8>();
    // More scattered runs than the ledger remembers.
    let frames: Vec<u64> = (0..LEAKED_RUNS as u64 + 3).map(|i| i * 2).collect();
    unsafe_convert(&mut host, frames.clone(), Direction::Share, &book).unwrap_err();
    let l = book.borrow();
    assert_eq!(l.stats.pages_leaked, frames.len() as u64);
    assert_eq!(l.stats.untracked, 3);
}

#[test]
fn frames_beyond_the_abi_are_refused_before_the_host() {
    let mut host = Host::default();
    let err = unsafe_convert(
        &mut host,
        [u64::MAX >> 12],
        Direction::Share,
        &ledger::<4>(),
    )
    .unwrap_err();
    assert_eq!(err.error, Error::Invalid);
    assert!(host.calls.is_empty());
}

#[test]
fn full_set_is_counted_not_lost() {
    let mut host = Host::default();
    let book = ledger::<2>();
    unsafe_convert(&mut host, [1, 3, 5], Direction::Share, &book).unwrap();
    let l = book.borrow();
    assert_eq!(l.stats.shares, 3);
    assert_eq!(l.stats.pages_shared, 2);
    assert_eq!(l.stats.untracked, 1);
}

/// A ledger shared between threads, as the kernel's spinlock shares it.
impl<const N: usize> Book<N> for Mutex<Ledger<N>> {
    fn with<R>(&self, f: impl FnOnce(&mut Ledger<N>) -> R) -> R {
        f(&mut self.lock().unwrap())
    }
}

/// A host whose first call on each thread waits until every thread has a
/// call in flight: it can only return if the ledger's lock is not held
/// across hypercalls.
struct Rendezvous<'a> {
    arrived: &'a AtomicUsize,
    threads: usize,
    first: bool,
    calls: u64,
}

impl Hypervisor for Rendezvous<'_> {
    unsafe fn hypercall(&mut self, _nr: u64, _args: [u64; 3]) -> u64 {
        self.calls += 1;
        if core::mem::take(&mut self.first) {
            self.arrived.fetch_add(1, Ordering::SeqCst);
            let until = Instant::now() + Duration::from_secs(10);
            while self.arrived.load(Ordering::SeqCst) < self.threads {
                if Instant::now() > until {
                    return Error::Fault.to_ret();
                }
                std::thread::yield_now();
            }
        }
        0
    }
}

#[test]
fn conversions_on_different_cpus_run_in_parallel_and_stay_exact() {
    const THREADS: usize = 4;
    const ROUNDS: u64 = 200;
    let book = Mutex::new(Ledger::<64>::new());
    let arrived = AtomicUsize::new(0);
    let calls: Vec<u64> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..THREADS as u64)
            .map(|t| {
                let (book, arrived) = (&book, &arrived);
                s.spawn(move || {
                    let mut host = Rendezvous {
                        arrived,
                        threads: THREADS,
                        first: true,
                        calls: 0,
                    };
                    // Each thread owns frames [t * 1000, t * 1000 + 16):
                    // it shares and unshares pieces of different sizes, and
                    // keeps the first 4 shared at the end.
                    let base = t * 1000;
                    for i in 0..ROUNDS {
                        let n = 1 + i % 16;
                        unsafe_convert(&mut host, base..base + n, Direction::Share, book)
                            .expect("share");
                        unsafe_convert(&mut host, base..base + n, Direction::Unshare, book)
                            .expect("unshare");
                    }
                    unsafe_convert(&mut host, base..base + 4, Direction::Share, book)
                        .expect("share");
                    host.calls
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap()).collect()
    });
    let l = book.lock().unwrap();
    let r = |pfn, npages| PfnRun { pfn, npages };
    assert_eq!(l.set.runs(), [r(0, 4), r(1000, 4), r(2000, 4), r(3000, 4)]);
    assert_eq!(l.stats.pages_shared, 16);
    assert_eq!(l.stats.shares, THREADS as u64 * (ROUNDS + 1));
    assert_eq!(l.stats.unshares, THREADS as u64 * ROUNDS);
    assert_eq!(calls.iter().sum::<u64>(), l.stats.shares + l.stats.unshares);
    assert_eq!((l.stats.failures, l.stats.pages_leaked), (0, 0));
}

#[test]
fn range_set_merges_and_splits() {
    let mut s = RangeSet::<3>::new();
    let r = |pfn, npages| PfnRun { pfn, npages };
    assert_eq!(s.insert(r(10, 5)), Ok(5));
    assert_eq!(s.insert(r(15, 5)), Ok(5)); // touching: merged
    assert_eq!(s.runs(), [r(10, 10)]);
    assert_eq!(s.insert(r(12, 2)), Ok(0)); // already in
    assert_eq!(s.remove(r(12, 2)), Ok(2)); // hole: split in two
    assert_eq!(s.runs(), [r(10, 2), r(14, 6)]);
    assert_eq!(s.insert(r(30, 1)), Ok(1));
    assert_eq!(s.remove(r(16, 1)), Err(Full)); // would need 4 runs
    assert_eq!(s.runs(), [r(10, 2), r(14, 6), r(30, 1)]);
    assert_eq!(s.insert(r(0, 100)), Ok(100 - 9)); // swallows everything
    assert_eq!(s.runs(), [r(0, 100)]);
    assert_eq!(s.remove(r(0, 100)), Ok(100));
    assert_eq!(s.pages(), 0);
}

#[derive(Clone, Debug)]
enum Op {
    Insert(u64, u64),
    Remove(u64, u64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0u64..64, 0u64..12).prop_map(|(p, n)| Op::Insert(p, n)),
        (0u64..64, 0u64..12).prop_map(|(p, n)| Op::Remove(p, n)),
    ]
}

proptest! {
    #[test]
    fn coalescing_covers_exactly_the_input(frames in proptest::collection::vec(0u64..40, 0..60), max in 0u64..6) {
        let out = runs(&frames, max);
        let flat: Vec<u64> = out.iter().flat_map(|r| r.pfn..r.pfn + r.npages).collect();
        prop_assert_eq!(&flat, &frames);
        for r in &out {
            prop_assert!(r.npages >= 1 && r.npages <= max.max(1));
        }
        // Maximal: two consecutive runs could not have been one.
        for w in out.windows(2) {
            prop_assert!(w[0].end() != w[1].pfn || w[0].npages == max.max(1));
        }
    }

    #[test]
    fn range_set_matches_a_model(ops in proptest::collection::vec(op(), 0..80)) {
        let mut set = RangeSet::<6>::new();
        let mut model = BTreeSet::new();
        for op in ops {
            let (res, pfn, n, ins) = match op {
                Op::Insert(p, n) => (set.insert(PfnRun { pfn: p, npages: n }), p, n, true),
                Op::Remove(p, n) => (set.remove(PfnRun { pfn: p, npages: n }), p, n, false),
            };
            if let Ok(changed) = res {
                let mut c = 0;
                for f in pfn..pfn + n {
                    c += u64::from(if ins { model.insert(f) } else { model.remove(&f) });
                }
                prop_assert_eq!(changed, c);
            }
            // Invariants hold whether or not the change fit.
            let rs = set.runs();
            for w in rs.windows(2) {
                prop_assert!(w[0].end() < w[1].pfn, "runs touch or overlap: {:?}", rs);
            }
            prop_assert!(rs.iter().all(|r| r.npages >= 1));
            prop_assert_eq!(set.pages(), model.len() as u64);
            for f in 0..80 {
                prop_assert_eq!(set.contains(f), model.contains(&f));
            }
        }
    }
}
