//! Intel MultiProcessor Specification 1.4 table: tells a Linux guest without
//! ACPI about its CPUs, the I/O APIC and how ISA IRQs reach it.
//!
//! Written at the EBDA (0x9fc00), where Linux's `smp_scan_config` looks:
//! the floating pointer, then the configuration table with one processor
//! entry per vCPU, an ISA bus, the I/O APIC, IRQ 0-23 routed to I/O APIC
//! pins 0-23 (as KVM's default routing does), ExtINT on LINT0 and NMI on
//! LINT1.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::boot::EBDA_START;

/// Where the table goes.
pub const MPTABLE_START: u64 = EBDA_START;
/// Most vCPUs the table (and the 1 KiB EBDA) can describe.
pub const MAX_CPUS: u8 = 32;
/// I/O APIC pins, routed 1:1 from ISA IRQs.
const IOAPIC_PINS: u8 = 24;
/// Address of the I/O APIC (KVM's).
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
/// Address of every local APIC.
pub const LAPIC_ADDR: u32 = 0xfee0_0000;
const APIC_VERSION: u8 = 0x14;
/// Entry types.
const MP_PROCESSOR: u8 = 0;
const MP_BUS: u8 = 1;
const MP_IOAPIC: u8 = 2;
const MP_INTSRC: u8 = 3;
const MP_LINTSRC: u8 = 4;
/// Interrupt types.
const MP_INT: u8 = 0;
const MP_NMI: u8 = 1;
const MP_EXTINT: u8 = 3;
/// Processor flags.
const CPU_ENABLED: u8 = 1;
const CPU_BOOTPROCESSOR: u8 = 2;

/// Errors writing the MP table.
#[derive(Debug, thiserror::Error)]
pub enum MptableError {
    /// Too many or too few vCPUs.
    #[error("an MP table describes 1..={MAX_CPUS} vCPUs, not {0}")]
    Cpus(u8),
    /// Writing to guest memory failed.
    #[error("writing the {len}-byte MP table at GPA {MPTABLE_START:#x} failed")]
    Write {
        /// Table size.
        len: usize,
    },
}

/// The I/O APIC's ID with `cpus` vCPUs: the first after their APIC IDs.
pub const fn ioapic_id(cpus: u8) -> u8 {
    cpus
}

fn checksum_fix(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |a, b| a.wrapping_add(*b))
        .wrapping_neg()
}

/// The MP floating pointer and configuration table for `cpus` vCPUs, as
/// bytes to place at [`MPTABLE_START`].
pub fn build(cpus: u8) -> Result<Vec<u8>, MptableError> {
    if cpus == 0 || cpus > MAX_CPUS {
        return Err(MptableError::Cpus(cpus));
    }
    let ioapic = ioapic_id(cpus);
    let mut entries = Vec::new();
    for id in 0..cpus {
        let flags = CPU_ENABLED | if id == 0 { CPU_BOOTPROCESSOR } else { 0 };
        entries.extend_from_slice(&[MP_PROCESSOR, id, APIC_VERSION, flags]);
        entries.extend_from_slice(&0x600u32.to_le_bytes()); // family 6 signature
        entries.extend_from_slice(&0x201u32.to_le_bytes()); // FPU | APIC
        entries.extend_from_slice(&[0; 8]);
    }
    entries.extend_from_slice(&[MP_BUS, 0]);
    entries.extend_from_slice(b"ISA   ");
    entries.extend_from_slice(&[MP_IOAPIC, ioapic, APIC_VERSION, 1]);
    entries.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    for irq in 0..IOAPIC_PINS {
        // type, irq type, flags (u16: conforms to bus), bus, bus irq, apic, pin
        entries.extend_from_slice(&[MP_INTSRC, MP_INT, 0, 0, 0, irq, ioapic, irq]);
    }
    entries.extend_from_slice(&[MP_LINTSRC, MP_EXTINT, 0, 0, 0, 0, 0, 0]);
    entries.extend_from_slice(&[MP_LINTSRC, MP_NMI, 0, 0, 0, 0, 0xff, 1]);

    let count = (cpus as u16) + 2 + u16::from(IOAPIC_PINS) + 2;
    let mut table = Vec::with_capacity(44 + entries.len());
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&((44 + entries.len()) as u16).to_le_bytes());
    table.push(4); // spec revision 1.4
    table.push(0); // checksum, fixed below
    table.extend_from_slice(b"PROTMEM ");
    table.extend_from_slice(b"protmem-vmm ");
    table.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    table.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&LAPIC_ADDR.to_le_bytes());
    table.extend_from_slice(&[0; 4]); // extended table length, checksum, reserved
    table.extend_from_slice(&entries);
    table[7] = checksum_fix(&table);

    let mut mpf = Vec::with_capacity(16);
    mpf.extend_from_slice(b"_MP_");
    mpf.extend_from_slice(&((MPTABLE_START + 16) as u32).to_le_bytes());
    mpf.extend_from_slice(&[1, 4, 0, 0, 0, 0, 0, 0]); // length 1 (x16), rev 1.4, checksum, features
    mpf[10] = checksum_fix(&mpf);
    mpf.extend_from_slice(&table);
    Ok(mpf)
}

/// Writes the MP table for `cpus` vCPUs into guest memory.
pub fn write(mem: &GuestMemoryMmap, cpus: u8) -> Result<(), MptableError> {
    let bytes = build(cpus)?;
    mem.write_slice(&bytes, GuestAddress(MPTABLE_START))
        .map_err(|_| MptableError::Write { len: bytes.len() })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    #[test]
    fn checksums_lengths_and_entries() {
        for cpus in [1, 2, MAX_CPUS] {
            let t = build(cpus).unwrap();
            assert_eq!(&t[..4], b"_MP_");
            assert_eq!(sum(&t[..16]), 0, "floating pointer checksum");
            let ptr = u32::from_le_bytes(t[4..8].try_into().unwrap()) as u64;
            assert_eq!(ptr, MPTABLE_START + 16);
            let cfg = &t[16..];
            assert_eq!(&cfg[..4], b"PCMP");
            let len = u16::from_le_bytes([cfg[4], cfg[5]]) as usize;
            assert_eq!(len, cfg.len());
            assert_eq!(sum(cfg), 0, "configuration table checksum");
            // Walk the entries: processors are 20 bytes, everything else 8.
            let (mut at, mut n, mut procs) = (44, 0, 0);
            while at < len {
                if cfg[at] == MP_PROCESSOR {
                    procs += 1;
                    assert_eq!(cfg[at + 3] & CPU_BOOTPROCESSOR != 0, cfg[at + 1] == 0);
                    at += 20;
                } else {
                    at += 8;
                }
                n += 1;
            }
            assert_eq!(at, len);
            assert_eq!(procs, cpus);
            assert_eq!(n, u16::from_le_bytes([cfg[34], cfg[35]]));
            assert!(t.len() <= 0xa0000 - MPTABLE_START as usize, "fits the EBDA");
        }
        assert!(build(0).is_err());
        assert!(build(MAX_CPUS + 1).is_err());
    }

    #[test]
    fn lands_in_guest_memory() {
        let m = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        write(&m, 2).unwrap();
        let mut sig = [0u8; 4];
        m.read_slice(&mut sig, GuestAddress(MPTABLE_START + 16))
            .unwrap();
        assert_eq!(&sig, b"PCMP");
        let small = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x9_0000)]).unwrap();
        assert!(matches!(write(&small, 1), Err(MptableError::Write { .. })));
    }
}
