//! Linux boot: bzImage, initrd, zero page and command line in guest RAM, and
//! the 64-bit entry state (identity page tables, GDT, control registers).
//!
//! Follows the x86 64-bit boot protocol (Documentation/arch/x86/boot.rst)
//! the way Firecracker does: the protected-mode kernel is loaded at 1 MiB,
//! the vCPU starts in long mode at `startup_64` (load address + 0x200) with
//! RSI pointing to `struct boot_params`.
//!
//! Low-memory layout (GPAs):
//!
//! | what | where |
//! |---|---|
//! | GDT / IDT | 0x500 / 0x520 |
//! | zero page (`boot_params`) | 0x7000 |
//! | boot stack top | 0x8ff0 |
//! | PML4, PDPT, 4 PDs (identity map of 4 GiB, 2 MiB pages) | 0x9000..0xf000 |
//! | command line | 0x20000 |
//! | MP table | 0x9fc00 (EBDA) |
//! | ACPI tables, RSDP first ([`crate::acpi`]) | 0xe0000 (e820: ACPI data up to 1 MiB) |
//! | kernel | 0x100000 |
//! | initrd | top of RAM, page aligned |

use std::io::{Read, Seek};

use kvm_bindings::{kvm_fpu, kvm_lapic_state, kvm_regs, kvm_segment, kvm_sregs};
use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::{load_cmdline, BzImage, KernelLoader};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap, ReadVolatile};
use x86::bits64::paging::{PDFlags, PDPTFlags, PML4Flags};
use x86::controlregs::{Cr0, Cr4};

use crate::acpi;

/// GDT address.
pub const BOOT_GDT: u64 = 0x500;
/// IDT address.
pub const BOOT_IDT: u64 = 0x520;
/// `struct boot_params` address.
pub const ZERO_PAGE: u64 = 0x7000;
/// Initial stack pointer.
pub const BOOT_STACK: u64 = 0x8ff0;
/// PML4 address.
pub const PML4: u64 = 0x9000;
/// PDPT address.
pub const PDPT: u64 = 0xa000;
/// First page directory; four follow each other.
pub const PD: u64 = 0xb000;
/// Identity-mapped span at entry.
pub const IDENTITY_MAPPED: u64 = 4 << 30;
/// Kernel command line address.
pub const CMDLINE: u64 = 0x20000;
/// Longest command line accepted (including the terminating NUL).
pub const CMDLINE_MAX: usize = 4096;
/// Start of the EBDA, where the MP table goes; RAM below it is usable.
pub const EBDA_START: u64 = 0x9fc00;
/// Start of high memory, where the kernel is loaded.
pub const HIMEM_START: u64 = 0x10_0000;
/// RAM must end below this (start of the 32-bit MMIO hole).
pub const MMIO_HOLE: u64 = 0xc000_0000;
/// Offset of `startup_64` from the protected-mode kernel's load address.
const STARTUP_64_OFFSET: u64 = 0x200;
/// `XLF_KERNEL_64`: the kernel has the 64-bit entry point.
const XLF_KERNEL_64: u16 = 1 << 0;
/// `type_of_loader` "undefined".
const LOADER_OTHER: u8 = 0xff;
/// e820 type of usable RAM.
const E820_RAM: u32 = 1;
/// e820 type of ACPI tables.
const E820_ACPI: u32 = 3;
/// EFER.LME and EFER.LMA (the x86 crate has the MSR number, not its bits).
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// Errors while preparing the boot.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// linux-loader refused the kernel image.
    #[error("loading bzImage failed: {0}")]
    Kernel(linux_loader::loader::Error),
    /// The kernel lacks the 64-bit entry point.
    #[error("kernel xloadflags {0:#x} lack XLF_KERNEL_64: no 64-bit entry point")]
    Not64Bit(u16),
    /// The kernel and its decompression space do not fit in RAM.
    #[error("kernel needs {need:#x} bytes from {load:#x} but RAM ends at {ram:#x}")]
    KernelTooBig {
        /// Where the kernel runs (load or preferred address).
        load: u64,
        /// init_size from the header.
        need: u64,
        /// RAM size.
        ram: u64,
    },
    /// The initrd does not fit between the kernel and the top of RAM.
    #[error("initrd of {size:#x} bytes does not fit above the kernel (ends {kernel_end:#x}) below {limit:#x}")]
    InitrdTooBig {
        /// initrd size.
        size: u64,
        /// First byte the kernel does not need.
        kernel_end: u64,
        /// Highest address the initrd may end at.
        limit: u64,
    },
    /// Reading the initrd into guest memory failed.
    #[error("reading {size:#x} bytes of initrd to GPA {addr:#x} failed: {msg}")]
    Initrd {
        /// Load address.
        addr: u64,
        /// Size.
        size: u64,
        /// The error, printed.
        msg: String,
    },
    /// The command line is invalid or too long.
    #[error("kernel command line {cmdline:?}: {msg}")]
    Cmdline {
        /// The command line so far.
        cmdline: String,
        /// What is wrong.
        msg: String,
    },
    /// Writing a boot structure to guest memory failed.
    #[error("writing {what} at GPA {addr:#x} failed")]
    Write {
        /// Which structure.
        what: &'static str,
        /// Where.
        addr: u64,
    },
}

/// Where things went in guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BootInfo {
    /// 64-bit entry point (RIP).
    pub entry: u64,
    /// Kernel load address.
    pub kernel_load: u64,
    /// initrd address and size, if any.
    pub initrd: Option<(u64, u64)>,
}

/// Builds the command line from `base`. The devices are not on it: the
/// ACPI tables describe them ([`crate::acpi`]).
pub fn build_cmdline(base: &str) -> Result<Cmdline, BootError> {
    let err = |msg: String| BootError::Cmdline {
        cmdline: base.to_string(),
        msg,
    };
    let mut cmdline = Cmdline::new(CMDLINE_MAX).map_err(|e| err(e.to_string()))?;
    if !base.trim().is_empty() {
        cmdline
            .insert_str(base.trim())
            .map_err(|e| err(e.to_string()))?;
    }
    Ok(cmdline)
}

/// Loads the kernel, the initrd and the command line into `mem` (RAM from
/// GPA 0 of `ram_size` bytes) and writes the zero page and the boot page
/// tables and GDT.
pub fn load<K, I>(
    mem: &GuestMemoryMmap,
    ram_size: u64,
    kernel: &mut K,
    initrd: Option<(&mut I, u64)>,
    cmdline: &Cmdline,
) -> Result<BootInfo, BootError>
where
    K: Read + ReadVolatile + Seek,
    I: ReadVolatile,
{
    let loaded = BzImage::load(mem, None, kernel, Some(GuestAddress(HIMEM_START)))
        .map_err(BootError::Kernel)?;
    let mut hdr: setup_header = loaded.setup_header.unwrap_or_default();
    let xloadflags = hdr.xloadflags;
    if xloadflags & XLF_KERNEL_64 == 0 {
        return Err(BootError::Not64Bit(xloadflags));
    }
    let load = loaded.kernel_load.0;
    // A relocatable kernel decompresses at max(load address, pref_address)
    // (LOAD_PHYSICAL_ADDR, usually 16 MiB) and needs init_size bytes there.
    let runtime_start = load.max(hdr.pref_address);
    let need = u64::from(hdr.init_size).max(loaded.kernel_end - load);
    let kernel_end = runtime_start.saturating_add(need);
    if kernel_end > ram_size {
        return Err(BootError::KernelTooBig {
            load,
            need,
            ram: ram_size,
        });
    }

    let initrd = match initrd {
        None => None,
        Some((src, size)) => {
            let limit = ram_size.min(u64::from(hdr.initrd_addr_max) + 1);
            let addr = limit.saturating_sub(size) & !(crate::ram::PAGE_SIZE - 1);
            if size > limit || addr < kernel_end {
                return Err(BootError::InitrdTooBig {
                    size,
                    kernel_end,
                    limit,
                });
            }
            mem.read_exact_volatile_from(GuestAddress(addr), src, size as usize)
                .map_err(|e| BootError::Initrd {
                    addr,
                    size,
                    msg: e.to_string(),
                })?;
            Some((addr, size))
        }
    };

    let cmdline_len = cmdline
        .as_cstring()
        .map(|c| c.as_bytes().len())
        .unwrap_or(0);
    let limit = hdr.cmdline_size;
    if limit != 0 && cmdline_len > limit as usize {
        return Err(BootError::Cmdline {
            cmdline: cmdline
                .as_cstring()
                .map(|c| c.to_string_lossy().into_owned())
                .unwrap_or_default(),
            msg: format!("{cmdline_len} bytes, the kernel accepts {limit}"),
        });
    }
    load_cmdline(mem, GuestAddress(CMDLINE), cmdline).map_err(|_| BootError::Write {
        what: "command line",
        addr: CMDLINE,
    })?;

    hdr.type_of_loader = LOADER_OTHER;
    hdr.cmd_line_ptr = CMDLINE as u32;
    hdr.cmdline_size = cmdline_len as u32;
    if let Some((addr, size)) = initrd {
        hdr.ramdisk_image = addr as u32;
        hdr.ramdisk_size = size as u32;
    }
    let mut params = boot_params {
        hdr,
        acpi_rsdp_addr: acpi::RSDP_ADDR,
        ..Default::default()
    };
    let e820 = [
        (0, EBDA_START, E820_RAM),
        (
            acpi::TABLES_START,
            acpi::TABLES_END - acpi::TABLES_START,
            E820_ACPI,
        ),
        (HIMEM_START, ram_size - HIMEM_START, E820_RAM),
    ];
    for (i, &(addr, size, r#type)) in e820.iter().enumerate() {
        params.e820_table[i] = boot_e820_entry { addr, size, r#type };
    }
    params.e820_entries = e820.len() as u8;
    LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(
        &BootParams::new(&params, GuestAddress(ZERO_PAGE)),
        mem,
    )
    .map_err(|_| BootError::Write {
        what: "zero page",
        addr: ZERO_PAGE,
    })?;

    write_page_tables(mem)?;
    write_gdt(mem)?;
    Ok(BootInfo {
        entry: load + STARTUP_64_OFFSET,
        kernel_load: load,
        initrd,
    })
}

/// Identity-maps [0, 4 GiB) with 2 MiB pages.
fn write_page_tables(mem: &GuestMemoryMmap) -> Result<(), BootError> {
    let w = |v: u64, addr: u64, what| {
        mem.write_obj(v, GuestAddress(addr))
            .map_err(|_| BootError::Write { what, addr })
    };
    let table = (PML4Flags::P | PML4Flags::RW).bits();
    w(PDPT | table, PML4, "PML4")?;
    let pds = IDENTITY_MAPPED >> 30;
    for i in 0..pds {
        w(
            (PD + i * 0x1000) | (PDPTFlags::P | PDPTFlags::RW).bits(),
            PDPT + 8 * i,
            "PDPT",
        )?;
    }
    let huge = (PDFlags::P | PDFlags::RW | PDFlags::PS).bits();
    for i in 0..pds * 512 {
        w((i << 21) | huge, PD + 8 * i, "PD")?;
    }
    Ok(())
}

/// Segment descriptor flags as Linux's GDT_ENTRY() takes them.
const CODE64: u16 = 0xa09b;
const DATA: u16 = 0xc093;
const TSS: u16 = 0x808b;

/// The boot GDT: null, 64-bit code (0x08), data (0x10), TSS (0x18).
pub fn gdt() -> [u64; 4] {
    [
        0,
        gdt_entry(CODE64, 0, 0xfffff),
        gdt_entry(DATA, 0, 0xfffff),
        gdt_entry(TSS, 0, 0xfffff),
    ]
}

/// A segment descriptor (arch/x86/include/asm/segment.h GDT_ENTRY).
pub fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    let (flags, base, limit) = (u64::from(flags), u64::from(base), u64::from(limit));
    ((base & 0xff00_0000) << 32)
        | ((flags & 0xf0ff) << 40)
        | ((limit & 0xf_0000) << 32)
        | ((base & 0xff_ffff) << 16)
        | (limit & 0xffff)
}

/// The KVM segment register that loading descriptor `entry` as selector
/// `index * 8` produces.
pub fn segment(entry: u64, index: u16) -> kvm_segment {
    let bit = |n: u32| ((entry >> n) & 1) as u8;
    let g = bit(55);
    let raw_limit = (((entry >> 32) & 0xf_0000) | (entry & 0xffff)) as u32;
    let present = bit(47);
    kvm_segment {
        base: ((entry >> 32) & 0xff00_0000) | ((entry >> 16) & 0xff_ffff),
        limit: if g == 1 {
            (raw_limit << 12) | 0xfff
        } else {
            raw_limit
        },
        selector: index * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 3) as u8,
        db: bit(54),
        s: bit(44),
        l: bit(53),
        g,
        avl: bit(52),
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

fn write_gdt(mem: &GuestMemoryMmap) -> Result<(), BootError> {
    for (i, e) in gdt().iter().enumerate() {
        let addr = BOOT_GDT + 8 * i as u64;
        mem.write_obj(*e, GuestAddress(addr))
            .map_err(|_| BootError::Write { what: "GDT", addr })?;
    }
    mem.write_obj(0u64, GuestAddress(BOOT_IDT))
        .map_err(|_| BootError::Write {
            what: "IDT",
            addr: BOOT_IDT,
        })
}

/// Special registers for the 64-bit entry, starting from KVM's `base`.
pub fn sregs(base: kvm_sregs) -> kvm_sregs {
    let table = gdt();
    let code = segment(table[1], 1);
    let data = segment(table[2], 2);
    let mut s = base;
    s.gdt.base = BOOT_GDT;
    s.gdt.limit = (table.len() * 8 - 1) as u16;
    s.idt.base = BOOT_IDT;
    s.idt.limit = 7;
    s.cs = code;
    s.ds = data;
    s.es = data;
    s.fs = data;
    s.gs = data;
    s.ss = data;
    s.tr = segment(table[3], 3);
    s.cr0 |= (Cr0::CR0_PROTECTED_MODE | Cr0::CR0_ENABLE_PAGING).bits() as u64;
    s.cr3 = PML4;
    s.cr4 |= Cr4::CR4_ENABLE_PAE.bits() as u64;
    s.efer |= EFER_LME | EFER_LMA;
    s
}

/// General registers for the 64-bit entry at `entry`.
pub fn regs(entry: u64) -> kvm_regs {
    kvm_regs {
        rflags: 0x2,
        rip: entry,
        rsp: BOOT_STACK,
        rbp: BOOT_STACK,
        rsi: ZERO_PAGE,
        ..Default::default()
    }
}

/// x87/SSE state at entry (FNINIT's control word, default MXCSR).
pub fn fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

/// Local APIC LVT0 and LVT1 register offsets.
const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
/// LVT delivery modes (bits 8-10).
const APIC_MODE_EXTINT: u32 = 0x7;
const APIC_MODE_NMI: u32 = 0x4;

fn lapic_reg(l: &kvm_lapic_state, off: usize) -> u32 {
    u32::from_le_bytes(std::array::from_fn(|i| l.regs[off + i] as u8))
}

fn set_lapic_reg(l: &mut kvm_lapic_state, off: usize, v: u32) {
    for (i, b) in v.to_le_bytes().into_iter().enumerate() {
        l.regs[off + i] = b as _;
    }
}

/// Wires LINT0 as ExtINT (the 8259 PIC) and LINT1 as NMI, as a PC's
/// firmware does, so PIC interrupts reach the boot CPU before the guest
/// programs its I/O APIC.
pub fn set_lint(l: &mut kvm_lapic_state) {
    let lvt0 = lapic_reg(l, APIC_LVT0);
    set_lapic_reg(l, APIC_LVT0, (lvt0 & !0x700) | (APIC_MODE_EXTINT << 8));
    let lvt1 = lapic_reg(l, APIC_LVT1);
    set_lapic_reg(l, APIC_LVT1, (lvt1 & !0x700) | (APIC_MODE_NMI << 8));
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;
    use vm_memory::ByteValued;

    const RAM: u64 = 64 << 20;
    const SETUP_SECTS: u8 = 4;

    /// A bzImage-shaped file: a setup header and `payload` as the
    /// protected-mode kernel.
    fn bzimage(payload: &[u8], init_size: u32, xloadflags: u16) -> Vec<u8> {
        bzimage_at(payload, init_size, xloadflags, 0)
    }

    fn bzimage_at(payload: &[u8], init_size: u32, xloadflags: u16, pref: u64) -> Vec<u8> {
        let hdr = setup_header {
            pref_address: pref,
            setup_sects: SETUP_SECTS,
            boot_flag: 0xaa55,
            header: 0x5372_6448,
            version: 0x020f,
            loadflags: 1,
            code32_start: HIMEM_START as u32,
            initrd_addr_max: 0x7fff_ffff,
            kernel_alignment: 0x20_0000,
            relocatable_kernel: 1,
            xloadflags,
            cmdline_size: 2047,
            init_size,
            ..Default::default()
        };
        let mut img = vec![0u8; (usize::from(SETUP_SECTS) + 1) * 512];
        img[0x1f1..0x1f1 + hdr.as_slice().len()].copy_from_slice(hdr.as_slice());
        img.extend_from_slice(payload);
        img
    }

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), RAM as usize)]).unwrap()
    }

    #[test]
    fn cmdline_is_the_base_trimmed() {
        let c = build_cmdline(" console=ttyS0 panic=-1 ").unwrap();
        assert_eq!(
            c.as_cstring().unwrap().to_str().unwrap(),
            "console=ttyS0 panic=-1"
        );
        assert!(build_cmdline("bad\0").is_err());
        assert!(build_cmdline(&"x".repeat(CMDLINE_MAX)).is_err());
    }

    #[test]
    fn loads_kernel_initrd_cmdline_and_zero_page() {
        let m = mem();
        let payload: Vec<u8> = (0..8192u32).map(|i| i as u8).collect();
        let mut kernel = Cursor::new(bzimage(&payload, 0x40_0000, XLF_KERNEL_64));
        let initrd_data = vec![0x42u8; 10_000];
        let mut initrd = Cursor::new(initrd_data.clone());
        let cmdline = build_cmdline("console=ttyS0 panic=-1").unwrap();
        let info = load(&m, RAM, &mut kernel, Some((&mut initrd, 10_000)), &cmdline).unwrap();

        assert_eq!(info.entry, HIMEM_START + 0x200);
        let mut got = vec![0u8; payload.len()];
        m.read_slice(&mut got, GuestAddress(HIMEM_START)).unwrap();
        assert_eq!(got, payload);
        let (iaddr, isize) = info.initrd.unwrap();
        assert_eq!((iaddr, isize), ((RAM - 10_000) & !0xfff, 10_000));
        let mut got = vec![0u8; 10_000];
        m.read_slice(&mut got, GuestAddress(iaddr)).unwrap();
        assert_eq!(got, initrd_data);

        let p: boot_params = m.read_obj(GuestAddress(ZERO_PAGE)).unwrap();
        let hdr = p.hdr;
        assert_eq!({ hdr.cmd_line_ptr }, CMDLINE as u32);
        assert_eq!({ hdr.ramdisk_image }, iaddr as u32);
        assert_eq!({ hdr.ramdisk_size }, 10_000);
        assert_eq!({ hdr.type_of_loader }, 0xff);
        assert_eq!({ hdr.boot_flag }, 0xaa55);
        assert_eq!(p.e820_entries, 3);
        let e = p.e820_table;
        assert_eq!(
            ({ e[0].addr }, { e[0].size }, { e[0].r#type }),
            (0, EBDA_START, 1)
        );
        assert_eq!(
            ({ e[1].addr }, { e[1].size }, { e[1].r#type }),
            (0xe_0000, 0x2_0000, 3),
            "the ACPI tables are ACPI data, up to 1 MiB"
        );
        assert_eq!(
            ({ e[2].addr }, { e[2].size }, { e[2].r#type }),
            (HIMEM_START, RAM - HIMEM_START, 1)
        );
        assert_eq!({ p.acpi_rsdp_addr }, acpi::RSDP_ADDR);
        let mut c = vec![0u8; 64];
        m.read_slice(&mut c, GuestAddress(CMDLINE)).unwrap();
        let text = "console=ttyS0 panic=-1\0";
        assert_eq!(&c[..text.len()], text.as_bytes());
        assert_eq!({ hdr.cmdline_size } as usize, text.len() - 1);
    }

    #[test]
    fn rejects_bad_kernels_and_oversized_initrds() {
        let m = mem();
        let cmdline = build_cmdline("").unwrap();
        let none: Option<(&mut Cursor<Vec<u8>>, u64)> = None;
        let mut k32 = Cursor::new(bzimage(&[0; 512], 0, 0));
        assert!(matches!(
            load(&m, RAM, &mut k32, none, &cmdline),
            Err(BootError::Not64Bit(0))
        ));
        let mut junk = Cursor::new(vec![0u8; 8192]);
        let none: Option<(&mut Cursor<Vec<u8>>, u64)> = None;
        assert!(matches!(
            load(&m, RAM, &mut junk, none, &cmdline),
            Err(BootError::Kernel(_))
        ));
        let mut huge = Cursor::new(bzimage(&[0; 512], RAM as u32, XLF_KERNEL_64));
        let none: Option<(&mut Cursor<Vec<u8>>, u64)> = None;
        assert!(matches!(
            load(&m, RAM, &mut huge, none, &cmdline),
            Err(BootError::KernelTooBig { .. })
        ));
        let mut k = Cursor::new(bzimage(&[0; 512], 0x100_0000, XLF_KERNEL_64));
        let mut initrd = Cursor::new(vec![0u8; 48 << 20]);
        let err = load(&m, RAM, &mut k, Some((&mut initrd, 48 << 20)), &cmdline).unwrap_err();
        assert!(matches!(err, BootError::InitrdTooBig { .. }), "{err}");
        // 40 MiB of initrd (at 24 MiB) fits above 1 + 16 MiB, not above 16 + 16 MiB.
        let mut k = Cursor::new(bzimage(&[0; 512], 0x100_0000, XLF_KERNEL_64));
        let mut initrd = Cursor::new(vec![0u8; 40 << 20]);
        assert!(load(&m, RAM, &mut k, Some((&mut initrd, 40 << 20)), &cmdline).is_ok());
        let mut k = Cursor::new(bzimage_at(&[0; 512], 0x100_0000, XLF_KERNEL_64, 0x100_0000));
        let mut initrd = Cursor::new(vec![0u8; 40 << 20]);
        let err = load(&m, RAM, &mut k, Some((&mut initrd, 40 << 20)), &cmdline).unwrap_err();
        assert!(
            matches!(
                err,
                BootError::InitrdTooBig {
                    kernel_end: 0x200_0000,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn lint_delivery_modes() {
        let mut l = kvm_lapic_state::default();
        set_lapic_reg(&mut l, APIC_LVT0, 0x0001_0000); // masked
        set_lapic_reg(&mut l, APIC_LVT1, 0x0001_0700);
        set_lint(&mut l);
        assert_eq!(lapic_reg(&l, APIC_LVT0), 0x0001_0700);
        assert_eq!(lapic_reg(&l, APIC_LVT1), 0x0001_0400);
        assert_eq!(lapic_reg(&l, 0x340), 0, "neighbours untouched");
    }

    #[test]
    fn page_tables_identity_map_4g() {
        let m = mem();
        write_page_tables(&m).unwrap();
        let r = |a: u64| m.read_obj::<u64>(GuestAddress(a)).unwrap();
        assert_eq!(r(PML4), PDPT | 0x3);
        for i in 0..4 {
            assert_eq!(r(PDPT + 8 * i), (PD + 0x1000 * i) | 0x3);
        }
        assert_eq!(r(PD), 0x83);
        assert_eq!(r(PD + 8), (2 << 20) | 0x83);
        assert_eq!(
            r(PD + 8 * 2047),
            (2047 << 21) | 0x83,
            "last 2 MiB below 4 GiB"
        );
    }

    #[test]
    fn gdt_and_segments_match() {
        let t = gdt();
        assert_eq!(t[1], 0x00af_9b00_0000_ffff);
        assert_eq!(t[2], 0x00cf_9300_0000_ffff);
        assert_eq!(t[3], 0x008f_8b00_0000_ffff);
        let s = sregs(kvm_sregs::default());
        assert_eq!(
            (s.cs.selector, s.cs.l, s.cs.db, s.cs.type_, s.cs.present),
            (8, 1, 0, 0xb, 1)
        );
        assert_eq!(
            (s.ds.selector, s.ds.limit, s.ds.g, s.ds.type_),
            (0x10, 0xffff_ffff, 1, 3)
        );
        assert_eq!((s.tr.selector, s.tr.type_, s.tr.s), (0x18, 0xb, 0));
        assert_eq!(s.cr0 & 0x8000_0001, 0x8000_0001);
        assert_eq!(s.cr4 & 0x20, 0x20);
        assert_eq!(s.efer & 0x500, 0x500);
        assert_eq!((s.cr3, s.gdt.base, s.gdt.limit), (PML4, BOOT_GDT, 31));
        let r = regs(0x100200);
        assert_eq!(
            (r.rip, r.rsi, r.rsp, r.rflags),
            (0x100200, ZERO_PAGE, BOOT_STACK, 2)
        );
        let m = mem();
        write_gdt(&m).unwrap();
        assert_eq!(m.read_obj::<u64>(GuestAddress(BOOT_GDT + 8)).unwrap(), t[1]);
        assert_eq!(fpu().fcw, 0x37f);
    }
}
