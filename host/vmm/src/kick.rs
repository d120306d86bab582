//! Stopping vCPU threads for a reboot: a real-time signal whose handler sets
//! the interrupted thread's `kvm_run.immediate_exit` (Firecracker's vCPU
//! kick).
//!
//! Each vCPU thread arms an [`Armed`] guard with its `immediate_exit` byte
//! and runs `while !stop { KVM_RUN }`. [`VcpuThreads::stop`] sets the shared
//! stop flag, then signals every thread that has not ended yet:
//! - a thread inside KVM_RUN (guest code, or halted in the in-kernel LAPIC)
//!   leaves it with `EINTR`;
//! - a thread between its stop check and KVM_RUN gets `immediate_exit = 1`
//!   from the handler, so its next KVM_RUN returns `EINTR` at once instead
//!   of entering the guest;
//! - a thread busy in the VMM (an exit being handled) sees the flag when it
//!   comes back to the loop.
//!
//! Threads still running are signalled again every [`KICK_INTERVAL`] until
//! they have ended or the timeout passes, and then joined: when `stop`
//! returns `Ok`, no vCPU thread is left, so no vCPU can be in KVM_RUN.

use std::marker::PhantomData;
use std::ptr;
use std::sync::atomic::{AtomicBool, AtomicPtr, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use libc::{c_int, c_void, siginfo_t};
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

/// How often threads that have not stopped yet are signalled again.
pub const KICK_INTERVAL: Duration = Duration::from_millis(10);

/// Errors stopping vCPU threads.
#[derive(Debug, thiserror::Error)]
pub enum KickError {
    /// `sigaction` for the kick signal failed.
    #[error("installing the vCPU kick handler for signal {signal} failed: {err}")]
    Install {
        /// The signal number.
        signal: c_int,
        /// The OS error.
        err: std::io::Error,
    },
    /// `pthread_kill` failed.
    #[error("sending signal {signal} to vCPU thread {id} failed: {err}")]
    Signal {
        /// vCPU id.
        id: u8,
        /// The signal number.
        signal: c_int,
        /// The OS error.
        err: std::io::Error,
    },
    /// A thread did not end in time.
    #[error("vCPU thread {id} did not stop within {waited:?} of the first kick")]
    Stuck {
        /// The first vCPU id still running.
        id: u8,
        /// How long it was kicked.
        waited: Duration,
    },
    /// A thread ended by panicking.
    #[error("vCPU thread {id} panicked")]
    Panicked {
        /// vCPU id.
        id: u8,
    },
}

thread_local! {
    /// This thread's `kvm_run.immediate_exit`, or null when not armed.
    /// Const-initialised and without a destructor, so the signal handler can
    /// read it at any time.
    static IMMEDIATE_EXIT: AtomicPtr<u8> = const { AtomicPtr::new(ptr::null_mut()) };
}

extern "C" fn on_kick(_: c_int, _: *mut siginfo_t, _: *mut c_void) {
    let _ = IMMEDIATE_EXIT.try_with(|slot| {
        let p = slot.load(Ordering::Acquire);
        if !p.is_null() {
            // The guard lives on this thread (it is not `Send`) and nulls the
            // slot when dropped; the handler runs on this thread too.
            // SAFETY: `Armed::new`'s caller keeps a non-null `p` valid for
            // writes while armed; a volatile byte store is async-signal-safe.
            unsafe { p.write_volatile(1) };
        }
    });
}

thread_local! {
    /// The stop flag of the VM this vCPU thread runs, for long operations
    /// on the thread to check when a kick interrupts them.
    static STOP: std::cell::RefCell<Option<Arc<AtomicBool>>> =
        const { std::cell::RefCell::new(None) };
}

/// Makes `stop` the calling thread's stop flag ([`stopping`]).
pub fn set_thread_stop_flag(stop: Arc<AtomicBool>) {
    STOP.with(|s| *s.borrow_mut() = Some(stop));
}

/// Whether the VM of the calling vCPU thread is being stopped: a
/// system call interrupted by a kick (`EINTR`) must then give up rather
/// than start again. False on threads without a stop flag.
pub fn stopping() -> bool {
    STOP.with(|s| {
        s.borrow()
            .as_ref()
            .is_some_and(|f| f.load(Ordering::SeqCst))
    })
}

/// The signal used to kick vCPU threads (`SIGRTMIN`, as Firecracker).
pub fn kick_signal() -> c_int {
    SIGRTMIN()
}

/// Installs the kick handler, once per process; later calls return the
/// first call's result.
pub fn install() -> Result<(), KickError> {
    static INSTALLED: OnceLock<Result<(), i32>> = OnceLock::new();
    let signal = kick_signal();
    INSTALLED
        .get_or_init(|| register_signal_handler(signal, on_kick).map_err(|e| e.errno()))
        .map_err(|errno| KickError::Install {
            signal,
            err: std::io::Error::from_raw_os_error(errno),
        })
}

/// While alive, a kick of this thread sets the armed byte to 1.
///
/// Not `Send`: it must be dropped on the thread that armed it.
#[derive(Debug)]
pub struct Armed {
    _thread_bound: PhantomData<*mut u8>,
}

impl Armed {
    /// Arms the kick for the calling thread with `immediate_exit`, the
    /// `immediate_exit` byte of this thread's vCPU `kvm_run` mapping.
    ///
    /// # Safety
    ///
    /// `immediate_exit` must stay valid for writes until the returned guard
    /// is dropped, and every other access to that byte while the guard lives
    /// must tolerate a store from a signal handler on this thread at any
    /// point (the byte is only ever set to 1 by the handler).
    pub unsafe fn new(immediate_exit: *mut u8) -> Self {
        IMMEDIATE_EXIT.with(|slot| slot.store(immediate_exit, Ordering::Release));
        Armed {
            _thread_bound: PhantomData,
        }
    }
}

impl Drop for Armed {
    fn drop(&mut self) {
        IMMEDIATE_EXIT.with(|slot| slot.store(ptr::null_mut(), Ordering::Release));
    }
}

/// The vCPU threads of one boot and their shared stop flag.
#[derive(Debug, Default)]
pub struct VcpuThreads {
    stop: Arc<AtomicBool>,
    threads: Vec<(u8, JoinHandle<()>)>,
}

impl VcpuThreads {
    /// No threads yet; the stop flag is clear.
    pub fn new() -> Self {
        Self::default()
    }

    /// The stop flag, for a thread's `while !stop` loop.
    pub fn stop_flag(&self) -> Arc<AtomicBool> {
        self.stop.clone()
    }

    /// Adds the thread of vCPU `id`.
    pub fn push(&mut self, id: u8, handle: JoinHandle<()>) {
        self.threads.push((id, handle));
    }

    /// Whether every thread has ended (each reports why before it ends,
    /// unless it was stopped or panicked).
    pub fn all_ended(&self) -> bool {
        self.threads.iter().all(|(_, h)| h.is_finished())
    }

    /// Kicks every running thread out of KVM_RUN once, without stopping it
    /// (it goes back in after a look at its flags).
    pub fn kick(&self) {
        let signal = kick_signal();
        for (_, handle) in &self.threads {
            if !handle.is_finished() {
                let _ = handle.kill(signal);
            }
        }
    }

    /// Sets the stop flag, kicks every thread until all have ended (giving
    /// up after `timeout`), and joins them.
    pub fn stop(self, timeout: Duration) -> Result<(), KickError> {
        self.stop.store(true, Ordering::SeqCst);
        let signal = kick_signal();
        let start = Instant::now();
        loop {
            let mut running = None;
            for (id, handle) in &self.threads {
                if handle.is_finished() {
                    continue;
                }
                running.get_or_insert(*id);
                handle.kill(signal).map_err(|e| KickError::Signal {
                    id: *id,
                    signal,
                    err: std::io::Error::from_raw_os_error(e.errno()),
                })?;
            }
            match running {
                None => break,
                Some(id) if start.elapsed() >= timeout => {
                    return Err(KickError::Stuck {
                        id,
                        waited: start.elapsed(),
                    })
                }
                Some(_) => thread::sleep(KICK_INTERVAL),
            }
        }
        for (id, handle) in self.threads {
            handle.join().map_err(|_| KickError::Panicked { id })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU8;
    use std::sync::mpsc;

    /// A stand-in for a vCPU thread: like KVM_RUN, `pause()` blocks until a
    /// signal, and a set "immediate_exit" byte means "don't block".
    fn fake_vcpu(stop: Arc<AtomicBool>, ready: mpsc::Sender<()>, saw_kick: Arc<AtomicBool>) {
        let immediate_exit = AtomicU8::new(0);
        // SAFETY: the byte outlives the guard (declared after it), and is
        // only accessed atomically here and by the handler's byte store.
        let _armed = unsafe { Armed::new(immediate_exit.as_ptr()) };
        ready.send(()).unwrap();
        // Block first, whatever the stop flag says: the thread can only
        // leave through a kick, so the test cannot pass by a thread that
        // saw the flag before it ever blocked. A kick that lands before
        // `pause()` is repeated by `stop()` until one interrupts it.
        loop {
            // SAFETY: pause has no arguments and only waits for a signal.
            unsafe { libc::pause() };
            if immediate_exit.swap(0, Ordering::SeqCst) == 1 {
                saw_kick.store(true, Ordering::SeqCst);
            }
            if stop.load(Ordering::SeqCst) {
                break;
            }
        }
    }

    #[test]
    fn stop_interrupts_every_blocked_thread_and_joins_it() {
        install().unwrap();
        install().unwrap();
        let mut threads = VcpuThreads::new();
        let (ready_tx, ready_rx) = mpsc::channel();
        let kicked: Vec<_> = (0..4).map(|_| Arc::new(AtomicBool::new(false))).collect();
        for (id, saw) in (0u8..).zip(&kicked) {
            let (stop, ready, saw) = (threads.stop_flag(), ready_tx.clone(), saw.clone());
            threads.push(id, thread::spawn(move || fake_vcpu(stop, ready, saw)));
        }
        for _ in 0..4 {
            ready_rx.recv().unwrap();
        }
        let start = Instant::now();
        threads.stop(Duration::from_secs(10)).unwrap();
        assert!(start.elapsed() < Duration::from_secs(5));
        for (id, saw) in kicked.iter().enumerate() {
            assert!(
                saw.load(Ordering::SeqCst),
                "thread {id}: handler set the byte"
            );
        }
    }

    #[test]
    fn a_thread_sees_its_own_stop_flag() {
        assert!(!stopping(), "no flag: not stopping");
        let mut threads = VcpuThreads::new();
        let flag = threads.stop_flag();
        let (tx, rx) = mpsc::channel::<bool>();
        let (go_tx, go_rx) = mpsc::channel::<()>();
        threads.push(
            0,
            thread::spawn(move || {
                set_thread_stop_flag(flag);
                tx.send(stopping()).unwrap();
                while !stopping() {
                    let _ = go_rx.recv_timeout(Duration::from_millis(5));
                }
                tx.send(stopping()).unwrap();
            }),
        );
        assert!(!rx.recv().unwrap());
        install().unwrap();
        threads.stop(Duration::from_secs(5)).unwrap();
        drop(go_tx);
        assert!(rx.recv().unwrap());
        assert!(!stopping(), "other threads unaffected");
    }

    #[test]
    fn the_guard_arms_only_while_alive() {
        install().unwrap();
        let byte = AtomicU8::new(0);
        {
            // SAFETY: `byte` outlives the guard.
            let _armed = unsafe { Armed::new(byte.as_ptr()) };
            // SAFETY: raise sends the kick to this thread; the handler is
            // installed, so it runs before raise returns.
            assert_eq!(unsafe { libc::raise(kick_signal()) }, 0);
            assert_eq!(byte.load(Ordering::SeqCst), 1);
        }
        byte.store(0, Ordering::SeqCst);
        // SAFETY: as above; nothing is armed now.
        assert_eq!(unsafe { libc::raise(kick_signal()) }, 0);
        assert_eq!(byte.load(Ordering::SeqCst), 0, "disarmed");
    }

    #[test]
    fn a_thread_that_never_stops_is_reported() {
        install().unwrap();
        let release = Arc::new(AtomicBool::new(false));
        let mut threads = VcpuThreads::new();
        let r = release.clone();
        threads.push(0, thread::spawn(|| {}));
        threads.push(
            7,
            thread::spawn(move || {
                while !r.load(Ordering::SeqCst) {
                    thread::sleep(Duration::from_millis(5));
                }
            }),
        );
        let err = threads.stop(Duration::from_millis(50)).unwrap_err();
        release.store(true, Ordering::SeqCst);
        assert!(matches!(err, KickError::Stuck { id: 7, .. }), "{err}");
        assert!(
            err.to_string().contains("vCPU thread 7 did not stop"),
            "{err}"
        );

        let mut threads = VcpuThreads::new();
        threads.push(3, thread::spawn(|| panic!("vCPU thread test panic")));
        let err = threads.stop(Duration::from_secs(5)).unwrap_err();
        assert_eq!(err.to_string(), "vCPU thread 3 panicked");
    }
}
