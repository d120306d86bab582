//! What the VMM prints when `--timeout` stops a guest that stopped making
//! progress: the interrupt controllers and each vCPU, decoded into one line
//! each, so that a hang can be told apart (a masked or stuck interrupt line,
//! a timer armed far in the future, a vCPU halted with nothing pending).
//!
//! The KVM shell ([`crate::vmm`]) reads the state; the formatting here is
//! tested without KVM.

use std::fmt::Write;

/// I/O APIC redirection entry bits (82093AA datasheet, 3.2.4).
const RTE_VECTOR: u64 = 0xff;
const RTE_REMOTE_IRR: u64 = 1 << 14;
const RTE_LEVEL: u64 = 1 << 15;
const RTE_MASKED: u64 = 1 << 16;

/// One line for the in-kernel I/O APIC: every pin that is unmasked, has a
/// vector, or is pending, with its state.
pub fn ioapic_line(redir: &[u64], irr: u32) -> String {
    let mut s = format!("ioapic irr={irr:#x}");
    for (pin, &e) in redir.iter().enumerate() {
        let pending = irr & (1 << pin) != 0;
        if e & RTE_MASKED != 0 && !pending && e & RTE_VECTOR == 0 {
            continue;
        }
        let _ = write!(
            s,
            " pin{pin}:vec={:#x}{}{}{}{}",
            e & RTE_VECTOR,
            if e & RTE_LEVEL != 0 {
                ",level"
            } else {
                ",edge"
            },
            if e & RTE_MASKED != 0 { ",masked" } else { "" },
            if e & RTE_REMOTE_IRR != 0 {
                ",remote-irr"
            } else {
                ""
            },
            if pending { ",pending" } else { "" },
        );
    }
    s
}

/// Local APIC register offsets (SDM vol. 3, table 11-1).
const APIC_TPR: usize = 0x80;
const APIC_ISR: usize = 0x100;
const APIC_IRR: usize = 0x200;
const APIC_LVT_TIMER: usize = 0x320;
const APIC_TMICT: usize = 0x380;
const APIC_TMCCT: usize = 0x390;
const APIC_TDCR: usize = 0x3e0;
/// LVT timer mode field (bits 18:17): 2 = TSC deadline.
const LVT_TIMER_MODE_SHIFT: u32 = 17;

fn reg(page: &[u8], off: usize) -> u32 {
    page.get(off..off + 4)
        .map_or(0, |b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

/// Vectors set in the 256-bit register starting at `off` (8 x 32 bits,
/// 16 bytes apart).
fn vectors(page: &[u8], off: usize) -> Vec<u32> {
    (0..8u32)
        .flat_map(|i| {
            let w = reg(page, off + 16 * i as usize);
            (0..32)
                .filter(move |b| w & (1 << b) != 0)
                .map(move |b| 32 * i + b)
        })
        .collect()
}

/// One line for a vCPU: where it is, its local APIC and its TSC deadline.
pub fn vcpu_line(
    id: u8,
    rip: u64,
    rflags: u64,
    mp_state: u32,
    lapic: &[u8],
    tsc_deadline: u64,
    tsc: u64,
) -> String {
    let lvt = reg(lapic, APIC_LVT_TIMER);
    let mode = match (lvt >> LVT_TIMER_MODE_SHIFT) & 3 {
        0 => "oneshot",
        1 => "periodic",
        2 => "tsc-deadline",
        _ => "reserved",
    };
    let deadline = if tsc_deadline == 0 {
        "none".to_string()
    } else {
        format!(
            "{tsc_deadline:#x} ({} cycles from now)",
            tsc_deadline as i128 - tsc as i128
        )
    };
    format!(
        "vcpu{id} rip={rip:#x} rflags={rflags:#x} mp_state={mp_state} tpr={:#x} isr={:?} irr={:?} \
         timer={mode}{} vec={:#x} tmict={:#x} tmcct={:#x} tdcr={:#x} tsc={tsc:#x} tsc_deadline={deadline}",
        reg(lapic, APIC_TPR),
        vectors(lapic, APIC_ISR),
        vectors(lapic, APIC_IRR),
        if lvt & (1 << 16) != 0 { ",masked" } else { "" },
        lvt & 0xff,
        reg(lapic, APIC_TMICT),
        reg(lapic, APIC_TMCCT),
        reg(lapic, APIC_TDCR),
    )
}

/// The hang report's line for a vCPU whose state KVM refuses to the VMM
/// (a protected guest under `KVM_CAP_X86_PROTECTED_MEMORY`).
pub fn vcpu_locked_line(id: u8, mp_state: u32) -> String {
    format!(
        "vcpu{id} mp_state={mp_state} registers, local APIC and MSRs not readable: KVM keeps a \
         protected guest's vCPU state from the VMM (EPERM)"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioapic_shows_live_pins_only() {
        let mut redir = [RTE_MASKED; 24];
        redir[4] = 0x24; // COM1, edge, unmasked
        redir[5] = 0x25 | RTE_LEVEL | RTE_REMOTE_IRR;
        redir[6] = 0x26 | RTE_MASKED;
        let l = ioapic_line(&redir, 1 << 6);
        assert_eq!(
            l,
            "ioapic irr=0x40 pin4:vec=0x24,edge pin5:vec=0x25,level,remote-irr \
             pin6:vec=0x26,edge,masked,pending"
        );
    }

    #[test]
    fn a_locked_vcpu_says_what_is_missing() {
        let l = vcpu_locked_line(2, 3);
        assert!(l.starts_with("vcpu2 mp_state=3 "), "{l}");
        assert!(l.contains("not readable") && l.contains("EPERM"), "{l}");
        assert_eq!(l.lines().count(), 1);
    }

    #[test]
    fn vcpu_line_decodes_the_timer() {
        let mut page = vec![0u8; 1024];
        let mut put = |off: usize, v: u32| page[off..off + 4].copy_from_slice(&v.to_le_bytes());
        put(APIC_LVT_TIMER, (2 << 17) | 0xec);
        put(APIC_ISR + 16, 1 << 2); // vector 34
        put(APIC_IRR + 7 * 16, 1 << 31); // vector 255
        let l = vcpu_line(0, 0xffff_ffff_8100_0000, 0x246, 3, &page, 1500, 1000);
        assert!(
            l.starts_with("vcpu0 rip=0xffffffff81000000 rflags=0x246 mp_state=3"),
            "{l}"
        );
        assert!(l.contains("isr=[34] irr=[255]"), "{l}");
        assert!(l.contains("timer=tsc-deadline vec=0xec"), "{l}");
        assert!(
            l.contains("tsc_deadline=0x5dc (500 cycles from now)"),
            "{l}"
        );
        let none = vcpu_line(1, 0, 0, 0, &[0u8; 1024], 0, 7);
        assert!(
            none.contains("timer=oneshot") && none.contains("tsc_deadline=none"),
            "{none}"
        );
    }
}
