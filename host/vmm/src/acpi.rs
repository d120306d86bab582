//! ACPI tables: the guest's CPUs, interrupt controllers and devices, as a
//! Linux guest expects to find them.
//!
//! With a MADT, Linux picks its local APIC driver (x2APIC included) while
//! it parses the tables in `setup_arch()`, long before it enables
//! interrupts; with the MP table alone it does so only in
//! `apic_intr_mode_init()`, and a kernel started by kexec, which inherits
//! the local APIC enabled in x2APIC mode, takes an early local APIC
//! interrupt without an x2APIC driver and panics.
//!
//! The tables lie in the BIOS area, where Linux also scans for the RSDP;
//! the zero page names it too (`acpi_rsdp_addr`, [`crate::boot`]), which
//! kexec passes on to the next kernel, and the e820 map marks the area as
//! ACPI data, which kdump hands to the crash kernel:
//!
//! | table | contents |
//! |---|---|
//! | RSDP | ACPI 2.0+, at [`RSDP_ADDR`]: the XSDT |
//! | XSDT | the FADT and the MADT |
//! | FADT | a PC's fixed hardware: SCI on IRQ 9, the PM1 registers ([`crate::devices::acpi_pm`]), no SMI command port (always in ACPI mode), no PM timer, no fixed power or sleep button, no C2/C3; no VGA, MSI or CMOS RTC; the FACS and the DSDT |
//! | FACS | no waking vector, no global lock owner |
//! | DSDT | COM1 (`PNP0501`, port 0x3f8, IRQ 4) and each virtio-mmio window (`LNRO0005`, its 4 KiB and its GSI) |
//! | MADT | one enabled local APIC per vCPU (ACPI UID and APIC ID = vCPU index, as [`crate::cpuid`] reports), the I/O APIC with the address and ID of the MP table, the SCI override, NMI on LINT1 of every CPU; `PCAT_COMPAT` |
//!
//! Not hardware-reduced ACPI, which Firecracker and QEMU's microvm use:
//! with it Linux drops the 8259 and, with it, every use of the PIT, the
//! TSC calibration included (`pit_calibrate_tsc()` gives up without a
//! legacy PIC), and a protected guest whose kvmclock stays off (it could
//! not share the page) then hangs with no TSC rate and no tick. So the
//! machine stays the PC the MP table describes: 8259s, PIT, ISA IRQ n on
//! I/O APIC pin n, conforming to the bus (edge, active high), which is
//! ACPI's default, so the only interrupt source override is the SCI's
//! (level, active high: KVM's I/O APIC does not invert polarity). The
//! DSDT describes the devices; their GSIs are their ISA IRQs.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::devices::acpi_pm::{PM1_CNT_BLK, PM1_CNT_LEN, PM1_EVT_BLK, PM1_EVT_LEN};
use crate::devices::serial::{COM1_BASE, COM1_IRQ, COM1_LEN};
use crate::devices::virtio::MMIO_SIZE;
use crate::mptable::{self, IOAPIC_ADDR, LAPIC_ADDR};

/// Start of the area the tables go in (the BIOS area Linux scans).
pub const TABLES_START: u64 = 0xe_0000;
/// End of that area (exclusive): the tables must fit below it.
pub const TABLES_END: u64 = 0x10_0000;
/// Where the RSDP goes (16-byte aligned, as the scan requires).
pub const RSDP_ADDR: u64 = TABLES_START;

/// OEM ID in every table.
const OEM_ID: [u8; 6] = *b"PRTMEM";
/// OEM table ID in every table.
const OEM_TABLE_ID: [u8; 8] = *b"PROTMEM ";
const OEM_REVISION: u32 = 1;
/// Creator ID and revision: this VMM.
const CREATOR_ID: [u8; 4] = *b"PMVM";
const CREATOR_REVISION: u32 = 1;
/// Length of the common table header.
const HEADER_LEN: usize = 36;
/// Length of an ACPI 2.0+ RSDP.
const RSDP_LEN: usize = 36;
/// ACPI 6.5 FADT: revision 6, minor version 5, 276 bytes.
const FADT_REVISION: u8 = 6;
const FADT_MINOR: u8 = 5;
const FADT_LEN: usize = 276;
/// MADT revision of ACPI 6.3 to 6.5.
const MADT_REVISION: u8 = 5;
/// DSDT revision 2: AML integers are 64 bits wide.
const DSDT_REVISION: u8 = 2;
/// FADT flags: power and sleep buttons are not fixed-feature devices.
const FADT_PWR_BUTTON: u32 = 1 << 4;
const FADT_SLP_BUTTON: u32 = 1 << 5;
/// The SCI's ISA IRQ, and the FADT's "C2/C3 not supported" latencies.
const SCI_IRQ: u8 = 9;
const P_LVL2_LAT_NONE: u16 = 101;
const P_LVL3_LAT_NONE: u16 = 1001;
/// FACS: 64 bytes, 64-byte aligned, version 2.
const FACS_LEN: usize = 64;
const FACS_VERSION: u8 = 2;
/// IA-PC boot architecture flags: ISA devices (COM1) present; no VGA, no
/// MSI, no CMOS RTC (the VMM's CMOS port only reads 0).
const IAPC_LEGACY_DEVICES: u16 = 1 << 0;
const IAPC_VGA_NOT_PRESENT: u16 = 1 << 2;
const IAPC_MSI_NOT_SUPPORTED: u16 = 1 << 3;
const IAPC_CMOS_RTC_NOT_PRESENT: u16 = 1 << 5;
/// MADT flag: a dual 8259 is present.
const MADT_PCAT_COMPAT: u32 = 1;
/// MADT entry types and lengths.
const MADT_LOCAL_APIC: u8 = 0;
const MADT_IO_APIC: u8 = 1;
const MADT_INT_SRC_OVERRIDE: u8 = 2;
/// MPS INTI flags: active high (01), level triggered (11 << 2).
const INTI_LEVEL_HIGH: u16 = 0b1101;
const MADT_LOCAL_APIC_NMI: u8 = 4;
/// Local APIC flag: enabled.
const LAPIC_ENABLED: u32 = 1;
/// ACPI processor UID meaning "all processors".
const ALL_PROCESSORS: u8 = 0xff;
/// COM1's ISA IRQ, for its `IRQNoFlags` descriptor (a 16-bit mask).
const COM1_ISA_IRQ: u8 = COM1_IRQ as u8;
const _: () = assert!(COM1_IRQ < 16);

/// Errors building or writing the tables.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    /// Too many or too few vCPUs.
    #[error("the MADT describes 1..={max} vCPUs, not {0}", max = mptable::MAX_CPUS)]
    Cpus(u8),
    /// A virtio window lies above 4 GiB (a `Memory32Fixed` cannot say so).
    #[error("virtio window {0:#x} is not below 4 GiB")]
    Window(u64),
    /// The tables do not fit their area.
    #[error("the ACPI tables take {len} bytes from GPA {TABLES_START:#x}, past {TABLES_END:#x}")]
    TooBig {
        /// Bytes needed.
        len: usize,
    },
    /// Writing to guest memory failed.
    #[error("writing the {len}-byte ACPI tables at GPA {TABLES_START:#x} failed")]
    Write {
        /// Bytes written.
        len: usize,
    },
}

/// The tables as one image to place at [`TABLES_START`], and where each
/// table is.
#[derive(Debug)]
pub struct Tables {
    /// The bytes from [`TABLES_START`] on.
    pub image: Vec<u8>,
    /// GPA of the XSDT.
    pub xsdt: u64,
    /// GPA of the FADT.
    pub fadt: u64,
    /// GPA of the FACS.
    pub facs: u64,
    /// GPA of the MADT.
    pub madt: u64,
    /// GPA of the DSDT.
    pub dsdt: u64,
}

/// The byte that makes `bytes` sum to 0 (mod 256) when stored among them
/// in place of a 0.
fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |a, b| a.wrapping_add(*b))
        .wrapping_neg()
}

/// A system description table: the common header, then `body`.
fn sdt(signature: &[u8; 4], revision: u8, body: &[u8]) -> Vec<u8> {
    let len = HEADER_LEN + body.len();
    let mut t = Vec::with_capacity(len);
    t.extend_from_slice(signature);
    t.extend_from_slice(&(len as u32).to_le_bytes());
    t.push(revision);
    t.push(0); // checksum, fixed below
    t.extend_from_slice(&OEM_ID);
    t.extend_from_slice(&OEM_TABLE_ID);
    t.extend_from_slice(&OEM_REVISION.to_le_bytes());
    t.extend_from_slice(&CREATOR_ID);
    t.extend_from_slice(&CREATOR_REVISION.to_le_bytes());
    t.extend_from_slice(body);
    t[9] = checksum(&t);
    t
}

/// The RSDP (ACPI 2.0+) pointing at the XSDT at `xsdt`; no RSDT.
fn rsdp(xsdt: u64) -> Vec<u8> {
    let mut r = Vec::with_capacity(RSDP_LEN);
    r.extend_from_slice(b"RSD PTR ");
    r.push(0); // checksum of the first 20 bytes, fixed below
    r.extend_from_slice(&OEM_ID);
    r.push(2); // revision: ACPI 2.0+
    r.extend_from_slice(&0u32.to_le_bytes()); // RSDT address
    r.extend_from_slice(&(RSDP_LEN as u32).to_le_bytes());
    r.extend_from_slice(&xsdt.to_le_bytes());
    r.push(0); // extended checksum, fixed below
    r.extend_from_slice(&[0; 3]);
    r[8] = checksum(&r[..20]);
    r[32] = checksum(&r);
    r
}

/// The XSDT listing the tables at `entries`.
fn xsdt(entries: &[u64]) -> Vec<u8> {
    let body: Vec<u8> = entries.iter().flat_map(|a| a.to_le_bytes()).collect();
    sdt(b"XSDT", 1, &body)
}

/// The FACS: no firmware waking vector, the global lock free.
fn facs() -> Vec<u8> {
    let mut f = vec![0u8; FACS_LEN];
    f[..4].copy_from_slice(b"FACS");
    f[4..8].copy_from_slice(&(FACS_LEN as u32).to_le_bytes());
    f[32] = FACS_VERSION;
    f
}

/// The FADT whose FACS is at `facs` and DSDT at `dsdt` (both below
/// 4 GiB: the tables lie below 1 MiB).
fn fadt(facs: u64, dsdt: u64) -> Vec<u8> {
    let mut b = vec![0u8; FADT_LEN - HEADER_LEN];
    // Offsets below are the FADT's, less the header.
    let at = |off: usize| off - HEADER_LEN;
    let mut put = |off: usize, v: &[u8]| b[at(off)..at(off) + v.len()].copy_from_slice(v);
    put(36, &(facs as u32).to_le_bytes()); // FIRMWARE_CTRL
    put(40, &(dsdt as u32).to_le_bytes()); // DSDT
    put(46, &u16::from(SCI_IRQ).to_le_bytes()); // SCI_INT; SMI_CMD 0
    put(56, &u32::from(PM1_EVT_BLK).to_le_bytes());
    put(64, &u32::from(PM1_CNT_BLK).to_le_bytes());
    put(88, &[PM1_EVT_LEN, PM1_CNT_LEN]);
    put(96, &P_LVL2_LAT_NONE.to_le_bytes());
    put(98, &P_LVL3_LAT_NONE.to_le_bytes());
    let iapc = IAPC_LEGACY_DEVICES
        | IAPC_VGA_NOT_PRESENT
        | IAPC_MSI_NOT_SUPPORTED
        | IAPC_CMOS_RTC_NOT_PRESENT;
    put(109, &iapc.to_le_bytes());
    put(112, &(FADT_PWR_BUTTON | FADT_SLP_BUTTON).to_le_bytes());
    put(131, &[FADT_MINOR]);
    put(140, &dsdt.to_le_bytes()); // X_DSDT; X_FIRMWARE_CTRL and X_PM* 0
    sdt(b"FACP", FADT_REVISION, &b)
}

/// The MADT of `cpus` vCPUs (APIC IDs 0..cpus) and the MP table's I/O APIC.
fn madt(cpus: u8) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&LAPIC_ADDR.to_le_bytes());
    b.extend_from_slice(&MADT_PCAT_COMPAT.to_le_bytes());
    for id in 0..cpus {
        // type, length, ACPI processor UID, APIC ID, flags
        b.extend_from_slice(&[MADT_LOCAL_APIC, 8, id, id]);
        b.extend_from_slice(&LAPIC_ENABLED.to_le_bytes());
    }
    // type, length, I/O APIC ID, reserved, address, GSI base
    b.extend_from_slice(&[MADT_IO_APIC, 12, mptable::ioapic_id(cpus), 0]);
    b.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes());
    // type, length, bus (ISA), source IRQ, GSI, flags
    b.extend_from_slice(&[MADT_INT_SRC_OVERRIDE, 10, 0, SCI_IRQ]);
    b.extend_from_slice(&u32::from(SCI_IRQ).to_le_bytes());
    b.extend_from_slice(&INTI_LEVEL_HIGH.to_le_bytes());
    // type, length, UID (all), flags (u16: conforms to the bus), LINT1
    b.extend_from_slice(&[MADT_LOCAL_APIC_NMI, 6, ALL_PROCESSORS, 0, 0, 1]);
    sdt(b"APIC", MADT_REVISION, &b)
}

/// The DSDT: COM1 and the virtio-mmio windows `virtio` (`(GPA, GSI)`),
/// in `\_SB`.
fn dsdt(virtio: &[(u64, u32)]) -> Result<Vec<u8>, AcpiError> {
    let mut devices = aml::device(
        *b"COM1",
        &[
            aml::name(*b"_HID", &aml::dword(aml::eisa_id(*b"PNP0501"))),
            aml::name(*b"_UID", &aml::integer(0)),
            aml::name(
                *b"_CRS",
                &aml::resources(&[
                    &aml::io16(COM1_BASE, COM1_LEN as u8),
                    &aml::irq_no_flags(COM1_ISA_IRQ),
                ]),
            ),
        ]
        .concat(),
    );
    for (i, &(base, gsi)) in virtio.iter().enumerate() {
        let base32 = u32::try_from(base).map_err(|_| AcpiError::Window(base))?;
        let crs = aml::resources(&[
            &aml::memory32_fixed(base32, MMIO_SIZE as u32),
            &aml::interrupt(gsi),
        ]);
        devices.extend(aml::device(
            aml::numbered(*b"V000", i),
            &[
                aml::name(*b"_HID", &aml::string("LNRO0005")),
                aml::name(*b"_UID", &aml::integer(i as u64)),
                aml::name(*b"_CRS", &crs),
            ]
            .concat(),
        ));
    }
    Ok(sdt(
        b"DSDT",
        DSDT_REVISION,
        &aml::scope(b"\\_SB_", &devices),
    ))
}

fn align16(n: usize) -> usize {
    n.next_multiple_of(16)
}

/// Builds the tables for `cpus` vCPUs and the virtio-mmio windows
/// `virtio` (`(GPA, GSI)`): the RSDP at [`RSDP_ADDR`], the FACS (64-byte
/// aligned), then the DSDT, FADT, MADT and XSDT, each 16-byte aligned.
pub fn build(cpus: u8, virtio: &[(u64, u32)]) -> Result<Tables, AcpiError> {
    if cpus == 0 || cpus > mptable::MAX_CPUS {
        return Err(AcpiError::Cpus(cpus));
    }
    let dsdt_bytes = dsdt(virtio)?;
    let madt_bytes = madt(cpus);
    let gpa = |off: usize| TABLES_START + off as u64;
    let facs_off = RSDP_LEN.next_multiple_of(64);
    let dsdt_off = align16(facs_off + FACS_LEN);
    let fadt_off = align16(dsdt_off + dsdt_bytes.len());
    let fadt_bytes = fadt(gpa(facs_off), gpa(dsdt_off));
    let madt_off = align16(fadt_off + fadt_bytes.len());
    let xsdt_off = align16(madt_off + madt_bytes.len());
    let xsdt_bytes = xsdt(&[gpa(fadt_off), gpa(madt_off)]);
    let end = xsdt_off + xsdt_bytes.len();
    if gpa(end) > TABLES_END {
        return Err(AcpiError::TooBig { len: end });
    }
    let mut image = vec![0u8; end];
    for (off, t) in [
        (0, rsdp(gpa(xsdt_off))),
        (facs_off, facs()),
        (dsdt_off, dsdt_bytes),
        (fadt_off, fadt_bytes),
        (madt_off, madt_bytes),
        (xsdt_off, xsdt_bytes),
    ] {
        image[off..off + t.len()].copy_from_slice(&t);
    }
    Ok(Tables {
        image,
        xsdt: gpa(xsdt_off),
        fadt: gpa(fadt_off),
        facs: gpa(facs_off),
        madt: gpa(madt_off),
        dsdt: gpa(dsdt_off),
    })
}

/// Writes the tables for `cpus` vCPUs and the virtio-mmio windows
/// `virtio` (`(GPA, GSI)`) into guest memory.
pub fn write(mem: &GuestMemoryMmap, cpus: u8, virtio: &[(u64, u32)]) -> Result<(), AcpiError> {
    let t = build(cpus, virtio)?;
    mem.write_slice(&t.image, GuestAddress(TABLES_START))
        .map_err(|_| AcpiError::Write { len: t.image.len() })
}

/// The few AML terms the DSDT needs (ACPI 6.5 section 20.2), and the
/// resource descriptors of `_CRS` (section 6.4).
mod aml {
    const ZERO_OP: u8 = 0x00;
    const ONE_OP: u8 = 0x01;
    const NAME_OP: u8 = 0x08;
    const BYTE_PREFIX: u8 = 0x0a;
    const WORD_PREFIX: u8 = 0x0b;
    const DWORD_PREFIX: u8 = 0x0c;
    const STRING_PREFIX: u8 = 0x0d;
    const QWORD_PREFIX: u8 = 0x0e;
    const SCOPE_OP: u8 = 0x10;
    const BUFFER_OP: u8 = 0x11;
    const EXT_OP_PREFIX: u8 = 0x5b;
    const DEVICE_OP: u8 = 0x82;
    /// Small resource descriptors: tag (type << 3 | length).
    const IRQ_NO_FLAGS: u8 = 0x22;
    const IO: u8 = 0x47;
    const END_TAG: u8 = 0x79;
    /// Large resource descriptors.
    const MEMORY32_FIXED: u8 = 0x86;
    const EXTENDED_INTERRUPT: u8 = 0x89;

    /// A 4-character name segment, ending in `n` as three hex digits
    /// (`V000`, `V001`, ...; the DSDT has one per virtio slot).
    pub fn numbered(mut seg: [u8; 4], n: usize) -> [u8; 4] {
        let digits = format!("{:03X}", n % 0x1000);
        seg[1..].copy_from_slice(digits.as_bytes());
        seg
    }

    /// PkgLength of a package whose contents after it are `len` bytes: it
    /// counts its own 1 to 4 bytes too.
    pub fn pkg_length(len: usize) -> Vec<u8> {
        if len + 1 < 0x40 {
            return vec![(len + 1) as u8];
        }
        let n = if len + 2 < 1 << 12 {
            2
        } else if len + 3 < 1 << 20 {
            3
        } else {
            4
        };
        let total = len + n;
        let mut v = vec![(((n - 1) << 6) | (total & 0xf)) as u8];
        for i in 0..n - 1 {
            v.push((total >> (4 + 8 * i)) as u8);
        }
        v
    }

    /// `Scope (path) { body }`; `path` is a name string such as `\_SB_`.
    pub fn scope(path: &[u8], body: &[u8]) -> Vec<u8> {
        let mut v = vec![SCOPE_OP];
        v.extend(pkg_length(path.len() + body.len()));
        v.extend_from_slice(path);
        v.extend_from_slice(body);
        v
    }

    /// `Device (name) { body }`.
    pub fn device(name: [u8; 4], body: &[u8]) -> Vec<u8> {
        let mut v = vec![EXT_OP_PREFIX, DEVICE_OP];
        v.extend(pkg_length(name.len() + body.len()));
        v.extend_from_slice(&name);
        v.extend_from_slice(body);
        v
    }

    /// `Name (name, value)`.
    pub fn name(name: [u8; 4], value: &[u8]) -> Vec<u8> {
        let mut v = vec![NAME_OP];
        v.extend_from_slice(&name);
        v.extend_from_slice(value);
        v
    }

    /// An integer in the shortest encoding.
    pub fn integer(n: u64) -> Vec<u8> {
        match n {
            0 => vec![ZERO_OP],
            1 => vec![ONE_OP],
            2..=0xff => vec![BYTE_PREFIX, n as u8],
            0x100..=0xffff => [&[WORD_PREFIX][..], &(n as u16).to_le_bytes()].concat(),
            0x1_0000..=0xffff_ffff => dword(n as u32),
            _ => [&[QWORD_PREFIX][..], &n.to_le_bytes()].concat(),
        }
    }

    /// A 32-bit integer, always as a DWordConst (how `EisaId()` compiles).
    pub fn dword(n: u32) -> Vec<u8> {
        [&[DWORD_PREFIX][..], &n.to_le_bytes()].concat()
    }

    /// A string (ASCII, NUL-terminated).
    pub fn string(s: &str) -> Vec<u8> {
        [&[STRING_PREFIX][..], s.as_bytes(), &[0]].concat()
    }

    /// The compressed EISA ID of `id` ("PNP0501"): three letters of five
    /// bits each, then four hex digits, stored big-endian.
    pub fn eisa_id(id: [u8; 7]) -> u32 {
        let letter = |c: u8| u16::from(c - b'@') & 0x1f;
        let vendor = (letter(id[0]) << 10) | (letter(id[1]) << 5) | letter(id[2]);
        let hex = |c: u8| (c as char).to_digit(16).unwrap_or(0) as u8;
        let product = [
            (hex(id[3]) << 4) | hex(id[4]),
            (hex(id[5]) << 4) | hex(id[6]),
        ];
        let [v0, v1] = vendor.to_be_bytes();
        u32::from_le_bytes([v0, v1, product[0], product[1]])
    }

    /// A resource template (`Buffer` of `descriptors` and an end tag whose
    /// checksum 0 means "not checked").
    pub fn resources(descriptors: &[&[u8]]) -> Vec<u8> {
        let mut bytes = descriptors.concat();
        bytes.extend_from_slice(&[END_TAG, 0]);
        let size = integer(bytes.len() as u64);
        let mut v = vec![BUFFER_OP];
        v.extend(pkg_length(size.len() + bytes.len()));
        v.extend(size);
        v.extend(bytes);
        v
    }

    /// `IO (Decode16, port, port, 1, len)`: `len` ports at `port`.
    pub fn io16(port: u16, len: u8) -> Vec<u8> {
        let [lo, hi] = port.to_le_bytes();
        vec![IO, 1, lo, hi, lo, hi, 1, len]
    }

    /// `IRQNoFlags () {irq}`: an ISA IRQ, edge triggered, active high.
    pub fn irq_no_flags(irq: u8) -> Vec<u8> {
        [&[IRQ_NO_FLAGS][..], &(1u16 << irq).to_le_bytes()].concat()
    }

    /// `Memory32Fixed (ReadWrite, base, len)`.
    pub fn memory32_fixed(base: u32, len: u32) -> Vec<u8> {
        [
            &[MEMORY32_FIXED, 9, 0, 1][..],
            &base.to_le_bytes(),
            &len.to_le_bytes(),
        ]
        .concat()
    }

    /// `Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive) {gsi}`.
    pub fn interrupt(gsi: u32) -> Vec<u8> {
        // flags: bit 0 consumer, bit 1 edge; count 1
        [&[EXTENDED_INTERRUPT, 6, 0, 0b11, 1][..], &gsi.to_le_bytes()].concat()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::{slot_addr, slot_irq};

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
    }

    fn u64_at(b: &[u8], off: usize) -> u64 {
        u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
    }

    fn virtio3() -> Vec<(u64, u32)> {
        (0..3).map(|s| (slot_addr(s), slot_irq(s as u32))).collect()
    }

    /// Guest RAM holding the tables as `write` left them.
    fn written(cpus: u8, virtio: &[(u64, u32)]) -> GuestMemoryMmap {
        let m = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x20_0000)]).unwrap();
        write(&m, cpus, virtio).unwrap();
        m
    }

    /// The table at `gpa`, checked: its signature, its length within
    /// the area, its checksum.
    fn table(m: &GuestMemoryMmap, gpa: u64, sig: &[u8; 4]) -> Vec<u8> {
        let mut hdr = [0u8; HEADER_LEN];
        m.read_slice(&mut hdr, GuestAddress(gpa)).unwrap();
        assert_eq!(&hdr[..4], sig, "signature at {gpa:#x}");
        let len = u32_at(&hdr, 4) as usize;
        assert!(len >= HEADER_LEN && gpa + len as u64 <= TABLES_END);
        let mut t = vec![0u8; len];
        m.read_slice(&mut t, GuestAddress(gpa)).unwrap();
        assert_eq!(sum(&t), 0, "{} checksum", String::from_utf8_lossy(sig));
        assert_eq!(&t[10..16], &OEM_ID);
        t
    }

    /// Follows the RSDP to the XSDT and returns its entries.
    fn xsdt_entries(m: &GuestMemoryMmap) -> Vec<u64> {
        let mut r = [0u8; RSDP_LEN];
        m.read_slice(&mut r, GuestAddress(RSDP_ADDR)).unwrap();
        assert_eq!(&r[..8], b"RSD PTR ");
        assert_eq!(sum(&r[..20]), 0, "RSDP checksum");
        assert_eq!(sum(&r), 0, "RSDP extended checksum");
        assert_eq!(r[15], 2, "revision: ACPI 2.0+");
        assert_eq!(u32_at(&r, 20) as usize, RSDP_LEN);
        assert_eq!(RSDP_ADDR % 16, 0);
        let x = table(m, u64_at(&r, 24), b"XSDT");
        assert_eq!((x.len() - HEADER_LEN) % 8, 0);
        (HEADER_LEN..x.len())
            .step_by(8)
            .map(|o| u64_at(&x, o))
            .collect()
    }

    /// MADT entries as (type, bytes).
    fn madt_entries(t: &[u8]) -> Vec<(u8, Vec<u8>)> {
        let mut at = HEADER_LEN + 8;
        let mut v = Vec::new();
        while at < t.len() {
            let len = t[at + 1] as usize;
            assert!(len >= 2 && at + len <= t.len(), "entry at {at} overruns");
            v.push((t[at], t[at..at + len].to_vec()));
            at += len;
        }
        v
    }

    #[test]
    fn rsdp_xsdt_fadt_dsdt_chain_with_checksums() {
        let m = written(2, &virtio3());
        let built = build(2, &virtio3()).unwrap();
        let entries = xsdt_entries(&m);
        assert_eq!(entries, [built.fadt, built.madt]);
        let f = table(&m, entries[0], b"FACP");
        assert_eq!(f.len(), FADT_LEN);
        assert_eq!((f[8], f[131]), (FADT_REVISION, FADT_MINOR));
        // Not hardware-reduced (bit 20): a PC with its fixed hardware.
        assert_eq!(u32_at(&f, 112) & (1 << 20), 0);
        assert_eq!(u16::from_le_bytes([f[46], f[47]]), 9, "SCI_INT");
        assert_eq!(u32_at(&f, 48), 0, "no SMI command port: ACPI mode");
        assert_eq!((u32_at(&f, 56), f[88]), (u32::from(PM1_EVT_BLK), 4));
        assert_eq!((u32_at(&f, 64), f[89]), (u32::from(PM1_CNT_BLK), 2));
        assert_eq!(u32_at(&f, 76), 0, "no PM timer");
        let facs_gpa = u64::from(u32_at(&f, 36));
        assert_eq!((facs_gpa, facs_gpa % 64), (built.facs, 0));
        let mut facs = [0u8; FACS_LEN];
        m.read_slice(&mut facs, GuestAddress(facs_gpa)).unwrap();
        assert_eq!(&facs[..4], b"FACS");
        assert_eq!((u32_at(&facs, 4) as usize, facs[32]), (FACS_LEN, 2));
        let x_dsdt = u64_at(&f, 140);
        assert_eq!(x_dsdt, built.dsdt);
        assert_eq!(u64::from(u32_at(&f, 40)), x_dsdt, "DSDT and X_DSDT agree");
        let d = table(&m, x_dsdt, b"DSDT");
        assert_eq!(d[8], DSDT_REVISION);
        table(&m, entries[1], b"APIC");
        // Every table lies in the area, none overlaps the next.
        let mut spans: Vec<(u64, u64)> =
            [built.facs, built.dsdt, built.fadt, built.madt, built.xsdt]
                .iter()
                .map(|&a| {
                    (
                        a,
                        a + u64::from(m.read_obj::<u32>(GuestAddress(a + 4)).unwrap()),
                    )
                })
                .collect();
        spans.push((RSDP_ADDR, RSDP_ADDR + RSDP_LEN as u64));
        spans.sort();
        assert!(spans.windows(2).all(|w| w[0].1 <= w[1].0), "{spans:x?}");
        assert_eq!(spans[0].0, TABLES_START);
        assert!(spans.iter().all(|s| s.1 <= TABLES_END));
    }

    #[test]
    fn madt_one_enabled_lapic_per_vcpu_and_the_mp_tables_ioapic() {
        for cpus in [1, 2, 4, mptable::MAX_CPUS] {
            let m = written(cpus, &[]);
            let t = table(&m, xsdt_entries(&m)[1], b"APIC");
            assert_eq!(u32_at(&t, HEADER_LEN), LAPIC_ADDR);
            assert_eq!(u32_at(&t, HEADER_LEN + 4), MADT_PCAT_COMPAT);
            let e = madt_entries(&t);
            let lapics: Vec<(u8, u8, u32)> = e
                .iter()
                .filter(|(ty, _)| *ty == MADT_LOCAL_APIC)
                .map(|(_, b)| (b[2], b[3], u32_at(b, 4)))
                .collect();
            let want: Vec<(u8, u8, u32)> = (0..cpus).map(|i| (i, i, LAPIC_ENABLED)).collect();
            assert_eq!(lapics, want, "UID and APIC ID = vCPU index, enabled");
            let ioapics: Vec<&Vec<u8>> = e
                .iter()
                .filter(|(ty, _)| *ty == MADT_IO_APIC)
                .map(|(_, b)| b)
                .collect();
            assert_eq!(ioapics.len(), 1);
            let io = ioapics[0];
            assert_eq!(io[2], mptable::ioapic_id(cpus));
            assert_eq!((u32_at(io, 4), u32_at(io, 8)), (IOAPIC_ADDR, 0));
            // The MP table's I/O APIC entry: type 2, id, version, flags, address.
            let mp = mptable::build(cpus).unwrap();
            // [MP_IOAPIC, id, version 0x14, enabled, address]
            let mp_io = mp
                .windows(8)
                .find(|w| w[0] == 2 && w[2] == 0x14 && w[3] == 1)
                .unwrap();
            assert_eq!((mp_io[1], u32_at(mp_io, 4)), (io[2], IOAPIC_ADDR));
            let nmi: Vec<&Vec<u8>> = e
                .iter()
                .filter(|(ty, _)| *ty == MADT_LOCAL_APIC_NMI)
                .map(|(_, b)| b)
                .collect();
            assert_eq!(
                nmi,
                [&vec![4, 6, 0xff, 0, 0, 1]],
                "NMI on LINT1 of all CPUs"
            );
            let overrides: Vec<&Vec<u8>> = e
                .iter()
                .filter(|(ty, _)| *ty == MADT_INT_SRC_OVERRIDE)
                .map(|(_, b)| b)
                .collect();
            assert_eq!(
                overrides,
                [&vec![2, 10, 0, 9, 9, 0, 0, 0, 0x0d, 0]],
                "only the SCI's: ISA IRQ 9 is GSI 9, level, active high"
            );
            assert_eq!(e.len(), cpus as usize + 3, "nothing else: {e:?}");
        }
        assert!(matches!(build(0, &[]), Err(AcpiError::Cpus(0))));
        assert!(build(mptable::MAX_CPUS + 1, &[]).is_err());
    }

    #[test]
    fn aml_encodings() {
        assert_eq!(aml::eisa_id(*b"PNP0501"), 0x0105_d041);
        assert_eq!(aml::eisa_id(*b"PNP0A03"), 0x030a_d041);
        assert_eq!(aml::pkg_length(0), [1]);
        assert_eq!(aml::pkg_length(62), [63]);
        // 63 + 2 = 65 = 0x41: low nibble 1 in byte 0, 0x4 next.
        assert_eq!(aml::pkg_length(63), [0x41, 0x04]);
        assert_eq!(aml::pkg_length(0xffd), [0x4f, 0xff]);
        assert_eq!(aml::pkg_length(0xffe), [0x81, 0x00, 0x01]);
        assert_eq!(aml::integer(0), [0]);
        assert_eq!(aml::integer(1), [1]);
        assert_eq!(aml::integer(7), [0x0a, 7]);
        assert_eq!(aml::integer(0x1234), [0x0b, 0x34, 0x12]);
        assert_eq!(aml::integer(0x1_0000), [0x0c, 0, 0, 1, 0]);
        assert_eq!(aml::integer(1 << 32), [0x0e, 0, 0, 0, 0, 1, 0, 0, 0]);
        assert_eq!(aml::string("AB"), [0x0d, b'A', b'B', 0]);
        assert_eq!(aml::numbered(*b"V000", 0x2b), *b"V02B");
        // The ACPI spec's examples of each descriptor.
        assert_eq!(aml::io16(0x3f8, 8), [0x47, 1, 0xf8, 3, 0xf8, 3, 1, 8]);
        assert_eq!(aml::irq_no_flags(4), [0x22, 0x10, 0]);
        assert_eq!(
            aml::memory32_fixed(0xd000_0000, 0x1000),
            [0x86, 9, 0, 1, 0, 0, 0, 0xd0, 0, 0x10, 0, 0]
        );
        assert_eq!(aml::interrupt(5), [0x89, 6, 0, 3, 1, 5, 0, 0, 0]);
        assert_eq!(
            aml::resources(&[&aml::irq_no_flags(4)]),
            [0x11, 8, 0x0a, 5, 0x22, 0x10, 0, 0x79, 0]
        );
    }

    /// Just enough of an AML reader to walk what `dsdt` writes: the
    /// scope, devices, and named integers, strings and buffers.
    mod reader {
        #[derive(Debug, PartialEq)]
        pub enum Value {
            Int(u64),
            Str(String),
            Buf(Vec<u8>),
        }

        /// A PkgLength at `b[0..]`: (package length, bytes it took).
        fn pkg_length(b: &[u8]) -> (usize, usize) {
            let n = (b[0] >> 6) as usize;
            if n == 0 {
                return ((b[0] & 0x3f) as usize, 1);
            }
            let mut len = (b[0] & 0xf) as usize;
            for i in 0..n {
                len |= (b[1 + i] as usize) << (4 + 8 * i);
            }
            (len, n + 1)
        }

        fn value(b: &[u8]) -> (Value, usize) {
            match b[0] {
                0 => (Value::Int(0), 1),
                1 => (Value::Int(1), 1),
                0x0a => (Value::Int(b[1].into()), 2),
                0x0b => (Value::Int(u16::from_le_bytes([b[1], b[2]]).into()), 3),
                0x0c => (Value::Int(super::u32_at(b, 1).into()), 5),
                0x0d => {
                    let end = b.iter().position(|&c| c == 0).unwrap();
                    let s = String::from_utf8(b[1..end].to_vec()).unwrap();
                    (Value::Str(s), end + 1)
                }
                0x11 => {
                    let (len, n) = pkg_length(&b[1..]);
                    let body = &b[1..1 + len];
                    let (size, m) = value(&body[n..]);
                    let Value::Int(size) = size else {
                        panic!("buffer size {size:?}")
                    };
                    let bytes = body[n + m..].to_vec();
                    assert_eq!(bytes.len() as u64, size, "buffer size");
                    (Value::Buf(bytes), 1 + len)
                }
                op => panic!("unexpected opcode {op:#x}"),
            }
        }

        /// The devices of `\_SB` in an AML body: (name, [(name, value)]).
        pub type Device = (String, Vec<(String, Value)>);

        pub fn sb_devices(aml: &[u8]) -> Vec<Device> {
            assert_eq!(aml[0], 0x10, "Scope");
            let (len, n) = pkg_length(&aml[1..]);
            assert_eq!(1 + len, aml.len(), "the scope is the whole body");
            let body = &aml[1 + n..1 + len];
            assert_eq!(&body[..5], b"\\_SB_");
            let mut at = 5;
            let mut devices = Vec::new();
            while at < body.len() {
                assert_eq!(&body[at..at + 2], [0x5b, 0x82], "Device at {at}");
                let (len, n) = pkg_length(&body[at + 2..]);
                let dev = &body[at + 2..at + 2 + len];
                let name = String::from_utf8(dev[n..n + 4].to_vec()).unwrap();
                let mut names = Vec::new();
                let mut i = n + 4;
                while i < dev.len() {
                    assert_eq!(dev[i], 0x08, "Name in {name}");
                    let key = String::from_utf8(dev[i + 1..i + 5].to_vec()).unwrap();
                    let (v, used) = value(&dev[i + 5..]);
                    names.push((key, v));
                    i += 5 + used;
                }
                assert_eq!(i, dev.len());
                devices.push((name, names));
                at += 2 + len;
            }
            devices
        }
    }

    #[test]
    fn dsdt_describes_com1_and_each_virtio_window() {
        use reader::Value::{Buf, Int, Str};
        let virtio = virtio3();
        let m = written(1, &virtio);
        let d = table(&m, build(1, &virtio).unwrap().dsdt, b"DSDT");
        let devices = reader::sb_devices(&d[HEADER_LEN..]);
        assert_eq!(devices.len(), 1 + virtio.len());
        let (name, com1) = &devices[0];
        assert_eq!(name, "COM1");
        assert_eq!(
            com1,
            &[
                ("_HID".into(), Int(0x0105_d041)),
                ("_UID".into(), Int(0)),
                (
                    "_CRS".into(),
                    Buf(vec![
                        0x47, 1, 0xf8, 3, 0xf8, 3, 1, 8, // IO 0x3f8, 8 ports
                        0x22, 0x10, 0, // IRQ 4
                        0x79, 0,
                    ])
                ),
            ]
        );
        for (i, ((name, dev), &(base, gsi))) in devices[1..].iter().zip(&virtio).enumerate() {
            assert_eq!(name, &format!("V{i:03X}"));
            let mut crs = aml::memory32_fixed(base as u32, MMIO_SIZE as u32);
            crs.extend(aml::interrupt(gsi));
            crs.extend([0x79, 0]);
            assert_eq!(
                dev,
                &[
                    ("_HID".into(), Str("LNRO0005".into())),
                    ("_UID".into(), Int(i as u64)),
                    ("_CRS".into(), Buf(crs)),
                ]
            );
        }
        // A large DSDT takes multi-byte package lengths and still reads back.
        let many: Vec<(u64, u32)> = (0..40).map(|s| (slot_addr(s), 5)).collect();
        let t = build(1, &many).unwrap();
        let off = (t.dsdt - TABLES_START) as usize;
        let len = u32_at(&t.image, off + 4) as usize;
        let big = &t.image[off..off + len];
        assert_eq!(sum(big), 0);
        assert_eq!(reader::sb_devices(&big[HEADER_LEN..]).len(), 41);
        assert!(matches!(
            build(1, &[(1 << 32, 5)]),
            Err(AcpiError::Window(0x1_0000_0000))
        ));
    }

    #[test]
    fn too_small_memory_fails_to_write() {
        let small = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0xe_0100)]).unwrap();
        assert!(matches!(
            write(&small, 1, &[]),
            Err(AcpiError::Write { .. })
        ));
    }
}
