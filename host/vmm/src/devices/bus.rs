//! The MMIO bus: devices keyed by the guest-physical range of their
//! register window.
//!
//! An access is routed by its first byte to the one device whose window
//! holds it, with the offset in that window; windows never overlap. Each
//! device sits behind its own mutex, shared with the event loop.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::exit::locked;

use super::{DeviceError, HangLine, MmioDevice};

/// A device as the bus and the event loop share it.
pub type SharedDevice = Arc<Mutex<dyn MmioDevice>>;

/// Errors building the bus.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// The window is empty or wraps around the address space.
    #[error("device {name}: bad window {base:#x}+{size:#x}")]
    BadWindow {
        /// The device.
        name: &'static str,
        /// First address.
        base: u64,
        /// Bytes.
        size: u64,
    },
    /// The window overlaps another device's.
    #[error("device {name} at {base:#x}+{size:#x} overlaps {other} at {other_base:#x}")]
    Overlap {
        /// The device being added.
        name: &'static str,
        /// Its first address.
        base: u64,
        /// Its size.
        size: u64,
        /// The device already there.
        other: &'static str,
        /// That device's first address.
        other_base: u64,
    },
}

/// One device on the bus.
#[derive(Clone)]
pub struct BusEntry {
    /// First guest-physical address of the window.
    pub base: u64,
    /// Bytes in the window.
    pub size: u64,
    /// The device's name (as [`MmioDevice::name`] said when it was added).
    pub name: &'static str,
    /// The device.
    pub device: SharedDevice,
}

/// The devices of the machine, sorted by address.
#[derive(Clone, Default)]
pub struct MmioBus {
    entries: Vec<BusEntry>,
}

impl MmioBus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `device` with its window at `base .. base + size`.
    pub fn insert(&mut self, base: u64, size: u64, device: SharedDevice) -> Result<(), BusError> {
        let name = locked(&device).name();
        let end = base
            .checked_add(size)
            .filter(|_| size > 0)
            .ok_or(BusError::BadWindow { name, base, size })?;
        if let Some(o) = self
            .entries
            .iter()
            .find(|e| base < e.base + e.size && e.base < end)
        {
            return Err(BusError::Overlap {
                name,
                base,
                size,
                other: o.name,
                other_base: o.base,
            });
        }
        let at = self.entries.partition_point(|e| e.base < base);
        self.entries.insert(
            at,
            BusEntry {
                base,
                size,
                name,
                device,
            },
        );
        Ok(())
    }

    /// The device whose window holds `addr`, and the offset in it.
    pub fn find(&self, addr: u64) -> Option<(&BusEntry, u64)> {
        let at = self.entries.partition_point(|e| e.base <= addr);
        let e = self.entries[..at].last()?;
        let off = addr - e.base;
        (off < e.size).then_some((e, off))
    }

    /// Guest read at `addr`; `false` if no device is there.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr) {
            Some((e, off)) => {
                locked(&e.device).read(off, data);
                true
            }
            None => false,
        }
    }

    /// Guest write at `addr`; `None` if no device is there.
    pub fn write(&self, addr: u64, data: &[u8]) -> Option<Result<(), DeviceError>> {
        let (e, off) = self.find(addr)?;
        Some(locked(&e.device).write(off, data))
    }

    /// The devices, by address.
    pub fn iter(&self) -> impl Iterator<Item = &BusEntry> {
        self.entries.iter()
    }

    /// Machine reset of every device.
    pub fn reset(&self) {
        for e in &self.entries {
            locked(&e.device).reset();
        }
    }

    /// Every device stops touching guest memory (before a reboot clears it).
    pub fn quiesce(&self) {
        for e in &self.entries {
            locked(&e.device).quiesce();
        }
    }

    /// `(key, counters)` of every device that has counters.
    pub fn stats(&self) -> Vec<(&'static str, serde_json::Value)> {
        self.entries
            .iter()
            .filter_map(|e| locked(&e.device).stats())
            .collect()
    }

    /// The hang-report line of every device that has one. A device whose
    /// lock (or a lock it needs) stays taken for `wait` gets a line saying
    /// so instead: a thread is stuck in it, and the report must not wait.
    pub fn hang_lines(&self, wait: Duration) -> Vec<String> {
        let mut out = Vec::new();
        for e in &self.entries {
            let start = Instant::now();
            let line = loop {
                let got = e.device.try_lock().ok().map(|d| d.hang_line());
                match got {
                    Some(HangLine::None) => break None,
                    Some(HangLine::Line(l)) => break Some(l),
                    Some(HangLine::Busy) | None if start.elapsed() < wait => {
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    Some(HangLine::Busy) | None => {
                        break Some(format!(
                            "{} or the protection lock is held for more than {wait:?}: a \
                             thread is stuck in device emulation or a conversion",
                            e.name
                        ))
                    }
                }
            };
            out.extend(line);
        }
        out
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use serde_json::json;

    /// A device that records its accesses: registers are bytes of `regs`.
    #[derive(Default)]
    pub(crate) struct Regs {
        pub(crate) regs: Vec<u8>,
        pub(crate) resets: u32,
        pub(crate) line: Option<HangLine>,
    }

    impl MmioDevice for Regs {
        fn name(&self) -> &'static str {
            "regs"
        }
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            for (i, b) in data.iter_mut().enumerate() {
                *b = self.regs.get(offset as usize + i).copied().unwrap_or(0xee);
            }
        }
        fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), DeviceError> {
            let end = offset as usize + data.len();
            if self.regs.len() < end {
                self.regs.resize(end, 0);
            }
            self.regs[offset as usize..end].copy_from_slice(data);
            Ok(())
        }
        fn reset(&mut self) {
            self.regs.clear();
            self.resets += 1;
        }
        fn stats(&self) -> Option<(&'static str, serde_json::Value)> {
            Some(("regs", json!({"len": self.regs.len()})))
        }
        fn hang_line(&self) -> HangLine {
            self.line.clone().unwrap_or(HangLine::None)
        }
    }

    fn shared(d: Regs) -> Arc<Mutex<Regs>> {
        Arc::new(Mutex::new(d))
    }

    #[test]
    fn routes_by_range_with_the_offset() {
        let (a, b) = (shared(Regs::default()), shared(Regs::default()));
        let mut bus = MmioBus::new();
        bus.insert(0x2000, 0x1000, b.clone()).unwrap();
        bus.insert(0x1000, 0x100, a.clone()).unwrap();
        assert_eq!(
            bus.iter().map(|e| e.base).collect::<Vec<_>>(),
            [0x1000, 0x2000],
            "sorted"
        );
        assert!(bus.write(0x1004, &[1, 2]).unwrap().is_ok());
        assert!(bus.write(0x2fff, &[9]).unwrap().is_ok());
        assert_eq!(locked(&a).regs, [0, 0, 0, 0, 1, 2]);
        assert_eq!(locked(&b).regs.len(), 0x1000);
        assert_eq!(locked(&b).regs[0xfff], 9);
        let mut v = [0u8; 2];
        assert!(bus.read(0x1004, &mut v));
        assert_eq!(v, [1, 2]);
        for hole in [0, 0xfff, 0x1100, 0x1fff, 0x3000, u64::MAX] {
            assert!(!bus.read(hole, &mut v), "{hole:#x}");
            assert!(bus.write(hole, &v).is_none(), "{hole:#x}");
        }
    }

    #[test]
    fn refuses_overlaps_and_bad_windows() {
        let mut bus = MmioBus::new();
        bus.insert(0x1000, 0x1000, shared(Regs::default())).unwrap();
        for (base, size) in [(0x1800, 0x10), (0x800, 0x1000), (0x0, 0x3000)] {
            let e = bus.insert(base, size, shared(Regs::default())).unwrap_err();
            assert!(
                matches!(
                    e,
                    BusError::Overlap {
                        other_base: 0x1000,
                        ..
                    }
                ),
                "{e}"
            );
        }
        assert!(
            bus.insert(0x800, 0x800, shared(Regs::default())).is_ok(),
            "adjacent"
        );
        assert!(matches!(
            bus.insert(0x5000, 0, shared(Regs::default())),
            Err(BusError::BadWindow { .. })
        ));
        assert!(bus.insert(u64::MAX, 2, shared(Regs::default())).is_err());
    }

    #[test]
    fn reset_stats_and_hang_report_loop_over_every_device() {
        let (a, b) = (shared(Regs::default()), shared(Regs::default()));
        locked(&b).line = Some(HangLine::Line("b is fine".into()));
        let mut bus = MmioBus::new();
        bus.insert(0x1000, 0x100, a.clone()).unwrap();
        bus.insert(0x2000, 0x100, b.clone()).unwrap();
        bus.write(0x1000, &[1, 2, 3]).unwrap().unwrap();
        assert_eq!(
            bus.stats(),
            [("regs", json!({"len": 3})), ("regs", json!({"len": 0}))]
        );
        bus.reset();
        bus.quiesce();
        assert_eq!((locked(&a).resets, locked(&b).resets), (2, 2));
        assert!(locked(&a).regs.is_empty());
        let wait = Duration::from_millis(50);
        assert_eq!(bus.hang_lines(wait), ["b is fine"]);
        // A device whose lock is held, or that cannot read its state: a
        // line that says so, after the wait, not a hang.
        locked(&a).line = Some(HangLine::Busy);
        let held = b.lock().unwrap();
        let start = Instant::now();
        let lines = bus.hang_lines(wait);
        assert!(start.elapsed() >= 2 * wait);
        drop(held);
        assert_eq!(lines.len(), 2);
        assert!(lines
            .iter()
            .all(|l| l.starts_with("regs or the protection lock is held")));
    }
}
