//! KVM-owned protected memory (`KVM_CAP_X86_PROTECTED_MEMORY`), checked
//! the way the hostile VMM of the end-to-end tests would attack it, with a
//! guest small enough to see every byte.
//!
//! A real-mode guest enables protection, keeps secrets in private pages,
//! shares one page, has one SHARE refused and one UNSHARE answered by a
//! VMM that lies (it says yes and changes nothing on its side), then drives
//! the instruction emulator over private memory: `rep insb` into a private
//! buffer and `rep outsb` out of it, `rep movsb` from MMIO into private
//! memory, a force-emulated `lock cmpxchg` on a private dword, and a
//! hypercall with the other vendor's instruction, which KVM patches in
//! guest memory. It reports every value through port I/O, because the
//! test, like a VMM, cannot read private memory; the test compares them
//! with what the guest must see, and checks that its own mapping of guest
//! RAM (the shared backing) holds none of it. After the guest halts, every
//! operation that would read or change private memory or vCPU state must
//! fail with EPERM.

use std::os::fd::AsRawFd;
use std::sync::mpsc;
use std::time::Duration;

use hypercall::{KVM_EFAULT, KVM_HC_ENABLE_MEM_PROTECTED, KVM_HC_MEM_SHARE, KVM_HC_MEM_UNSHARE};
use kvm_bindings::{kvm_enable_cap, kvm_userspace_memory_region, kvm_userspace_memory_region2};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use kvm_protmem_vmm::gmem_kvm::{
    self, KvmSwProtectedPopulate, KVM_CAP_X86_PROTECTED_MEMORY, KVM_EXIT_HYPERCALL_APPLIED,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::asm::{Asm, R};
use crate::{
    enter_real_mode_at_code, guest_memory, is_amd, populate_ioctl, punch_gmem, set_private, CODE,
    MEM,
};

/// Private page with the first secret.
const SECRET_PAGE: u16 = 0x4000;
/// Shared by the guest, later taken back with an UNSHARE the VMM lies about.
const Q1: u16 = 0x5000;
/// A SHARE the VMM refuses.
const Q2: u16 = 0x6000;
/// The dword the guest exchanges with a force-emulated `lock cmpxchg`.
const XCHG: u16 = 0x7000;
/// `rep insb` target and `rep movsb` target, both private.
const INS_BUF: u16 = 0x8100;
const MOVS_BUF: u16 = 0x8200;
/// Bytes moved by `rep insb` and `rep movsb`.
const INS_LEN: u16 = 64;
const MOVS_LEN: u16 = 16;
/// MMIO source of `rep movsb` (no memslot there): segment 0x2000.
const MMIO_SEG: u16 = 0x2000;
const MMIO_BASE: u64 = (MMIO_SEG as u64) << 4;
/// Ports: `rep insb` source, `rep outsb` sink, dword reports.
const PORT_IN: u16 = 0xe0;
const PORT_BYTES: u16 = 0xe1;
const PORT_REPORT: u8 = 0xe2;

const SECRET1: u32 = 0x5ec2_e701;
const SECRET2: u32 = 0x5ec2_e702;
const SECRET3: u32 = 0x0dd_ba11;
const SHARED_MARK: u32 = 0x51a2_ed01;
const XCHG_OLD: u32 = 0x1111_1111;
const XCHG_NEW: u32 = 0x2222_2222;

/// The byte `rep insb` reads at index `i`.
fn in_byte(i: usize) -> u8 {
    (i as u8).wrapping_mul(3).wrapping_add(1)
}

/// The byte the MMIO source holds at `addr`.
fn mmio_byte(addr: u64) -> u8 {
    0xc0u8.wrapping_add((addr - MMIO_BASE) as u8)
}

/// The guest program. With `fep` it also force-emulates two `cmpxchg`s.
fn program(fep: bool) -> Vec<u8> {
    let amd = is_amd();
    let mut a = Asm::default();
    let report = |a: &mut Asm| {
        a.out_eax(PORT_REPORT);
    };
    a.hypercall(KVM_HC_ENABLE_MEM_PROTECTED, [0; 3], amd);
    report(&mut a);
    a.store32(SECRET_PAGE, SECRET1);
    a.hypercall(KVM_HC_MEM_SHARE, [u32::from(Q1), 1, 0], amd);
    report(&mut a);
    a.store32(Q1, SHARED_MARK);
    a.hypercall(KVM_HC_MEM_SHARE, [u32::from(Q2), 1, 0], amd);
    report(&mut a);
    a.store32(Q2, SECRET3);
    a.hypercall(KVM_HC_MEM_UNSHARE, [u32::from(Q1), 1, 0], amd);
    report(&mut a);
    a.store32(Q1, SECRET2);
    for page in [SECRET_PAGE, Q1, Q2] {
        a.load_eax(page);
        report(&mut a);
    }
    // rep insb into the private buffer, then rep outsb out of it.
    a.mov16(R::Ax, 0).es_from_ax();
    a.mov16(R::Di, INS_BUF)
        .mov16(R::Dx, PORT_IN)
        .mov16(R::Cx, INS_LEN)
        .rep_insb();
    a.mov16(R::Si, INS_BUF)
        .mov16(R::Dx, PORT_BYTES)
        .mov16(R::Cx, INS_LEN)
        .rep_outsb();
    // rep movsb from MMIO into private memory, then out.
    a.mov16(R::Ax, MMIO_SEG).ds_from_ax();
    a.mov16(R::Si, 0)
        .mov16(R::Di, MOVS_BUF)
        .mov16(R::Cx, MOVS_LEN)
        .rep_movsb();
    a.mov16(R::Ax, 0).ds_from_ax();
    a.mov16(R::Si, MOVS_BUF)
        .mov16(R::Dx, PORT_BYTES)
        .mov16(R::Cx, MOVS_LEN)
        .rep_outsb();
    if fep {
        // Succeeds: memory holds XCHG_OLD (populated from shared memory).
        a.mov32(R::Ax, XCHG_OLD)
            .mov32(R::Cx, XCHG_NEW)
            .fep()
            .lock_cmpxchg_ecx(XCHG);
        a.load_eax(XCHG);
        report(&mut a);
        // Fails: EAX gets what memory holds, memory stays.
        a.mov32(R::Ax, 0x3333_3333)
            .mov32(R::Cx, 0x4444_4444)
            .fep()
            .lock_cmpxchg_ecx(XCHG);
        report(&mut a);
        a.load_eax(XCHG);
        report(&mut a);
    }
    // KVM_HC_VAPIC_POLL_IRQ with the other vendor's instruction: KVM
    // patches it in (private) guest memory and the guest runs the patch.
    a.hypercall(1, [0; 3], !amd);
    report(&mut a);
    a.hlt();
    a.0
}

/// What the guest did, as the VMM saw it.
#[derive(Debug, Default)]
struct Seen {
    /// Dwords the guest reported.
    reports: Vec<u32>,
    /// Bytes of its `rep outsb`s.
    bytes: Vec<u8>,
    /// (hypercall, KVM_EXIT_HYPERCALL_APPLIED) per hypercall exit.
    hypercalls: Vec<(u64, bool)>,
    /// Results of the checks made while the guest ran.
    checks: Vec<(String, bool, String)>,
}

impl Seen {
    fn check(&mut self, name: &str, ok: bool, detail: String) {
        self.checks.push((format!("owned: {name}"), ok, detail));
    }
}

/// The errno of a kvm-ioctls result, 0 for success.
fn errno<T>(r: Result<T, kvm_ioctls::Error>) -> i32 {
    r.map_or_else(|e| e.errno(), |_| 0)
}

/// One VM with KVM-owned protected memory, and what it needs.
struct OwnedVm {
    vm: VmFd,
    vcpu: VcpuFd,
    gmem: std::fs::File,
    mem: GuestMemoryMmap,
    host: u64,
}

impl OwnedVm {
    fn new(kvm: &Kvm, code: &[u8]) -> Result<Self, String> {
        let vm = kvm
            .create_vm_with_type(gmem_kvm::VM_TYPE)
            .map_err(|e| format!("KVM_CREATE_VM(SW_PROTECTED): {e}"))?;
        gmem_kvm::enable_protected_memory(&vm).map_err(|e| e.to_string())?;
        let (mem, host) = guest_memory(&[(CODE, code)])?;
        mem.write_obj(XCHG_OLD, GuestAddress(u64::from(XCHG)))
            .map_err(|e| format!("writing memory: {e}"))?;
        // SAFETY: `mem` maps MEM bytes and lives in the returned struct
        // with the VM; the VM goes first (field order).
        let gmem =
            unsafe { gmem_kvm::add_gmem_slot(&vm, MEM as u64, host) }.map_err(|e| e.to_string())?;
        let vcpu = vm
            .create_vcpu(0)
            .map_err(|e| format!("KVM_CREATE_VCPU: {e}"))?;
        enter_real_mode_at_code(&vcpu)?;
        let mut sregs = vcpu
            .get_sregs()
            .map_err(|e| format!("KVM_GET_SREGS: {e}"))?;
        sregs.es.base = 0;
        sregs.es.selector = 0;
        vcpu.set_sregs(&sregs)
            .map_err(|e| format!("KVM_SET_SREGS: {e}"))?;
        Ok(OwnedVm {
            vm,
            vcpu,
            gmem,
            mem,
            host,
        })
    }

    /// KVM_SW_PROTECTED_POPULATE of `len` bytes at `gpa` from our mapping.
    fn populate(&self, gpa: u64, len: u64) -> Result<(), i32> {
        let mut arg = KvmSwProtectedPopulate {
            gpa,
            size: len,
            source: self.host + gpa,
            ..Default::default()
        };
        populate_ioctl(&self.vm, &mut arg)
    }

    fn read32(&self, gpa: u16) -> u32 {
        self.mem
            .read_obj(GuestAddress(u64::from(gpa)))
            .unwrap_or(u32::MAX)
    }

    /// The guest's ENABLE waits for us: populate it, and try what KVM must
    /// refuse in the window.
    fn enable_window(&self, seen: &mut Seen) {
        let code = CODE;
        let first = self.populate(code, 0x1000);
        seen.check(
            "ENABLE window: populate the code page from the shared backing",
            first.is_ok(),
            format!("{first:?}"),
        );
        let again = self.populate(code, 0x1000);
        seen.check(
            "ENABLE window: populating a page twice: EPERM",
            again == Err(libc::EPERM),
            format!("{again:?}"),
        );
        let attr = set_private(&self.vm, u64::from(SECRET_PAGE), 0x1000, false);
        seen.check(
            "ENABLE window: KVM_SET_MEMORY_ATTRIBUTES: EPERM",
            attr.as_ref()
                .is_err_and(|e| e.contains("Operation not permitted")),
            format!("{attr:?}"),
        );
        let regs = errno(self.vcpu.get_regs());
        seen.check(
            "ENABLE window: KVM_GET_REGS already refused (EPERM)",
            regs == libc::EPERM,
            format!("errno {regs}"),
        );
        let rest = self
            .populate(0, code)
            .and_then(|()| self.populate(code + 0x1000, MEM as u64 - code - 0x1000));
        seen.check(
            "ENABLE window: populate the rest of RAM",
            rest.is_ok(),
            format!("{rest:?}"),
        );
    }

    /// Runs the guest to HLT, playing a VMM that accepts the ENABLE and
    /// the first SHARE, refuses the second SHARE and lies about the UNSHARE.
    fn run(&mut self) -> Result<Seen, String> {
        let mut seen = Seen::default();
        loop {
            let exit = self.vcpu.run().map_err(|e| format!("KVM_RUN: {e}"))?;
            match exit {
                VcpuExit::Hypercall(h) => {
                    // kvm-ioctls reads the flags word's low half as `longmode`.
                    let applied = u64::from(h.longmode) & KVM_EXIT_HYPERCALL_APPLIED != 0;
                    let (nr, gpa) = (h.nr, h.args[0]);
                    seen.hypercalls.push((nr, applied));
                    if nr == KVM_HC_MEM_SHARE && gpa == u64::from(Q2) {
                        *h.ret = KVM_EFAULT.wrapping_neg();
                    }
                    if nr == KVM_HC_ENABLE_MEM_PROTECTED {
                        self.enable_window(&mut seen);
                    }
                    // UNSHARE of Q1: "0" and nothing done on our side.
                }
                VcpuExit::IoIn(PORT_IN, data) => {
                    for (i, b) in data.iter_mut().enumerate() {
                        *b = in_byte(i);
                    }
                }
                VcpuExit::IoOut(PORT_BYTES, data) => seen.bytes.extend_from_slice(data),
                VcpuExit::IoOut(port, data) if port == u16::from(PORT_REPORT) => {
                    let mut w = [0u8; 4];
                    w[..data.len().min(4)].copy_from_slice(&data[..data.len().min(4)]);
                    seen.reports.push(u32::from_le_bytes(w));
                }
                VcpuExit::MmioRead(addr, data) => {
                    for (i, b) in data.iter_mut().enumerate() {
                        *b = mmio_byte(addr + i as u64);
                    }
                }
                VcpuExit::Hlt => return Ok(seen),
                other => return Err(format!("unexpected exit {other:?}")),
            }
            if seen.hypercalls.len() > 8 || seen.reports.len() > 32 {
                return Err("the guest ran away".into());
            }
        }
    }
}

/// Whether KVM emulates after its forced-emulation prefix.
fn fep_enabled() -> bool {
    std::fs::read_to_string("/sys/module/kvm/parameters/force_emulation_prefix")
        .is_ok_and(|v| !matches!(v.trim(), "0" | "N"))
}

/// Everything after HLT: what must fail with EPERM, and what may not.
fn lockout(o: &OwnedVm, check: &mut dyn FnMut(&str, bool, String)) {
    let v = &o.vcpu;
    let mut msrs = kvm_bindings::Msrs::from_entries(&[kvm_bindings::kvm_msr_entry {
        index: 0xc000_0082, // MSR_LSTAR
        ..Default::default()
    }])
    .ok();
    let refused: Vec<(&str, i32)> = vec![
        ("KVM_GET_REGS", errno(v.get_regs())),
        ("KVM_SET_REGS", errno(v.set_regs(&Default::default()))),
        ("KVM_GET_SREGS", errno(v.get_sregs())),
        ("KVM_SET_SREGS", errno(v.set_sregs(&Default::default()))),
        ("KVM_GET_FPU", errno(v.get_fpu())),
        ("KVM_SET_FPU", errno(v.set_fpu(&Default::default()))),
        ("KVM_GET_XSAVE", errno(v.get_xsave())),
        ("KVM_GET_XCRS", errno(v.get_xcrs())),
        ("KVM_SET_XCRS", errno(v.set_xcrs(&Default::default()))),
        ("KVM_GET_DEBUGREGS", errno(v.get_debug_regs())),
        (
            "KVM_SET_DEBUGREGS",
            errno(v.set_debug_regs(&Default::default())),
        ),
        (
            "KVM_GET_MSRS",
            msrs.as_mut().map_or(-1, |m| errno(v.get_msrs(m))),
        ),
        (
            "KVM_SET_MSRS",
            msrs.as_ref().map_or(-1, |m| errno(v.set_msrs(m))),
        ),
        ("KVM_GET_LAPIC", errno(v.get_lapic())),
        ("KVM_SET_LAPIC", errno(v.set_lapic(&Default::default()))),
        ("KVM_GET_VCPU_EVENTS", errno(v.get_vcpu_events())),
        (
            "KVM_SET_VCPU_EVENTS",
            errno(v.set_vcpu_events(&Default::default())),
        ),
        (
            "KVM_SET_MP_STATE",
            errno(v.set_mp_state(kvm_bindings::kvm_mp_state {
                mp_state: kvm_bindings::KVM_MP_STATE_INIT_RECEIVED,
            })),
        ),
        ("KVM_TRANSLATE", errno(v.translate_gva(CODE))),
        (
            "KVM_SET_GUEST_DEBUG",
            errno(v.set_guest_debug(&kvm_bindings::kvm_guest_debug {
                control: kvm_bindings::KVM_GUESTDBG_ENABLE | kvm_bindings::KVM_GUESTDBG_SINGLESTEP,
                ..Default::default()
            })),
        ),
        ("KVM_SMI", errno(v.smi())),
        ("KVM_SET_TSC_KHZ", errno(v.set_tsc_khz(1_000_000))),
        ("KVM_CREATE_VCPU (a new vCPU)", errno(o.vm.create_vcpu(1))),
        (
            "KVM_SET_USER_MEMORY_REGION2 (delete the guest_memfd slot)",
            // SAFETY: deleting a slot maps nothing; KVM refuses it anyway.
            errno(unsafe {
                o.vm.set_user_memory_region2(kvm_userspace_memory_region2 {
                    slot: 0,
                    ..Default::default()
                })
            }),
        ),
        (
            "KVM_SET_USER_MEMORY_REGION (new slot of the VMM's memory)",
            // SAFETY: our own mapping of guest RAM, which outlives the VM;
            // KVM refuses the slot anyway.
            errno(unsafe {
                o.vm.set_user_memory_region(kvm_userspace_memory_region {
                    slot: 1,
                    flags: 0,
                    guest_phys_addr: 0x10_0000,
                    memory_size: 0x1000,
                    userspace_addr: o.host,
                })
            }),
        ),
    ];
    for (name, e) in refused {
        check(
            &format!("owned: after ENABLE, {name}: EPERM"),
            e == libc::EPERM,
            format!("errno {e}"),
        );
    }
    let attr = set_private(&o.vm, u64::from(SECRET_PAGE), 0x1000, false);
    check(
        "owned: after ENABLE, KVM_SET_MEMORY_ATTRIBUTES (make a private page shared): EPERM",
        attr.as_ref()
            .is_err_and(|e| e.contains("Operation not permitted")),
        format!("{attr:?}"),
    );
    let punch = punch_gmem(&o.gmem, u64::from(SECRET_PAGE), 0x1000);
    check(
        "owned: after ENABLE, fallocate(PUNCH_HOLE) of a private guest_memfd page: EPERM",
        punch
            .as_ref()
            .is_err_and(|e| e.contains("Operation not permitted")),
        format!("{punch:?}"),
    );
    let pop = o.populate(u64::from(SECRET_PAGE), 0x1000);
    check(
        "owned: after ENABLE, KVM_SW_PROTECTED_POPULATE: EPERM",
        pop == Err(libc::EPERM),
        format!("{pop:?}"),
    );
    // The guest_memfd itself cannot be mapped: the VMM created it without
    // GUEST_MEMFD_FLAG_MMAP, and a VM with private memory cannot have one
    // whose pages map (it cannot initialise them shared). Reads fail on any
    // guest_memfd (main.rs).
    let fd = o.gmem.as_raw_fd();
    // SAFETY: a new shared mapping of one page at an address the kernel
    // chooses; nothing else refers to it, and it is unmapped below if made.
    let map = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            0x1000,
            libc::PROT_READ,
            libc::MAP_SHARED,
            fd,
            i64::from(SECRET_PAGE),
        )
    };
    let map_err = std::io::Error::last_os_error().raw_os_error();
    if map != libc::MAP_FAILED {
        // SAFETY: the mapping made just above, one page, not used since.
        unsafe { libc::munmap(map, 0x1000) };
    }
    check(
        "owned: after ENABLE, mmap of the guest_memfd: ENODEV",
        map == libc::MAP_FAILED && map_err == Some(libc::ENODEV),
        format!("mmap {map:?}, errno {map_err:?}"),
    );
    let mp = v.get_mp_state();
    check(
        "owned: after ENABLE, KVM_GET_MP_STATE still works",
        mp.is_ok(),
        format!("{mp:?}"),
    );
    let cpuid = v.get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES);
    check(
        "owned: after ENABLE, KVM_GET_CPUID2 still works",
        cpuid.is_ok(),
        format!("{:?}", cpuid.err()),
    );
    // Mapping ahead of the guest, as the VMM does after populating an
    // ENABLE: it changes no state, so the lock-out lets it through.
    let pre = gmem_kvm::pre_fault(v, u64::from(SECRET_PAGE), 0x1000);
    check(
        "owned: after ENABLE, KVM_PRE_FAULT_MEMORY of a private page still works",
        matches!(pre, Ok(gmem_kvm::PreFault::Done)),
        format!("{pre:?}"),
    );
}

/// Capability semantics, before any guest runs.
fn cap_checks(kvm: &Kvm, check: &mut dyn FnMut(&str, bool, String)) {
    let sys = kvm.check_extension_raw(KVM_CAP_X86_PROTECTED_MEMORY.into());
    check(
        "owned: KVM_CAP_X86_PROTECTED_MEMORY on /dev/kvm",
        sys == 1,
        format!("{sys}"),
    );
    let enable = |vm: &VmFd| {
        errno(vm.enable_cap(&kvm_enable_cap {
            cap: KVM_CAP_X86_PROTECTED_MEMORY,
            ..Default::default()
        }))
    };
    match kvm.create_vm() {
        Ok(vm) => {
            let e = enable(&vm);
            check(
                "owned: the capability on a default VM: EINVAL",
                e == libc::EINVAL,
                format!("errno {e}"),
            );
        }
        Err(e) => check("owned: default VM", false, e.to_string()),
    }
    match kvm.create_vm_with_type(gmem_kvm::VM_TYPE) {
        Ok(vm) => {
            let e = vm.create_vcpu(0).map(|_v| enable(&vm));
            check(
                "owned: the capability after a vCPU exists: EBUSY",
                matches!(e, Ok(libc::EBUSY)),
                format!("{e:?}"),
            );
        }
        Err(e) => check("owned: SW-protected VM", false, e.to_string()),
    }
    match kvm.create_vm_with_type(gmem_kvm::VM_TYPE) {
        Ok(vm) => {
            let on = enable(&vm);
            let sync = vm.check_extension_raw(kvm_bindings::KVM_CAP_SYNC_REGS.into());
            let msr = errno(vm.enable_cap(&kvm_enable_cap {
                cap: kvm_bindings::KVM_CAP_X86_USER_SPACE_MSR,
                args: [
                    u64::from(kvm_bindings::KVM_MSR_EXIT_REASON_UNKNOWN),
                    0,
                    0,
                    0,
                ],
                ..Default::default()
            }));
            check(
                "owned: enabled before vCPUs; then no KVM_CAP_SYNC_REGS, no user-space MSR exits (EINVAL)",
                on == 0 && sync == 0 && msr == libc::EINVAL,
                format!("enable errno {on}, sync regs {sync}, user space msr errno {msr}"),
            );
        }
        Err(e) => check("owned: SW-protected VM", false, e.to_string()),
    }
}

/// The checks of this module; each result goes to `check`.
pub fn checks(kvm: &Kvm, check: &mut dyn FnMut(&str, bool, String)) {
    if let Err(e) = gmem_kvm::check_host(kvm) {
        return check(
            "owned: host offers KVM-owned protected memory",
            false,
            e.to_string(),
        );
    }
    cap_checks(kvm, check);
    let fep = fep_enabled();
    check(
        "owned: kvm.force_emulation_prefix is on (the cmpxchg checks need it)",
        fep,
        "/sys/module/kvm/parameters/force_emulation_prefix".into(),
    );
    let code = program(fep);
    let mut o = match OwnedVm::new(kvm, &code) {
        Ok(o) => o,
        Err(e) => return check("owned: VM with KVM_CAP_X86_PROTECTED_MEMORY", false, e),
    };
    let attr = set_private(&o.vm, u64::from(SECRET_PAGE), 0x1000, true);
    check(
        "owned: before ENABLE, KVM_SET_MEMORY_ATTRIBUTES: EPERM (KVM owns them)",
        attr.as_ref()
            .is_err_and(|e| e.contains("Operation not permitted")),
        format!("{attr:?}"),
    );
    let punch = punch_gmem(&o.gmem, 0, 0x1000);
    check(
        "owned: before ENABLE, fallocate(PUNCH_HOLE) of the guest_memfd: EPERM",
        punch
            .as_ref()
            .is_err_and(|e| e.contains("Operation not permitted")),
        format!("{punch:?}"),
    );
    let pop = o.populate(CODE, 0x1000);
    check(
        "owned: before ENABLE, KVM_SW_PROTECTED_POPULATE: EPERM",
        pop == Err(libc::EPERM),
        format!("{pop:?}"),
    );

    // Run on a thread: a guest stuck inside KVM (an endless #UD loop if the
    // hypercall patch missed private memory) never returns from KVM_RUN.
    let (tx, rx) = mpsc::channel();
    let worker = std::thread::spawn(move || {
        let r = o.run();
        let _ = tx.send(());
        (o, r)
    });
    if rx.recv_timeout(Duration::from_secs(60)).is_err() {
        check(
            "owned: the guest halts",
            false,
            "no HLT within 60 s: stuck in KVM (emulation or hypercall patching)".into(),
        );
        println!("protmem-kvm-test: giving up on the stuck guest");
        std::process::exit(1);
    }
    let (o, result) = match worker.join() {
        Ok(r) => r,
        Err(_) => return check("owned: guest thread", false, "panicked".into()),
    };
    let mut seen = match result {
        Ok(s) => s,
        Err(e) => return check("owned: the guest runs to HLT", false, e),
    };
    for (name, ok, detail) in std::mem::take(&mut seen.checks) {
        check(&name, ok, detail);
    }
    let want_calls = vec![
        (KVM_HC_ENABLE_MEM_PROTECTED, true),
        (KVM_HC_MEM_SHARE, true),
        (KVM_HC_MEM_SHARE, true),
        (KVM_HC_MEM_UNSHARE, true),
    ];
    check(
        "owned: KVM applied each hypercall before telling the VMM (KVM_EXIT_HYPERCALL_APPLIED)",
        seen.hypercalls == want_calls,
        format!("{:?}", seen.hypercalls),
    );
    let r = &seen.reports;
    let at = |i: usize| r.get(i).copied();
    check(
        "owned: ENABLE and the accepted SHARE return 0",
        at(0) == Some(0) && at(1) == Some(0),
        format!("{r:#x?}"),
    );
    check(
        "owned: the refused SHARE returns the VMM's refusal (-KVM_EFAULT)",
        at(2) == Some((KVM_EFAULT as u32).wrapping_neg()),
        format!("{:#x?}", at(2)),
    );
    check(
        "owned: the UNSHARE the VMM lied about returns 0 (KVM did convert)",
        at(3) == Some(0),
        format!("{:#x?}", at(3)),
    );
    check(
        "owned: the guest reads its private data back intact",
        at(4) == Some(SECRET1) && at(5) == Some(SECRET2) && at(6) == Some(SECRET3),
        format!("{:#x?}", &r.get(4..7)),
    );
    let ins: Vec<u8> = (0..usize::from(INS_LEN)).map(in_byte).collect();
    let movs: Vec<u8> = (0..u64::from(MOVS_LEN))
        .map(|i| mmio_byte(MMIO_BASE + i))
        .collect();
    let (out_ins, out_movs) = seen
        .bytes
        .split_at(seen.bytes.len().min(usize::from(INS_LEN)));
    check(
        "owned: rep insb into private memory, rep outsb out of it: same bytes",
        out_ins == ins.as_slice(),
        format!("{out_ins:02x?}"),
    );
    check(
        "owned: rep movsb from MMIO into private memory keeps the data",
        out_movs == movs.as_slice(),
        format!("{out_movs:02x?}"),
    );
    let mut next = 7;
    if fep {
        check(
            "owned: emulated lock cmpxchg on private memory (success, mismatch, memory after)",
            at(7) == Some(XCHG_NEW) && at(8) == Some(XCHG_NEW) && at(9) == Some(XCHG_NEW),
            format!("{:#x?}", r.get(7..10)),
        );
        next = 10;
    }
    check(
        "owned: KVM patches the other vendor's hypercall instruction in private memory, and the guest runs it",
        at(next) == Some(0) && r.len() == next + 1,
        format!("{:#x?}", r.get(next..)),
    );
    // What the VMM's own mapping of guest RAM holds: nothing private.
    let shared = [
        ("the first secret", SECRET_PAGE, SECRET1),
        (
            "the secret written after the lied-about UNSHARE",
            Q1,
            SECRET2,
        ),
        ("the secret of the refused SHARE", Q2, SECRET3),
    ];
    for (what, page, secret) in shared {
        let v = o.read32(page);
        check(
            &format!("owned: the shared backing does not hold {what}"),
            v != secret,
            format!("{page:#x}: {v:#x}"),
        );
    }
    check(
        "owned: the shared page keeps what the guest wrote while it was shared",
        o.read32(Q1) == SHARED_MARK,
        format!("{:#x}", o.read32(Q1)),
    );
    let mut buf = vec![0u8; usize::from(INS_LEN)];
    let _ = o.mem.read_slice(&mut buf, GuestAddress(u64::from(INS_BUF)));
    check(
        "owned: string I/O wrote private memory, not the shared backing",
        buf.iter().all(|&b| b == 0),
        format!("{:02x?}", &buf[..8]),
    );
    if fep {
        check(
            "owned: the emulated cmpxchg changed private memory, not the shared backing",
            o.read32(XCHG) == XCHG_OLD,
            format!("{:#x}", o.read32(XCHG)),
        );
    }
    lockout(&o, check);
}
