//! Probe device: lets a guest test ask what the device view may access.
//!
//! A 4 KiB MMIO window at [`PROBE_BASE`] (not announced on the command
//! line; guest tests use busybox `devmem`). Registers, little-endian,
//! accessed as 4 or 8 bytes:
//!
//! | offset | access | meaning |
//! |---|---|---|
//! | 0x00 | RW u64 | GPA to probe |
//! | 0x08 | R u64 | 1 if the device view may access the page holding GPA, else 0 |
//! | 0x10 | R u64 | the 8 bytes at GPA if the device view may read them, else 0 |
//! | 0x18 | R u32 | magic `0x626f7270` ("prob") |
//!
//! Every read that touches 0x08..0x17 is one probe, counted as allowed or
//! denied separately from device accesses.

use std::sync::{Arc, PoisonError, RwLock};

use super::{DeviceError, MmioDevice};
use crate::protection::Protection;

/// Guest-physical address of the probe window.
pub const PROBE_BASE: u64 = 0xd000_f000;
/// Size of the probe window.
pub const PROBE_SIZE: u64 = 0x1000;
/// GPA register.
pub const REG_GPA: u64 = 0x00;
/// Allowed-page register.
pub const REG_ALLOWED: u64 = 0x08;
/// Data register.
pub const REG_DATA: u64 = 0x10;
/// Magic register.
pub const REG_MAGIC: u64 = 0x18;
/// Value of the magic register.
pub const MAGIC: u32 = 0x626f_7270;

/// The probe device's state: the GPA register.
#[derive(Debug, Default)]
pub struct Probe {
    gpa: u64,
}

impl Probe {
    /// Guest read of `data.len()` bytes at `offset`.
    pub fn read(&self, offset: u64, data: &mut [u8], prot: &Protection) {
        data.fill(0);
        let reg = offset & !7;
        let within = (offset - reg) as usize;
        if within + data.len() > 8 {
            return;
        }
        let value = match reg {
            REG_GPA => self.gpa,
            REG_ALLOWED => u64::from(prot.probe_page(self.gpa)),
            REG_DATA => prot.probe_read(self.gpa).unwrap_or(0),
            REG_MAGIC => u64::from(MAGIC),
            _ => 0,
        };
        data.copy_from_slice(&value.to_le_bytes()[within..within + data.len()]);
    }

    /// Guest write of `data` at `offset`; only the GPA register is writable.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= REG_GPA + 8 || offset as usize + data.len() > 8 {
            return;
        }
        let mut bytes = self.gpa.to_le_bytes();
        bytes[offset as usize..offset as usize + data.len()].copy_from_slice(data);
        self.gpa = u64::from_le_bytes(bytes);
    }
}

/// The probe on the MMIO bus, reading the device view through the
/// protection lock.
pub struct ProbeDevice {
    probe: Probe,
    prot: Arc<RwLock<Protection>>,
}

impl ProbeDevice {
    /// A probe of `prot`'s device view, GPA register 0.
    pub fn new(prot: Arc<RwLock<Protection>>) -> Self {
        ProbeDevice {
            probe: Probe::default(),
            prot,
        }
    }
}

impl MmioDevice for ProbeDevice {
    fn name(&self) -> &'static str {
        "probe"
    }

    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let prot = self.prot.read().unwrap_or_else(PoisonError::into_inner);
        self.probe.read(offset, data, &prot);
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), DeviceError> {
        self.probe.write(offset, data);
        Ok(())
    }

    fn reset(&mut self) {
        self.probe = Probe::default();
    }

    fn quiesce(&mut self) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use hypercall::GpaRange;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    fn read64(p: &Probe, off: u64, prot: &Protection) -> u64 {
        let mut b = [0u8; 8];
        p.read(off, &mut b, prot);
        u64::from_le_bytes(b)
    }

    #[test]
    fn registers_follow_the_shared_map() {
        let view = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let mut prot = Protection::new(view);
        prot.write_obj(0x1122_3344_5566_7788u64, GuestAddress(0x4010))
            .unwrap();
        let mut p = Probe::default();
        p.write(REG_GPA, &0x4010u32.to_le_bytes());
        p.write(4, &0u32.to_le_bytes());
        assert_eq!(read64(&p, REG_GPA, &prot), 0x4010);
        assert_eq!(read64(&p, REG_MAGIC, &prot) as u32, MAGIC);
        assert_eq!(
            read64(&p, REG_ALLOWED, &prot),
            1,
            "all shared before ENABLE"
        );
        assert_eq!(read64(&p, REG_DATA, &prot), 0x1122_3344_5566_7788);
        prot.enable().unwrap();
        assert_eq!(read64(&p, REG_ALLOWED, &prot), 0);
        assert_eq!(read64(&p, REG_DATA, &prot), 0);
        prot.share(GpaRange::new(0x4000, 1).unwrap()).unwrap();
        let mut hi = [0u8; 4];
        p.read(REG_DATA + 4, &mut hi, &prot);
        assert_eq!(u32::from_le_bytes(hi), 0x1122_3344);
        p.write(REG_GPA, &0x10_0000u64.to_le_bytes());
        assert_eq!(read64(&p, REG_ALLOWED, &prot), 0, "not RAM");
        let s = prot.stats();
        assert_eq!((s.probe_allowed, s.probe_denied), (3, 3));
        assert_eq!(s.allowed, 1, "only the test's own write is a device access");
        let mut straddle = [0xffu8; 8];
        p.read(REG_GPA + 4, &mut straddle, &prot);
        assert_eq!(straddle, [0; 8], "accesses may not straddle registers");
    }
}
