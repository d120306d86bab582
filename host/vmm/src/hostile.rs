//! TEST ONLY (`--hostile`): the VMM behaves as one that has been taken
//! over, to show what KVM stops and what it cannot.
//!
//! From the start it lies about conversions (see [`crate::hypercalls`]):
//! it answers 0 to ENABLE, SHARE and UNSHARE and keeps its side as it was
//! (every page of its memfd kept, the device view open everywhere). With
//! `--protect=gmem` KVM applied the conversions anyway; with
//! `--protect=view` the guest now believes memory is private that the VMM
//! maps.
//!
//! On SIGUSR1 (the test harness sends it once the guest holds a secret in
//! private memory) it attacks: every vCPU thread, kicked out of KVM_RUN,
//! tries to read and change its vCPU's state; then the main thread tries
//! every VM-level operation that would read or change private memory, and
//! searches what its memfd holds of guest RAM for the secret
//! (`--hostile-needle`, hex-encoded so that the VMM's own memory holds the
//! secret only during the search) to overwrite it. Each attempt is one stderr line,
//! `protmem-vmm: hostile: <operation>: refused (<errno>)` or `...: done
//! (<what>)`, and the file named by `--hostile` is created when all are done.
//!
//! Where KVM does not own the guest's memory (`--protect=view`) nothing
//! refuses these operations, and the destructive ones (new vCPUs and
//! memslots, INIT, state of the VMM's choosing) would only crash the
//! guest: there the VMM reads everything, writes the registers back as it
//! read them, and rewrites the secret.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use kvm_bindings::{
    kvm_enable_cap, kvm_guest_debug, kvm_memory_attributes, kvm_msr_entry,
    kvm_userspace_memory_region, kvm_userspace_memory_region2, Msrs,
};
use kvm_ioctls::{VcpuFd, VmFd};

use crate::gmem_kvm::{KvmSwProtectedPopulate, KVM_SW_PROTECTED_POPULATE};

/// Set by the SIGUSR1 handler.
static REQUESTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigusr1(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    REQUESTED.store(true, Ordering::SeqCst);
}

/// How long the vCPU threads get to report before the VM-level attacks
/// go ahead without them.
const VCPU_WAIT: Duration = Duration::from_secs(10);

/// Errors setting up the hostile mode.
#[derive(Debug, thiserror::Error)]
pub enum HostileError {
    /// `sigaction(SIGUSR1)` failed.
    #[error("installing the --hostile SIGUSR1 handler failed: {0}")]
    Signal(std::io::Error),
    /// `--hostile-needle` is not an even number of hex digits.
    #[error("--hostile-needle {0:?}: expected the secret as hex digits, two per byte")]
    Needle(String),
}

/// One attempt and what KVM made of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attempt {
    /// What was tried, e.g. `vcpu0 KVM_GET_REGS`.
    pub op: String,
    /// `Err(errno)` if refused, else what it did.
    pub outcome: Result<String, i32>,
}

/// In the stats file: `{"op": ..., "refused": "EPERM"}` or `{"op": ...,
/// "done": "what it did"}`.
impl serde::Serialize for Attempt {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(Some(2))?;
        m.serialize_entry("op", &self.op)?;
        match &self.outcome {
            Ok(what) => m.serialize_entry("done", what)?,
            Err(e) => m.serialize_entry("refused", &errno_name(*e))?,
        }
        m.end()
    }
}

impl Attempt {
    fn new(op: impl Into<String>, outcome: Result<String, i32>) -> Self {
        Attempt {
            op: op.into(),
            outcome,
        }
    }

    /// The stable stderr line.
    pub fn line(&self) -> String {
        match &self.outcome {
            Ok(what) => format!("hostile: {}: done ({what})", self.op),
            Err(e) => format!("hostile: {}: refused ({})", self.op, errno_name(*e)),
        }
    }
}

/// The name of an errno the attempts can get.
pub fn errno_name(e: i32) -> String {
    match e {
        libc::EPERM => "EPERM".into(),
        libc::EINVAL => "EINVAL".into(),
        libc::EBUSY => "EBUSY".into(),
        libc::EFAULT => "EFAULT".into(),
        libc::ENOTTY => "ENOTTY".into(),
        libc::ENXIO => "ENXIO".into(),
        libc::EOPNOTSUPP => "EOPNOTSUPP".into(),
        other => format!("errno {other}"),
    }
}

fn kvm_result<T>(
    r: Result<T, kvm_ioctls::Error>,
    what: impl FnOnce(T) -> String,
) -> Result<String, i32> {
    r.map(what).map_err(|e| e.errno())
}

/// The hostile mode of one VMM run.
pub struct Hostile {
    done: PathBuf,
    /// The secret, hex-encoded.
    needle_hex: Option<String>,
    /// The guest RAM memfd: the search reads its data extents.
    memfd: File,
    /// Whether private memory lives in a guest_memfd (KVM owns it).
    gmem: bool,
    vcpus: usize,
    /// Every attempt so far, and which vCPUs are through.
    attempts: Mutex<(Vec<Attempt>, Vec<u8>)>,
    /// The attack ran (it runs once).
    finished: AtomicBool,
    started: Mutex<Option<Instant>>,
}

impl Hostile {
    /// Installs the SIGUSR1 trigger; `done` is created when the attack is
    /// over; `memfd` is guest RAM's shared backing.
    pub fn new(
        done: PathBuf,
        needle_hex: Option<String>,
        memfd: File,
        gmem: bool,
        vcpus: usize,
    ) -> Result<Self, HostileError> {
        if let Some(h) = &needle_hex {
            decode_hex(h).ok_or_else(|| HostileError::Needle(h.clone()))?;
        }
        vmm_sys_util::signal::register_signal_handler(libc::SIGUSR1, on_sigusr1)
            .map_err(|e| HostileError::Signal(std::io::Error::from_raw_os_error(e.errno())))?;
        Ok(Hostile {
            done,
            needle_hex,
            memfd,
            gmem,
            vcpus,
            attempts: Mutex::default(),
            finished: AtomicBool::new(false),
            started: Mutex::default(),
        })
    }

    /// Every attempt, in order (the vCPUs' first), for the stats file.
    pub fn attempts(&self) -> Vec<Attempt> {
        self.attempts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .0
            .clone()
    }

    /// Whether the harness asked for the attack and it is not over.
    pub fn requested(&self) -> bool {
        REQUESTED.load(Ordering::SeqCst) && !self.finished.load(Ordering::SeqCst)
    }

    /// A vCPU thread's part, once per vCPU: read and change its state.
    pub fn on_vcpu(&self, id: u8, vcpu: &VcpuFd) {
        if !self.requested() {
            return;
        }
        let mut guard = self.attempts.lock().unwrap_or_else(|e| e.into_inner());
        if guard.1.contains(&id) {
            return;
        }
        let attempts = vcpu_attack(id, vcpu, self.gmem);
        for a in &attempts {
            eprintln!("protmem-vmm: {}", a.line());
        }
        guard.0.extend(attempts);
        guard.1.push(id);
    }

    /// The main thread's part, called every tick: once every vCPU thread
    /// reported (or `VCPU_WAIT` passed), the VM-level attacks, the search
    /// for the secret, and the done file. `kick` makes the vCPU threads
    /// leave KVM_RUN; it is called until they all reported.
    pub fn poll(&self, vm: &VmFd, gmem: Option<&File>, ram: &[(u64, u64)], kick: impl Fn()) {
        if !self.requested() {
            return;
        }
        let started = *self
            .started
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_or_insert_with(Instant::now);
        let through = self
            .attempts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .1
            .len();
        if through < self.vcpus && started.elapsed() < VCPU_WAIT {
            kick();
            return;
        }
        if through < self.vcpus {
            eprintln!(
                "protmem-vmm: hostile: {} of {} vCPU threads did not come out of KVM_RUN",
                self.vcpus - through,
                self.vcpus
            );
        }
        let mut done = vm_attack(vm, gmem, ram, self.gmem);
        if let (Some(hex), Some(&(host, len))) = (&self.needle_hex, ram.first()) {
            let outcome = match crate::gmem::data_extents(&self.memfd, 0, len) {
                Ok(extents) => {
                    let mut needle = decode_hex(hex).unwrap_or_default();
                    let ranges: Vec<(u64, u64)> =
                        extents.iter().map(|&(s, e)| (host + s, e - s)).collect();
                    let hits = overwrite(&ranges, &needle);
                    // Leave no copy of the secret behind in our own memory.
                    for b in needle.iter_mut() {
                        // SAFETY: a byte of our own vector; volatile so that
                        // the store is not dropped as dead.
                        unsafe { std::ptr::write_volatile(b, 0) };
                    }
                    Ok(format!("{hits} hits overwritten"))
                }
                Err(e) => {
                    eprintln!("protmem-vmm: hostile: {e}");
                    Err(libc::EIO)
                }
            };
            done.push(Attempt::new(
                "find and overwrite the guest's secret in the VMM's mappings of guest RAM",
                outcome,
            ));
        }
        for a in &done {
            eprintln!("protmem-vmm: {}", a.line());
        }
        self.attempts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .0
            .extend(done);
        self.finished.store(true, Ordering::SeqCst);
        match File::create(&self.done) {
            Ok(_) => eprintln!("protmem-vmm: hostile: attack over"),
            Err(e) => eprintln!(
                "protmem-vmm: hostile: cannot create {}: {e}",
                self.done.display()
            ),
        }
    }
}

/// What a vCPU thread tries on its own vCPU: every read, then the writes
/// with what an attacker would write (state of its choosing, LSTAR 0,
/// INIT). Where KVM does not own the guest (`kvm_owned` false) nothing
/// refuses those writes and they would only crash the guest, so only the
/// register write is shown there, writing back what was read.
fn vcpu_attack(id: u8, v: &VcpuFd, kvm_owned: bool) -> Vec<Attempt> {
    let op = |name: &str| format!("vcpu{id} {name}");
    let mut out = Vec::new();
    let regs = v.get_regs();
    let read_back = regs.as_ref().ok().copied();
    out.push(Attempt::new(
        op("KVM_GET_REGS (read the registers)"),
        kvm_result(regs, |r| format!("rip {:#x}", r.rip)),
    ));
    out.push(Attempt::new(
        op("KVM_SET_REGS"),
        kvm_result(v.set_regs(&read_back.unwrap_or_default()), |()| {
            "registers written".into()
        }),
    ));
    out.push(Attempt::new(
        op("KVM_GET_SREGS"),
        kvm_result(v.get_sregs(), |s| format!("cr3 {:#x}", s.cr3)),
    ));
    out.push(Attempt::new(
        op("KVM_GET_FPU"),
        kvm_result(v.get_fpu(), |_| "read".into()),
    ));
    out.push(Attempt::new(
        op("KVM_GET_XSAVE (vector registers)"),
        kvm_result(v.get_xsave(), |_| "read".into()),
    ));
    out.push(Attempt::new(
        op("KVM_GET_XCRS"),
        kvm_result(v.get_xcrs(), |_| "read".into()),
    ));
    out.push(Attempt::new(
        op("KVM_GET_DEBUGREGS"),
        kvm_result(v.get_debug_regs(), |_| "read".into()),
    ));
    // MSR_LSTAR: the syscall entry point.
    let lstar = || {
        Msrs::from_entries(&[kvm_msr_entry {
            index: 0xc000_0082,
            ..Default::default()
        }])
        .ok()
    };
    if let Some(mut m) = lstar() {
        out.push(Attempt::new(
            op("KVM_GET_MSRS (LSTAR)"),
            kvm_result(v.get_msrs(&mut m), |n| format!("{n} read")),
        ));
    }
    out.push(Attempt::new(
        op("KVM_GET_LAPIC"),
        kvm_result(v.get_lapic(), |_| "read".into()),
    ));
    out.push(Attempt::new(
        op("KVM_GET_VCPU_EVENTS"),
        kvm_result(v.get_vcpu_events(), |_| "read".into()),
    ));
    out.push(Attempt::new(
        op("KVM_TRANSLATE (walk the guest's page tables)"),
        kvm_result(v.translate_gva(0xffff_ffff_8100_0000), |t| {
            format!("valid {}", t.valid)
        }),
    ));
    if !kvm_owned {
        return out;
    }
    out.push(Attempt::new(
        op("KVM_SET_SREGS"),
        kvm_result(v.set_sregs(&Default::default()), |()| "written".into()),
    ));
    if let Some(m) = lstar() {
        out.push(Attempt::new(
            op("KVM_SET_MSRS (LSTAR)"),
            kvm_result(v.set_msrs(&m), |n| format!("{n} written")),
        ));
    }
    out.push(Attempt::new(
        op("KVM_SET_GUEST_DEBUG (single-step)"),
        kvm_result(
            v.set_guest_debug(&kvm_guest_debug {
                control: kvm_bindings::KVM_GUESTDBG_ENABLE | kvm_bindings::KVM_GUESTDBG_SINGLESTEP,
                ..Default::default()
            }),
            |()| "enabled".into(),
        ),
    ));
    out.push(Attempt::new(
        op("KVM_SET_MP_STATE"),
        kvm_result(
            v.set_mp_state(kvm_bindings::kvm_mp_state {
                mp_state: kvm_bindings::KVM_MP_STATE_INIT_RECEIVED,
            }),
            |()| "INIT received".into(),
        ),
    ));
    out
}

/// `ioctl` that returns the errno on failure.
fn raw_ioctl<T>(fd: &impl AsRawFd, req: libc::c_ulong, arg: &mut T) -> Result<(), i32> {
    // SAFETY: every caller passes the structure its request reads and
    // writes; the kernel touches nothing else of ours.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), req, arg as *mut T) };
    if rc < 0 {
        Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
    } else {
        Ok(())
    }
}

/// What the main thread tries on the VM, its guest_memfd and guest RAM.
/// Without KVM-owned memory (`kvm_owned` false) nothing stops the memslot
/// and vCPU changes, which would only disturb the guest: not tried there.
fn vm_attack(vm: &VmFd, gmem: Option<&File>, ram: &[(u64, u64)], kvm_owned: bool) -> Vec<Attempt> {
    let mut out = Vec::new();
    let ram_len = ram.first().map_or(0, |r| r.1);
    out.push(Attempt::new(
        "KVM_SET_MEMORY_ATTRIBUTES (all RAM shared, to write the guest's private pages)",
        kvm_result(
            vm.set_memory_attributes(kvm_memory_attributes {
                address: 0,
                size: ram_len,
                attributes: 0,
                flags: 0,
            }),
            |()| "RAM is shared".into(),
        ),
    ));
    if let Some(g) = gmem {
        // SAFETY: fallocate on our guest_memfd descriptor; it would free
        // guest pages (that is the attack), touching nothing of ours.
        let rc = unsafe {
            libc::fallocate(
                g.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                0,
                ram_len as libc::off_t,
            )
        };
        out.push(Attempt::new(
            "fallocate(PUNCH_HOLE) of the guest_memfd (zero the guest's private pages)",
            if rc == 0 {
                Ok("punched".into())
            } else {
                Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
            },
        ));
        // Our chosen bytes for every page.
        let source = vec![0xccu8; 0x1000 * 16];
        let src = (source.as_ptr() as u64 + 0xfff) & !0xfff;
        let mut arg = KvmSwProtectedPopulate {
            gpa: 0x10_0000,
            size: 0x1000 * 8,
            source: src,
            ..Default::default()
        };
        out.push(Attempt::new(
            "KVM_SW_PROTECTED_POPULATE (write chosen bytes into private pages)",
            raw_ioctl(vm, KVM_SW_PROTECTED_POPULATE, &mut arg).map(|()| "populated".into()),
        ));
    }
    let delete = kvm_userspace_memory_region2 {
        slot: 0,
        flags: kvm_bindings::KVM_MEM_GUEST_MEMFD,
        ..Default::default()
    };
    if kvm_owned {
        // SAFETY: deleting a slot maps no memory of ours into the guest; on
        // a host that allows it the guest loses its RAM (the attack).
        let deleted = unsafe { vm.set_user_memory_region2(delete) };
        out.push(Attempt::new(
            "KVM_SET_USER_MEMORY_REGION2 (delete the guest's RAM slot)",
            kvm_result(deleted, |()| "deleted".into()),
        ));
    }
    if let (true, Some(&(host, _))) = (kvm_owned, ram.first()) {
        let slot = kvm_userspace_memory_region {
            slot: 7,
            flags: 0,
            guest_phys_addr: 0xf000_0000,
            memory_size: 0x1000,
            userspace_addr: host,
        };
        // SAFETY: the slot would show the first page of our RAM mapping,
        // which lives as long as the VMM, at an unused GPA.
        let mapped = unsafe { vm.set_user_memory_region(slot) };
        out.push(Attempt::new(
            "KVM_SET_USER_MEMORY_REGION (map VMM memory where the guest could run it)",
            kvm_result(mapped, |()| "mapped".into()),
        ));
    }
    if kvm_owned {
        out.push(Attempt::new(
            "KVM_CREATE_VCPU (a vCPU that starts where the VMM wants)",
            kvm_result(vm.create_vcpu(31), |_| "created".into()),
        ));
    }
    out.push(Attempt::new(
        "KVM_ENABLE_CAP(KVM_CAP_X86_USER_SPACE_MSR) (see the guest's MSR writes)",
        kvm_result(
            vm.enable_cap(&kvm_enable_cap {
                cap: kvm_bindings::KVM_CAP_X86_USER_SPACE_MSR,
                args: [u64::from(kvm_bindings::KVM_MSR_EXIT_REASON_FILTER), 0, 0, 0],
                ..Default::default()
            }),
            |()| "enabled".into(),
        ),
    ));
    out
}

/// Overwrites every occurrence of `needle` in the ranges `ram` (host
/// address, length) of the VMM's own mappings; returns how many there were.
fn overwrite(ram: &[(u64, u64)], needle: &[u8]) -> usize {
    let mut hits = 0;
    if needle.is_empty() {
        return 0;
    }
    let finder = memchr::memmem::Finder::new(needle);
    for &(host, len) in ram {
        let Ok(len) = usize::try_from(len) else {
            continue;
        };
        // Callers pass readable ranges (PROT_NONE pages would fault); the
        // guest may write them concurrently, which only changes what is found.
        // SAFETY: `host .. host + len` is the VMM's own, lifelong RAM mapping.
        let mem = unsafe { std::slice::from_raw_parts_mut(host as *mut u8, len) };
        let found: Vec<usize> = finder.find_iter(mem).collect();
        for at in found {
            if let Some(hit) = mem.get_mut(at..at + needle.len()) {
                hit.fill(b'X');
                hits += 1;
            }
        }
    }
    hits
}

/// `hex` as bytes, or `None` unless it is an even number of hex digits.
fn decode_hex(hex: &str) -> Option<Vec<u8>> {
    if hex.len() % 2 != 0 {
        return None;
    }
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_stable() {
        let a = Attempt::new("vcpu0 KVM_GET_REGS", Err(libc::EPERM));
        assert_eq!(a.line(), "hostile: vcpu0 KVM_GET_REGS: refused (EPERM)");
        let b = Attempt::new("x", Ok("3 hits overwritten".into()));
        assert_eq!(b.line(), "hostile: x: done (3 hits overwritten)");
        assert_eq!(errno_name(99), "errno 99");
    }

    #[test]
    fn attempts_serialize_for_the_stats_file() {
        let v = serde_json::to_value(vec![
            Attempt::new("a", Err(libc::EPERM)),
            Attempt::new("b", Ok("read".into())),
        ])
        .unwrap();
        assert_eq!(
            v,
            serde_json::json!([{"op": "a", "refused": "EPERM"}, {"op": "b", "done": "read"}])
        );
    }

    #[test]
    fn needles_come_as_hex() {
        assert_eq!(decode_hex("4b504d"), Some(b"KPM".to_vec()));
        assert_eq!(decode_hex("4b5"), None);
        assert_eq!(decode_hex("zz"), None);
        assert_eq!(decode_hex(""), Some(vec![]));
    }

    #[test]
    fn overwrite_finds_every_hit() {
        let mut buf = b"..KPM-SECRET-ab..KPM-SECRET-ab.KPM-SECRET-a".to_vec();
        let hits = overwrite(
            &[(buf.as_mut_ptr() as u64, buf.len() as u64)],
            b"KPM-SECRET-ab",
        );
        assert_eq!(hits, 2);
        assert_eq!(&buf[..17], b"..XXXXXXXXXXXXX..");
        assert!(buf.ends_with(b"KPM-SECRET-a"));
    }
}
