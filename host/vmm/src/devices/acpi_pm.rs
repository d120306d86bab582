//! ACPI PM1 registers: the fixed hardware a full (not hardware-reduced)
//! FADT must name, at ports [`PM1_EVT_BLK`] and [`PM1_CNT_BLK`].
//!
//! | port | register | model |
//! |---|---|---|
//! | 0x600 | PM1_STS (16 bits) | write 1 to clear; no event source sets a bit |
//! | 0x602 | PM1_EN (16 bits) | the defined enable bits, read back as written |
//! | 0x604 | PM1_CNT (16 bits) | SCI_EN reads 1 (always in ACPI mode: the FADT has no SMI command port); SLP_TYP read back; SLP_EN, GBL_RLS and BM_RLD read 0 |
//!
//! The machine has no fixed-feature events: no power or sleep button (the
//! FADT says so), no RTC alarm, no PM timer, no firmware to share the
//! global lock with; so no status bit ever becomes set and the SCI (IRQ 9
//! in the FADT) is never raised. The DSDT declares no sleep state, so an
//! OSPM has no SLP_TYP to write with SLP_EN: the write is accepted and has
//! no effect. ACPICA enables the global lock event at init and checks that
//! GBL_EN sticks; it does.

/// PM1a event block: PM1_STS then PM1_EN.
pub const PM1_EVT_BLK: u16 = 0x600;
/// Its length in bytes (the FADT's PM1_EVT_LEN).
pub const PM1_EVT_LEN: u8 = 4;
/// PM1a control block: PM1_CNT.
pub const PM1_CNT_BLK: u16 = 0x604;
/// Its length in bytes (the FADT's PM1_CNT_LEN).
pub const PM1_CNT_LEN: u8 = 2;

/// PM1_EN bits defined by ACPI: TMR_EN, GBL_EN, PWRBTN_EN, SLPBTN_EN,
/// RTC_EN, PCIEXP_WAKE_DIS.
const PM1_EN_DEFINED: u16 = (1 << 0) | (1 << 5) | (1 << 8) | (1 << 9) | (1 << 10) | (1 << 14);
/// PM1_CNT: SCI_EN, and the SLP_TYP field kept as written.
const SCI_EN: u16 = 1 << 0;
const SLP_TYP: u16 = 0b111 << 10;

/// The PM1 registers of one boot.
#[derive(Debug, Default)]
pub struct AcpiPm {
    sts: u16,
    en: u16,
    slp_typ: u16,
}

impl AcpiPm {
    /// The register value at `off` (0: PM1_STS, 2: PM1_EN, 4: PM1_CNT).
    fn register(&self, off: u16) -> u16 {
        match off {
            0 => self.sts,
            2 => self.en,
            _ => SCI_EN | self.slp_typ,
        }
    }

    /// Reads `data.len()` bytes at `port`; false if the port is not a PM1
    /// register. Bytes past the block read 0xff, like unclaimed ports.
    pub fn read(&self, port: u16, data: &mut [u8]) -> bool {
        let Some(base) = offset(port) else {
            return false;
        };
        for (i, b) in data.iter_mut().enumerate() {
            let off = base + i as u16;
            *b = if off < 6 {
                self.register(off & !1).to_le_bytes()[usize::from(off & 1)]
            } else {
                0xff
            };
        }
        true
    }

    /// Writes `data` at `port`; false if the port is not a PM1 register.
    pub fn write(&mut self, port: u16, data: &[u8]) -> bool {
        let Some(base) = offset(port) else {
            return false;
        };
        for (i, &b) in data.iter().enumerate() {
            let off = base + i as u16;
            let shift = 8 * (off & 1);
            let bits = u16::from(b) << shift;
            let lane = 0xffu16 << shift;
            match off & !1 {
                0 => self.sts &= !bits,
                2 => self.en = (self.en & !lane) | (bits & lane & PM1_EN_DEFINED),
                4 => self.slp_typ = (self.slp_typ & !lane) | (bits & lane & SLP_TYP),
                _ => {}
            }
        }
        true
    }

    /// Back to power-on: no enable bit set, SLP_TYP 0.
    pub fn reset(&mut self) {
        *self = Self::default();
    }
}

/// Offset of `port` in the PM1 registers (event block, then control
/// block, which follow each other).
fn offset(port: u16) -> Option<u16> {
    let off = port.checked_sub(PM1_EVT_BLK)?;
    (off < u16::from(PM1_EVT_LEN + PM1_CNT_LEN)).then_some(off)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rd(pm: &AcpiPm, port: u16, n: usize) -> u32 {
        let mut b = [0u8; 4];
        assert!(pm.read(port, &mut b[..n]));
        u32::from_le_bytes(b)
    }

    #[test]
    fn registers_as_acpica_uses_them() {
        assert_eq!(PM1_CNT_BLK, PM1_EVT_BLK + u16::from(PM1_EVT_LEN));
        let mut pm = AcpiPm::default();
        assert_eq!(rd(&pm, PM1_EVT_BLK, 2), 0, "no status bit");
        assert_eq!(rd(&pm, PM1_CNT_BLK, 2), 1, "SCI_EN: ACPI mode");
        // ACPICA clears every status bit, then enables the global lock
        // event and reads GBL_EN back.
        assert!(pm.write(PM1_EVT_BLK, &[0xff, 0xff]));
        assert!(pm.write(PM1_EVT_BLK + 2, &0x0020u16.to_le_bytes()));
        assert_eq!(rd(&pm, PM1_EVT_BLK + 2, 2), 0x20);
        // Undefined enable bits do not stick; a byte write touches its byte.
        assert!(pm.write(PM1_EVT_BLK + 3, &[0xff]));
        assert_eq!(rd(&pm, PM1_EVT_BLK + 2, 2), 0x4720);
        // One 32-bit read of the event block: PM1_STS low, PM1_EN high.
        assert_eq!(rd(&pm, PM1_EVT_BLK, 4), 0x4720_0000);
        // SLP_TYP reads back, SLP_EN and SCI_EN writes do not.
        assert!(pm.write(PM1_CNT_BLK, &((5u16 << 10) | (1 << 13)).to_le_bytes()));
        assert_eq!(rd(&pm, PM1_CNT_BLK, 2), (5 << 10) | 1);
        pm.reset();
        assert_eq!(rd(&pm, PM1_EVT_BLK, 4), 0);
        assert_eq!(rd(&pm, PM1_CNT_BLK, 2), 1);
        // Outside the block: not ours.
        let mut b = [0u8; 1];
        assert!(!pm.read(PM1_EVT_BLK - 1, &mut b));
        assert!(!pm.write(PM1_CNT_BLK + 2, &[0]));
        // A 4-byte read at the control block runs past it.
        assert_eq!(rd(&pm, PM1_CNT_BLK, 4), 0xffff_0001);
    }
}
