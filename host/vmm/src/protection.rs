//! Protected memory: the shared-page map and the checked device view.
//!
//! [`Protection`] owns the device view of guest RAM and is the only way
//! device emulation reaches guest memory: it implements vm-memory's
//! [`GuestMemory`], so virtio-queue and the devices go through
//! [`GuestMemory::get_slices`] for every ring, descriptor and buffer access,
//! and each access is checked against the map of shared 4 KiB pages.
//!
//! Before `KVM_HC_ENABLE_MEM_PROTECTED` all RAM is shared, as in a normal VM.
//! ENABLE makes every page private (contents kept) and drops every share;
//! SHARE and UNSHARE flip ranges. Private pages of the device view are also
//! `mprotect`ed to `PROT_NONE`, so code that bypassed the check would fault
//! instead of reading guest data. The map is updated so that it is never
//! more permissive than the mapping: SHARE opens the mapping first, UNSHARE
//! and ENABLE close the map first.
//!
//! With `--protect=gmem` a [`Gmem`] is attached. KVM then owns what is
//! private and has applied each ENABLE, SHARE and UNSHARE before the VMM
//! hears of it; the VMM follows (this map, the device view, and moving
//! page contents out of the shared memfd, see [`crate::gmem`]) or refuses,
//! which KVM undoes. With `--protect=view` the VMM decides alone.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};

use hypercall::{Error as AbiError, GpaRange};
use serde::Serialize;
use vm_memory::bitmap::BS;
use vm_memory::guest_memory::GuestMemorySliceIterator;
use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemory, GuestMemoryBackend, GuestMemoryError,
    GuestMemoryMmap, GuestMemoryRegion, MemoryRegionAddress, Permissions,
};

use crate::gmem::{Gmem, GmemError, GmemStats};
use crate::ram::PAGE_SIZE;

/// Errors of the protection machinery itself (not of a guest request).
#[derive(Debug, thiserror::Error)]
pub enum ProtectionError {
    /// `mprotect` of a device-view range failed.
    #[error("mprotect({prot}) of device-view GPAs {start:#x}..{end:#x} failed: {err}")]
    Mprotect {
        /// First GPA of the range.
        start: u64,
        /// One past the last GPA.
        end: u64,
        /// The protection asked for.
        prot: &'static str,
        /// The OS error.
        err: io::Error,
    },
    /// Moving guest pages into the guest_memfd failed (ENABLE).
    #[error(transparent)]
    Gmem(#[from] GmemError),
}

/// One bit per 4 KiB guest page: set = shared with the host.
///
/// The number of set pages and of runs of set pages are kept up to date
/// by [`PageBitmap::set_range`], so that a conversion costs time in
/// proportion to the pages it converts, not to guest RAM: the guest's
/// per-page mode shares its 64 MiB bounce pool in 16384 conversions.
#[derive(Clone, Debug)]
pub struct PageBitmap {
    words: Vec<u64>,
    npages: u64,
    /// Set pages.
    count: u64,
    /// Runs of consecutive set pages.
    runs: u64,
}

impl PageBitmap {
    /// A map of `npages` pages, all clear.
    pub fn new(npages: u64) -> Self {
        let words = usize::try_from(npages.div_ceil(64)).unwrap_or(usize::MAX);
        PageBitmap {
            words: vec![0; words],
            npages,
            count: 0,
            runs: 0,
        }
    }

    /// Number of pages the map covers.
    pub fn npages(&self) -> u64 {
        self.npages
    }

    /// Whether page `pfn` is set; pages outside the map are clear.
    pub fn get(&self, pfn: u64) -> bool {
        pfn < self.npages && self.words[(pfn / 64) as usize] & (1 << (pfn % 64)) != 0
    }

    /// Run starts at pages `first ..= last` (clipped to the map): set pages
    /// whose lower neighbour is clear.
    fn starts(&self, first: u64, last: u64) -> u64 {
        (first..=last.min(self.npages.saturating_sub(1)))
            .filter(|&p| self.get(p) && (p == 0 || !self.get(p - 1)))
            .count() as u64
    }

    /// The runs of set pages there would be after setting pages
    /// `first .. first + n` (clipped to the map) to `value`.
    pub fn runs_after(&self, first: u64, n: u64, value: bool) -> u64 {
        let end = first.saturating_add(n).min(self.npages);
        if first >= end {
            return self.runs;
        }
        // Only run starts at first ..= end can change: inside the range
        // and just past it (its lower neighbour changes).
        let before = self.starts(first, end);
        let after = if value {
            // One run covers the range; it starts at `first` unless the
            // page below is set, and the page past it starts nothing.
            u64::from(first == 0 || !self.get(first - 1))
        } else {
            u64::from(self.get(end))
        };
        self.runs + after - before
    }

    /// Sets or clears pages `first .. first + n` (clipped to the map) and
    /// returns how many changed.
    pub fn set_range(&mut self, first: u64, n: u64, value: bool) -> u64 {
        let end = first.saturating_add(n).min(self.npages);
        if first >= end {
            return 0;
        }
        self.runs = self.runs_after(first, n, value);
        let mut changed = 0;
        for pfn in first..end {
            let word = &mut self.words[(pfn / 64) as usize];
            let bit = 1u64 << (pfn % 64);
            if (*word & bit != 0) != value {
                *word ^= bit;
                changed += 1;
            }
        }
        if value {
            self.count += changed;
        } else {
            self.count -= changed;
        }
        changed
    }

    /// Whether every page of `first .. first + n` is set (false past the map).
    pub fn all_set(&self, first: u64, n: u64) -> bool {
        match first.checked_add(n) {
            Some(end) if end <= self.npages => (first..end).all(|pfn| self.get(pfn)),
            _ => false,
        }
    }

    /// Number of set pages.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Number of runs of consecutive set pages.
    pub fn runs(&self) -> u64 {
        self.runs
    }

    /// Counts set pages and runs over the whole map (what `count` and
    /// `runs` keep track of; tests compare them).
    pub fn recount(&self) -> (u64, u64) {
        let mut runs = 0;
        let mut carry = 0u64; // bit 63 of the previous word
        for (i, w) in self.words.iter().enumerate() {
            let w = if (i as u64 + 1) * 64 > self.npages {
                w & (u64::MAX >> ((i as u64 + 1) * 64 - self.npages))
            } else {
                *w
            };
            // A run starts at each set bit whose lower neighbour is clear.
            runs += u64::from((w & !((w << 1) | carry)).count_ones());
            carry = w >> 63;
        }
        let count = self.words.iter().map(|w| u64::from(w.count_ones())).sum();
        (count, runs)
    }

    /// Clears every page.
    pub fn clear(&mut self) {
        self.words.iter_mut().for_each(|w| *w = 0);
        self.count = 0;
        self.runs = 0;
    }
}

/// Most runs of shared pages the VMM accepts. Each run splits the device
/// view into more mappings (VMAs); far below Linux's default
/// `vm.max_map_count` (65530), so `mprotect` cannot run out of them. A
/// SHARE or UNSHARE that would leave more runs is refused (`-KVM_EFAULT`),
/// which the guest handles like any refused conversion.
pub const MAX_SHARED_RUNS: u64 = 16384;

/// What the device view may do with a guest range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Entirely RAM and entirely shared (or protection not enabled).
    Allowed,
    /// Entirely RAM, but at least one page is private.
    Private,
    /// Not entirely guest RAM.
    NotRam,
}

/// Counters of device-view traffic, as written to the stats file.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct AccessStats {
    /// Device accesses served (ring, descriptor and buffer accesses).
    pub allowed: u64,
    /// Device accesses refused because a page was private.
    pub denied: u64,
    /// Device accesses refused because the range was not RAM.
    pub not_ram: u64,
    /// Bytes devices read from guest memory.
    pub bytes_read: u64,
    /// Bytes devices wrote to guest memory.
    pub bytes_written: u64,
    /// Probe-device checks that found the page shared.
    pub probe_allowed: u64,
    /// Probe-device checks that found the page private (or not RAM).
    pub probe_denied: u64,
    /// `mprotect` calls that failed (the map still enforced the change).
    pub mprotect_failures: u64,
    /// SHARE/UNSHARE refused because they would exceed [`MAX_SHARED_RUNS`].
    pub run_limit_refusals: u64,
    /// Bytes the vCPU threads mapped ahead of the guest after SHAREs.
    pub bytes_prefaulted_shared: u64,
    /// Microseconds (host clock) those pre-faults took in all.
    pub shared_prefault_us: u64,
    /// Pre-faults after a SHARE that KVM refused or a signal cut short.
    pub shared_prefaults_incomplete: u64,
}

#[derive(Debug, Default)]
struct Counters {
    allowed: AtomicU64,
    denied: AtomicU64,
    not_ram: AtomicU64,
    bytes_read: AtomicU64,
    bytes_written: AtomicU64,
    probe_allowed: AtomicU64,
    probe_denied: AtomicU64,
    mprotect_failures: AtomicU64,
    run_limit_refusals: AtomicU64,
    bytes_prefaulted_shared: AtomicU64,
    shared_prefault_us: AtomicU64,
    shared_prefaults_incomplete: AtomicU64,
}

/// Counters are bumped by device threads under a shared lock: relaxed
/// atomics, read only for the stats.
fn bump(c: &AtomicU64, by: u64) {
    c.fetch_add(by, Ordering::Relaxed);
}

fn get(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

/// The device view of guest RAM with its shared-page map.
#[derive(Debug)]
pub struct Protection {
    view: GuestMemoryMmap,
    ram_end: u64,
    enabled: bool,
    shared: PageBitmap,
    shared_peak: u64,
    enable_count: u64,
    counters: Counters,
    gmem: Option<Gmem>,
    /// Figures of guest_memfd sides already detached (earlier boots).
    gmem_before: Option<GmemStats>,
    /// An UNSHARE whose device-view mapping could not be closed: the VMM
    /// must stop (see [`Protection::take_revoke_failure`]).
    revoke_failure: Option<ProtectionError>,
}

impl Protection {
    /// Wraps the device view; all memory is shared until ENABLE.
    pub fn new(view: GuestMemoryMmap) -> Self {
        let ram_end = view
            .iter()
            .map(|r| r.start_addr().0 + r.len())
            .max()
            .unwrap_or(0);
        let shared = PageBitmap::new(ram_end.div_ceil(PAGE_SIZE));
        Protection {
            view,
            ram_end,
            enabled: false,
            shared,
            shared_peak: 0,
            enable_count: 0,
            counters: Counters::default(),
            gmem: None,
            gmem_before: None,
            revoke_failure: None,
        }
    }

    /// Attaches the guest_memfd side of a (new) VM: from now on conversions
    /// also move pages between the memfd and the guest_memfd. Replaces
    /// and returns the previous one.
    pub fn attach_gmem(&mut self, mut gmem: Gmem) -> Option<Gmem> {
        if let Some(before) = self.gmem_before.take() {
            gmem.carry(before);
        }
        self.gmem.replace(gmem)
    }

    /// Detaches the guest_memfd side (the VM it belongs to is going away);
    /// its figures carry over to the next one attached.
    pub fn detach_gmem(&mut self) -> Option<Gmem> {
        let g = self.gmem.take();
        if let Some(g) = &g {
            self.gmem_before = Some(g.stats());
        }
        g
    }

    /// Figures of guest_memfd protection over the run, if it is in use.
    pub fn gmem_stats(&self) -> Option<GmemStats> {
        self.gmem.as_ref().map(Gmem::stats).or(self.gmem_before)
    }

    /// Whether the guest has enabled protected memory.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Pages shared now (0 before ENABLE: nothing is private then).
    pub fn shared_pages(&self) -> u64 {
        self.shared.count()
    }

    /// Highest number of pages shared at once since the VM started.
    pub fn shared_peak(&self) -> u64 {
        self.shared_peak
    }

    /// How often ENABLE succeeded.
    pub fn enable_count(&self) -> u64 {
        self.enable_count
    }

    /// A copy of the access counters.
    pub fn stats(&self) -> AccessStats {
        let c = &self.counters;
        AccessStats {
            allowed: get(&c.allowed),
            denied: get(&c.denied),
            not_ram: get(&c.not_ram),
            bytes_read: get(&c.bytes_read),
            bytes_written: get(&c.bytes_written),
            probe_allowed: get(&c.probe_allowed),
            probe_denied: get(&c.probe_denied),
            mprotect_failures: get(&c.mprotect_failures),
            run_limit_refusals: get(&c.run_limit_refusals),
            bytes_prefaulted_shared: get(&c.bytes_prefaulted_shared),
            shared_prefault_us: get(&c.shared_prefault_us),
            shared_prefaults_incomplete: get(&c.shared_prefaults_incomplete),
        }
    }

    /// Counts a pre-fault after a SHARE of `bytes` that took `us`
    /// microseconds; `complete` false if it stopped early. Returns whether
    /// it was the first to stop early.
    pub fn record_shared_prefault(&self, bytes: u64, us: u64, complete: bool) -> bool {
        let c = &self.counters;
        bump(&c.bytes_prefaulted_shared, bytes);
        bump(&c.shared_prefault_us, us);
        !complete
            && c.shared_prefaults_incomplete
                .fetch_add(1, Ordering::Relaxed)
                == 0
    }

    /// Makes all RAM private and drops every share; contents are kept.
    ///
    /// May be called again (reboot, kexec): it resets to the same state.
    pub fn enable(&mut self) -> Result<(), ProtectionError> {
        // Pages whose data is in the shared backing now: all of them before
        // the first ENABLE, else the shared set.
        let was_enabled = self.enabled;
        let shared_before = self.shared.clone();
        self.enabled = true;
        self.shared.clear();
        self.enable_count += 1;
        self.set_prot(0, self.ram_end, false)?;
        if let Some(g) = self.gmem.as_mut() {
            g.populate(
                self.ram_end,
                |pfn| !was_enabled || shared_before.get(pfn),
                true,
            )?;
        }
        Ok(())
    }

    /// See [`Gmem::take_populated`]; empty without guest_memfd.
    pub fn take_populated(&mut self) -> Vec<(u64, u64)> {
        self.gmem
            .as_mut()
            .map(Gmem::take_populated)
            .unwrap_or_default()
    }

    /// See [`Gmem::record_prefault`].
    pub fn record_prefault(&mut self, bytes: u64, us: u64, complete: bool) {
        if let Some(g) = self.gmem.as_mut() {
            g.record_prefault(bytes, us, complete);
        }
    }

    /// `--hostile`'s ENABLE: under guest_memfd, copies the guest's pages
    /// into it (KVM made them private and zero) but keeps them in the memfd
    /// and the device view open; the map stays as it was. Without
    /// guest_memfd it does nothing.
    pub fn populate_keeping_copies(&mut self) -> Result<(), ProtectionError> {
        if let Some(g) = self.gmem.as_mut() {
            g.populate(self.ram_end, |_| true, false)?;
        }
        Ok(())
    }

    /// Back to the power-on state for a reboot: protection off, no page
    /// private, the shared map empty and the whole device view
    /// `PROT_READ|PROT_WRITE` again, so the next kernel starts as a normal
    /// VM until it issues ENABLE. Counters, the peak and the ENABLE count
    /// stay cumulative over the run.
    ///
    /// Call it only with every vCPU stopped and after guest RAM was cleared
    /// (see [`crate::ram::clear`]): it reopens every page to devices.
    pub fn reset(&mut self) -> Result<(), ProtectionError> {
        self.set_prot(0, self.ram_end, true)?;
        self.shared.clear();
        self.enabled = false;
        Ok(())
    }

    /// One stderr line for a conversion the VMM could not carry out.
    fn report(op: &str, range: GpaRange, e: &dyn std::fmt::Display) {
        eprintln!(
            "protmem-vmm: {op} {:#x}+{} pages: {e}",
            range.gpa(),
            range.npages()
        );
    }

    /// An UNSHARE that could not close the device view, taken once.
    pub fn take_revoke_failure(&mut self) -> Option<ProtectionError> {
        self.revoke_failure.take()
    }

    /// Refuses a conversion that would leave more than
    /// [`MAX_SHARED_RUNS`] runs of shared pages.
    fn check_runs(&self, range: GpaRange, share: bool) -> Result<(), AbiError> {
        let runs = self
            .shared
            .runs_after(range.first_pfn(), range.npages(), share);
        if runs > MAX_SHARED_RUNS {
            if get(&self.counters.run_limit_refusals) == 0 {
                eprintln!(
                    "protmem-vmm: {} {:#x}+{} pages refused: it would leave {runs} runs of shared \
                     pages, more than {MAX_SHARED_RUNS} (each run splits the device view's mapping)",
                    if share { "SHARE" } else { "UNSHARE" },
                    range.gpa(),
                    range.npages()
                );
            }
            bump(&self.counters.run_limit_refusals, 1);
            return Err(AbiError::Fault);
        }
        Ok(())
    }

    /// Shares `range` with the host (devices may then access it).
    pub fn share(&mut self, range: GpaRange) -> Result<(), AbiError> {
        self.check_request(range)?;
        self.check_runs(range, true)?;
        if let Err(e) = self.set_prot(range.gpa(), range.end(), true) {
            // The pages stay private in the map: nothing was opened.
            Self::report("SHARE", range, &e);
            bump(&self.counters.mprotect_failures, 1);
            return Err(AbiError::Fault);
        }
        if let Some(g) = self.gmem.as_mut() {
            g.share(range.gpa(), range.len());
        }
        self.shared
            .set_range(range.first_pfn(), range.npages(), true);
        self.shared_peak = self.shared_peak.max(self.shared.count());
        Ok(())
    }

    /// Takes `range` back: devices may no longer access it.
    ///
    /// If the device view cannot be closed over the range, the map still
    /// refuses it but the mapping would stay readable: the request fails
    /// and [`Protection::take_revoke_failure`] reports it, so the VMM stops
    /// rather than run with a private page mapped.
    pub fn unshare(&mut self, range: GpaRange) -> Result<(), AbiError> {
        self.check_request(range)?;
        self.check_runs(range, false)?;
        self.shared
            .set_range(range.first_pfn(), range.npages(), false);
        if let Err(e) = self.set_prot(range.gpa(), range.end(), false) {
            bump(&self.counters.mprotect_failures, 1);
            self.revoke_failure = Some(e);
            return Err(AbiError::Fault);
        }
        if let Some(g) = self.gmem.as_mut() {
            g.unshare(range.gpa(), range.len());
        }
        Ok(())
    }

    fn check_request(&self, range: GpaRange) -> Result<(), AbiError> {
        if !self.enabled {
            return Err(AbiError::Permission);
        }
        if self.classify(range.gpa(), range.len()) == Access::NotRam {
            return Err(AbiError::Fault);
        }
        Ok(())
    }

    /// What the device view may do with `len` bytes at `gpa` (counts nothing).
    pub fn classify(&self, gpa: u64, len: u64) -> Access {
        let Ok(count) = usize::try_from(len) else {
            return Access::NotRam;
        };
        if len == 0 {
            return Access::Allowed;
        }
        if !GuestMemoryBackend::check_range(&self.view, GuestAddress(gpa), count) {
            return Access::NotRam;
        }
        if !self.enabled {
            return Access::Allowed;
        }
        // No overflow: check_range proved gpa + len is inside RAM.
        let first = gpa / PAGE_SIZE;
        let last = (gpa + len - 1) / PAGE_SIZE;
        if self.shared.all_set(first, last - first + 1) {
            Access::Allowed
        } else {
            Access::Private
        }
    }

    /// Probe device: may the device view access the page holding `gpa`?
    ///
    /// Counted as a probe, not as a device access.
    pub fn probe_page(&self, gpa: u64) -> bool {
        let ok = self.classify(gpa, 1) == Access::Allowed;
        self.count_probe(ok);
        ok
    }

    /// Probe device: the 8 bytes at `gpa` if the device view may read them,
    /// else `None`. Counted as a probe, not as a device access.
    pub fn probe_read(&self, gpa: u64) -> Option<u64> {
        let ok = self.classify(gpa, 8) == Access::Allowed;
        self.count_probe(ok);
        if !ok {
            return None;
        }
        self.view.read_obj::<u64>(GuestAddress(gpa)).ok()
    }

    fn count_probe(&self, ok: bool) {
        let c = if ok {
            &self.counters.probe_allowed
        } else {
            &self.counters.probe_denied
        };
        bump(c, 1);
    }

    /// Sets the device view's protection of GPAs `start..end` (page aligned).
    fn set_prot(&self, start: u64, end: u64, allow: bool) -> Result<(), ProtectionError> {
        let (prot, name) = if allow {
            (libc::PROT_READ | libc::PROT_WRITE, "PROT_READ|PROT_WRITE")
        } else {
            (libc::PROT_NONE, "PROT_NONE")
        };
        for region in self.view.iter() {
            let rstart = region.start_addr().0;
            let rend = rstart + region.len();
            let (s, e) = (start.max(rstart), end.min(rend));
            if s >= e {
                continue;
            }
            let host = region
                .get_host_address(MemoryRegionAddress(s - rstart))
                .map_err(|_| ProtectionError::Mprotect {
                    start: s,
                    end: e,
                    prot: name,
                    err: io::Error::from(io::ErrorKind::InvalidInput),
                })?;
            // `s` is page aligned: GPA ranges are whole pages and regions
            // start page aligned. vm-memory uses volatile raw pointers, so no
            // Rust reference into guest memory exists to be invalidated.
            // SAFETY: `host .. host + (e - s)` lies inside `region`'s mapping,
            // which `self.view` owns; only its protection changes.
            let rc = unsafe { libc::mprotect(host.cast(), (e - s) as usize, prot) };
            if rc != 0 {
                return Err(ProtectionError::Mprotect {
                    start: s,
                    end: e,
                    prot: name,
                    err: io::Error::last_os_error(),
                });
            }
        }
        Ok(())
    }

    /// The unchecked device view, for tests that prove the mapping faults.
    #[cfg(test)]
    fn raw_view(&self) -> &GuestMemoryMmap {
        &self.view
    }
}

impl GuestMemory for Protection {
    type PhysicalMemory = GuestMemoryMmap;
    type Bitmap = ();

    fn check_range(&self, addr: GuestAddress, count: usize, _access: Permissions) -> bool {
        self.classify(addr.raw_value(), count as u64) == Access::Allowed
    }

    fn get_slices<'a>(
        &'a self,
        addr: GuestAddress,
        count: usize,
        access: Permissions,
    ) -> vm_memory::guest_memory::Result<impl GuestMemorySliceIterator<'a, BS<'a, ()>>> {
        match self.classify(addr.raw_value(), count as u64) {
            Access::Allowed => {
                if count > 0 {
                    let c = &self.counters;
                    bump(&c.allowed, 1);
                    if access.has_write() {
                        bump(&c.bytes_written, count as u64);
                    } else {
                        bump(&c.bytes_read, count as u64);
                    }
                }
                GuestMemory::get_slices(&self.view, addr, count, access)
            }
            Access::Private => {
                bump(&self.counters.denied, 1);
                Err(GuestMemoryError::InvalidGuestAddress(addr))
            }
            Access::NotRam => {
                bump(&self.counters.not_ram, 1);
                Err(GuestMemoryError::InvalidGuestAddress(addr))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    const NPAGES: u64 = 16;

    fn prot() -> Protection {
        let view =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), (NPAGES * PAGE_SIZE) as usize)])
                .unwrap();
        Protection::new(view)
    }

    fn range(pfn: u64, n: u64) -> GpaRange {
        GpaRange::from_pfn(pfn, n).unwrap()
    }

    /// Permissions of each page of `[start, start + npages * 4K)` as
    /// /proc/self/maps shows them ("rw-p", "---p", ...).
    fn page_perms(start: u64, npages: u64) -> Vec<String> {
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        let mut out = Vec::new();
        for page in 0..npages {
            let addr = start + page * PAGE_SIZE;
            let perms = maps
                .lines()
                .find_map(|line| {
                    let (range, rest) = line.split_once(' ')?;
                    let (lo, hi) = range.split_once('-')?;
                    let lo = u64::from_str_radix(lo, 16).ok()?;
                    let hi = u64::from_str_radix(hi, 16).ok()?;
                    (lo <= addr && addr < hi).then(|| rest[..4].to_string())
                })
                .unwrap_or_default();
            out.push(perms);
        }
        out
    }

    #[test]
    fn bitmap_edges() {
        let mut b = PageBitmap::new(130);
        assert_eq!(b.set_range(60, 10, true), 10);
        assert_eq!(b.set_range(60, 10, true), 0, "idempotent");
        assert!(b.all_set(60, 10));
        assert!(!b.all_set(59, 2));
        assert_eq!(b.set_range(125, 100, true), 5, "clipped to the map");
        assert!(!b.all_set(129, 2), "past the end is never set");
        assert!(!b.get(130));
        assert_eq!(b.count(), 15);
        b.clear();
        assert_eq!(b.count(), 0);
        assert!(!b.all_set(u64::MAX, 2));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn bitmap_matches_a_set(ops in proptest::collection::vec((0u64..200, 0u64..80, any::<bool>()), 0..40)) {
            let mut b = PageBitmap::new(150);
            let mut model = BTreeSet::new();
            for (first, n, v) in ops {
                let before = model.len() as u64;
                for p in first..(first + n).min(150) {
                    if v { model.insert(p); } else { model.remove(&p); }
                }
                let predicted = b.runs_after(first, n, v);
                let changed = b.set_range(first, n, v);
                prop_assert_eq!(changed, (model.len() as i64 - before as i64).unsigned_abs());
                prop_assert_eq!(b.count(), model.len() as u64);
                let runs = model.iter().filter(|&&p| p == 0 || !model.contains(&(p - 1))).count();
                prop_assert_eq!(b.runs(), runs as u64);
                prop_assert_eq!(predicted, runs as u64, "runs_after predicts");
                prop_assert_eq!(b.recount(), (b.count(), b.runs()));
            }
            for p in 0..160 {
                prop_assert_eq!(b.get(p), model.contains(&p));
            }
        }
    }

    #[test]
    fn runs_are_counted_across_words() {
        let mut b = PageBitmap::new(200);
        assert_eq!(b.runs(), 0);
        b.set_range(0, 1, true);
        b.set_range(2, 1, true);
        assert_eq!(b.runs(), 2);
        b.set_range(60, 10, true); // crosses the word boundary at 64
        assert_eq!(b.runs(), 3);
        b.set_range(64, 1, false); // splits it
        assert_eq!(b.runs(), 4);
        b.set_range(190, 100, true); // clipped at the end
        assert_eq!(b.runs(), 5);
        b.set_range(0, 200, true);
        assert_eq!(b.runs(), 1);
    }

    #[test]
    fn alternating_pattern_is_bounded_and_never_fails_open() {
        let npages = 2 * MAX_SHARED_RUNS + 8;
        let view =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), (npages * PAGE_SIZE) as usize)])
                .unwrap();
        let mut p = Protection::new(view);
        p.enable().unwrap();
        // Share every other page: the guest pattern that splits the most.
        let mut refused = 0;
        for pfn in (0..npages).step_by(2) {
            if p.share(range(pfn, 1)).is_err() {
                refused += 1;
            }
        }
        assert_eq!(p.shared.runs(), MAX_SHARED_RUNS);
        assert_eq!(refused, npages / 2 - MAX_SHARED_RUNS);
        assert_eq!(p.stats().run_limit_refusals, refused);
        // Every refused page stayed private, map and mapping alike.
        assert_eq!(
            p.classify(2 * MAX_SHARED_RUNS * PAGE_SIZE, 1),
            Access::Private
        );
        assert_eq!(
            read_in_child(&p, 2 * MAX_SHARED_RUNS * PAGE_SIZE),
            Some(libc::SIGSEGV)
        );
        // Take back a page that splits a run? Fill the gap first, then split it:
        // merging is always allowed, a split past the limit is refused.
        p.share(range(1, 1)).unwrap();
        assert_eq!(p.shared.runs(), MAX_SHARED_RUNS - 1);
        p.unshare(range(1, 1)).unwrap();
        assert_eq!(p.unshare(range(0, 1)), Ok(()), "removing a run always fits");
        assert!(p.take_revoke_failure().is_none());
        assert_eq!(p.stats().mprotect_failures, 0);
    }

    #[test]
    fn everything_shared_before_enable() {
        let mut p = prot();
        assert!(!p.enabled());
        assert_eq!(p.classify(0, NPAGES * PAGE_SIZE), Access::Allowed);
        assert_eq!(p.classify(NPAGES * PAGE_SIZE - 4, 8), Access::NotRam);
        assert_eq!(p.share(range(0, 1)), Err(AbiError::Permission));
        assert_eq!(p.unshare(range(0, 1)), Err(AbiError::Permission));
        p.write_obj(7u64, GuestAddress(0x2000)).unwrap();
        assert_eq!(p.stats().allowed, 1);
        assert_eq!(p.stats().bytes_written, 8);
    }

    #[test]
    fn share_unshare_and_counts() {
        let mut p = prot();
        p.enable().unwrap();
        assert_eq!(p.classify(0, 1), Access::Private);
        p.share(range(2, 3)).unwrap();
        assert_eq!(p.shared_pages(), 3);
        assert_eq!(p.classify(2 * PAGE_SIZE, 3 * PAGE_SIZE), Access::Allowed);
        assert_eq!(
            p.classify(2 * PAGE_SIZE, 3 * PAGE_SIZE + 1),
            Access::Private
        );
        assert_eq!(
            p.classify(2 * PAGE_SIZE - 1, 2),
            Access::Private,
            "straddles"
        );
        p.unshare(range(3, 1)).unwrap();
        assert_eq!(p.shared_pages(), 2);
        assert_eq!(p.shared_peak(), 3);
        assert_eq!(p.share(range(NPAGES - 1, 2)), Err(AbiError::Fault));
        assert_eq!(p.unshare(range(NPAGES, 1)), Err(AbiError::Fault));
        assert_eq!(p.shared_pages(), 2, "failed requests change nothing");
    }

    #[test]
    fn device_accesses_are_checked_and_counted() {
        let mut p = prot();
        p.write_obj(0x55aa_u16, GuestAddress(0x1000)).unwrap();
        p.enable().unwrap();
        assert!(p.read_obj::<u16>(GuestAddress(0x1000)).is_err());
        assert!(p.write_obj(1u8, GuestAddress(0x1fff)).is_err());
        assert!(!GuestMemory::check_range(
            &p,
            GuestAddress(0x1000),
            2,
            Permissions::Read
        ));
        let s = p.stats();
        assert_eq!((s.denied, s.allowed), (2, 1));
        p.share(range(1, 1)).unwrap();
        assert_eq!(
            p.read_obj::<u16>(GuestAddress(0x1000)).unwrap(),
            0x55aa,
            "kept"
        );
        assert!(
            p.read_obj::<u64>(GuestAddress(0x1ffc)).is_err(),
            "runs into page 2"
        );
        assert!(p.read_obj::<u64>(GuestAddress(NPAGES * PAGE_SIZE)).is_err());
        let s = p.stats();
        assert_eq!((s.allowed, s.denied, s.not_ram), (2, 3, 1));
        assert_eq!(s.bytes_read, 2);
    }

    #[test]
    fn enable_again_drops_every_share() {
        let mut p = prot();
        p.enable().unwrap();
        p.share(range(0, NPAGES)).unwrap();
        p.write_obj(0xdead_beef_u32, GuestAddress(0x5000)).unwrap();
        p.enable().unwrap();
        assert_eq!(p.enable_count(), 2);
        assert_eq!(p.shared_pages(), 0);
        assert_eq!(p.shared_peak(), NPAGES);
        assert!(p.read_obj::<u32>(GuestAddress(0x5000)).is_err());
        p.share(range(5, 1)).unwrap();
        assert_eq!(
            p.read_obj::<u32>(GuestAddress(0x5000)).unwrap(),
            0xdead_beef
        );
    }

    #[test]
    fn probe_counts_separately() {
        let mut p = prot();
        p.write_obj(0x0102_0304_0506_0708u64, GuestAddress(0x3000))
            .unwrap();
        assert_eq!(p.probe_read(0x3000), Some(0x0102_0304_0506_0708));
        p.enable().unwrap();
        assert!(!p.probe_page(0x3000));
        assert_eq!(p.probe_read(0x3000), None);
        p.share(range(3, 1)).unwrap();
        assert!(p.probe_page(0x3abc));
        assert_eq!(p.probe_read(0x3ffc), None, "crosses into a private page");
        assert!(!p.probe_page(NPAGES * PAGE_SIZE), "not RAM");
        let s = p.stats();
        assert_eq!((s.probe_allowed, s.probe_denied), (2, 4));
        assert_eq!(
            (s.allowed, s.denied),
            (1, 0),
            "probes are not device accesses"
        );
    }

    #[test]
    fn private_pages_are_prot_none_in_the_mapping() {
        let mut p = prot();
        let base = p.raw_view().get_host_address(GuestAddress(0)).unwrap() as u64;
        assert!(page_perms(base, NPAGES).iter().all(|s| s.starts_with("rw")));
        p.enable().unwrap();
        p.share(range(2, 2)).unwrap();
        p.share(range(9, 1)).unwrap();
        p.unshare(range(3, 1)).unwrap();
        let perms = page_perms(base, NPAGES);
        for (pfn, perm) in perms.iter().enumerate() {
            let want = if pfn == 2 || pfn == 9 { "rw" } else { "--" };
            assert!(
                perm.starts_with(want),
                "page {pfn}: {perm} (all: {perms:?})"
            );
        }
    }

    #[test]
    fn reset_reopens_a_real_memfd_and_empties_the_map() {
        let (_kvm, dev) = crate::ram::GuestRam::new(NPAGES * PAGE_SIZE)
            .unwrap()
            .into_views();
        let mut p = Protection::new(dev);
        let base = p.raw_view().get_host_address(GuestAddress(0)).unwrap() as u64;
        p.enable().unwrap();
        p.share(range(1, 3)).unwrap();
        p.share(range(12, 1)).unwrap();
        p.write_obj(0x1234_u32, GuestAddress(0x1000)).unwrap();
        assert!(page_perms(base, NPAGES).iter().any(|s| s.starts_with("--")));
        let before = p.stats();

        p.reset().unwrap();
        let perms = page_perms(base, NPAGES);
        assert!(
            perms.iter().all(|s| s.starts_with("rw")),
            "every page RW after reset: {perms:?}"
        );
        assert!(!p.enabled());
        assert_eq!(p.shared_pages(), 0, "map empty");
        assert_eq!(p.classify(0, NPAGES * PAGE_SIZE), Access::Allowed);
        assert_eq!(read_in_child(&p, 0x5000), None, "really readable");
        assert_eq!(p.share(range(0, 1)), Err(AbiError::Permission), "normal VM");
        assert_eq!(p.read_obj::<u32>(GuestAddress(0x1000)).unwrap(), 0x1234);
        assert_eq!(p.enable_count(), 1, "cumulative");
        assert_eq!(p.shared_peak(), 4, "cumulative");
        assert_eq!(p.stats().allowed, before.allowed + 1, "counters kept");

        p.enable().unwrap();
        assert_eq!(p.shared_pages(), 0);
        assert_eq!(p.classify(0x1000, 4), Access::Private, "ENABLE works again");
        assert_eq!(read_in_child(&p, 0x1000), Some(libc::SIGSEGV));
    }

    /// Forks a child that reads one byte of `gpa` through the unchecked
    /// device view; returns the signal that killed it, or None if it exited.
    fn read_in_child(p: &Protection, gpa: u64) -> Option<i32> {
        let ptr = p.raw_view().get_host_address(GuestAddress(gpa)).unwrap();
        // SAFETY: the child only does a volatile read and `_exit`, both
        // async-signal-safe, so forking a multi-threaded test process is fine.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork failed");
        if pid == 0 {
            // SAFETY: `ptr` points into the live device-view mapping; the
            // read either succeeds or raises SIGSEGV, which is what we test.
            let _ = unsafe { std::ptr::read_volatile(ptr) };
            // SAFETY: `_exit` ends the child without running destructors.
            unsafe { libc::_exit(0) };
        }
        let mut status = 0;
        // SAFETY: waits for the child we just forked; `status` is a valid out
        // pointer.
        let rc = unsafe { libc::waitpid(pid, &mut status, 0) };
        assert_eq!(rc, pid);
        libc::WIFSIGNALED(status).then(|| libc::WTERMSIG(status))
    }

    #[test]
    fn reading_a_private_page_directly_faults() {
        let mut p = prot();
        p.enable().unwrap();
        p.share(range(1, 1)).unwrap();
        assert_eq!(read_in_child(&p, 0x1000), None, "shared page is readable");
        assert_eq!(read_in_child(&p, 0x4000), Some(libc::SIGSEGV));
    }
}

#[cfg(test)]
mod cost {
    use super::*;

    /// The guest's per-page mode at boot: the 64 MiB bounce pool shared
    /// one page per SHARE (16384 calls) into 512 MiB of RAM. Prints the
    /// host time; run with `--release --ignored --nocapture`.
    #[test]
    #[ignore = "a measurement, not a check"]
    fn per_page_pool_share_cost() {
        const RAM: u64 = 512 << 20;
        let view = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), RAM as usize)]).unwrap();
        let mut p = Protection::new(view);
        p.enable().unwrap();
        let pool = (RAM - (64 << 20)) / PAGE_SIZE;
        let start = std::time::Instant::now();
        for pfn in pool..pool + 16384 {
            p.share(GpaRange::from_pfn(pfn, 1).unwrap()).unwrap();
        }
        let share = start.elapsed();
        let start = std::time::Instant::now();
        for pfn in pool..pool + 16384 {
            p.unshare(GpaRange::from_pfn(pfn, 1).unwrap()).unwrap();
        }
        let unshare = start.elapsed();
        println!(
            "16384 one-page SHAREs into 512 MiB: {share:?} ({:.2} us each); UNSHAREs {unshare:?}",
            share.as_secs_f64() * 1e6 / 16384.0
        );
    }
}
