//! Reading or writing vCPU state while an exit is not complete.
//!
//! After `KVM_EXIT_MMIO` or `KVM_EXIT_IO` the instruction is only finished
//! by the next `KVM_RUN` (api.rst: userspace re-enters with `immediate_exit`
//! set "to complete pending operations without allowing any further
//! instructions to be executed"). `KVM_SET_REGS` in between marks the
//! emulator's register cache stale: the completion then re-reads the
//! registers and drops the read's destination register, so a
//! `mov eax, [mmio]` keeps the old EAX. A guest whose interrupt handler
//! loses the status it read this way never acknowledges the interrupt and
//! waits for its I/O forever; that is how `--hostile` (which writes back
//! the registers it read, in `--protect=view`) once left the guest of the
//! `hostile-view` scenario hung. The VMM therefore touches vCPU state only
//! after a `KVM_RUN` that returned `EINTR`; this checks that rule, and
//! shows the loss without it.

use kvm_ioctls::{Kvm, VcpuExit};

use crate::asm::{Asm, R};
use crate::{guest_memory, plain_vm, CODE};

/// The MMIO read's source: segment 0x2000, past the only memslot.
const MMIO_SEG: u16 = 0x2000;
/// What EAX holds before the read, and what the read returns.
const BEFORE: u32 = 0x0bad_0bad;
const READ: u32 = 0x600d_600d;
/// The port the guest reports EAX on.
const PORT: u8 = 0xe2;

/// `mov eax, BEFORE; mov eax, [MMIO]; out PORT, eax; hlt`.
fn program() -> Vec<u8> {
    let mut a = Asm::default();
    a.mov16(R::Ax, MMIO_SEG).ds_from_ax();
    a.mov32(R::Ax, BEFORE).load_eax(0).out_eax(PORT).hlt();
    a.0
}

/// Runs the program; at the MMIO read exit, answers READ, then (with
/// `complete_first`, as the VMM does) completes it with `immediate_exit`
/// before `KVM_GET_REGS` + `KVM_SET_REGS` of the same values. Returns the
/// EAX the guest reported.
fn run(kvm: &Kvm, complete_first: bool) -> Result<u32, String> {
    let (_mem, host) = guest_memory(&[(CODE, &program())])?;
    // SAFETY: `_mem` maps MEM bytes at `host` and is dropped after the VM
    // (declared first).
    let (_vm, mut vcpu) = unsafe { plain_vm(kvm, host) }?;
    let mut reported = None;
    for _ in 0..16 {
        let mut pending = false;
        match vcpu.run().map_err(|e| format!("KVM_RUN: {e}"))? {
            VcpuExit::MmioRead(_, data) => {
                let n = data.len().min(4);
                data[..n].copy_from_slice(&READ.to_le_bytes()[..n]);
                pending = true;
            }
            VcpuExit::IoOut(port, data) if port == u16::from(PORT) && data.len() == 4 => {
                reported = Some(u32::from_le_bytes([data[0], data[1], data[2], data[3]]));
            }
            VcpuExit::Hlt => break,
            other => return Err(format!("unexpected exit {other:?}")),
        }
        if !pending {
            continue;
        }
        if complete_first {
            vcpu.set_kvm_immediate_exit(1);
            let r = match vcpu.run() {
                Err(e) if e.errno() == libc::EINTR => Ok(()),
                Err(e) => Err(format!("KVM_RUN with immediate_exit: {e}")),
                Ok(exit) => Err(format!("KVM_RUN with immediate_exit ran on: {exit:?}")),
            };
            vcpu.set_kvm_immediate_exit(0);
            r?;
        }
        let regs = vcpu.get_regs().map_err(|e| format!("KVM_GET_REGS: {e}"))?;
        vcpu.set_regs(&regs)
            .map_err(|e| format!("KVM_SET_REGS: {e}"))?;
    }
    reported.ok_or_else(|| "the guest reported nothing".into())
}

pub fn checks(kvm: &Kvm, check: &mut dyn FnMut(&str, bool, String)) {
    let without = match run(kvm, false) {
        Ok(v) => format!("{v:#x}"),
        Err(e) => e,
    };
    match run(kvm, true) {
        Ok(v) => check(
            "vCPU state written after an MMIO read completed (immediate_exit): the guest gets the read value",
            v == READ,
            format!("eax {v:#x}, want {READ:#x}; written before completing: eax {without}"),
        ),
        Err(e) => check("MMIO read completed before a state write", false, e),
    }
    println!(
        "protmem-kvm-test: info: KVM_SET_REGS before the MMIO read completed: eax {without} (read {READ:#x}, before {BEFORE:#x})"
    );
}
