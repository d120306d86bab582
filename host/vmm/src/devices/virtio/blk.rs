//! virtio-blk backed by a host file: read, write, flush and get-id.
//!
//! Requests follow virtio 1.x 5.2.6: a 16-byte readable header, data
//! buffers, and a one-byte writable status last. Every guest-memory access
//! goes through the device view; an access that is refused (a private page)
//! fails the request with `VIRTIO_BLK_S_IOERR` if the status byte can be
//! written, and otherwise the chain is returned with length 0.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde::Serialize;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_ID_BYTES,
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_INDIRECT_DESC;
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, Bytes, GuestMemory};

use super::VirtioDevice;

/// Sector size of the virtio-blk protocol.
pub const SECTOR_SIZE: u64 = 512;
/// Queue size offered.
const QUEUE_SIZE: u16 = 256;
/// Size of the request header (type, reserved, sector).
const HEADER_SIZE: u32 = 16;
/// Largest single data buffer accepted (bounds the bounce allocation).
const MAX_BUFFER: u32 = 1 << 20;
/// Most data buffers in one request (the chain also holds the header and
/// the status byte). With `MAX_BUFFER` it bounds a
/// request to 254 MiB, so no byte count can overflow a u32.
const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
/// Serial number returned by GET_ID.
const DISK_ID: &[u8] = b"protmem-vmm-disk";

/// Errors opening the disk.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// Opening the backing file failed.
    #[error("opening disk image {path} read-write failed: {err}")]
    Open {
        /// Path given on the command line.
        path: PathBuf,
        /// The OS error.
        err: io::Error,
    },
}

/// Why one request failed.
#[derive(Debug, PartialEq, Eq)]
enum RequestError {
    /// I/O error: bad chain, refused memory access, out of range, host I/O.
    Io,
    /// Unknown request type.
    Unsupported,
}

/// Request counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct BlockStats {
    /// Requests completed with VIRTIO_BLK_S_OK.
    pub ok: u64,
    /// Requests completed with VIRTIO_BLK_S_IOERR.
    pub ioerr: u64,
    /// Requests completed with VIRTIO_BLK_S_UNSUPP.
    pub unsupp: u64,
    /// Chains returned with length 0 (no writable status byte).
    pub dropped: u64,
}

/// A virtio-blk device over a file.
pub struct Block {
    file: File,
    capacity: u64,
    stats: BlockStats,
}

impl Block {
    /// Opens `path` read-write as the disk.
    pub fn open(path: &Path) -> Result<Self, BlockError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|err| BlockError::Open {
                path: path.to_path_buf(),
                err,
            })?;
        let len = file.metadata().map_err(|err| BlockError::Open {
            path: path.to_path_buf(),
            err,
        })?;
        Ok(Self::from_file(file, len.len()))
    }

    /// A disk over an open file of `len` bytes (whole sectors are used).
    pub fn from_file(file: File, len: u64) -> Self {
        Block {
            file,
            capacity: len / SECTOR_SIZE,
            stats: BlockStats::default(),
        }
    }

    /// Request counters.
    pub fn stats(&self) -> BlockStats {
        self.stats
    }

    fn request<M: GuestMemory>(
        &mut self,
        header: &Descriptor,
        data: &[Descriptor],
        mem: &M,
    ) -> Result<u32, RequestError> {
        if header.is_write_only() || header.len() < HEADER_SIZE {
            return Err(RequestError::Io);
        }
        let kind: u32 = mem.read_obj(header.addr()).map_err(|_| RequestError::Io)?;
        let sector_at = header.addr().checked_add(8).ok_or(RequestError::Io)?;
        let sector: u64 = mem.read_obj(sector_at).map_err(|_| RequestError::Io)?;
        match kind {
            VIRTIO_BLK_T_IN => self.transfer(sector, data, mem, true),
            VIRTIO_BLK_T_OUT => self.transfer(sector, data, mem, false),
            VIRTIO_BLK_T_FLUSH => self
                .file
                .sync_data()
                .map(|_| 0)
                .map_err(|_| RequestError::Io),
            VIRTIO_BLK_T_GET_ID => {
                let d = data
                    .first()
                    .filter(|d| d.is_write_only())
                    .ok_or(RequestError::Io)?;
                let mut id = [0u8; VIRTIO_BLK_ID_BYTES as usize];
                id[..DISK_ID.len()].copy_from_slice(DISK_ID);
                let n = d.len().min(VIRTIO_BLK_ID_BYTES) as usize;
                mem.write_slice(&id[..n], d.addr())
                    .map_err(|_| RequestError::Io)?;
                Ok(n as u32)
            }
            _ => Err(RequestError::Unsupported),
        }
    }

    /// Moves the data buffers between the disk and guest memory; returns the
    /// bytes written to guest memory.
    fn transfer<M: GuestMemory>(
        &mut self,
        sector: u64,
        data: &[Descriptor],
        mem: &M,
        read: bool,
    ) -> Result<u32, RequestError> {
        if data.len() > SEG_MAX as usize {
            return Err(RequestError::Io);
        }
        let total: u64 = data.iter().map(|d| u64::from(d.len())).sum();
        let start = sector.checked_mul(SECTOR_SIZE).ok_or(RequestError::Io)?;
        let end = start.checked_add(total).ok_or(RequestError::Io)?;
        if end > self.capacity * SECTOR_SIZE {
            return Err(RequestError::Io);
        }
        let mut offset = start;
        let mut to_guest = 0u32;
        for d in data {
            if d.is_write_only() != read || d.len() > MAX_BUFFER {
                return Err(RequestError::Io);
            }
            let mut buf = vec![0u8; d.len() as usize];
            if read {
                self.file
                    .read_exact_at(&mut buf, offset)
                    .map_err(|_| RequestError::Io)?;
                mem.write_slice(&buf, d.addr())
                    .map_err(|_| RequestError::Io)?;
                to_guest += d.len();
            } else {
                mem.read_slice(&mut buf, d.addr())
                    .map_err(|_| RequestError::Io)?;
                self.file
                    .write_all_at(&buf, offset)
                    .map_err(|_| RequestError::Io)?;
            }
            offset += u64::from(d.len());
        }
        Ok(to_guest)
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn name(&self) -> &'static str {
        "blk"
    }

    fn stats(&self) -> serde_json::Value {
        serde_json::json!(self.stats)
    }

    fn device_features(&self) -> u64 {
        // SIZE_MAX and SEG_MAX: the limits the device enforces, so a driver
        // never builds a request it would refuse. INDIRECT_DESC with them:
        // a request of SEG_MAX + 2 descriptors must fit whatever ring the
        // driver ends up with. Linux reads seg_max before it sets up the
        // queue, and when a protected guest cannot share the ring's pages
        // it retries with a smaller ring (128 entries where 256 failed);
        // without indirect tables a request longer than the ring then gets
        // -ENOSPC forever, and the queue stays stopped with nothing in
        // flight to restart it (share-every-7th-fails hung so).
        (1 << VIRTIO_BLK_F_FLUSH)
            | (1 << VIRTIO_BLK_F_SIZE_MAX)
            | (1 << VIRTIO_BLK_F_SEG_MAX)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC)
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn config(&self) -> Vec<u8> {
        // struct virtio_blk_config: le64 capacity (sectors), le32 size_max,
        // le32 seg_max.
        let mut c = self.capacity.to_le_bytes().to_vec();
        c.extend(MAX_BUFFER.to_le_bytes());
        c.extend(SEG_MAX.to_le_bytes());
        c
    }

    fn handle_chain<M: GuestMemory>(&mut self, _q: usize, descs: &[Descriptor], mem: &M) -> u32 {
        let status_desc = match descs.last() {
            Some(d) if descs.len() >= 2 && d.is_write_only() && d.len() >= 1 => *d,
            _ => {
                self.stats.dropped += 1;
                return 0;
            }
        };
        let result = self.request(&descs[0], &descs[1..descs.len() - 1], mem);
        let (status, written) = match result {
            Ok(n) => (VIRTIO_BLK_S_OK, n),
            Err(RequestError::Io) => (VIRTIO_BLK_S_IOERR, 0),
            Err(RequestError::Unsupported) => (VIRTIO_BLK_S_UNSUPP, 0),
        };
        if mem.write_obj(status as u8, status_desc.addr()).is_err() {
            self.stats.dropped += 1;
            return 0;
        }
        match status {
            VIRTIO_BLK_S_OK => self.stats.ok += 1,
            VIRTIO_BLK_S_IOERR => self.stats.ioerr += 1,
            _ => self.stats.unsupp += 1,
        }
        written + 1
    }
}

/// The header of a request, as a driver lays it out (tests, fuzzing).
pub fn header_bytes(kind: u32, sector: u64) -> [u8; HEADER_SIZE as usize] {
    let mut h = [0u8; HEADER_SIZE as usize];
    h[..4].copy_from_slice(&kind.to_le_bytes());
    h[8..].copy_from_slice(&sector.to_le_bytes());
    h
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::serial::tests::CountingIrq;
    use crate::devices::virtio::tests::{activate, kick, Rings};
    use crate::devices::virtio::MmioTransport;
    use crate::protection::{Access, Protection};
    use crate::ram::GuestRam;
    use hypercall::GpaRange;
    use proptest::prelude::*;
    use std::io::{Read, Seek, SeekFrom, Write};
    use std::sync::{Arc, RwLock};
    use vm_memory::GuestAddress;

    type GuestMemoryMmap = vm_memory::GuestMemoryMmap<()>;

    fn ga(a: u64) -> GuestAddress {
        GuestAddress(a)
    }

    const DISK_SECTORS: u64 = 64;

    fn disk() -> (File, Block) {
        let mut f = tempfile();
        let pattern: Vec<u8> = (0..DISK_SECTORS * SECTOR_SIZE)
            .map(|i| (i % 251) as u8)
            .collect();
        f.write_all(&pattern).unwrap();
        let blk = Block::from_file(f.try_clone().unwrap(), pattern.len() as u64);
        (f, blk)
    }

    /// A temporary file, unlinked at once so nothing is left behind.
    fn tempfile() -> File {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let path = std::env::temp_dir().join(format!("protmem-blk-{}-{n}", std::process::id()));
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .unwrap();
        std::fs::remove_file(&path).unwrap();
        f
    }

    /// Guest memory as the guest sees it and as the device sees it.
    fn ram() -> (GuestMemoryMmap, Protection) {
        let (kvm, dev) = GuestRam::new(0x40_0000).unwrap().into_views();
        (kvm, Protection::new(dev))
    }

    #[test]
    fn read_write_flush_get_id_over_plain_memory() {
        let m = GuestMemoryMmap::from_ranges(&[(ga(0), 0x10_0000)]).unwrap();
        let (mut f, blk) = disk();
        let mut t = MmioTransport::new(blk, CountingIrq::default(), m.clone());
        let mut rings = Rings::new(0x1000, 16);
        activate(&mut t, &rings);
        let mut cfg = [0u8; 8];
        t.read(0x100, &mut cfg);
        assert_eq!(u64::from_le_bytes(cfg), DISK_SECTORS);

        m.write_slice(&header_bytes(VIRTIO_BLK_T_IN, 2), ga(0x8000))
            .unwrap();
        rings.add_chain(
            &m,
            &[(0x8000, 16, false), (0x9000, 1024, true), (0x8100, 1, true)],
        );
        m.write_slice(&[0xaa; 512], ga(0xa000)).unwrap();
        m.write_slice(&header_bytes(VIRTIO_BLK_T_OUT, 10), ga(0x8200))
            .unwrap();
        rings.add_chain(
            &m,
            &[(0x8200, 16, false), (0xa000, 512, false), (0x8300, 1, true)],
        );
        m.write_slice(&header_bytes(VIRTIO_BLK_T_FLUSH, 0), ga(0x8400))
            .unwrap();
        rings.add_chain(&m, &[(0x8400, 16, false), (0x8500, 1, true)]);
        m.write_slice(&header_bytes(VIRTIO_BLK_T_GET_ID, 0), ga(0x8600))
            .unwrap();
        rings.add_chain(
            &m,
            &[(0x8600, 16, false), (0xb000, 20, true), (0x8700, 1, true)],
        );
        m.write_slice(&header_bytes(0x99, 0), ga(0x8800)).unwrap();
        rings.add_chain(&m, &[(0x8800, 16, false), (0x8900, 1, true)]);
        kick(&mut t);

        assert_eq!(rings.used_idx(&m), 5);
        let mut got = vec![0u8; 1024];
        m.read_slice(&mut got, ga(0x9000)).unwrap();
        let want: Vec<u8> = (1024..2048u64).map(|i| (i % 251) as u8).collect();
        assert_eq!(got, want, "sectors 2-3");
        assert_eq!(rings.used_elem(&m, 0).1, 1025);
        let status = |a| m.read_obj::<u8>(ga(a)).unwrap() as u32;
        assert_eq!(status(0x8100), VIRTIO_BLK_S_OK);
        assert_eq!(status(0x8300), VIRTIO_BLK_S_OK);
        assert_eq!(status(0x8500), VIRTIO_BLK_S_OK);
        assert_eq!(status(0x8700), VIRTIO_BLK_S_OK);
        assert_eq!(status(0x8900), VIRTIO_BLK_S_UNSUPP);
        let mut id = [0u8; 20];
        m.read_slice(&mut id, ga(0xb000)).unwrap();
        assert_eq!(&id[..DISK_ID.len()], DISK_ID);
        let mut sector = [0u8; 512];
        f.seek(SeekFrom::Start(10 * SECTOR_SIZE)).unwrap();
        f.read_exact(&mut sector).unwrap();
        assert_eq!(sector, [0xaa; 512], "write reached the file");
        assert_eq!(t.device().stats().ok, 4);
        assert_eq!(t.device().stats().unsupp, 1);
    }

    #[test]
    fn out_of_range_and_wrong_direction_are_ioerr() {
        let m = GuestMemoryMmap::from_ranges(&[(ga(0), 0x10_0000)]).unwrap();
        let (_f, blk) = disk();
        let mut t = MmioTransport::new(blk, CountingIrq::default(), m.clone());
        let mut rings = Rings::new(0x1000, 16);
        activate(&mut t, &rings);
        m.write_slice(&header_bytes(VIRTIO_BLK_T_IN, DISK_SECTORS - 1), ga(0x8000))
            .unwrap();
        rings.add_chain(
            &m,
            &[(0x8000, 16, false), (0x9000, 1024, true), (0x8100, 1, true)],
        );
        m.write_slice(&header_bytes(VIRTIO_BLK_T_IN, 0), ga(0x8200))
            .unwrap();
        rings.add_chain(
            &m,
            &[(0x8200, 16, false), (0x9000, 512, false), (0x8300, 1, true)],
        );
        m.write_slice(&header_bytes(VIRTIO_BLK_T_IN, u64::MAX), ga(0x8400))
            .unwrap();
        rings.add_chain(
            &m,
            &[(0x8400, 16, false), (0x9000, 512, true), (0x8500, 1, true)],
        );
        rings.add_chain(&m, &[(0x8600, 1, true)]);
        kick(&mut t);
        assert_eq!(rings.used_idx(&m), 4);
        for a in [0x8100, 0x8300, 0x8500] {
            assert_eq!(
                m.read_obj::<u8>(ga(a)).unwrap() as u32,
                VIRTIO_BLK_S_IOERR,
                "{a:#x}"
            );
        }
        assert_eq!(rings.used_elem(&m, 3).1, 0, "no header: dropped");
        assert_eq!(t.device().stats().ioerr, 3);
        assert_eq!(t.device().stats().dropped, 1);
    }

    #[test]
    fn limits_are_advertised_and_indirect_chains_served() {
        let m = GuestMemoryMmap::from_ranges(&[(ga(0), 0x10_0000)]).unwrap();
        let (_f, blk) = disk();
        let f = blk.device_features();
        for bit in [
            VIRTIO_BLK_F_SIZE_MAX,
            VIRTIO_BLK_F_SEG_MAX,
            VIRTIO_RING_F_INDIRECT_DESC,
        ] {
            assert_ne!(f & (1 << bit), 0, "feature bit {bit}");
        }
        let mut t = MmioTransport::new(blk, CountingIrq::default(), m.clone());
        let mut rings = Rings::new(0x1000, 16);
        activate(&mut t, &rings);
        let mut cfg = [0u8; 4];
        t.read(0x100 + 8, &mut cfg);
        assert_eq!(u32::from_le_bytes(cfg), MAX_BUFFER, "size_max");
        t.read(0x100 + 12, &mut cfg);
        assert_eq!(u32::from_le_bytes(cfg), SEG_MAX, "seg_max");

        // One ring slot, an indirect table of header, 3 data buffers and
        // the status byte.
        use virtio_bindings::virtio_ring::{
            VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
        };
        m.write_slice(&header_bytes(VIRTIO_BLK_T_IN, 1), ga(0x8000))
            .unwrap();
        let (next, write) = (VRING_DESC_F_NEXT as u16, VRING_DESC_F_WRITE as u16);
        let table = [
            Descriptor::new(0x8000, 16, next, 1),
            Descriptor::new(0x9000, 512, next | write, 2),
            Descriptor::new(0xa000, 512, next | write, 3),
            Descriptor::new(0xb000, 512, next | write, 4),
            Descriptor::new(0x8100, 1, write, 0),
        ];
        for (i, d) in table.iter().enumerate() {
            m.write_obj(*d, ga(0xc000 + 16 * i as u64)).unwrap();
        }
        let head = rings.add_chain(&m, &[(0xc000, 16 * table.len() as u32, false)]);
        let d = Descriptor::new(
            0xc000,
            16 * table.len() as u32,
            VRING_DESC_F_INDIRECT as u16,
            0,
        );
        m.write_obj(d, ga(rings.desc + 16 * u64::from(head)))
            .unwrap();
        kick(&mut t);
        assert_eq!(rings.used_idx(&m), 1);
        assert_eq!(rings.used_elem(&m, 0).1, 3 * 512 + 1);
        assert_eq!(
            m.read_obj::<u8>(ga(0x8100)).unwrap() as u32,
            VIRTIO_BLK_S_OK
        );
        let mut got = vec![0u8; 512];
        m.read_slice(&mut got, ga(0xa000)).unwrap();
        let want: Vec<u8> = (2 * 512..3 * 512u64).map(|i| (i % 251) as u8).collect();
        assert_eq!(got, want, "sector 2 in the second data buffer");
    }

    /// A virtio-blk on a protected guest whose rings (0x1000-0x3fff) and
    /// page 0x8000 are shared, activated; returns the disk file to keep it.
    fn protected_blk() -> (
        GuestMemoryMmap,
        Dev,
        File,
        MmioTransport<Block, CountingIrq, Dev>,
        Rings,
    ) {
        let (guest, mut dev) = ram();
        dev.enable().unwrap();
        dev.share(GpaRange::new(0x1000, 3).unwrap()).unwrap();
        dev.share(GpaRange::new(0x8000, 1).unwrap()).unwrap();
        let dev = Arc::new(RwLock::new(dev));
        let (f, blk) = disk();
        let mut t = MmioTransport::new(blk, CountingIrq::default(), dev.clone());
        let rings = Rings::new(0x1000, 16);
        activate(&mut t, &rings);
        (guest, dev, f, t, rings)
    }

    /// The device view behind the protection lock, as the VMM shares it.
    type Dev = Arc<RwLock<Protection>>;

    #[test]
    fn private_buffer_is_denied_counted_and_ioerr() {
        // Rings (0x1000-0x3fff), header and status (0x8000) shared; the
        // rest of RAM, e.g. the data buffer at 0x9000, is private.
        let (guest, dev, _f, mut t, mut rings) = protected_blk();
        guest
            .write_slice(&header_bytes(VIRTIO_BLK_T_IN, 0), ga(0x8000))
            .unwrap();
        guest.write_slice(&[0x5a; 512], ga(0x9000)).unwrap();
        rings.add_chain(
            &guest,
            &[(0x8000, 16, false), (0x9000, 512, true), (0x8100, 1, true)],
        );
        let denied_before = dev.read().unwrap().stats().denied;
        kick(&mut t);
        assert_eq!(rings.used_idx(&guest), 1);
        assert_eq!(rings.used_elem(&guest, 0).1, 1, "status only");
        assert_eq!(
            guest.read_obj::<u8>(ga(0x8100)).unwrap() as u32,
            VIRTIO_BLK_S_IOERR
        );
        assert_eq!(dev.read().unwrap().stats().denied, denied_before + 1);
        let mut buf = [0u8; 512];
        guest.read_slice(&mut buf, ga(0x9000)).unwrap();
        assert_eq!(buf, [0x5a; 512], "private page untouched");
        assert_eq!(t.device().stats().ioerr, 1);
    }

    #[test]
    fn private_status_returns_len_zero_and_private_rings_skip_the_queue() {
        // Rings (0x1000-0x3fff), header and status (0x8000) shared; the
        // rest of RAM, e.g. the data buffer at 0x9000, is private.
        let (guest, dev, _f, mut t, mut rings) = protected_blk();
        guest
            .write_slice(&header_bytes(VIRTIO_BLK_T_FLUSH, 0), ga(0x8000))
            .unwrap();
        rings.add_chain(&guest, &[(0x8000, 16, false), (0xc000, 1, true)]);
        kick(&mut t);
        assert_eq!(rings.used_idx(&guest), 1);
        assert_eq!(rings.used_elem(&guest, 0).1, 0);
        assert_eq!(t.device().stats().dropped, 1);

        let ring = GpaRange::new(0x2000, 1).unwrap(); // the avail ring
        dev.write().unwrap().unshare(ring).unwrap();
        rings.add_chain(&guest, &[(0x8000, 16, false), (0x8100, 1, true)]);
        kick(&mut t);
        assert_eq!(t.stats().ring_denials, 1);
        assert_eq!(rings.used_idx(&guest), 1, "queue not processed");
        dev.write().unwrap().share(ring).unwrap();
        kick(&mut t);
        assert_eq!(rings.used_idx(&guest), 2, "processed once shared again");
    }

    /// The UNSHARE-in-flight protocol (module docs of `crate::iothread`):
    /// a request served on another thread while the guest UNSHAREs its
    /// buffer never writes a page after the UNSHARE returned. Checked
    /// through the KVM view, which still shows the memfd: the unshared half
    /// of the buffer as it was when UNSHARE returned must be what it is at
    /// the end.
    #[test]
    fn no_device_write_lands_after_unshare_returned() {
        const BUF: u64 = 0x10_000;
        const PAGES: u64 = 8;
        let (guest, dev, _f, mut t, mut rings) = protected_blk();
        let mut outcomes = [0u32; 2];
        for i in 0..64u64 {
            let buf = GpaRange::new(BUF, PAGES).unwrap();
            dev.write().unwrap().share(buf).unwrap();
            guest
                .write_slice(&[0u8; (PAGES * 0x1000) as usize], ga(BUF))
                .unwrap();
            guest
                .write_slice(&header_bytes(VIRTIO_BLK_T_IN, 0), ga(0x8000))
                .unwrap();
            let mut chain = vec![(0x8000, 16, false)];
            chain.extend((0..PAGES).map(|p| (BUF + p * 0x1000, 0x1000, true)));
            chain.push((0x8100, 1, true));
            rings.add_chain(&guest, &chain);
            let at_unshare = std::thread::scope(|s| {
                let io = s.spawn(|| t.queue_notify(0).unwrap());
                for _ in 0..(i % 8) * 50 {
                    std::hint::spin_loop();
                }
                let tail = GpaRange::new(BUF + 0x1000 * (PAGES / 2), PAGES / 2).unwrap();
                dev.write().unwrap().unshare(tail).unwrap();
                let mut at_unshare = vec![0u8; (tail.len()) as usize];
                guest.read_slice(&mut at_unshare, ga(tail.gpa())).unwrap();
                io.join().unwrap();
                at_unshare
            });
            let mut now = vec![0u8; at_unshare.len()];
            guest
                .read_slice(&mut now, ga(BUF + 0x1000 * (PAGES / 2)))
                .unwrap();
            assert!(
                now == at_unshare,
                "iteration {i}: a device write landed in an unshared page after UNSHARE returned"
            );
            let status = guest.read_obj::<u8>(ga(0x8100)).unwrap() as u32;
            outcomes[usize::from(status == VIRTIO_BLK_S_OK)] += 1;
            assert!(status == VIRTIO_BLK_S_OK || status == VIRTIO_BLK_S_IOERR);
            dev.write().unwrap().unshare(buf).unwrap();
        }
        assert_eq!(outcomes.iter().sum::<u32>(), 64, "every request completed");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]
        /// Arbitrary descriptor tables and available rings never panic the
        /// device, and it only ever touches shared pages.
        #[test]
        fn fuzz_descriptor_parsing(
            descs in proptest::collection::vec(
                (0u64..0x50_0000, any::<u32>(), any::<u16>(), 0u16..20), 1..16),
            heads in proptest::collection::vec(0u16..20, 1..8),
            headers in proptest::collection::vec((0u32..10, 0u64..80), 4),
            shared in proptest::collection::vec(0u64..0x400, 0..64),
            enable in any::<bool>(),
        ) {
            let (guest, mut dev) = ram();
            for (i, (kind, sector)) in headers.iter().enumerate() {
                guest.write_slice(&header_bytes(*kind, *sector), ga(0x8000 + 0x100 * i as u64)).unwrap();
            }
            let (_f, blk) = disk();
            let rings = Rings::new(0x1000, 16);
            for (i, (addr, len, flags, next)) in descs.iter().enumerate() {
                let d = Descriptor::new(*addr, *len % 0x3000, *flags, *next);
                guest.write_obj(d, ga(0x1000 + 16 * i as u64)).unwrap();
            }
            for (i, h) in heads.iter().enumerate() {
                guest.write_obj(*h, ga(0x2004 + 2 * i as u64)).unwrap();
            }
            guest.write_obj(heads.len() as u16, ga(0x2002)).unwrap();
            if enable {
                dev.enable().unwrap();
                dev.share(GpaRange::new(0x1000, 3).unwrap()).unwrap();
                for p in &shared {
                    dev.share(GpaRange::from_pfn(*p, 1).unwrap()).unwrap();
                }
            }
            let private = |dev: &Protection| -> Vec<u64> {
                (0..0x400).filter(|p| dev.classify(p * 0x1000, 1) != Access::Allowed).collect()
            };
            let snapshot = |pages: &[u64]| -> Vec<u8> {
                let mut out = vec![0u8; pages.len() * 0x1000];
                for (i, p) in pages.iter().enumerate() {
                    guest.read_slice(&mut out[i * 0x1000..(i + 1) * 0x1000], ga(p * 0x1000)).unwrap();
                }
                out
            };
            let pages = private(&dev);
            let before = snapshot(&pages);
            let mut t = MmioTransport::new(blk, CountingIrq::default(), &dev);
            activate(&mut t, &rings);
            kick(&mut t);
            let used = rings.used_idx(&guest);
            prop_assert!(used as usize <= heads.len());
            let s = t.device().stats();
            prop_assert_eq!(s.ok + s.ioerr + s.unsupp + s.dropped, t.stats().chains);
            prop_assert!(snapshot(&pages) == before, "a private page changed");
        }
    }
}
