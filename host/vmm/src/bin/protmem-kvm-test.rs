//! `protmem-kvm-test`: checks the KVM side of protected memory against the
//! running kernel's KVM, in the spirit of the KVM selftests
//! (kvm_pv_test.c, private_mem_conversions_test.c).
//!
//! A tiny real-mode guest issues the protected-memory hypercalls with good
//! and bad arguments and stores each return value (EAX) in memory:
//! - with KVM_CAP_EXIT_HYPERCALL enabled for 13-15, well-formed calls exit
//!   to userspace carrying the right number and arguments, and the value
//!   userspace writes back reaches the guest; malformed SHARE/UNSHARE
//!   calls get -KVM_EINVAL without an exit;
//! - without the capability, every call gets -KVM_ENOSYS without an exit.
//!
//! Prints one `ok`/`not ok` line per check and `N passed, M failed`; exits
//! non-zero on any failure. Needs /dev/kvm.

#![deny(clippy::undocumented_unsafe_blocks)]

use std::process::ExitCode;

use hypercall::{
    KVM_EINVAL, KVM_ENOSYS, KVM_HC_ENABLE_MEM_PROTECTED, KVM_HC_MEM_SHARE, KVM_HC_MEM_UNSHARE,
};
use kvm_bindings::{kvm_enable_cap, kvm_userspace_memory_region, KVM_CAP_EXIT_HYPERCALL};
use kvm_ioctls::{Cap, Kvm, VcpuExit};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

/// Where the guest code starts.
const CODE: u64 = 0x1000;
/// Where the guest stores the return values, 4 bytes each.
const RESULTS: u16 = 0x3000;
/// Guest memory size.
const MEM: usize = 0x10000;
/// The value userspace returns for forwarded calls.
const FORWARDED_RET: u32 = 0x1234;

/// One hypercall the guest makes: number and EBX, ECX, EDX.
struct Call {
    nr: u64,
    args: [u32; 3],
}

/// The guest's calls, in order.
fn calls() -> Vec<Call> {
    let share = KVM_HC_MEM_SHARE;
    let unshare = KVM_HC_MEM_UNSHARE;
    vec![
        Call {
            nr: share,
            args: [0x2000, 3, 0],
        }, // forwarded
        Call {
            nr: share,
            args: [0x2001, 1, 0],
        }, // unaligned
        Call {
            nr: share,
            args: [0x2000, 0, 0],
        }, // zero pages
        Call {
            nr: unshare,
            args: [0x2000, 1, 1],
        }, // flags
        Call {
            nr: unshare,
            args: [0x4000, 2, 0],
        }, // forwarded
        Call {
            nr: KVM_HC_ENABLE_MEM_PROTECTED,
            args: [0; 3],
        }, // forwarded
    ]
}

/// Assembles the real-mode guest: for each call, load EAX/EBX/ECX/EDX,
/// execute the hypercall instruction, store EAX at RESULTS + 4 * i; HLT.
fn guest_code(calls: &[Call], vmmcall: bool) -> Vec<u8> {
    let mut c = Vec::new();
    for (i, call) in calls.iter().enumerate() {
        // 66 B8+r id: mov r32, imm32 (operand-size prefix in 16-bit mode).
        for (op, val) in [
            (0xb8u8, call.nr as u32),
            (0xbb, call.args[0]),
            (0xb9, call.args[1]),
            (0xba, call.args[2]),
        ] {
            c.extend_from_slice(&[0x66, op]);
            c.extend_from_slice(&val.to_le_bytes());
        }
        // vmmcall (AMD) or vmcall (Intel).
        c.extend_from_slice(if vmmcall {
            &[0x0f, 0x01, 0xd9]
        } else {
            &[0x0f, 0x01, 0xc1]
        });
        // 66 A3 moffs16: mov [moffs16], eax.
        c.extend_from_slice(&[0x66, 0xa3]);
        c.extend_from_slice(&(RESULTS + 4 * i as u16).to_le_bytes());
    }
    c.push(0xf4); // hlt
    c
}

fn is_amd() -> bool {
    let r = std::arch::x86_64::__cpuid(0);
    let mut v = Vec::new();
    for w in [r.ebx, r.edx, r.ecx] {
        v.extend_from_slice(&w.to_le_bytes());
    }
    v == b"AuthenticAMD" || v == b"HygonGenuine"
}

/// A forwarded exit as userspace saw it.
#[derive(Debug, PartialEq, Eq)]
struct Seen {
    nr: u64,
    args: [u64; 3],
}

/// Runs the guest once with `mask` enabled in KVM_CAP_EXIT_HYPERCALL
/// (none if 0); returns the forwarded exits and the guest's results.
fn run(kvm: &Kvm, mask: u64, code: &[u8], ncalls: usize) -> Result<(Vec<Seen>, Vec<u32>), String> {
    let vm = kvm.create_vm().map_err(|e| format!("KVM_CREATE_VM: {e}"))?;
    if mask != 0 {
        let cap = kvm_enable_cap {
            cap: KVM_CAP_EXIT_HYPERCALL,
            args: [mask, 0, 0, 0],
            ..Default::default()
        };
        vm.enable_cap(&cap)
            .map_err(|e| format!("KVM_ENABLE_CAP(EXIT_HYPERCALL, {mask:#x}): {e}"))?;
    }
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM)])
        .map_err(|e| format!("guest memory: {e}"))?;
    mem.write_slice(code, GuestAddress(CODE))
        .map_err(|e| format!("loading code: {e}"))?;
    let host = mem
        .get_host_address(GuestAddress(0))
        .map_err(|e| format!("host address: {e}"))?;
    let region = kvm_userspace_memory_region {
        slot: 0,
        flags: 0,
        guest_phys_addr: 0,
        memory_size: MEM as u64,
        userspace_addr: host as u64,
    };
    // SAFETY: `host` maps MEM bytes owned by `mem`, which outlives the VM
    // (both are dropped at the end of this function, the VM first).
    unsafe { vm.set_user_memory_region(region) }
        .map_err(|e| format!("KVM_SET_USER_MEMORY_REGION: {e}"))?;
    let mut vcpu = vm
        .create_vcpu(0)
        .map_err(|e| format!("KVM_CREATE_VCPU: {e}"))?;
    let mut sregs = vcpu
        .get_sregs()
        .map_err(|e| format!("KVM_GET_SREGS: {e}"))?;
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    sregs.ds.base = 0;
    sregs.ds.selector = 0;
    vcpu.set_sregs(&sregs)
        .map_err(|e| format!("KVM_SET_SREGS: {e}"))?;
    let mut regs = vcpu.get_regs().map_err(|e| format!("KVM_GET_REGS: {e}"))?;
    regs.rip = CODE;
    regs.rflags = 2;
    vcpu.set_regs(&regs)
        .map_err(|e| format!("KVM_SET_REGS: {e}"))?;

    let mut seen = Vec::new();
    loop {
        match vcpu.run().map_err(|e| format!("KVM_RUN: {e}"))? {
            VcpuExit::Hypercall(h) => {
                seen.push(Seen {
                    nr: h.nr,
                    args: [h.args[0], h.args[1], h.args[2]],
                });
                *h.ret = u64::from(FORWARDED_RET);
                if seen.len() > ncalls {
                    return Err("more hypercall exits than calls".into());
                }
            }
            VcpuExit::Hlt => break,
            other => return Err(format!("unexpected exit {other:?}")),
        }
    }
    let mut results = Vec::new();
    for i in 0..ncalls {
        let v: u32 = mem
            .read_obj(GuestAddress(u64::from(RESULTS) + 4 * i as u64))
            .map_err(|e| format!("reading results: {e}"))?;
        results.push(v);
    }
    Ok((seen, results))
}

/// -err as the guest sees it in a 32-bit EAX.
fn neg32(err: u64) -> u32 {
    (err as u32).wrapping_neg()
}

fn main() -> ExitCode {
    let mut passed = 0;
    let mut failed = 0;
    let mut check = |name: &str, ok: bool, detail: String| {
        if ok {
            passed += 1;
            println!("protmem-kvm-test: ok {name}");
        } else {
            failed += 1;
            println!("protmem-kvm-test: not ok {name}: {detail}");
        }
    };
    let kvm = match Kvm::new() {
        Ok(k) => k,
        Err(e) => {
            println!("protmem-kvm-test: cannot open /dev/kvm: {e}");
            println!("0 passed, 1 failed");
            return ExitCode::FAILURE;
        }
    };
    let offered = kvm.check_extension_int(Cap::ExitHypercall).max(0) as u64;
    let ours =
        (1 << KVM_HC_ENABLE_MEM_PROTECTED) | (1 << KVM_HC_MEM_SHARE) | (1 << KVM_HC_MEM_UNSHARE);
    check(
        "KVM_CAP_EXIT_HYPERCALL offers hypercalls 13-15",
        offered & ours == ours,
        format!("mask {offered:#x}, need {ours:#x}"),
    );
    let list = calls();
    let code = guest_code(&list, is_amd());

    match run(&kvm, ours, &code, list.len()) {
        Ok((seen, res)) => {
            let want = vec![
                Seen {
                    nr: KVM_HC_MEM_SHARE,
                    args: [0x2000, 3, 0],
                },
                Seen {
                    nr: KVM_HC_MEM_UNSHARE,
                    args: [0x4000, 2, 0],
                },
                Seen {
                    nr: KVM_HC_ENABLE_MEM_PROTECTED,
                    args: [0, 0, 0],
                },
            ];
            check(
                "well-formed calls exit with their number and arguments",
                seen == want,
                format!("{seen:?}"),
            );
            let fwd = [res[0], res[4], res[5]];
            check(
                "userspace's return value reaches the guest",
                fwd == [FORWARDED_RET; 3],
                format!("{fwd:#x?}"),
            );
            let einval = neg32(KVM_EINVAL);
            check(
                "unaligned GPA: -KVM_EINVAL, no exit",
                res[1] == einval,
                format!("{:#x}", res[1]),
            );
            check(
                "zero pages: -KVM_EINVAL, no exit",
                res[2] == einval,
                format!("{:#x}", res[2]),
            );
            check(
                "nonzero flags: -KVM_EINVAL, no exit",
                res[3] == einval,
                format!("{:#x}", res[3]),
            );
        }
        Err(e) => check("guest run with the capability", false, e),
    }
    match run(&kvm, 0, &code, list.len()) {
        Ok((seen, res)) => {
            check(
                "without the capability: no exit",
                seen.is_empty(),
                format!("{seen:?}"),
            );
            let enosys = neg32(KVM_ENOSYS);
            check(
                "without the capability: -KVM_ENOSYS for every call",
                res.iter().all(|&r| r == enosys),
                format!("{res:#x?}"),
            );
        }
        Err(e) => check("guest run without the capability", false, e),
    }
    println!("{passed} passed, {failed} failed");
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_encodes_each_call() {
        let c = guest_code(
            &[Call {
                nr: 14,
                args: [0x2000, 1, 0],
            }],
            true,
        );
        // 4 x (66 op imm32) + vmmcall + (66 A3 disp16) + hlt.
        assert_eq!(c.len(), 4 * 6 + 3 + 4 + 1);
        assert_eq!(&c[..6], &[0x66, 0xb8, 14, 0, 0, 0]);
        assert_eq!(&c[24..27], &[0x0f, 0x01, 0xd9]);
        assert_eq!(&c[27..31], &[0x66, 0xa3, 0x00, 0x30]);
        assert_eq!(c[31], 0xf4);
        assert_eq!(
            &guest_code(
                &[Call {
                    nr: 1,
                    args: [0; 3]
                }],
                false
            )[24..27],
            &[0x0f, 0x01, 0xc1]
        );
    }

    #[test]
    fn negative_errors_in_eax() {
        assert_eq!(neg32(22), 0xffff_ffea);
        assert_eq!(neg32(1000), 0xffff_fc18);
    }
}
