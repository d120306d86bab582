//! Guest RAM: one sealed memfd mapped twice, a KVM view and a device view.
//!
//! The KVM view backs the memslot and is where the kernel is loaded before
//! boot; no device ever gets it. The device view is the only mapping that
//! device emulation reads and writes, always through
//! [`crate::protection::Protection`], which checks the shared-page map and
//! turns private pages of this view to `PROT_NONE`.
//!
//! The memfd is sealed against shrinking and growing, so neither mapping can
//! lose its backing (a truncated memfd would turn guest accesses into
//! SIGBUS in the VMM).

use std::fs::File;
use std::io;
use std::os::fd::FromRawFd;

use vm_memory::mmap::MmapRegionError;
use vm_memory::{
    FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    GuestRegionCollectionError, GuestRegionMmap, MmapRegion,
};

/// Page size of the shared-page map (the hypercall ABI's page).
pub const PAGE_SIZE: u64 = hypercall::PAGE_SIZE;

/// Errors while creating guest RAM.
#[derive(Debug, thiserror::Error)]
pub enum RamError {
    /// The size is zero, unaligned or does not fit the host's address space.
    #[error("guest RAM size {0:#x} is not a non-zero multiple of {PAGE_SIZE:#x} bytes")]
    BadSize(u64),
    /// `memfd_create` failed.
    #[error("memfd_create for {size:#x} bytes of guest RAM failed: {err}")]
    Memfd {
        /// Requested RAM size.
        size: u64,
        /// The OS error.
        err: io::Error,
    },
    /// `ftruncate` of the memfd failed.
    #[error("sizing the guest RAM memfd to {size:#x} bytes failed: {err}")]
    Truncate {
        /// Requested RAM size.
        size: u64,
        /// The OS error.
        err: io::Error,
    },
    /// `F_ADD_SEALS` failed.
    #[error("sealing the guest RAM memfd with seals {seals:#x} failed: {err}")]
    Seal {
        /// The seals asked for.
        seals: i32,
        /// The OS error.
        err: io::Error,
    },
    /// Mapping one view failed.
    #[error("mapping the {view} view of guest RAM ({size:#x} bytes) failed: {err}")]
    Map {
        /// Which view.
        view: &'static str,
        /// RAM size.
        size: u64,
        /// The mmap error.
        err: MmapRegionError,
    },
    /// Building the guest memory object of one view failed.
    #[error("placing the {view} view of guest RAM at GPA 0 failed: {err}")]
    Region {
        /// Which view.
        view: &'static str,
        /// The vm-memory error.
        err: GuestRegionCollectionError,
    },
    /// Duplicating the memfd for the second view failed.
    #[error("duplicating the guest RAM memfd failed: {0}")]
    Dup(io::Error),
    /// Zeroing a range of guest RAM for a reboot failed.
    #[error("clearing guest RAM GPAs {start:#x}..{end:#x} (punching the memfd) failed: {err}")]
    Clear {
        /// First GPA of the range.
        start: u64,
        /// One past the last GPA.
        end: u64,
        /// The OS error (`InvalidInput` if the range is not file backed).
        err: io::Error,
    },
}

/// Guest RAM from GPA 0: a memfd with a KVM view and a device view.
#[derive(Debug)]
pub struct GuestRam {
    size: u64,
    kvm_view: GuestMemoryMmap,
    device_view: GuestMemoryMmap,
}

/// Seals that keep the memfd's size fixed for the life of the VM.
const SEALS: i32 = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;

impl GuestRam {
    /// Creates `size` bytes of zeroed guest RAM starting at GPA 0.
    pub fn new(size: u64) -> Result<Self, RamError> {
        if size == 0 || size % PAGE_SIZE != 0 || usize::try_from(size).is_err() {
            return Err(RamError::BadSize(size));
        }
        let file = memfd(size)?;
        file.set_len(size)
            .map_err(|err| RamError::Truncate { size, err })?;
        // SAFETY: fcntl on a file descriptor we own; F_ADD_SEALS takes an int
        // argument and touches no memory of ours.
        let rc = unsafe {
            libc::fcntl(
                std::os::fd::AsRawFd::as_raw_fd(&file),
                libc::F_ADD_SEALS,
                SEALS,
            )
        };
        if rc < 0 {
            return Err(RamError::Seal {
                seals: SEALS,
                err: io::Error::last_os_error(),
            });
        }
        let second = file.try_clone().map_err(RamError::Dup)?;
        let kvm_view = map_view("KVM", file, size)?;
        let device_view = map_view("device", second, size)?;
        Ok(GuestRam {
            size,
            kvm_view,
            device_view,
        })
    }

    /// Size of guest RAM in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The view KVM's memslot uses; also used to load the kernel before boot.
    pub fn kvm_view(&self) -> &GuestMemoryMmap {
        &self.kvm_view
    }

    /// Host virtual address of GPA 0 in the KVM view (the memslot's
    /// `userspace_addr`).
    pub fn kvm_host_address(&self) -> u64 {
        // A non-empty region starting at GPA 0 always has a host address.
        self.kvm_view
            .get_host_address(GuestAddress(0))
            .map_or(0, |p| p as u64)
    }

    /// Splits into the KVM view and the device view; the device view is then
    /// wrapped by [`crate::protection::Protection`].
    pub fn into_views(self) -> (GuestMemoryMmap, GuestMemoryMmap) {
        (self.kvm_view, self.device_view)
    }
}

/// Zeroes all guest RAM of `view` (either view of one [`GuestRam`]) for a
/// reboot, by punching the memfd: the pages go back to the host and read as
/// zero through both views; the memfd keeps its size and seals.
///
/// A reboot reopens every page to devices (protection starts off again), so
/// without this the previous kernel's private pages would become readable by
/// the device view. Call it only with every vCPU stopped.
pub fn clear(view: &GuestMemoryMmap) -> Result<(), RamError> {
    for region in view.iter() {
        let start = region.start_addr().0;
        let end = start + region.len();
        let err = |err| RamError::Clear { start, end, err };
        let fo = region
            .file_offset()
            .ok_or_else(|| err(io::Error::from(io::ErrorKind::InvalidInput)))?;
        let (offset, len) = (fo.start(), region.len());
        let (Ok(offset), Ok(len)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len))
        else {
            return Err(err(io::Error::from(io::ErrorKind::InvalidInput)));
        };
        // SAFETY: fallocate on a descriptor the region owns; it changes file
        // contents, never our memory layout: both mappings stay valid and
        // read the punched range as zeros. The seals allow it (KEEP_SIZE).
        let rc = unsafe {
            libc::fallocate(
                std::os::fd::AsRawFd::as_raw_fd(fo.file()),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset,
                len,
            )
        };
        if rc != 0 {
            return Err(err(io::Error::last_os_error()));
        }
    }
    Ok(())
}

fn memfd(size: u64) -> Result<File, RamError> {
    // SAFETY: the name is a NUL-terminated string literal that outlives the
    // call; the flags are valid memfd_create flags.
    let fd = unsafe {
        libc::memfd_create(
            c"protmem-guest-ram".as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        )
    };
    if fd < 0 {
        return Err(RamError::Memfd {
            size,
            err: io::Error::last_os_error(),
        });
    }
    // SAFETY: memfd_create just returned this descriptor; nothing else owns it.
    Ok(unsafe { File::from_raw_fd(fd) })
}

fn map_view(view: &'static str, file: File, size: u64) -> Result<GuestMemoryMmap, RamError> {
    // `size` fits usize: checked in `GuestRam::new`.
    let len = size as usize;
    let region = MmapRegion::from_file(FileOffset::new(file, 0), len)
        .map_err(|err| RamError::Map { view, size, err })?;
    let region = GuestRegionMmap::new(region, GuestAddress(0)).ok_or(RamError::Region {
        view,
        err: GuestRegionCollectionError::NoMemoryRegion,
    })?;
    GuestMemoryMmap::from_regions(vec![region]).map_err(|err| RamError::Region { view, err })
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn views_alias_the_same_memory() {
        let ram = GuestRam::new(16 * PAGE_SIZE).unwrap();
        assert_eq!(ram.size(), 16 * PAGE_SIZE);
        assert_ne!(ram.kvm_host_address(), 0);
        let (kvm, dev) = ram.into_views();
        kvm.write_obj(0x1122_3344_5566_7788u64, GuestAddress(0x3008))
            .unwrap();
        assert_eq!(
            dev.read_obj::<u64>(GuestAddress(0x3008)).unwrap(),
            0x1122_3344_5566_7788
        );
        dev.write_obj(0xabu8, GuestAddress(0xf000)).unwrap();
        assert_eq!(kvm.read_obj::<u8>(GuestAddress(0xf000)).unwrap(), 0xab);
        let kvm_ptr = kvm.get_host_address(GuestAddress(0)).unwrap();
        let dev_ptr = dev.get_host_address(GuestAddress(0)).unwrap();
        assert_ne!(kvm_ptr, dev_ptr, "two distinct mappings");
    }

    #[test]
    fn rejects_bad_sizes() {
        for size in [0, 1, PAGE_SIZE + 1, !(PAGE_SIZE - 1)] {
            assert!(
                matches!(
                    GuestRam::new(size),
                    Err(RamError::BadSize(_)) | Err(RamError::Truncate { .. })
                ),
                "size {size:#x}"
            );
        }
    }

    #[test]
    fn clear_zeroes_both_views_and_keeps_the_memfd() {
        let ram = GuestRam::new(8 * PAGE_SIZE).unwrap();
        let (kvm, dev) = ram.into_views();
        let pattern = [0xa5u8; 64];
        for page in 0..8 {
            kvm.write_slice(&pattern, GuestAddress(page * PAGE_SIZE + 100))
                .unwrap();
        }
        let kvm_ptr = kvm.get_host_address(GuestAddress(0)).unwrap();
        clear(&dev).unwrap();
        for view in [&kvm, &dev] {
            let mut all = vec![0xffu8; (8 * PAGE_SIZE) as usize];
            view.read_slice(&mut all, GuestAddress(0)).unwrap();
            assert!(all.iter().all(|b| *b == 0), "zeroed");
        }
        assert_eq!(kvm.get_host_address(GuestAddress(0)).unwrap(), kvm_ptr);
        kvm.write_obj(7u64, GuestAddress(0x10)).unwrap();
        assert_eq!(
            dev.read_obj::<u64>(GuestAddress(0x10)).unwrap(),
            7,
            "still aliased"
        );
        let region = kvm.iter().next().unwrap();
        let file = region.file_offset().unwrap().file();
        assert_eq!(file.metadata().unwrap().len(), 8 * PAGE_SIZE);
        assert!(file.set_len(PAGE_SIZE).is_err(), "seals kept");

        let anon = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
        let e = clear(&anon).unwrap_err().to_string();
        assert!(e.contains("0x0..0x1000"), "{e}");
    }

    #[test]
    fn memfd_is_sealed_against_resizing() {
        let ram = GuestRam::new(4 * PAGE_SIZE).unwrap();
        let region = ram.kvm_view().iter().next().unwrap().get_mmap();
        let fo = region.file_offset().unwrap();
        let file = fo.file();
        assert!(file.set_len(PAGE_SIZE).is_err(), "shrinking must fail");
        assert!(file.set_len(8 * PAGE_SIZE).is_err(), "growing must fail");
        assert_eq!(file.metadata().unwrap().len(), 4 * PAGE_SIZE);
    }
}
