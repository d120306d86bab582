//! Serial console: vm-superio's 16550A at 0x3f8 (IRQ 4) feeding a console
//! sink that watches the stream for a guest kernel panic.
//!
//! The UART is generic over its interrupt trigger, so tests drive it with a
//! counting trigger. The UART writes into a small buffer that is moved to
//! the console after every register write, so that a reboot can replace
//! the UART with a power-on one while the console stream (and its panic
//! watch) goes on.
//!
//! The console never writes to its output on the vCPU's thread: bytes go
//! to a [`ConsoleSink`], a bounded queue drained by a writer thread, so a
//! stalled stdout (a pipe nobody reads) blocks neither the vCPUs that
//! print, nor `--timeout`, nor the exit path; past the bound, bytes are
//! dropped and counted. The panic watch is an atomic ([`PanicWatch`]) that
//! the main thread reads without the serial lock.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};

/// I/O port base of COM1.
pub const COM1_BASE: u16 = 0x3f8;
/// Number of COM1 registers.
pub const COM1_LEN: u16 = 8;
/// ISA IRQ of COM1.
pub const COM1_IRQ: u32 = 4;

/// First line of a Linux panic (kernel/panic.c).
pub const PANIC_MARKER: &[u8] = b"Kernel panic - not syncing";
/// Last line of a Linux panic report.
pub const PANIC_END_MARKER: &[u8] = b"---[ end Kernel panic - not syncing";

/// Banner of a kernel starting (init/main.c): after a panic, the crash
/// kernel that kdump started (`panic()` runs `crash_kexec()` before the
/// report's end line), so the panic is handled, not the end of the guest.
pub const KERNEL_BANNER: &[u8] = b"] Linux version ";

/// Longest line kept for marker matching; longer lines keep their tail.
const MAX_LINE: usize = 4096;

/// Most console bytes waiting for the writer thread; more are dropped.
pub const SINK_CAPACITY: usize = 4 << 20;

/// Errors of the serial console.
#[derive(Debug, thiserror::Error)]
pub enum SerialError {
    /// Writing a UART register failed (the interrupt or the output failed).
    #[error("serial register write at offset {offset} (value {value:#04x}) failed: {msg}")]
    Write {
        /// Register offset from COM1_BASE.
        offset: u8,
        /// Value written.
        value: u8,
        /// vm-superio's error, printed.
        msg: String,
    },
}

/// What the console has seen of a guest panic.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(u8)]
pub enum PanicState {
    /// No panic line yet.
    #[default]
    None = 0,
    /// "Kernel panic - not syncing" seen; the report may still be printing.
    Started = 1,
    /// The "---[ end Kernel panic" line is complete.
    Ended = 2,
}

/// The console's panic state, shared: the console sets it on the vCPU
/// that prints, the main thread reads it without the serial lock.
#[derive(Clone, Debug, Default)]
pub struct PanicWatch(Arc<AtomicU8>);

impl PanicWatch {
    /// The state now.
    pub fn state(&self) -> PanicState {
        match self.0.load(Ordering::Acquire) {
            0 => PanicState::None,
            1 => PanicState::Started,
            _ => PanicState::Ended,
        }
    }

    fn set(&self, s: PanicState) {
        self.0.store(s as u8, Ordering::Release);
    }
}

/// What the writer thread has to do and has done.
#[derive(Default)]
struct Pending {
    bytes: VecDeque<u8>,
    /// The writer is writing a chunk it took.
    writing: bool,
    /// Bytes dropped because the queue was full.
    dropped: u64,
    /// The first write error of the output.
    error: Option<String>,
}

struct SinkShared {
    pending: Mutex<Pending>,
    /// Signalled when bytes arrive and when a chunk is written.
    changed: Condvar,
}

impl SinkShared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Console output on its way to a writer thread: [`ConsoleSink::push`]
/// never blocks on the output.
#[derive(Clone)]
pub struct ConsoleSink {
    shared: Arc<SinkShared>,
    capacity: usize,
}

impl ConsoleSink {
    /// Starts the writer thread that writes to `out` (and flushes after
    /// each chunk), with room for [`SINK_CAPACITY`] bytes in between.
    pub fn spawn<W: Write + Send + 'static>(out: W) -> io::Result<Self> {
        Self::with_capacity(out, SINK_CAPACITY)
    }

    /// [`ConsoleSink::spawn`] with room for `capacity` bytes.
    pub fn with_capacity<W: Write + Send + 'static>(
        mut out: W,
        capacity: usize,
    ) -> io::Result<Self> {
        let shared = Arc::new(SinkShared {
            pending: Mutex::new(Pending::default()),
            changed: Condvar::new(),
        });
        let s = shared.clone();
        // Detached: a writer stuck in a write must not hold up the exit.
        thread::Builder::new()
            .name("console".into())
            .spawn(move || loop {
                let chunk: Vec<u8> = {
                    let mut p = s.lock();
                    while p.bytes.is_empty() {
                        p = s.changed.wait(p).unwrap_or_else(PoisonError::into_inner);
                    }
                    p.writing = true;
                    p.bytes.drain(..).collect()
                };
                let res = out.write_all(&chunk).and_then(|()| out.flush());
                let mut p = s.lock();
                p.writing = false;
                if let Err(e) = res {
                    p.error.get_or_insert(e.to_string());
                }
                s.changed.notify_all();
            })?;
        Ok(ConsoleSink { shared, capacity })
    }

    /// Queues `buf` for the output; what does not fit is dropped and
    /// counted. Returns the output's first write error, if there was one.
    pub fn push(&self, buf: &[u8]) -> Result<(), String> {
        let mut p = self.shared.lock();
        if let Some(e) = &p.error {
            return Err(e.clone());
        }
        let room = self.capacity.saturating_sub(p.bytes.len());
        let n = buf.len().min(room);
        p.bytes.extend(&buf[..n]);
        p.dropped += (buf.len() - n) as u64;
        self.shared.changed.notify_all();
        Ok(())
    }

    /// Waits until everything queued is written, at most `wait`; returns
    /// whether it was.
    pub fn flush(&self, wait: Duration) -> bool {
        let deadline = Instant::now() + wait;
        let mut p = self.shared.lock();
        while !p.bytes.is_empty() || p.writing {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || p.error.is_some() {
                return false;
            }
            p = self
                .shared
                .changed
                .wait_timeout(p, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        true
    }

    /// Bytes not written yet (queued or being written).
    pub fn backlog(&self) -> usize {
        let p = self.shared.lock();
        p.bytes.len()
    }

    /// Bytes dropped because the writer could not keep up.
    pub fn dropped(&self) -> u64 {
        self.shared.lock().dropped
    }
}

/// Output sink of the UART: scans whole lines for a panic and passes every
/// byte to the [`ConsoleSink`].
pub struct Console {
    sink: ConsoleSink,
    line: Vec<u8>,
    panic: PanicWatch,
    bytes: u64,
}

impl Console {
    /// A console writing through `sink`.
    pub fn new(sink: ConsoleSink) -> Self {
        Console {
            sink,
            line: Vec::new(),
            panic: PanicWatch::default(),
            bytes: 0,
        }
    }

    /// Panic state so far.
    pub fn panic_state(&self) -> PanicState {
        self.panic.state()
    }

    /// The panic state, for readers without the serial lock.
    pub fn panic_watch(&self) -> PanicWatch {
        self.panic.clone()
    }

    /// Bytes the guest has written to the console.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// The sink behind the console.
    pub fn sink(&self) -> &ConsoleSink {
        &self.sink
    }

    fn end_line(&mut self) {
        let has = |m: &[u8]| self.line.windows(m.len()).any(|w| w == m);
        let now = self.panic.state();
        // The end line alone also proves a panic (its start may have been
        // cut by a full line buffer).
        if has(PANIC_END_MARKER) {
            self.panic.set(PanicState::Ended);
        } else if has(PANIC_MARKER) && now == PanicState::None {
            self.panic.set(PanicState::Started);
        } else if has(KERNEL_BANNER) && now == PanicState::Started {
            self.panic.set(PanicState::None);
        }
        self.line.clear();
    }

    /// Scans `buf` and queues it for the output.
    pub fn write(&mut self, buf: &[u8]) -> Result<(), String> {
        self.bytes += buf.len() as u64;
        for &b in buf {
            if b == b'\n' {
                self.end_line();
            } else {
                if self.line.len() >= MAX_LINE {
                    self.line.drain(..MAX_LINE - PANIC_END_MARKER.len());
                }
                self.line.push(b);
            }
        }
        self.sink.push(buf)
    }
}

/// COM1: a 16550A whose output goes to a [`Console`].
pub struct SerialPort<T: Trigger> {
    uart: Serial<T, NoEvents, Vec<u8>>,
    console: Console,
}

impl<T: Trigger> SerialPort<T> {
    /// A UART raising `irq` and writing through `sink`.
    pub fn new(irq: T, sink: ConsoleSink) -> Self {
        SerialPort {
            uart: Serial::new(irq, Vec::new()),
            console: Console::new(sink),
        }
    }

    /// Machine reset: the UART goes back to its power-on registers (no
    /// interrupt enabled, default divisor, empty FIFO); the console keeps
    /// its output, byte count and panic state, and drops a partial line.
    pub fn reset(&mut self)
    where
        T: Clone,
    {
        self.uart = Serial::new(self.uart.interrupt_evt().clone(), Vec::new());
        self.console.line.clear();
    }

    /// Guest `in` from register `offset`.
    pub fn read(&mut self, offset: u8) -> u8 {
        self.uart.read(offset)
    }

    /// Guest `out` to register `offset`.
    pub fn write(&mut self, offset: u8, value: u8) -> Result<(), SerialError> {
        let err = |msg: String| SerialError::Write { offset, value, msg };
        self.uart
            .write(offset, value)
            .map_err(|e| err(format!("{e:?}")))?;
        let out = self.uart.writer_mut();
        if out.is_empty() {
            return Ok(());
        }
        let res = self.console.write(out);
        out.clear();
        res.map_err(err)
    }

    /// The console behind the UART.
    pub fn console(&self) -> &Console {
        &self.console
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;

    /// Interrupt trigger that counts how often it fired.
    #[derive(Clone, Debug, Default)]
    pub(crate) struct CountingIrq(pub(crate) Arc<AtomicU64>);

    impl CountingIrq {
        pub(crate) fn count(&self) -> u64 {
            self.0.load(Ordering::SeqCst)
        }
    }

    impl Trigger for CountingIrq {
        type E = io::Error;

        fn trigger(&self) -> io::Result<()> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    /// An output that keeps what it was given, for tests to read.
    #[derive(Clone, Default)]
    pub(crate) struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl Captured {
        /// A sink writing here.
        pub(crate) fn sink() -> (ConsoleSink, Captured) {
            let c = Captured::default();
            (ConsoleSink::spawn(c.clone()).unwrap(), c)
        }

        /// What reached the output once `sink` is flushed.
        pub(crate) fn after(&self, sink: &ConsoleSink) -> Vec<u8> {
            assert!(sink.flush(Duration::from_secs(5)), "the writer is stuck");
            self.0.lock().unwrap().clone()
        }
    }

    /// An output whose writes block until the test lets them through
    /// (drops the sender).
    pub(crate) struct Stalled(
        pub(crate) std::sync::mpsc::Receiver<()>,
        pub(crate) Captured,
    );

    impl Write for Stalled {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let _ = self.0.recv();
            self.1.write(buf)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    const THR: u8 = 0;
    const IER: u8 = 1;
    const IIR: u8 = 2;
    const LSR: u8 = 5;

    fn port<T: Trigger>(irq: T) -> (SerialPort<T>, Captured) {
        let (sink, out) = Captured::sink();
        (SerialPort::new(irq, sink), out)
    }

    fn type_str<T: Trigger>(port: &mut SerialPort<T>, s: &[u8]) {
        for &b in s {
            port.write(THR, b).unwrap();
        }
    }

    #[test]
    fn output_reaches_the_sink_and_interrupts_fire() {
        let irq = CountingIrq::default();
        let (mut port, out) = port(irq.clone());
        assert_ne!(port.read(LSR) & 0x20, 0, "transmitter empty");
        port.write(IER, 0x02).unwrap(); // THR-empty interrupt on
        assert_eq!(irq.count(), 1, "enabling with THR empty asserts it");
        for &b in b"Linux version 7.2\n" {
            assert_eq!(port.read(IIR) & 0x0f, 0x02, "THR-empty pending");
            port.write(THR, b).unwrap();
        }
        assert_eq!(out.after(port.console().sink()), b"Linux version 7.2\n");
        assert_eq!(port.console().bytes(), 18);
        assert_eq!(
            irq.count(),
            19,
            "one THR-empty interrupt per byte after each IIR read"
        );
        assert_eq!(port.console().panic_state(), PanicState::None);
    }

    #[test]
    fn panic_is_seen_start_then_end() {
        let (mut port, _out) = port(CountingIrq::default());
        type_str(
            &mut port,
            b"[    1.0] Kernel panic - not syncing: VFS: Unable to mount root",
        );
        assert_eq!(
            port.console().panic_state(),
            PanicState::None,
            "line not complete"
        );
        type_str(&mut port, b"\nCPU: 0 PID: 1\nCall Trace:\n");
        assert_eq!(port.console().panic_state(), PanicState::Started);
        type_str(
            &mut port,
            b"[    1.1] ---[ end Kernel panic - not syncing: VFS ]---\n",
        );
        assert_eq!(port.console().panic_state(), PanicState::Ended);
    }

    #[test]
    fn a_crash_kernel_banner_ends_the_panic() {
        let (mut port, _out) = port(CountingIrq::default());
        type_str(
            &mut port,
            b"[   13.1] Kernel panic - not syncing: sysrq triggered crash\n",
        );
        assert_eq!(port.console().panic_state(), PanicState::Started);
        // kdump: panic() kexecs into the crash kernel before its end line.
        type_str(
            &mut port,
            b"[    0.000000] Linux version 7.2.12 (root@vm)\n",
        );
        assert_eq!(port.console().panic_state(), PanicState::None);
        // The crash kernel's own panic counts again.
        type_str(&mut port, b"[    2.0] Kernel panic - not syncing: x\n");
        assert_eq!(port.console().panic_state(), PanicState::Started);
        // An ended panic stays ended: nothing runs after its report.
        type_str(
            &mut port,
            b"[    2.1] ---[ end Kernel panic - not syncing: x ]---\n",
        );
        type_str(&mut port, b"[    0.000000] Linux version 7.2.12\n");
        assert_eq!(port.console().panic_state(), PanicState::Ended);
    }

    #[test]
    fn reset_restores_power_on_registers_and_keeps_the_console() {
        use vm_superio::serial::SerialState;
        const LCR: u8 = 3;
        const SCR: u8 = 7;
        let irq = CountingIrq::default();
        let (mut port, out) = port(irq.clone());
        let power_on = port.uart.state();
        assert_eq!(power_on, SerialState::default());
        port.write(LCR, 0x80).unwrap(); // DLAB: set the divisor
        port.write(0, 1).unwrap();
        port.write(LCR, 0x03).unwrap(); // 8n1
        port.write(IER, 0x03).unwrap();
        port.write(SCR, 0x5a).unwrap();
        type_str(&mut port, b"first boot\nhalf a li");
        assert_ne!(port.uart.state(), power_on);
        let fired = irq.count();

        port.reset();
        assert_eq!(port.uart.state(), power_on);
        assert_eq!(port.read(IER), 0);
        assert_eq!(port.read(SCR), 0);
        assert_eq!(irq.count(), fired, "a reset raises nothing");
        type_str(&mut port, b"ne\nsecond boot\n");
        assert_eq!(
            out.after(port.console().sink()),
            b"first boot\nhalf a line\nsecond boot\n"
        );
        assert_eq!(port.console().bytes(), 35);
        assert_eq!(port.console().panic_state(), PanicState::None);
        port.write(IER, 0x02).unwrap();
        assert_eq!(
            irq.count(),
            fired + 1,
            "the same interrupt line after reset"
        );
    }

    #[test]
    fn long_lines_are_bounded_and_markers_still_found() {
        let (sink, out) = Captured::sink();
        let mut c = Console::new(sink);
        c.write(b"Kernel panic - not syncing: late").unwrap();
        assert_eq!(c.panic_state(), PanicState::None, "no newline yet");
        let long = vec![b'x'; 3 * MAX_LINE];
        c.write(&long).unwrap();
        c.write(b"Kernel panic - not syncing: late\n").unwrap();
        assert_eq!(c.panic_state(), PanicState::Started);
        assert!(c.line.is_empty());
        assert_eq!(out.after(c.sink()).len(), 32 + 3 * MAX_LINE + 33);
        c.write(b"---[ end Kernel panic - not syncing ]---\n")
            .unwrap();
        assert_eq!(c.panic_state(), PanicState::Ended);
    }

    /// A stdout nobody reads: the guest keeps printing at full speed, the
    /// panic is seen at once by a reader without the serial lock, a flush
    /// gives up at its deadline, and what did not fit is dropped and
    /// counted; once the output moves again, everything queued arrives.
    #[test]
    fn a_stalled_output_blocks_neither_the_guest_nor_the_panic_watch() {
        let (release, stalled) = std::sync::mpsc::channel();
        let out = Captured::default();
        let sink = ConsoleSink::with_capacity(Stalled(stalled, out.clone()), 64 << 10).unwrap();
        let mut port = SerialPort::new(CountingIrq::default(), sink.clone());
        let watch = port.console().panic_watch();
        let start = Instant::now();
        type_str(&mut port, b"first line\n");
        // The writer now holds the first line and is stuck writing it.
        let line = [b'y'; 99];
        for _ in 0..2000 {
            type_str(&mut port, &line);
            type_str(&mut port, b"\n");
        }
        type_str(&mut port, b"Kernel panic - not syncing: stalled\n");
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "printing 200 KB took {:?}",
            start.elapsed()
        );
        assert_eq!(watch.state(), PanicState::Started);
        let t = Instant::now();
        assert!(!sink.flush(Duration::from_millis(100)), "still stuck");
        assert!(t.elapsed() < Duration::from_secs(2));
        let written = port.console().bytes();
        assert_eq!(written, 11 + 2000 * 100 + 36);
        // The writer took the first chunk; the queue filled up behind it.
        let dropped = sink.dropped();
        assert!(
            dropped > 0 && dropped <= written - (64 << 10) as u64,
            "{dropped}"
        );
        drop(release);
        assert!(sink.flush(Duration::from_secs(5)));
        let got = out.0.lock().unwrap().len() as u64;
        assert_eq!(got + dropped, written, "every byte written or counted");
    }
}
