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
//! - without the capability, every call gets -KVM_ENOSYS without an exit;
//! - guest_memfd (`KVM_SW_PROTECTED_POPULATE`, in the pattern of
//!   private_mem_conversions_test.c): in a stock software-protected VM,
//!   where userspace sets the memory attributes, a guest running from a
//!   shared page reads byte patterns from private pages that userspace
//!   populated, not what the shared backing holds; conversions private ->
//!   shared -> private and punching the guest_memfd give the contents the
//!   API promises; the populate ioctl rejects bad arguments with the
//!   documented errno;
//! - KVM-owned protected memory (`KVM_CAP_X86_PROTECTED_MEMORY`, [`owned`]):
//!   KVM applies the hypercalls, the VMM can refuse but not fake one, every
//!   operation that would read or change private memory or vCPU state
//!   fails with EPERM, and the instruction emulator reads and writes
//!   private memory (string I/O, `movs` from MMIO, `cmpxchg`, hypercall
//!   patching) with the data checked;
//! - the conversion race of SMP guests ([`race`]): one vCPU converts a
//!   page back and forth while another reads across into it; every
//!   `KVM_EXIT_MEMORY_FAULT` is re-entered as the VMM does;
//! - vCPU state written between an MMIO exit and its completion
//!   ([`pending`]): the VMM completes the exit first.
//!
//! Prints one `ok`/`not ok` line per check and `N passed, M failed`; exits
//! non-zero on any failure. Needs /dev/kvm.

#![deny(clippy::undocumented_unsafe_blocks)]

mod asm;
mod owned;
mod pending;
mod race;

use std::process::ExitCode;

use hypercall::{
    KVM_EINVAL, KVM_ENOSYS, KVM_HC_ENABLE_MEM_PROTECTED, KVM_HC_MEM_SHARE, KVM_HC_MEM_UNSHARE,
};
use kvm_bindings::{kvm_enable_cap, kvm_userspace_memory_region, KVM_CAP_EXIT_HYPERCALL};
use kvm_ioctls::{Cap, Kvm, VcpuExit, VcpuFd, VmFd};
use kvm_protmem_vmm::gmem_kvm::{
    self, KvmPrivate, KvmSwProtectedPopulate, KVM_CAP_SW_PROTECTED_POPULATE,
    KVM_SW_PROTECTED_POPULATE,
};
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
    let (mem, host) = guest_memory(&[(CODE, code)])?;
    // SAFETY: `mem` maps MEM bytes at `host` and is dropped after the VM
    // (declared first).
    let (vm, mut vcpu) = unsafe { plain_vm(kvm, host) }?;
    if mask != 0 {
        let cap = kvm_enable_cap {
            cap: KVM_CAP_EXIT_HYPERCALL,
            args: [mask, 0, 0, 0],
            ..Default::default()
        };
        vm.enable_cap(&cap)
            .map_err(|e| format!("KVM_ENABLE_CAP(EXIT_HYPERCALL, {mask:#x}): {e}"))?;
    }

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

/// MEM bytes of guest memory at GPA 0, each `(gpa, bytes)` of `code`
/// loaded; returns it and its host address.
fn guest_memory(code: &[(u64, &[u8])]) -> Result<(GuestMemoryMmap, u64), String> {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM)])
        .map_err(|e| format!("guest memory: {e}"))?;
    for &(gpa, bytes) in code {
        mem.write_slice(bytes, GuestAddress(gpa))
            .map_err(|e| format!("loading code at {gpa:#x}: {e}"))?;
    }
    let host = mem
        .get_host_address(GuestAddress(0))
        .map_err(|e| format!("host address: {e}"))?;
    Ok((mem, host as u64))
}

/// A VM of the default type with MEM bytes at `host` as its RAM from GPA
/// 0, and vCPU 0 in real mode at CODE.
///
/// # Safety
///
/// `host` maps MEM bytes (from [`guest_memory`]) that outlive the VM.
unsafe fn plain_vm(kvm: &Kvm, host: u64) -> Result<(VmFd, VcpuFd), String> {
    let vm = kvm.create_vm().map_err(|e| format!("KVM_CREATE_VM: {e}"))?;
    let region = kvm_userspace_memory_region {
        slot: 0,
        flags: 0,
        guest_phys_addr: 0,
        memory_size: MEM as u64,
        userspace_addr: host,
    };
    // SAFETY: the caller's promise: `host` maps MEM bytes that outlive the
    // VM.
    unsafe { vm.set_user_memory_region(region) }
        .map_err(|e| format!("KVM_SET_USER_MEMORY_REGION: {e}"))?;
    let vcpu = vm
        .create_vcpu(0)
        .map_err(|e| format!("KVM_CREATE_VCPU: {e}"))?;
    enter_real_mode_at_code(&vcpu)?;
    Ok((vm, vcpu))
}

/// Private pages of the guest_memfd test and where the guest reports what
/// it read from each (first and last dword).
const GM_DATA: [u64; 4] = [0x4000, 0x5000, 0x6000, 0x7000];
const GM_REPORT: u16 = 0x3000;

/// Real-mode code: for each data page, copy its first and last dword to
/// GM_REPORT; HLT.
fn gmem_guest_code() -> Vec<u8> {
    let mut c = Vec::new();
    let mut out = GM_REPORT;
    for page in GM_DATA {
        for off in [0u16, 0xffc] {
            c.extend_from_slice(&[0x66, 0xa1]); // mov eax, [moffs16]
            c.extend_from_slice(&(page as u16 + off).to_le_bytes());
            c.extend_from_slice(&[0x66, 0xa3]); // mov [moffs16], eax
            c.extend_from_slice(&out.to_le_bytes());
            out += 4;
        }
    }
    c.push(0xf4);
    c
}

/// The dword pattern of page `gpa` for `tag` (never 0).
fn pattern(tag: u8, gpa: u64) -> u32 {
    u32::from_le_bytes([tag, (gpa >> 12) as u8, 0x5a, 0xa5])
}

/// Fills the page at `gpa` of `mem` with `pattern(tag, gpa)`.
fn fill(mem: &GuestMemoryMmap, gpa: u64, tag: u8) -> Result<(), String> {
    let page: Vec<u8> = std::iter::repeat_n(pattern(tag, gpa).to_le_bytes(), 1024)
        .flatten()
        .collect();
    mem.write_slice(&page, GuestAddress(gpa))
        .map_err(|e| format!("filling {gpa:#x}: {e}"))
}

/// One software-protected VM with a guest_memfd slot over `mem`.
struct GmemVm {
    vm: std::sync::Arc<VmFd>,
    vcpu: VcpuFd,
    private: KvmPrivate,
    mem: GuestMemoryMmap,
}

impl GmemVm {
    fn new(kvm: &Kvm) -> Result<Self, String> {
        let vm = kvm
            .create_vm_with_type(gmem_kvm::VM_TYPE)
            .map_err(|e| format!("KVM_CREATE_VM(SW_PROTECTED): {e}"))?;
        let (mem, host) = guest_memory(&[(CODE, &gmem_guest_code())])?;
        // SAFETY: `mem` maps MEM bytes and lives in the returned struct
        // with the VM, which is dropped before it (field order).
        let gmem =
            unsafe { gmem_kvm::add_gmem_slot(&vm, MEM as u64, host) }.map_err(|e| e.to_string())?;
        let vcpu = vm
            .create_vcpu(0)
            .map_err(|e| format!("KVM_CREATE_VCPU: {e}"))?;
        let vm = std::sync::Arc::new(vm);
        let private = KvmPrivate::new(vm.clone(), gmem, host);
        Ok(GmemVm {
            vm,
            vcpu,
            private,
            mem,
        })
    }

    /// Runs the guest from CODE to HLT; returns its reports.
    fn run(&mut self) -> Result<Vec<u32>, String> {
        enter_real_mode_at_code(&self.vcpu)?;
        match self.vcpu.run().map_err(|e| format!("KVM_RUN: {e}"))? {
            VcpuExit::Hlt => {}
            other => return Err(format!("unexpected exit {other:?}")),
        }
        (0..GM_DATA.len() * 2)
            .map(|i| {
                self.mem
                    .read_obj::<u32>(GuestAddress(u64::from(GM_REPORT) + 4 * i as u64))
                    .map_err(|e| format!("reading reports: {e}"))
            })
            .collect()
    }

    /// Raw KVM_SW_PROTECTED_POPULATE; the errno on failure.
    fn populate_raw(&self, mut arg: KvmSwProtectedPopulate) -> Result<(), i32> {
        populate_ioctl(&self.vm, &mut arg)
    }
}

fn populate_ioctl(vm: &VmFd, arg: &mut KvmSwProtectedPopulate) -> Result<(), i32> {
    // SAFETY: the ioctl reads and writes one `KvmSwProtectedPopulate`; the
    // source pages are only read (through GUP) if the checks pass.
    let rc = unsafe { vmm_sys_util::ioctl::ioctl_with_mut_ref(vm, KVM_SW_PROTECTED_POPULATE, arg) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
    }
}

/// The guest_memfd checks; each result goes to `check`.
fn gmem_checks(kvm: &Kvm, check: &mut dyn FnMut(&str, bool, String)) {
    let sys = kvm.check_extension_raw(KVM_CAP_SW_PROTECTED_POPULATE.into());
    check(
        "gmem: KVM_CAP_SW_PROTECTED_POPULATE on /dev/kvm",
        sys == 1,
        format!("{sys}"),
    );
    if let Err(e) = gmem_kvm::check_host(kvm) {
        check(
            "gmem: host offers SW-protected VMs and guest_memfd",
            false,
            e.to_string(),
        );
        return;
    }
    let mut g = match GmemVm::new(kvm) {
        Ok(g) => g,
        Err(e) => {
            return check(
                "gmem: software-protected VM with a guest_memfd slot",
                false,
                e,
            )
        }
    };
    let on_vm =
        g.vm.check_extension_raw(KVM_CAP_SW_PROTECTED_POPULATE.into());
    check(
        "gmem: capability on a SW-protected VM",
        on_vm == 1,
        format!("{on_vm}"),
    );
    let (first, len) = (GM_DATA[0], GM_DATA.len() as u64 * 0x1000);
    // A source buffer apart from guest RAM, with pattern A.
    let src = match GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(first), len as usize)]) {
        Ok(m) => m,
        Err(e) => return check("gmem: source buffer", false, e.to_string()),
    };
    let src_host = src
        .get_host_address(GuestAddress(first))
        .map_or(0, |p| p as u64);
    let setup = || -> Result<(), String> {
        for &p in &GM_DATA {
            fill(&src, p, b'A')?;
            fill(&g.mem, p, b'S')?;
        }
        set_private(&g.vm, first, len, true)?;
        let mut arg = KvmSwProtectedPopulate {
            gpa: first,
            size: len,
            source: src_host,
            ..Default::default()
        };
        populate_ioctl(&g.vm, &mut arg).map_err(|e| format!("populate: errno {e}"))?;
        if arg.size != 0 || arg.gpa != first + len || arg.source != src_host + len {
            return Err(format!("populate left {arg:?}"));
        }
        Ok(())
    };
    if let Err(e) = setup() {
        return check(
            "gmem: populate private pages from a userspace buffer",
            false,
            e,
        );
    }
    fn step(check: &mut dyn FnMut(&str, bool, String), name: &str, tags: [u8; 4], g: &mut GmemVm) {
        let want: Vec<u32> = GM_DATA
            .iter()
            .zip(tags)
            .flat_map(|(&p, t)| {
                let v = if t == 0 { 0 } else { pattern(t, p) };
                [v, v]
            })
            .collect();
        match g.run() {
            Ok(seen) => check(name, seen == want, format!("{seen:#x?}")),
            Err(e) => check(name, false, e),
        }
    }
    step(
        check,
        "gmem: the guest reads the populated private data, not the shared backing",
        [b'A'; 4],
        &mut g,
    );
    // Private -> shared: the guest sees what the shared side holds.
    let p1 = GM_DATA[1];
    let conv = set_private(&g.vm, p1, 0x1000, false)
        .and_then(|()| punch_gmem(g.private.file(), p1, 0x1000));
    check(
        "gmem: convert a page to shared and punch its private page",
        conv.is_ok(),
        format!("{conv:?}"),
    );
    let _ = fill(&g.mem, p1, b'C');
    step(
        check,
        "gmem: after private->shared the guest reads the shared backing",
        [b'A', b'C', b'A', b'A'],
        &mut g,
    );
    // Shared -> private: a new, zeroed private page.
    let conv = set_private(&g.vm, p1, 0x1000, true);
    check(
        "gmem: convert the page back to private",
        conv.is_ok(),
        format!("{conv:?}"),
    );
    step(
        check,
        "gmem: after shared->private the page reads zero (new backing), not the shared data",
        [b'A', 0, b'A', b'A'],
        &mut g,
    );
    // Punching a private page loses its contents.
    let punched = punch_gmem(g.private.file(), GM_DATA[2], 0x1000);
    check(
        "gmem: punch a private page",
        punched.is_ok(),
        format!("{punched:?}"),
    );
    step(
        check,
        "gmem: a punched private page reads zero",
        [b'A', 0, 0, b'A'],
        &mut g,
    );
    // Userspace cannot read the guest_memfd.
    let mut buf = [0u8; 8];
    let gfd = gmem_fd_read(&g, &mut buf);
    check(
        "gmem: read() of the guest_memfd fails",
        gfd.is_err(),
        format!("{gfd:?} {buf:?}"),
    );

    // Argument checks.
    let base = KvmSwProtectedPopulate {
        gpa: GM_DATA[3],
        size: 0x1000,
        source: src_host,
        ..Default::default()
    };
    let cases: Vec<(&str, KvmSwProtectedPopulate, i32)> = vec![
        (
            "unaligned gpa",
            KvmSwProtectedPopulate {
                gpa: base.gpa + 8,
                ..base
            },
            libc::EINVAL,
        ),
        (
            "unaligned size",
            KvmSwProtectedPopulate {
                size: 0x800,
                ..base
            },
            libc::EINVAL,
        ),
        (
            "zero size",
            KvmSwProtectedPopulate { size: 0, ..base },
            libc::EINVAL,
        ),
        (
            "unaligned source",
            KvmSwProtectedPopulate {
                source: src_host + 1,
                ..base
            },
            libc::EINVAL,
        ),
        (
            "nonzero flags",
            KvmSwProtectedPopulate { flags: 1, ..base },
            libc::EINVAL,
        ),
        (
            "nonzero padding",
            KvmSwProtectedPopulate {
                padding: [0, 0, 0, 1],
                ..base
            },
            libc::EINVAL,
        ),
        (
            "range past the slot",
            KvmSwProtectedPopulate {
                size: MEM as u64,
                ..base
            },
            libc::EINVAL,
        ),
        (
            "gpa wraps",
            KvmSwProtectedPopulate {
                gpa: !0xfff,
                size: 0x2000,
                ..base
            },
            libc::EINVAL,
        ),
        (
            "shared range",
            KvmSwProtectedPopulate { gpa: CODE, ..base },
            libc::EPERM,
        ),
    ];
    for (name, arg, errno) in cases {
        let r = g.populate_raw(arg);
        check(
            &format!("gmem: populate with {name}: errno {errno}"),
            r == Err(errno),
            format!("{r:?}"),
        );
    }
    match kvm.create_vm() {
        Ok(plain) => {
            let mut arg = base;
            let r = populate_ioctl(&plain, &mut arg);
            let cap = plain.check_extension_raw(KVM_CAP_SW_PROTECTED_POPULATE.into());
            check(
                "gmem: a default VM has no populate (capability 0, EINVAL)",
                r == Err(libc::EINVAL) && cap == 0,
                format!("{r:?} cap {cap}"),
            );
        }
        Err(e) => check("gmem: default VM", false, e.to_string()),
    }
}

/// `KVM_SET_MEMORY_ATTRIBUTES`: `len` bytes at `gpa` private or shared.
fn set_private(vm: &VmFd, gpa: u64, len: u64, private: bool) -> Result<(), String> {
    let attributes = if private {
        u64::from(kvm_bindings::KVM_MEMORY_ATTRIBUTE_PRIVATE)
    } else {
        0
    };
    vm.set_memory_attributes(kvm_bindings::kvm_memory_attributes {
        address: gpa,
        size: len,
        attributes,
        flags: 0,
    })
    .map_err(|e| format!("KVM_SET_MEMORY_ATTRIBUTES({gpa:#x}+{len:#x}, {attributes:#x}): {e}"))
}

/// `fallocate(PUNCH_HOLE)` of `len` bytes at `offset` of a guest_memfd.
fn punch_gmem(gmem: &std::fs::File, offset: u64, len: u64) -> Result<(), String> {
    use std::os::fd::AsRawFd;
    // SAFETY: fallocate on a descriptor the caller owns; it changes file
    // contents only.
    let rc = unsafe {
        libc::fallocate(
            gmem.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset as libc::off_t,
            len as libc::off_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(format!(
            "fallocate(PUNCH_HOLE, {offset:#x}+{len:#x}): {}",
            std::io::Error::last_os_error()
        ))
    }
}

/// Tries to read the guest_memfd of `g` (it must fail).
fn gmem_fd_read(g: &GmemVm, buf: &mut [u8]) -> Result<usize, String> {
    use std::os::unix::fs::FileExt;
    g.private
        .file()
        .read_at(buf, GM_DATA[0])
        .map_err(|e| e.to_string())
}

/// Points `vcpu` at CODE in real mode with flat CS and DS at 0.
fn enter_real_mode_at_code(vcpu: &VcpuFd) -> Result<(), String> {
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
        .map_err(|e| format!("KVM_SET_REGS: {e}"))
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
    gmem_checks(&kvm, &mut check);
    owned::checks(&kvm, &mut check);
    race::checks(&kvm, &mut check);
    pending::checks(&kvm, &mut check);
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
