//! virtio-rng: fills device-writable buffers from a host entropy source.
//!
//! The source is any `Read` (the VMM opens `/dev/urandom`), so tests can
//! check exactly which bytes reach guest memory.

use std::fs::File;
use std::io::{self, Read};

use serde::Serialize;
use virtio_bindings::virtio_ids::VIRTIO_ID_RNG;
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestMemory};

use super::VirtioDevice;

/// Queue size offered.
const QUEUE_SIZE: u16 = 64;
/// Most bytes served per descriptor.
const MAX_CHUNK: u32 = 64 * 1024;

/// Errors opening the entropy source.
#[derive(Debug, thiserror::Error)]
pub enum RngError {
    /// Opening the entropy source failed.
    #[error("opening entropy source {path} failed: {err}")]
    Open {
        /// The source's path.
        path: &'static str,
        /// The OS error.
        err: io::Error,
    },
}

/// Request counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct RngStats {
    /// Bytes of entropy written to the guest.
    pub bytes: u64,
    /// Chains cut short by a refused access or a source error.
    pub failed: u64,
}

/// A virtio-rng device over entropy source `R`.
pub struct Rng<R: Read> {
    source: R,
    stats: RngStats,
}

/// Entropy source type of the VMM's rng device.
pub type EntropySource = Box<dyn Read + Send>;

/// Host entropy for the guest.
pub const URANDOM: &str = "/dev/urandom";

impl Rng<File> {
    /// A device reading `/dev/urandom`.
    pub fn urandom() -> Result<Self, RngError> {
        let f = File::open(URANDOM).map_err(|err| RngError::Open { path: URANDOM, err })?;
        Ok(Rng::new(f))
    }
}

impl<R: Read> Rng<R> {
    /// A device reading `source`.
    pub fn new(source: R) -> Self {
        Rng {
            source,
            stats: RngStats::default(),
        }
    }

    /// Counters.
    pub fn stats(&self) -> RngStats {
        self.stats
    }
}

impl<R: Read + Send> VirtioDevice for Rng<R> {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_RNG
    }

    fn name(&self) -> &'static str {
        "rng"
    }

    fn stats(&self) -> serde_json::Value {
        serde_json::json!(self.stats)
    }

    fn device_features(&self) -> u64 {
        0
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn config(&self) -> Vec<u8> {
        Vec::new()
    }

    fn handle_chain<M: GuestMemory>(&mut self, _q: usize, descs: &[Descriptor], mem: &M) -> u32 {
        let mut written = 0u32;
        for d in descs.iter().filter(|d| d.is_write_only()) {
            let mut buf = vec![0u8; d.len().min(MAX_CHUNK) as usize];
            let ok =
                self.source.read_exact(&mut buf).is_ok() && mem.write_slice(&buf, d.addr()).is_ok();
            if !ok {
                self.stats.failed += 1;
                break;
            }
            written += buf.len() as u32;
            self.stats.bytes += buf.len() as u64;
        }
        written
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::serial::tests::CountingIrq;
    use crate::devices::virtio::tests::{activate, kick, Rings};
    use crate::devices::virtio::MmioTransport;
    use crate::protection::Protection;
    use crate::ram::GuestRam;
    use hypercall::GpaRange;
    use std::io::Cursor;
    use vm_memory::GuestAddress;

    fn counting_source() -> Cursor<Vec<u8>> {
        Cursor::new((0..=255u8).cycle().take(1 << 16).collect())
    }

    #[test]
    fn fills_writable_buffers_in_order() {
        let m =
            vm_memory::GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let mut t = MmioTransport::new(
            Rng::new(counting_source()),
            CountingIrq::default(),
            m.clone(),
        );
        let mut rings = Rings::new(0x1000, 16);
        activate(&mut t, &rings);
        rings.add_chain(&m, &[(0x8000, 4, true), (0x9000, 3, true)]);
        kick(&mut t);
        assert_eq!(rings.used_elem(&m, 0).1, 7);
        assert_eq!(
            m.read_obj::<u32>(GuestAddress(0x8000)).unwrap(),
            0x0302_0100
        );
        let mut tail = [0u8; 3];
        m.read_slice(&mut tail, GuestAddress(0x9000)).unwrap();
        assert_eq!(tail, [4, 5, 6]);
        assert_eq!(t.device().stats().bytes, 7);
    }

    #[test]
    fn private_buffer_gets_nothing() {
        let (guest, dev) = GuestRam::new(0x10_0000).unwrap().into_views();
        let mut dev = Protection::new(dev);
        dev.enable().unwrap();
        dev.share(GpaRange::new(0x1000, 3).unwrap()).unwrap();
        dev.share(GpaRange::new(0x8000, 1).unwrap()).unwrap();
        let mut t = MmioTransport::new(Rng::new(counting_source()), CountingIrq::default(), &dev);
        let mut rings = Rings::new(0x1000, 16);
        activate(&mut t, &rings);
        rings.add_chain(&guest, &[(0x9000, 16, true)]);
        rings.add_chain(&guest, &[(0x8000, 8, true), (0x9000, 8, true)]);
        let before = dev.stats().denied;
        kick(&mut t);
        assert_eq!(rings.used_elem(&guest, 0).1, 0);
        assert_eq!(
            rings.used_elem(&guest, 1).1,
            8,
            "stops at the private buffer"
        );
        assert_eq!(guest.read_obj::<u64>(GuestAddress(0x9000)).unwrap(), 0);
        assert_eq!(dev.stats().denied, before + 2);
        assert_eq!(t.device().stats().failed, 2);
    }
}
