//! guest_memfd protection (`--protect=gmem`): private guest pages live only
//! in a guest_memfd, which KVM maps for the guest and the VMM cannot map.
//!
//! Guest RAM has two backings per page: the shared memfd (the memslot's
//! `userspace_addr`, also what devices reach through the checked view) and
//! the guest_memfd. KVM picks one per page from the page's memory
//! attributes, and KVM alone sets them: with `KVM_CAP_X86_PROTECTED_MEMORY`
//! it applies ENABLE, SHARE and UNSHARE itself (and frees the guest_memfd
//! pages of what becomes shared) before it tells the VMM, which can refuse
//! a conversion but not fake one. This module does the VMM's part and keeps
//! one invariant: **the memfd holds nothing for a private page** (a hole),
//! so the VMM process never holds a copy of a private page.
//!
//! | guest request (KVM applied it) | then, in the VMM |
//! |---|---|
//! | ENABLE (RAM private) | populate every *shared data extent* of the memfd into the guest_memfd, the one time KVM allows it (holes are skipped, pages never touched cost nothing; KVM refuses pages that were private), then punch the whole memfd |
//! | SHARE (range shared) | nothing: the memfd range is the shared backing (contents are not kept: the guest writes a shared page after sharing it) |
//! | UNSHARE (range private) | punch the memfd range (the private page starts zeroed) |
//!
//! A reboot or a new VM gets a new guest_memfd (it belongs to one KVM VM),
//! and the shell punches the memfd, so no copy of either side survives.
//!
//! The KVM call sits behind [`PrivateMemory`], so the bookkeeping here is
//! tested with a fake; [`crate::gmem_kvm`] implements it over KVM.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::time::Instant;

use serde::Serialize;

use crate::ram::PAGE_SIZE;

/// Errors of guest_memfd protection.
#[derive(Debug, thiserror::Error)]
pub enum GmemError {
    /// A KVM operation on the private side failed.
    #[error("{op} for GPAs {start:#x}..{end:#x} failed: {err}")]
    Kvm {
        /// The operation (`KVM_SET_MEMORY_ATTRIBUTES(PRIVATE)`, ...).
        op: &'static str,
        /// First GPA.
        start: u64,
        /// One past the last GPA.
        end: u64,
        /// The OS error.
        err: io::Error,
    },
    /// The VM is being stopped (a reboot, `--timeout`) while ENABLE was
    /// populating: the rest was not copied, and the guest never runs again.
    #[error(
        "populating the guest_memfd was interrupted by a stop at GPA {at:#x}, {left:#x} bytes left"
    )]
    Interrupted {
        /// First GPA not populated.
        at: u64,
        /// Bytes not populated.
        left: u64,
    },
    /// Walking or punching the shared memfd failed.
    #[error("{op} of the shared memfd at {start:#x}..{end:#x} failed: {err}")]
    Shared {
        /// `lseek(SEEK_DATA)`, `lseek(SEEK_HOLE)` or `fallocate(PUNCH_HOLE)`.
        op: &'static str,
        /// First offset (= GPA).
        start: u64,
        /// One past the last offset.
        end: u64,
        /// The OS error.
        err: io::Error,
    },
}

/// The private side of guest RAM: what KVM lets the VMM do for a
/// software-protected VM whose private memory KVM owns. GPAs and lengths
/// are page aligned; the guest_memfd offset of a GPA is the GPA (one
/// memslot from GPA 0).
pub trait PrivateMemory: Send {
    /// Copies `len` bytes at `gpa` from the shared backing into the
    /// guest_memfd (`KVM_SW_PROTECTED_POPULATE`): only while the guest's
    /// ENABLE waits for the VMM, into pages that were shared, once.
    fn populate(&mut self, gpa: u64, len: u64) -> Result<(), GmemError>;
}

/// Figures of guest_memfd protection, as the stats file lists them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct GmemStats {
    /// Successful ENABLEs handled in gmem mode.
    pub enables: u64,
    /// Bytes copied into the guest_memfd by ENABLEs.
    pub bytes_populated: u64,
    /// Data extents populated (one populate call each).
    pub extents_populated: u64,
    /// Microseconds (host clock) the last ENABLE took: attributes, populate, punch.
    pub last_enable_us: u64,
    /// Bytes populated by the last ENABLE.
    pub last_enable_bytes: u64,
    /// The VMM's resident memory (KiB, `VmRSS`) just before and just after the last ENABLE.
    pub rss_kib_before_enable: u64,
    /// See `rss_kib_before_enable`.
    pub rss_kib_after_enable: u64,
    /// Ranges KVM made shared (SHARE) and private (UNSHARE).
    pub to_shared: u64,
    /// See `to_shared`.
    pub to_private: u64,
    /// Punches of the memfd that failed after an UNSHARE (the conversion
    /// stood; the stale copy is counted, never used by KVM).
    pub punch_failures: u64,
    /// Bytes the vCPU threads mapped ahead of the guest after ENABLEs
    /// (`KVM_PRE_FAULT_MEMORY` of what was populated).
    pub bytes_prefaulted: u64,
    /// Microseconds (host clock) the last of those took.
    pub last_prefault_us: u64,
    /// Pre-faults KVM refused or a signal cut short (the pages then fault
    /// in on demand, as without it).
    pub prefaults_incomplete: u64,
}

/// guest_memfd protection state of one VM: the private side and the
/// shared memfd.
pub struct Gmem {
    private: Box<dyn PrivateMemory + Send + Sync>,
    shared: File,
    stats: GmemStats,
    /// What the last ENABLE populated, until the vCPU takes it to
    /// pre-fault ([`Gmem::take_populated`]).
    populated: Vec<(u64, u64)>,
}

impl std::fmt::Debug for Gmem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gmem").field("stats", &self.stats).finish()
    }
}

impl Gmem {
    /// Wraps the private side of a VM and (a descriptor of) the shared memfd.
    pub fn new(private: Box<dyn PrivateMemory + Send + Sync>, shared: File) -> Self {
        Gmem {
            private,
            shared,
            stats: GmemStats::default(),
            populated: Vec::new(),
        }
    }

    /// The figures so far.
    pub fn stats(&self) -> GmemStats {
        self.stats
    }

    /// Starts from the figures of the side this one replaces (a reboot),
    /// so that the counts cover the whole run.
    pub fn carry(&mut self, before: GmemStats) {
        self.stats = before;
    }

    /// ENABLE over RAM `0..ram_end`, which KVM made private: keeps the
    /// contents of the pages `is_shared` reports shared (all of them at a
    /// boot's first ENABLE; the shared set at a later one) by populating
    /// them, then, with `punch`, empties the shared memfd. Data of a page
    /// that was private stays in the guest_memfd; whatever the memfd held
    /// for it (nothing, unless something touched the hole) is dropped,
    /// never copied in (KVM would refuse it). Only `--hostile` keeps the
    /// memfd (`punch` false).
    pub fn populate(
        &mut self,
        ram_end: u64,
        is_shared: impl Fn(u64) -> bool,
        punch_memfd: bool,
    ) -> Result<(), GmemError> {
        let started = Instant::now();
        let rss_before = rss_kib();
        let mut bytes = 0;
        self.populated.clear();
        for (start, end) in data_extents(&self.shared, 0, ram_end)? {
            for (s, e) in shared_runs(start, end, &is_shared) {
                self.private.populate(s, e - s)?;
                bytes += e - s;
                self.stats.extents_populated += 1;
                self.populated.push((s, e - s));
            }
        }
        if punch_memfd {
            punch(&self.shared, 0, ram_end)?;
        }
        let s = &mut self.stats;
        s.enables += 1;
        s.bytes_populated += bytes;
        s.last_enable_bytes = bytes;
        s.last_enable_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        s.rss_kib_before_enable = rss_before;
        s.rss_kib_after_enable = rss_kib();
        Ok(())
    }

    /// The ranges (GPA, length) the last ENABLE populated: pages the guest
    /// used before ENABLE, which it will touch again. Empty after the
    /// first call.
    pub fn take_populated(&mut self) -> Vec<(u64, u64)> {
        std::mem::take(&mut self.populated)
    }

    /// Counts a pre-fault of `bytes` that took `us` microseconds;
    /// `complete` false if it stopped early.
    pub fn record_prefault(&mut self, bytes: u64, us: u64, complete: bool) {
        self.stats.bytes_prefaulted += bytes;
        self.stats.last_prefault_us = us;
        if !complete {
            self.stats.prefaults_incomplete += 1;
        }
    }

    /// SHARE, which KVM applied: the range's data is now the shared memfd's
    /// (KVM freed its private pages).
    pub fn share(&mut self, _gpa: u64, _len: u64) {
        self.stats.to_shared += 1;
    }

    /// UNSHARE, which KVM applied: the range is private (zeroed in the
    /// guest_memfd); its shared pages are freed.
    pub fn unshare(&mut self, gpa: u64, len: u64) {
        self.stats.to_private += 1;
        if let Err(e) = punch(&self.shared, gpa, len) {
            eprintln!("protmem-vmm: UNSHARE {gpa:#x}+{len:#x}: {e}");
            self.stats.punch_failures += 1;
        }
    }
}

/// Splits the page-aligned range `start..end` into runs of pages for which
/// `is_shared(pfn)` holds.
fn shared_runs(start: u64, end: u64, is_shared: &impl Fn(u64) -> bool) -> Vec<(u64, u64)> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    let mut pfn = start / PAGE_SIZE;
    while pfn * PAGE_SIZE < end {
        if is_shared(pfn) {
            let gpa = pfn * PAGE_SIZE;
            match runs.last_mut() {
                Some(last) if last.1 == gpa => last.1 += PAGE_SIZE,
                _ => runs.push((gpa, gpa + PAGE_SIZE)),
            }
        }
        pfn += 1;
    }
    runs
}

/// The data extents of `file` within `start..end`, page aligned outward
/// and clipped to the range (`lseek` `SEEK_DATA`/`SEEK_HOLE`).
pub fn data_extents(file: &File, start: u64, end: u64) -> Result<Vec<(u64, u64)>, GmemError> {
    let fd = file.as_raw_fd();
    let seek = |op: &'static str, whence, at: u64| -> Result<Option<u64>, GmemError> {
        let err = |err| GmemError::Shared {
            op,
            start: at,
            end,
            err,
        };
        let off = libc::off_t::try_from(at)
            .map_err(|_| err(io::Error::from(io::ErrorKind::InvalidInput)))?;
        // SAFETY: lseek on a descriptor we own; it moves the file offset,
        // which nothing else here relies on (reads use explicit offsets).
        let r = unsafe { libc::lseek(fd, off, whence) };
        if r < 0 {
            let e = io::Error::last_os_error();
            // ENXIO: no data (SEEK_DATA) at or past `at`.
            return if e.raw_os_error() == Some(libc::ENXIO) {
                Ok(None)
            } else {
                Err(err(e))
            };
        }
        Ok(Some(r as u64))
    };
    let mut out = Vec::new();
    let mut at = start;
    while at < end {
        let Some(data) = seek("lseek(SEEK_DATA)", libc::SEEK_DATA, at)? else {
            break;
        };
        if data >= end {
            break;
        }
        let hole = seek("lseek(SEEK_HOLE)", libc::SEEK_HOLE, data)?.unwrap_or(end);
        let s = data / PAGE_SIZE * PAGE_SIZE;
        let e = hole.div_ceil(PAGE_SIZE).saturating_mul(PAGE_SIZE).min(end);
        if e > s {
            out.push((s, e));
        }
        at = e.max(at + PAGE_SIZE);
    }
    Ok(out)
}

/// Frees `len` bytes at `offset` of `file` (punch hole, size kept).
pub fn punch(file: &File, offset: u64, len: u64) -> Result<(), GmemError> {
    let err = |err| GmemError::Shared {
        op: "fallocate(PUNCH_HOLE)",
        start: offset,
        end: offset.saturating_add(len),
        err,
    };
    let (Ok(off), Ok(l)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
        return Err(err(io::Error::from(io::ErrorKind::InvalidInput)));
    };
    // SAFETY: fallocate on a descriptor we own changes file contents only;
    // every mapping of the file stays valid and reads the range as zeros.
    let rc = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            off,
            l,
        )
    };
    if rc != 0 {
        return Err(err(io::Error::last_os_error()));
    }
    Ok(())
}

/// This process's resident set in KiB (`VmRSS` of /proc/self/status), 0
/// if unknown.
pub fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{BTreeMap, BTreeSet};
    use std::os::unix::fs::FileExt;
    use std::sync::{Arc, Mutex};

    /// A fake KVM: attributes per page, a guest_memfd page store, the
    /// populate window of a pending ENABLE, and the populate calls made.
    #[derive(Default)]
    struct Fake {
        private: BTreeMap<u64, bool>,
        store: BTreeMap<u64, Vec<u8>>,
        window: BTreeSet<u64>,
        calls: Vec<String>,
    }

    impl Fake {
        /// KVM's side of ENABLE: every shared page private, and open to
        /// one populate each.
        fn enable(&mut self, npages: u64) {
            self.window = (0..npages)
                .filter(|p| !self.private.get(p).copied().unwrap_or(false))
                .collect();
            for p in 0..npages {
                self.private.insert(p, true);
            }
        }

        /// KVM's side of SHARE (private pages dropped) and UNSHARE.
        fn convert(&mut self, first: u64, n: u64, private: bool) {
            for p in first..first + n {
                self.private.insert(p, private);
                if !private {
                    self.store.remove(&p);
                }
            }
        }
    }

    struct FakeSide {
        state: Arc<Mutex<Fake>>,
        shared: File,
    }

    impl PrivateMemory for FakeSide {
        fn populate(&mut self, gpa: u64, len: u64) -> Result<(), GmemError> {
            let mut s = self.state.lock().unwrap();
            s.calls.push(format!("populate {gpa:#x}+{len:#x}"));
            let pages = gpa / PAGE_SIZE..(gpa + len) / PAGE_SIZE;
            // KVM_SW_PROTECTED_POPULATE: only pages of the window, once.
            if pages.clone().any(|p| !s.window.contains(&p)) {
                return Err(GmemError::Kvm {
                    op: "KVM_SW_PROTECTED_POPULATE",
                    start: gpa,
                    end: gpa + len,
                    err: io::Error::from_raw_os_error(libc::EPERM),
                });
            }
            for pfn in pages {
                s.window.remove(&pfn);
                let mut page = vec![0; PAGE_SIZE as usize];
                self.shared
                    .read_exact_at(&mut page, pfn * PAGE_SIZE)
                    .unwrap();
                s.store.insert(pfn, page);
            }
            Ok(())
        }
    }

    const NPAGES: u64 = 64;

    fn memfd() -> File {
        let ram = crate::ram::GuestRam::new(NPAGES * PAGE_SIZE).unwrap();
        let (kvm, _dev) = ram.into_views();
        use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
        let f = kvm
            .iter()
            .next()
            .unwrap()
            .file_offset()
            .unwrap()
            .file()
            .try_clone()
            .unwrap();
        f
    }

    fn setup() -> (Gmem, Arc<Mutex<Fake>>, File) {
        let shared = memfd();
        let state = Arc::new(Mutex::new(Fake::default()));
        let side = FakeSide {
            state: state.clone(),
            shared: shared.try_clone().unwrap(),
        };
        (
            Gmem::new(Box::new(side), shared.try_clone().unwrap()),
            state,
            shared,
        )
    }

    fn page_of(b: u8) -> Vec<u8> {
        vec![b; PAGE_SIZE as usize]
    }

    #[test]
    fn extents_skip_holes_and_align() {
        let f = memfd();
        assert!(
            data_extents(&f, 0, NPAGES * PAGE_SIZE).unwrap().is_empty(),
            "fresh memfd"
        );
        f.write_all_at(b"x", 3 * PAGE_SIZE + 17).unwrap();
        f.write_all_at(&page_of(1), 4 * PAGE_SIZE).unwrap();
        f.write_all_at(b"y", 40 * PAGE_SIZE).unwrap();
        let all = data_extents(&f, 0, NPAGES * PAGE_SIZE).unwrap();
        assert_eq!(
            all,
            vec![
                (3 * PAGE_SIZE, 5 * PAGE_SIZE),
                (40 * PAGE_SIZE, 41 * PAGE_SIZE)
            ]
        );
        assert_eq!(
            data_extents(&f, 4 * PAGE_SIZE, 40 * PAGE_SIZE).unwrap(),
            vec![(4 * PAGE_SIZE, 5 * PAGE_SIZE)],
            "clipped"
        );
        punch(&f, 4 * PAGE_SIZE, PAGE_SIZE).unwrap();
        assert_eq!(
            data_extents(&f, 0, NPAGES * PAGE_SIZE).unwrap(),
            vec![
                (3 * PAGE_SIZE, 4 * PAGE_SIZE),
                (40 * PAGE_SIZE, 41 * PAGE_SIZE)
            ]
        );
    }

    #[test]
    fn first_enable_moves_every_data_page_and_empties_the_memfd() {
        let (mut g, state, shared) = setup();
        shared.write_all_at(&page_of(0xaa), 2 * PAGE_SIZE).unwrap();
        shared.write_all_at(&page_of(0xbb), 3 * PAGE_SIZE).unwrap();
        shared.write_all_at(&page_of(0xcc), 50 * PAGE_SIZE).unwrap();
        state.lock().unwrap().enable(NPAGES);
        g.populate(NPAGES * PAGE_SIZE, |_| true, true).unwrap();
        let s = state.lock().unwrap();
        assert_eq!(
            s.calls,
            vec![
                "populate 0x2000+0x2000".to_string(),
                "populate 0x32000+0x1000".into(),
            ]
        );
        assert_eq!(s.store[&2], page_of(0xaa));
        assert_eq!(s.store[&3], page_of(0xbb));
        assert_eq!(s.store[&50], page_of(0xcc));
        assert_eq!(s.store.len(), 3, "untouched pages are not copied");
        assert!(
            data_extents(&shared, 0, NPAGES * PAGE_SIZE)
                .unwrap()
                .is_empty(),
            "no copy left in the VMM"
        );
        let st = g.stats();
        assert_eq!(
            (st.enables, st.bytes_populated, st.extents_populated),
            (1, 3 * PAGE_SIZE, 2)
        );
    }

    #[test]
    fn share_and_unshare_leave_one_copy() {
        let (mut g, state, shared) = setup();
        shared.write_all_at(&page_of(0x11), 5 * PAGE_SIZE).unwrap();
        state.lock().unwrap().enable(NPAGES);
        g.populate(NPAGES * PAGE_SIZE, |_| true, true).unwrap();
        state.lock().unwrap().convert(5, 2, false);
        g.share(5 * PAGE_SIZE, 2 * PAGE_SIZE);
        assert!(!state.lock().unwrap().store.contains_key(&5));
        // The guest writes the shared page; then takes it back.
        shared.write_all_at(&page_of(0x22), 5 * PAGE_SIZE).unwrap();
        state.lock().unwrap().convert(5, 1, true);
        g.unshare(5 * PAGE_SIZE, PAGE_SIZE);
        assert!(
            data_extents(&shared, 0, NPAGES * PAGE_SIZE)
                .unwrap()
                .is_empty(),
            "shared copy dropped on UNSHARE"
        );
        let st = g.stats();
        assert_eq!((st.to_shared, st.to_private, st.punch_failures), (1, 1, 0));
    }

    #[test]
    fn enable_again_copies_only_shared_pages() {
        let (mut g, state, shared) = setup();
        state.lock().unwrap().enable(NPAGES);
        g.populate(NPAGES * PAGE_SIZE, |_| true, true).unwrap();
        state.lock().unwrap().convert(8, 1, false);
        g.share(8 * PAGE_SIZE, PAGE_SIZE);
        shared.write_all_at(&page_of(0x33), 8 * PAGE_SIZE).unwrap();
        // Something touched the hole of private page 9 (a scanner reading
        // the mapping): zeros in the memfd that must not clobber the
        // guest's private page.
        shared.write_all_at(&page_of(0), 9 * PAGE_SIZE).unwrap();
        state.lock().unwrap().store.insert(9, page_of(0x99));
        state.lock().unwrap().enable(NPAGES);
        g.populate(NPAGES * PAGE_SIZE, |pfn| pfn == 8, true)
            .unwrap();
        let s = state.lock().unwrap();
        assert_eq!(s.store[&8], page_of(0x33), "shared data kept");
        assert_eq!(s.store[&9], page_of(0x99), "private data untouched");
        assert!(data_extents(&shared, 0, NPAGES * PAGE_SIZE)
            .unwrap()
            .is_empty());
        assert_eq!(g.stats().last_enable_bytes, PAGE_SIZE);
    }

    #[test]
    fn a_populate_kvm_refuses_fails_the_enable() {
        let (mut g, state, shared) = setup();
        shared.write_all_at(&page_of(0x44), 7 * PAGE_SIZE).unwrap();
        // No ENABLE pending in KVM: the populate window is closed.
        let e = g.populate(NPAGES * PAGE_SIZE, |_| true, true).unwrap_err();
        assert!(e.to_string().contains("KVM_SW_PROTECTED_POPULATE"), "{e}");
        assert!(state.lock().unwrap().store.is_empty());
        assert_eq!(g.stats().enables, 0);
    }

    #[test]
    fn runs_follow_the_shared_set() {
        let runs = shared_runs(0, 10 * PAGE_SIZE, &|p| p == 1 || p == 2 || p == 7);
        assert_eq!(
            runs,
            vec![(PAGE_SIZE, 3 * PAGE_SIZE), (7 * PAGE_SIZE, 8 * PAGE_SIZE)]
        );
        assert!(shared_runs(0, 4 * PAGE_SIZE, &|_| false).is_empty());
    }

    #[test]
    fn rss_is_read() {
        assert!(rss_kib() > 0);
    }
}
