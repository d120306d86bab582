//! Device I/O off the vCPU threads: a thread that serves a virtqueue when
//! its ioeventfd fires.
//!
//! KVM signals the ioeventfd when the guest writes the queue's index to the
//! device's QueueNotify register, and the vCPU goes straight back into the
//! guest without an exit to userspace (Firecracker and cloud-hypervisor do
//! the same). The thread then takes the device's lock, processes the queue
//! and raises the interrupt through the device's irqfd.
//!
//! Guest memory is reached through the protection lock, one descriptor
//! chain at a time ([`crate::devices::virtio::MemoryGuard`]). That defines what
//! happens when the guest UNSHAREs a buffer while a request that touches it
//! is in flight: the UNSHARE (which takes the lock for writing) waits until
//! the chain being processed is done, and every access after it sees the
//! page private and fails (the request completes with an I/O error, counted
//! as a denied access). No device access reads or writes a page after the
//! UNSHARE that made it private returned.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::thread::{self, JoinHandle};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Errors of the I/O thread's setup.
#[derive(Debug, thiserror::Error)]
pub enum IoThreadError {
    /// Creating the stop eventfd failed.
    #[error("creating the stop eventfd of I/O thread {name}: {err}")]
    EventFd {
        /// Thread name.
        name: String,
        /// The OS error.
        err: io::Error,
    },
    /// Spawning the thread failed.
    #[error("spawning I/O thread {name}: {err}")]
    Spawn {
        /// Thread name.
        name: String,
        /// The OS error.
        err: io::Error,
    },
}

/// A running I/O thread; dropping it stops and joins it.
pub struct IoThread {
    stop: EventFd,
    handle: Option<JoinHandle<()>>,
}

impl IoThread {
    /// Starts thread `name`, which calls `work` each time `notify` fires
    /// (once for any number of notifications since the last call) until it
    /// is stopped. An error from `work` goes to `failed` and ends the thread.
    pub fn spawn(
        name: &str,
        notify: Arc<EventFd>,
        mut work: impl FnMut() -> Result<(), String> + Send + 'static,
        failed: impl FnOnce(String) + Send + 'static,
    ) -> Result<IoThread, IoThreadError> {
        let stop = EventFd::new(EFD_NONBLOCK).map_err(|err| IoThreadError::EventFd {
            name: name.to_string(),
            err,
        })?;
        let stop_wait = stop.try_clone().map_err(|err| IoThreadError::EventFd {
            name: name.to_string(),
            err,
        })?;
        let handle = thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                let result = serve(&notify, &stop_wait, &mut work);
                if let Err(e) = result {
                    failed(e);
                }
            })
            .map_err(|err| IoThreadError::Spawn {
                name: name.to_string(),
                err,
            })?;
        Ok(IoThread {
            stop,
            handle: Some(handle),
        })
    }
}

impl Drop for IoThread {
    fn drop(&mut self) {
        // The thread polls the stop eventfd; a failed write leaves nothing
        // better to do than to wait for it.
        let _ = self.stop.write(1);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// The thread's loop: wait for `notify` or `stop`, drain `notify`, work.
fn serve(
    notify: &EventFd,
    stop: &EventFd,
    work: &mut impl FnMut() -> Result<(), String>,
) -> Result<(), String> {
    loop {
        let mut fds = [
            libc::pollfd {
                fd: notify.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: stop.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: `fds` is a valid array of two pollfd for the call.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if rc < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(format!("poll: {err}"));
        }
        if fds[1].revents != 0 {
            return Ok(());
        }
        if fds[0].revents & libc::POLLIN != 0 {
            // Non-blocking: EAGAIN means another wake-up drained it.
            match notify.read() {
                Ok(_) => work()?,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(format!("reading the queue eventfd: {e}")),
            }
        } else if fds[0].revents != 0 {
            return Err(format!("queue eventfd: poll events {:#x}", fds[0].revents));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::mpsc;
    use std::time::Duration;

    fn wait_until(what: &str, f: impl Fn() -> bool) {
        for _ in 0..500 {
            if f() {
                return;
            }
            thread::sleep(Duration::from_millis(2));
        }
        panic!("timed out waiting for {what}");
    }

    #[test]
    fn works_on_each_notification_and_stops_on_drop() {
        let notify = Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());
        let calls = Arc::new(AtomicU64::new(0));
        let c = calls.clone();
        let t = IoThread::spawn(
            "test-io",
            notify.clone(),
            move || {
                c.fetch_add(1, Ordering::SeqCst);
                Ok(())
            },
            |e| panic!("unexpected failure {e}"),
        )
        .unwrap();
        notify.write(1).unwrap();
        wait_until("the first call", || calls.load(Ordering::SeqCst) == 1);
        notify.write(1).unwrap();
        wait_until("the second call", || calls.load(Ordering::SeqCst) == 2);
        drop(t);
        notify.write(1).unwrap();
        thread::sleep(Duration::from_millis(20));
        assert_eq!(calls.load(Ordering::SeqCst), 2, "no work after the stop");
    }

    #[test]
    fn an_error_is_reported_and_ends_the_thread() {
        let notify = Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());
        let (tx, rx) = mpsc::channel();
        let t = IoThread::spawn(
            "test-io-err",
            notify.clone(),
            || Err("irqfd write failed".to_string()),
            move |e| tx.send(e).unwrap(),
        )
        .unwrap();
        notify.write(1).unwrap();
        let e = rx.recv_timeout(Duration::from_secs(5)).unwrap();
        assert_eq!(e, "irqfd write failed");
        drop(t);
    }
}
