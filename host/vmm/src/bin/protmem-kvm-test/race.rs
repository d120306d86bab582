//! The conversion race of SMP guests: a vCPU that touches a page while
//! another converts it can get `KVM_EXIT_MEMORY_FAULT` (KVM takes the
//! access's private bit from the page's attribute when the fault starts
//! and checks it again later). The VMM re-enters such a vCPU
//! (`kvm_protmem_vmm::exit::memory_fault_action`); this check runs the
//! race on the real KVM with two vCPUs of a KVM-owned protected VM:
//!
//! - vCPU 0 enables protection, then SHAREs and UNSHAREs one page
//!   [`ROUNDS`] times (KVM applies each, this test accepts it), then
//!   writes a done flag and halts;
//! - vCPU 1 reads a dword across the boundary into that page, the access
//!   `load_unaligned_zeropad()` makes, until it sees the flag, then
//!   reports how often it read and halts.
//!
//! Every memory fault goes through the VMM's decision, with this test's
//! map of the page as the VMM's map; the check fails if one is not
//! retried or a vCPU does not halt.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use hypercall::{KVM_HC_ENABLE_MEM_PROTECTED, KVM_HC_MEM_SHARE, KVM_HC_MEM_UNSHARE};
use kvm_bindings::KVM_MEMORY_EXIT_FLAG_PRIVATE;
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use kvm_protmem_vmm::exit::{memory_fault_action, FaultAction, VcpuExitState};
use kvm_protmem_vmm::gmem_kvm::{self, KvmSwProtectedPopulate, KVM_EXIT_HYPERCALL_APPLIED};
use vm_memory::GuestMemoryMmap;

use crate::asm::{Asm, R};
use crate::{enter_real_mode_at_code, guest_memory, is_amd, populate_ioctl, CODE, MEM};

/// vCPU 1's code.
const CODE1: u16 = 0x2000;
/// The page vCPU 0 converts.
const PAGE: u16 = 0x6000;
/// The dword vCPU 1 reads: two bytes of the page below, two of [`PAGE`].
const ACROSS: u16 = PAGE - 2;
/// vCPU 0's done flag (private memory, never converted).
const DONE: u16 = 0x7000;
/// vCPU 1's report port.
const PORT_READS: u8 = 0xe4;
/// SHARE + UNSHARE rounds of vCPU 0.
pub const ROUNDS: u32 = 5000;

/// vCPU 0: ENABLE, then the conversions.
fn converter(amd: bool) -> Vec<u8> {
    let mut a = Asm::default();
    a.hypercall(KVM_HC_ENABLE_MEM_PROTECTED, [0; 3], amd);
    a.mov32(R::Di, ROUNDS);
    let top = a.here();
    a.hypercall(KVM_HC_MEM_SHARE, [u32::from(PAGE), 1, 0], amd);
    a.hypercall(KVM_HC_MEM_UNSHARE, [u32::from(PAGE), 1, 0], amd);
    a.dec32(R::Di).jcc_back(false, top);
    a.store32(DONE, 1).hlt();
    a.0
}

/// vCPU 1: the reads across the boundary, until the flag.
fn reader() -> Vec<u8> {
    let mut a = Asm::default();
    a.mov32(R::Si, 0);
    let top = a.here();
    a.load_eax(ACROSS)
        .inc32(R::Si)
        .cmp_zero32(DONE)
        .jcc_back(true, top);
    a.eax_from(R::Si).out_eax(PORT_READS).hlt();
    a.0
}

/// The VMM's side: its map of [`PAGE`] and what it saw.
#[derive(Default)]
struct Vmm {
    enabled: AtomicBool,
    page_shared: AtomicBool,
    faults: AtomicU64,
    after: AtomicU64,
    before: AtomicU64,
    reads: AtomicU64,
    /// Conversions reported to the VMM (its side of each applied one).
    conversions: AtomicU64,
}

impl Vmm {
    /// Whether the VMM's map has `gpa` private.
    fn map_private(&self, gpa: u64) -> bool {
        let on_page = gpa & !0xfff == u64::from(PAGE);
        self.enabled.load(Ordering::SeqCst) && !(on_page && self.page_shared.load(Ordering::SeqCst))
    }

    /// Runs `vcpu` to HLT; `enable` is called in the ENABLE window.
    fn run(
        &self,
        vcpu: &mut VcpuFd,
        enable: &dyn Fn() -> Result<(), String>,
    ) -> Result<(), String> {
        let mut state = VcpuExitState::default();
        loop {
            let exit = vcpu.run().map_err(|e| format!("KVM_RUN: {e}"))?;
            if !matches!(exit, VcpuExit::MemoryFault { .. }) {
                state.fault_streak = 0;
            }
            match exit {
                VcpuExit::Hypercall(h) => {
                    // kvm-ioctls reads the flags word's low half as `longmode`.
                    if u64::from(h.longmode) & KVM_EXIT_HYPERCALL_APPLIED == 0 {
                        return Err(format!("hypercall {} not applied by KVM", h.nr));
                    }
                    self.conversions.fetch_add(1, Ordering::SeqCst);
                    match (h.nr, h.args[0]) {
                        (KVM_HC_ENABLE_MEM_PROTECTED, _) => {
                            // KVM made all RAM private before exiting.
                            self.enabled.store(true, Ordering::SeqCst);
                            enable()?;
                        }
                        (KVM_HC_MEM_SHARE, gpa) if gpa == u64::from(PAGE) => {
                            self.page_shared.store(true, Ordering::SeqCst)
                        }
                        (KVM_HC_MEM_UNSHARE, gpa) if gpa == u64::from(PAGE) => {
                            self.page_shared.store(false, Ordering::SeqCst)
                        }
                        (nr, gpa) => return Err(format!("hypercall {nr} for {gpa:#x}")),
                    }
                }
                VcpuExit::MemoryFault { flags, gpa, .. } => {
                    let streak = state.count_fault(self.conversions.load(Ordering::SeqCst));
                    self.faults.fetch_add(1, Ordering::SeqCst);
                    let private = flags & u64::from(KVM_MEMORY_EXIT_FLAG_PRIVATE) != 0;
                    let ram = (gpa < MEM as u64).then(|| self.map_private(gpa));
                    match memory_fault_action(true, private, ram, streak) {
                        FaultAction::Retry { seen: true } => {
                            self.after.fetch_add(1, Ordering::SeqCst)
                        }
                        FaultAction::Retry { seen: false } => {
                            self.before.fetch_add(1, Ordering::SeqCst)
                        }
                        FaultAction::Stop(why) => {
                            return Err(format!(
                                "memory fault at {gpa:#x} (flags {flags:#x}): {why}"
                            ))
                        }
                    };
                }
                VcpuExit::IoOut(port, data) if port == u16::from(PORT_READS) => {
                    let mut w = [0u8; 4];
                    w[..data.len().min(4)].copy_from_slice(&data[..data.len().min(4)]);
                    self.reads
                        .store(u32::from_le_bytes(w).into(), Ordering::SeqCst);
                }
                VcpuExit::Hlt => return Ok(()),
                other => return Err(format!("unexpected exit {other:?}")),
            }
        }
    }
}

/// Creates the VM and its two vCPUs (their registers set before ENABLE
/// locks them).
fn setup(kvm: &Kvm) -> Result<(VmFd, std::fs::File, GuestMemoryMmap, u64, [VcpuFd; 2]), String> {
    let amd = is_amd();
    let vm = kvm
        .create_vm_with_type(gmem_kvm::VM_TYPE)
        .map_err(|e| format!("KVM_CREATE_VM(SW_PROTECTED): {e}"))?;
    gmem_kvm::enable_protected_memory(&vm).map_err(|e| e.to_string())?;
    let (mem, host) = guest_memory(&[(CODE, &converter(amd)), (u64::from(CODE1), &reader())])?;
    // SAFETY: `mem` maps MEM bytes and is returned with the VM, which the
    // caller drops first.
    let gmem =
        unsafe { gmem_kvm::add_gmem_slot(&vm, MEM as u64, host) }.map_err(|e| e.to_string())?;
    let mut vcpus = Vec::new();
    for (id, code) in [(0, CODE), (1, u64::from(CODE1))] {
        let v = vm
            .create_vcpu(id)
            .map_err(|e| format!("KVM_CREATE_VCPU {id}: {e}"))?;
        enter_real_mode_at_code(&v)?;
        let mut regs = v.get_regs().map_err(|e| format!("KVM_GET_REGS: {e}"))?;
        regs.rip = code;
        v.set_regs(&regs)
            .map_err(|e| format!("KVM_SET_REGS: {e}"))?;
        vcpus.push(v);
    }
    let vcpus: [VcpuFd; 2] = vcpus.try_into().map_err(|_| "two vCPUs".to_string())?;
    Ok((vm, gmem, mem, host, vcpus))
}

/// Runs the race; each result goes to `check`.
pub fn checks(kvm: &Kvm, check: &mut dyn FnMut(&str, bool, String)) {
    let (vm, _gmem, _mem, host, [mut v0, mut v1]) = match setup(kvm) {
        Ok(s) => s,
        Err(e) => return check("race: a KVM-owned protected VM with two vCPUs", false, e),
    };
    let vm = Arc::new(vm);
    let vmm = Arc::new(Vmm::default());
    let (started, start) = mpsc::channel::<()>();
    let (done_tx, done) = mpsc::channel::<(u8, Result<(), String>)>();
    let begin = Instant::now();
    let (vm0, vmm0, tx0) = (vm.clone(), vmm.clone(), done_tx.clone());
    let t0 = std::thread::spawn(move || {
        let enable = || {
            // All of RAM was shared: populate it, once, in the window.
            let mut arg = KvmSwProtectedPopulate {
                gpa: 0,
                size: MEM as u64,
                source: host,
                ..Default::default()
            };
            populate_ioctl(&vm0, &mut arg).map_err(|e| format!("populate: errno {e}"))?;
            let _ = started.send(());
            Ok(())
        };
        let r = vmm0.run(&mut v0, &enable);
        let _ = tx0.send((0, r));
        v0
    });
    let vmm1 = vmm.clone();
    let t1 = std::thread::spawn(move || {
        // Runs only once protection is on and its code populated.
        let r = match start.recv() {
            Ok(()) => vmm1.run(&mut v1, &|| Err("ENABLE on vCPU 1".into())),
            Err(_) => Err("vCPU 0 never enabled protection".into()),
        };
        let _ = done_tx.send((1, r));
        v1
    });
    let mut results = [None, None];
    while results.iter().any(Option::is_none) {
        match done.recv_timeout(Duration::from_secs(300)) {
            Ok((id, r)) => results[usize::from(id)] = Some(r),
            Err(_) => {
                check(
                    "race: both vCPUs halt",
                    false,
                    format!("still running after 300 s: {results:?}"),
                );
                println!("protmem-kvm-test: giving up on the stuck guest");
                std::process::exit(1);
            }
        }
    }
    let _ = (t0.join(), t1.join());
    let secs = begin.elapsed().as_secs_f64();
    let [r0, r1] = results.map(|r| r.unwrap_or_else(|| Err("no result".into())));
    let (faults, after, before, reads) = (
        vmm.faults.load(Ordering::SeqCst),
        vmm.after.load(Ordering::SeqCst),
        vmm.before.load(Ordering::SeqCst),
        vmm.reads.load(Ordering::SeqCst),
    );
    println!(
        "protmem-kvm-test: race: {ROUNDS} SHARE+UNSHARE rounds on vCPU 0 while vCPU 1 read \
         across into the page {reads} times, {secs:.1} s: {faults} memory faults, {after} with \
         the VMM's map showing the conversion, {before} before it did"
    );
    check(
        "race: vCPU 0 converts a page 5000 times back and forth and halts",
        r0.is_ok(),
        format!("{r0:?}"),
    );
    check(
        "race: vCPU 1 reads across into it until done; every memory fault is re-entered",
        r1.is_ok() && reads > 0,
        format!("{r1:?}, {reads} reads"),
    );
}
