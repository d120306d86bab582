//! Device I/O off the vCPU threads: one thread, one epoll, every device.
//!
//! KVM signals a queue's ioeventfd when the guest writes the queue's index
//! to its device's QueueNotify register, and the vCPU goes straight back
//! into the guest without an exit to userspace (Firecracker and
//! cloud-hypervisor do the same). The event loop waits with epoll on every
//! such eventfd and on the devices' backend descriptors (a TAP), and hands
//! each event to its device under the device's lock: the device processes
//! the queue, or moves data between its backend and the guest, and raises
//! its interrupt through its irqfd.
//!
//! Guest memory is reached through the protection lock, one descriptor
//! chain at a time ([`crate::devices::virtio::MemoryGuard`]). That defines
//! what happens when the guest UNSHAREs a buffer while a request that
//! touches it is in flight: the UNSHARE (which takes the lock for writing)
//! waits until the chain being processed is done, and every access after
//! it sees the page private and fails (the request completes with an
//! error, counted as a denied access). No device access reads or writes a
//! page after the UNSHARE that made it private returned.
//!
//! Queue eventfds are level triggered and drained before the device is
//! called (once for any number of notifications since the last call);
//! backends are edge triggered, so a device with no room for what its
//! backend holds does not wake the loop again until something new arrives
//! or the guest makes room (a notification of the queue).

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::thread::{self, JoinHandle};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::bus::{MmioBus, SharedDevice};
use crate::exit::locked;

/// Errors of the event loop's setup.
#[derive(Debug, thiserror::Error)]
pub enum EventLoopError {
    /// Creating the epoll instance or the stop eventfd failed.
    #[error("creating the device event loop's {what}: {err}")]
    Create {
        /// What.
        what: &'static str,
        /// The OS error.
        err: io::Error,
    },
    /// Adding a descriptor to the epoll set failed.
    #[error("adding descriptor {fd} of device {device} to the event loop: {err}")]
    Add {
        /// The device.
        device: &'static str,
        /// The descriptor.
        fd: RawFd,
        /// The OS error.
        err: io::Error,
    },
    /// Spawning the thread failed.
    #[error("spawning the device event loop thread: {0}")]
    Spawn(io::Error),
}

/// What one epoll entry stands for.
struct Source {
    device: SharedDevice,
    name: &'static str,
    token: u32,
    /// A queue eventfd to drain before the device runs (`None`: a backend).
    counter: Option<Arc<EventFd>>,
}

/// The running event loop; dropping it stops and joins the thread.
pub struct EventLoop {
    stop: EventFd,
    handle: Option<JoinHandle<()>>,
}

/// epoll data of the stop eventfd (sources are numbered from 0).
const STOP: u64 = u64::MAX;

impl EventLoop {
    /// Starts the loop over the events every device of `bus` asked for
    /// ([`super::MmioDevice::ioevents`], [`super::MmioDevice::backends`]).
    /// A device error goes to `failed` and ends the loop (the VM stops).
    pub fn spawn(
        bus: &MmioBus,
        failed: impl FnOnce(String) + Send + 'static,
    ) -> Result<EventLoop, EventLoopError> {
        let create = |what| move |err| EventLoopError::Create { what, err };
        let epoll = Epoll::new().map_err(create("epoll"))?;
        let stop = EventFd::new(EFD_NONBLOCK).map_err(create("stop eventfd"))?;
        epoll
            .ctl(
                ControlOperation::Add,
                stop.as_raw_fd(),
                EpollEvent::new(EventSet::IN, STOP),
            )
            .map_err(create("stop registration"))?;
        let mut sources = Vec::new();
        for e in bus.iter() {
            let (ioevents, backends) = {
                let d = locked(&e.device);
                (d.ioevents(), d.backends())
            };
            let counters = ioevents
                .into_iter()
                .map(|io| (io.evt.as_raw_fd(), io.token, Some(io.evt), EventSet::IN));
            let backends = backends
                .into_iter()
                .map(|b| (b.fd, b.token, None, EventSet::IN | EventSet::EDGE_TRIGGERED));
            for (fd, token, counter, events) in counters.chain(backends) {
                let data = sources.len() as u64;
                epoll
                    .ctl(ControlOperation::Add, fd, EpollEvent::new(events, data))
                    .map_err(|err| EventLoopError::Add {
                        device: e.name,
                        fd,
                        err,
                    })?;
                sources.push(Source {
                    device: e.device.clone(),
                    name: e.name,
                    token,
                    counter,
                });
            }
        }
        let handle = thread::Builder::new()
            .name("devices".into())
            .spawn(move || {
                if let Err(e) = serve(&epoll, &sources) {
                    failed(e);
                }
            })
            .map_err(EventLoopError::Spawn)?;
        Ok(EventLoop {
            stop,
            handle: Some(handle),
        })
    }
}

impl Drop for EventLoop {
    fn drop(&mut self) {
        // The thread polls the stop eventfd; a failed write leaves nothing
        // better to do than to wait for it.
        let _ = self.stop.write(1);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// The loop: wait, then run each ready source's device.
fn serve(epoll: &Epoll, sources: &[Source]) -> Result<(), String> {
    let mut events = vec![EpollEvent::default(); sources.len() + 1];
    loop {
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(format!("epoll_wait: {e}")),
        };
        for ev in &events[..n] {
            if ev.data() == STOP {
                return Ok(());
            }
            let Some(s) = sources.get(ev.data() as usize) else {
                continue;
            };
            if let Some(evt) = &s.counter {
                if ev.event_set().contains(EventSet::ERROR) {
                    return Err(format!(
                        "queue eventfd of {}: poll events {:#x}",
                        s.name,
                        ev.events()
                    ));
                }
                // Non-blocking: EAGAIN means an earlier wake-up drained it.
                match evt.read() {
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    Err(e) => return Err(format!("reading a queue eventfd of {}: {e}", s.name)),
                }
            }
            locked(&s.device)
                .handle_event(s.token)
                .map_err(|e| format!("{}: {e}", s.name))?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::{Backend, DeviceError, IoEvent, MmioDevice};
    use std::os::unix::net::UnixStream;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::{mpsc, Mutex};
    use std::time::Duration;

    /// Counts its events; token 7 fails.
    struct Counter {
        queue: Arc<EventFd>,
        backend: UnixStream,
        seen: Arc<Mutex<Vec<u32>>>,
        calls: Arc<AtomicU64>,
    }

    impl MmioDevice for Counter {
        fn name(&self) -> &'static str {
            "counter"
        }
        fn read(&mut self, _: u64, _: &mut [u8]) {}
        fn write(&mut self, _: u64, _: &[u8]) -> Result<(), DeviceError> {
            Ok(())
        }
        fn reset(&mut self) {}
        fn ioevents(&self) -> Vec<IoEvent> {
            vec![IoEvent {
                offset: 0x50,
                datamatch: 0,
                evt: self.queue.clone(),
                token: 1,
            }]
        }
        fn backends(&self) -> Vec<Backend> {
            vec![Backend {
                fd: self.backend.as_raw_fd(),
                token: 2,
            }]
        }
        fn handle_event(&mut self, token: u32) -> Result<(), DeviceError> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            locked(&self.seen).push(token);
            if token == 2 {
                // Take what the backend holds, as a device with room does.
                use std::io::Read;
                let mut buf = [0u8; 64];
                let _ = (&self.backend).read(&mut buf);
            }
            Ok(())
        }
    }

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
    fn queue_and_backend_events_reach_their_device_until_stopped() {
        let queue = Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());
        let (backend, mut peer) = UnixStream::pair().unwrap();
        backend.set_nonblocking(true).unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let calls = Arc::new(AtomicU64::new(0));
        let dev = Arc::new(Mutex::new(Counter {
            queue: queue.clone(),
            backend,
            seen: seen.clone(),
            calls: calls.clone(),
        }));
        let mut bus = MmioBus::new();
        bus.insert(0x1000, 0x100, dev).unwrap();
        let l = EventLoop::spawn(&bus, |e| panic!("unexpected failure {e}")).unwrap();
        queue.write(1).unwrap();
        queue.write(1).unwrap();
        wait_until("the queue event", || calls.load(Ordering::SeqCst) == 1);
        use std::io::Write;
        peer.write_all(b"frame").unwrap();
        wait_until("the backend event", || calls.load(Ordering::SeqCst) == 2);
        assert_eq!(*locked(&seen), [1, 2], "two notifications, one call");
        drop(l);
        queue.write(1).unwrap();
        peer.write_all(b"late").unwrap();
        thread::sleep(Duration::from_millis(20));
        assert_eq!(calls.load(Ordering::SeqCst), 2, "nothing after the stop");
    }

    /// A device whose events fail.
    struct Failing(Arc<EventFd>);

    impl MmioDevice for Failing {
        fn name(&self) -> &'static str {
            "failing"
        }
        fn read(&mut self, _: u64, _: &mut [u8]) {}
        fn write(&mut self, _: u64, _: &[u8]) -> Result<(), DeviceError> {
            Ok(())
        }
        fn reset(&mut self) {}
        fn ioevents(&self) -> Vec<IoEvent> {
            vec![IoEvent {
                offset: 0,
                datamatch: 0,
                evt: self.0.clone(),
                token: 0,
            }]
        }
        fn handle_event(&mut self, _: u32) -> Result<(), DeviceError> {
            Err(DeviceError::Virtio(
                crate::devices::virtio::VirtioError::Irq {
                    device: 9,
                    msg: "irqfd write failed".into(),
                },
            ))
        }
    }

    #[test]
    fn a_device_error_is_reported_and_ends_the_loop() {
        let evt = Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());
        let mut bus = MmioBus::new();
        bus.insert(0, 0x100, Arc::new(Mutex::new(Failing(evt.clone()))))
            .unwrap();
        let (tx, rx) = mpsc::channel();
        let l = EventLoop::spawn(&bus, move |e| tx.send(e).unwrap()).unwrap();
        evt.write(1).unwrap();
        let e = rx.recv_timeout(Duration::from_secs(5)).unwrap();
        assert!(
            e.starts_with("failing: ") && e.contains("irqfd write failed"),
            "{e}"
        );
        drop(l);
    }
}
