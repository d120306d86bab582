// SPDX-License-Identifier: GPL-2.0

//! Range logic for sharing guest pages with the host.
//!
//! A protected guest converts memory between private and shared in units of
//! 4 KiB frames, but asks the host in ranges: the frames behind a virtual
//! range (vmalloc included) are coalesced into runs of physically contiguous
//! frames, each run at most a bounded number of pages, and each run becomes
//! one `KVM_HC_MEM_SHARE` or `KVM_HC_MEM_UNSHARE`. What is shared is tracked
//! in a fixed-capacity set of runs (no allocation: conversions happen before
//! the allocators are up, and the set lives under a spinlock), which is
//! locked only to record a result, never across a hypercall ([`Book`]).
//!
//! This file is compiled by cargo as part of the `swiotlb-shim` crate and,
//! unchanged, into the guest kernel next to the ABI module, which both
//! builds reach as `crate::abi`.

use crate::abi::{self, GpaRange, Hypercall, Hypervisor};

/// Most pages one hypercall converts: 1 GiB, the largest x86 page.
///
/// Bounds the host's work per exit; a 64 MiB bounce pool, physically
/// contiguous, still takes one hypercall.
pub const MAX_RUN_PAGES: u64 = 1 << 18;

/// A run of physically contiguous 4 KiB page frames.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PfnRun {
    /// First frame.
    pub pfn: u64,
    /// Number of frames, at least one in every run this module produces.
    pub npages: u64,
}

impl PfnRun {
    /// One past the last frame.
    pub const fn end(&self) -> u64 {
        self.pfn.saturating_add(self.npages)
    }
}

/// Iterator that coalesces frames into runs; see [`coalesce`].
pub struct Coalesce<I> {
    frames: I,
    max: u64,
    cur: Option<PfnRun>,
}

/// Coalesces `frames`, in the order given, into maximal runs of physically
/// contiguous frames of at most `max_pages` pages each (`max_pages` of zero
/// counts as one). Frames that are not adjacent are never merged, and every
/// frame given lands in exactly one run, in order.
pub fn coalesce<I: IntoIterator<Item = u64>>(frames: I, max_pages: u64) -> Coalesce<I::IntoIter> {
    Coalesce {
        frames: frames.into_iter(),
        max: if max_pages == 0 { 1 } else { max_pages },
        cur: None,
    }
}

impl<I: Iterator<Item = u64>> Iterator for Coalesce<I> {
    type Item = PfnRun;

    fn next(&mut self) -> Option<PfnRun> {
        loop {
            let Some(pfn) = self.frames.next() else {
                return self.cur.take();
            };
            match &mut self.cur {
                Some(run)
                    if run.pfn.checked_add(run.npages) == Some(pfn) && run.npages < self.max =>
                {
                    run.npages += 1;
                }
                cur => {
                    let done = cur.replace(PfnRun { pfn, npages: 1 });
                    if done.is_some() {
                        return done;
                    }
                }
            }
        }
    }
}

/// The range set is full: the change was not recorded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Full;

/// A set of page frames kept as at most `N` sorted, disjoint, non-adjacent
/// runs.
///
/// # Invariants
///
/// `runs[..len]` is sorted by `pfn`, every run has `npages >= 1`, and two
/// consecutive runs neither overlap nor touch.
pub struct RangeSet<const N: usize> {
    runs: [PfnRun; N],
    len: usize,
}

impl<const N: usize> Default for RangeSet<N> {
    fn default() -> Self {
        Self::new()
    }
}

impl<const N: usize> RangeSet<N> {
    /// An empty set.
    pub const fn new() -> Self {
        // INVARIANT: no runs.
        RangeSet {
            runs: [PfnRun { pfn: 0, npages: 0 }; N],
            len: 0,
        }
    }

    /// The runs, sorted.
    pub fn runs(&self) -> &[PfnRun] {
        &self.runs[..self.len]
    }

    /// Number of frames in the set.
    pub fn pages(&self) -> u64 {
        self.runs().iter().map(|r| r.npages).sum()
    }

    /// Whether `pfn` is in the set.
    pub fn contains(&self, pfn: u64) -> bool {
        self.runs().iter().any(|r| pfn >= r.pfn && pfn < r.end())
    }

    /// Adds `run`; returns how many of its frames were not in the set yet.
    ///
    /// Fails, leaving the set unchanged, when it would need more than `N`
    /// runs.
    pub fn insert(&mut self, run: PfnRun) -> Result<u64, Full> {
        if run.npages == 0 {
            return Ok(0);
        }
        let (start, end) = (run.pfn, run.end());
        // Runs that overlap or touch [start, end) form one window.
        let first = self
            .runs()
            .iter()
            .position(|r| r.end() >= start)
            .unwrap_or(self.len);
        let last = first
            + self.runs()[first..]
                .iter()
                .take_while(|r| r.pfn <= end)
                .count();
        let mut covered = 0;
        let (mut lo, mut hi) = (start, end);
        for r in &self.runs[first..last] {
            covered += r.end().min(end).saturating_sub(r.pfn.max(start));
            lo = lo.min(r.pfn);
            hi = hi.max(r.end());
        }
        let merged = PfnRun {
            pfn: lo,
            npages: hi - lo,
        };
        if first == last {
            if self.len == N {
                return Err(Full);
            }
            self.runs.copy_within(first..self.len, first + 1);
            self.len += 1;
        } else {
            self.runs.copy_within(last..self.len, first + 1);
            self.len -= last - first - 1;
        }
        // INVARIANT: `merged` absorbed every run it overlaps or touches, and
        // the runs around it keep their order.
        self.runs[first] = merged;
        Ok(run.npages - covered)
    }

    /// Removes `run`; returns how many of its frames were in the set.
    ///
    /// Fails, leaving the set unchanged, when punching the hole would need
    /// more than `N` runs.
    pub fn remove(&mut self, run: PfnRun) -> Result<u64, Full> {
        if run.npages == 0 {
            return Ok(0);
        }
        let (start, end) = (run.pfn, run.end());
        let first = self
            .runs()
            .iter()
            .position(|r| r.end() > start)
            .unwrap_or(self.len);
        let last = first
            + self.runs()[first..]
                .iter()
                .take_while(|r| r.pfn < end)
                .count();
        if first == last {
            return Ok(0);
        }
        let head = self.runs[first];
        let tail = self.runs[last - 1];
        let mut removed = 0;
        for r in &self.runs[first..last] {
            removed += r.end().min(end) - r.pfn.max(start);
        }
        let mut keep = [PfnRun { pfn: 0, npages: 0 }; 2];
        let mut nkeep = 0;
        if head.pfn < start {
            keep[nkeep] = PfnRun {
                pfn: head.pfn,
                npages: start - head.pfn,
            };
            nkeep += 1;
        }
        if tail.end() > end {
            keep[nkeep] = PfnRun {
                pfn: end,
                npages: tail.end() - end,
            };
            nkeep += 1;
        }
        let new_len = self.len - (last - first) + nkeep;
        if new_len > N {
            return Err(Full);
        }
        self.runs.copy_within(last..self.len, first + nkeep);
        // Element by element: `copy_from_slice()`'s length check would add
        // a panic path the kernel's objtool does not know as noreturn.
        for (dst, src) in self.runs[first..].iter_mut().zip(&keep[..nkeep]) {
            *dst = *src;
        }
        // INVARIANT: the kept pieces lie strictly inside the removed window,
        // separated from their neighbours by the hole.
        self.len = new_len;
        Ok(removed)
    }
}

/// Counters of conversions, as debugfs shows them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Successful `KVM_HC_MEM_SHARE` hypercalls.
    pub shares: u64,
    /// Successful `KVM_HC_MEM_UNSHARE` hypercalls.
    pub unshares: u64,
    /// Frames shared with the host now.
    pub pages_shared: u64,
    /// Conversions (calls of [`convert`]) that failed.
    pub failures: u64,
    /// Frames of failed conversions that were not made private again
    /// since: their owners must never reuse them. A caller that rolls a
    /// failed share back with a successful unshare (as
    /// `swiotlb_alloc_tlb()` does before it frees the pages) gets them
    /// back, and they leave this count.
    pub pages_leaked: u64,
    /// Frames the range sets could not record (they were full); frames of
    /// a failure that could not be recorded stay in `pages_leaked` for
    /// good.
    pub untracked: u64,
}

impl Stats {
    /// All counters zero.
    pub const fn new() -> Self {
        Stats {
            shares: 0,
            unshares: 0,
            pages_shared: 0,
            failures: 0,
            pages_leaked: 0,
            untracked: 0,
        }
    }
}

/// Runs of failed conversions a [`Ledger`] remembers. Failures are rare
/// and every one is logged; beyond this, leaked frames are counted in
/// [`Stats::untracked`] as well and never leave `pages_leaked`.
pub const LEAKED_RUNS: usize = 64;

/// What is shared with the host, what leaked, and the counters: the state
/// one lock protects. See [`Book`].
pub struct Ledger<const N: usize> {
    /// Frames shared with the host now.
    pub set: RangeSet<N>,
    /// Frames of failed conversions not made private again since.
    pub leaked: RangeSet<LEAKED_RUNS>,
    /// The counters.
    pub stats: Stats,
}

impl<const N: usize> Default for Ledger<N> {
    fn default() -> Self {
        Self::new()
    }
}

impl<const N: usize> Ledger<N> {
    /// Nothing shared, all counters zero.
    pub const fn new() -> Self {
        Ledger {
            set: RangeSet::new(),
            leaked: RangeSet::new(),
            stats: Stats::new(),
        }
    }

    /// Records a run the host converted.
    fn converted(&mut self, run: PfnRun, dir: Direction) {
        match dir {
            Direction::Share => {
                self.stats.shares += 1;
                match self.set.insert(run) {
                    Ok(n) => self.stats.pages_shared += n,
                    Err(Full) => self.stats.untracked += run.npages,
                }
            }
            Direction::Unshare => {
                self.stats.unshares += 1;
                match self.set.remove(run) {
                    Ok(n) => self.stats.pages_shared -= n,
                    Err(Full) => self.stats.untracked += run.npages,
                }
                // Private again: whoever leaked these frames got them back.
                if let Ok(n) = self.leaked.remove(run) {
                    self.stats.pages_leaked -= n;
                }
            }
        }
    }

    /// Records a failed request of `frames`; returns which failure this is
    /// (1 for the first).
    fn failed<I: Iterator<Item = u64>>(&mut self, frames: I) -> u64 {
        self.stats.failures += 1;
        for run in coalesce(frames, MAX_RUN_PAGES) {
            match self.leaked.insert(run) {
                Ok(n) => self.stats.pages_leaked += n,
                Err(Full) => {
                    self.stats.pages_leaked += run.npages;
                    self.stats.untracked += run.npages;
                }
            }
        }
        self.stats.failures
    }
}

/// Exclusive access to the [`Ledger`] that [`convert`] keeps up to date:
/// in the kernel, a spinlock. [`convert`] enters it only to record a
/// result, never across a hypercall, so conversions on different CPUs
/// reach the host in parallel.
///
/// Exactness under concurrency rests on ownership: a page has one owner,
/// and only its owner converts it, so concurrent requests name disjoint
/// frames and each run's record commutes with the others'. Between a
/// run's hypercall and its record the ledger lags by that run.
pub trait Book<const N: usize> {
    /// Runs `f` with the ledger, excluding every other `with`.
    fn with<R>(&self, f: impl FnOnce(&mut Ledger<N>) -> R) -> R;
}

/// A ledger used from one thread only (tests, early boot).
impl<const N: usize> Book<N> for core::cell::RefCell<Ledger<N>> {
    fn with<R>(&self, f: impl FnOnce(&mut Ledger<N>) -> R) -> R {
        f(&mut self.borrow_mut())
    }
}

/// Direction of a conversion.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Private to shared (`set_memory_decrypted()`).
    Share,
    /// Shared to private (`set_memory_encrypted()`).
    Unshare,
}

/// Why a conversion failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Failed {
    /// The run the host refused (or that could not be encoded).
    pub run: PfnRun,
    /// What the host answered.
    pub error: abi::Error,
    /// Hypercalls that succeeded before the failure.
    pub done: u64,
    /// Which failure since boot this is (1 for the first), read under the
    /// lock that counted it: exactly one caller sees 1.
    pub nth: u64,
}

/// Converts the frames behind one request, run by run, and records each
/// converted run in `book`'s ledger. Returns the hypercalls issued.
///
/// Stops at the first run the host refuses: the runs before it stay
/// converted and recorded, and all frames of the request count as leaked
/// until they are made private again: their state is now mixed, and the
/// host is not trusted.
///
/// # Safety
///
/// As [`Hypervisor::hypercall`]: the caller owns every frame of `frames`
/// (nothing private in them for a share; nothing still using them as
/// shared for an unshare).
pub unsafe fn convert<H, I, B, const N: usize>(
    hv: &mut H,
    frames: I,
    dir: Direction,
    book: &B,
) -> Result<u64, Failed>
where
    H: Hypervisor + ?Sized,
    I: IntoIterator<Item = u64>,
    I::IntoIter: Clone,
    B: Book<N> + ?Sized,
{
    // SAFETY: as this function's (caller).
    unsafe { convert_in_runs_of(hv, frames, dir, book, MAX_RUN_PAGES) }
}

/// [`convert`] with at most `max_run` pages per hypercall (clamped to
/// `1..=`[`MAX_RUN_PAGES`]). `1` converts page by page, one hypercall per
/// 4 KiB page as pKVM guests do: the guest's per-page mode, which exists
/// to measure what coalescing saves. The ledger coalesces either way.
///
/// # Safety
///
/// As [`convert`].
pub unsafe fn convert_in_runs_of<H, I, B, const N: usize>(
    hv: &mut H,
    frames: I,
    dir: Direction,
    book: &B,
    max_run: u64,
) -> Result<u64, Failed>
where
    H: Hypervisor + ?Sized,
    I: IntoIterator<Item = u64>,
    I::IntoIter: Clone,
    B: Book<N> + ?Sized,
{
    let frames = frames.into_iter();
    let mut done = 0;
    for run in coalesce(frames.clone(), max_run.clamp(1, MAX_RUN_PAGES)) {
        let res = GpaRange::from_pfn(run.pfn, run.npages).and_then(|r| {
            let call = match dir {
                Direction::Share => Hypercall::Share(r),
                Direction::Unshare => Hypercall::Unshare(r),
            };
            // SAFETY: the caller owns every frame of the request.
            unsafe { abi::issue(hv, call) }
        });
        if let Err(error) = res {
            let nth = book.with(|l| l.failed(frames));
            return Err(Failed {
                run,
                error,
                done,
                nth,
            });
        }
        done += 1;
        book.with(|l| l.converted(run, dir));
    }
    Ok(done)
}
