// SPDX-License-Identifier: GPL-2.0

//! Host-side tests of the range logic, with a software host.

extern crate std;

use super::*;
use hypercall::{Error, Hypercall, Hypervisor};
use proptest::prelude::*;
use std::collections::BTreeSet;
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

/// [`convert`] over the software host, which changes no memory.
fn unsafe_convert<I: IntoIterator<Item = u64>, const N: usize>(
    host: &mut Host,
    frames: I,
    npages: u64,
    dir: Direction,
    set: &mut RangeSet<N>,
    stats: &mut Stats,
) -> Result<u64, Failed> {
    // SAFETY: `Host` only records calls; no memory changes state.
    unsafe { convert(host, frames, npages, dir, set, stats) }
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
    let mut set = RangeSet::<8>::new();
    let mut stats = Stats::default();
    let base = 0x3c00_0000 >> 12;
    let n = (64 << 20) >> 12;
    let done = unsafe_convert(
        &mut host,
        base..base + n,
        n,
        Direction::Share,
        &mut set,
        &mut stats,
    )
    .unwrap();
    assert_eq!(done, 1);
    assert_eq!(host.calls.len(), 1);
    assert_eq!(stats.shares, 1);
    assert_eq!(stats.pages_shared, 16384);
    // 4 GiB contiguous would take 4 calls at the 1 GiB bound.
    let mut host = Host::default();
    let n4 = (4u64 << 30) >> 12;
    let done = unsafe_convert(
        &mut host,
        0..n4,
        n4,
        Direction::Share,
        &mut RangeSet::<8>::new(),
        &mut Stats::default(),
    )
    .unwrap();
    assert_eq!(done, 4);
}

#[test]
fn share_then_unshare_round_trip() {
    let mut host = Host::default();
    let mut set = RangeSet::<8>::new();
    let mut stats = Stats::default();
    // A vmalloc buffer backed by two physical pieces.
    let frames = [100, 101, 102, 200, 201];
    unsafe_convert(&mut host, frames, 5, Direction::Share, &mut set, &mut stats).unwrap();
    assert_eq!(stats.pages_shared, 5);
    assert_eq!(set.runs().len(), 2);
    unsafe_convert(
        &mut host,
        frames,
        5,
        Direction::Unshare,
        &mut set,
        &mut stats,
    )
    .unwrap();
    assert_eq!(stats.pages_shared, 0);
    assert_eq!((stats.shares, stats.unshares), (2, 2));
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
    let mut set = RangeSet::<8>::new();
    let mut stats = Stats::default();
    let err = unsafe_convert(
        &mut host,
        [1, 2, 5, 9],
        4,
        Direction::Share,
        &mut set,
        &mut stats,
    )
    .unwrap_err();
    assert_eq!(
        err,
        Failed {
            run: PfnRun { pfn: 5, npages: 1 },
            error: Error::Fault,
            done: 1
        }
    );
    // The third run was never asked for.
    assert_eq!(host.calls.len(), 2);
    assert_eq!(stats.failures, 1);
    assert_eq!(stats.pages_leaked, 4);
    // What the host did accept is recorded as shared.
    assert_eq!(stats.pages_shared, 2);
    assert!(set.contains(1) && set.contains(2) && !set.contains(5));
}

#[test]
fn frames_beyond_the_abi_are_refused_before_the_host() {
    let mut host = Host::default();
    let err = unsafe_convert(
        &mut host,
        [u64::MAX >> 12],
        1,
        Direction::Share,
        &mut RangeSet::<4>::new(),
        &mut Stats::default(),
    )
    .unwrap_err();
    assert_eq!(err.error, Error::Invalid);
    assert!(host.calls.is_empty());
}

#[test]
fn full_set_is_counted_not_lost() {
    let mut host = Host::default();
    let mut set = RangeSet::<2>::new();
    let mut stats = Stats::default();
    unsafe_convert(
        &mut host,
        [1, 3, 5],
        3,
        Direction::Share,
        &mut set,
        &mut stats,
    )
    .unwrap();
    assert_eq!(stats.shares, 3);
    assert_eq!(stats.pages_shared, 2);
    assert_eq!(stats.untracked, 1);
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
