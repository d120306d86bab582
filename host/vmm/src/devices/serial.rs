//! Serial console: vm-superio's 16550A at 0x3f8 (IRQ 4) feeding a console
//! sink that watches the stream for a guest kernel panic.
//!
//! The UART is generic over its interrupt trigger and the sink over its
//! output, so tests drive it with a counting trigger and a `Vec<u8>`. The
//! UART writes into a small buffer that is moved to the console after every
//! register write, so that a reboot can replace the UART with a power-on
//! one while the console stream (and its panic watch) goes on.

use std::io::{self, Write};

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
pub enum PanicState {
    /// No panic line yet.
    #[default]
    None,
    /// "Kernel panic - not syncing" seen; the report may still be printing.
    Started,
    /// The "---[ end Kernel panic" line is complete.
    Ended,
}

/// Output sink of the UART: forwards every byte and scans whole lines.
#[derive(Debug)]
pub struct Console<W: Write> {
    out: W,
    line: Vec<u8>,
    panic: PanicState,
    bytes: u64,
}

impl<W: Write> Console<W> {
    /// A console writing to `out`.
    pub fn new(out: W) -> Self {
        Console {
            out,
            line: Vec::new(),
            panic: PanicState::None,
            bytes: 0,
        }
    }

    /// Panic state so far.
    pub fn panic_state(&self) -> PanicState {
        self.panic
    }

    /// Bytes the guest has written to the console.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// The output sink.
    pub fn output(&self) -> &W {
        &self.out
    }

    fn end_line(&mut self) {
        let has = |m: &[u8]| self.line.windows(m.len()).any(|w| w == m);
        // The end line alone also proves a panic (its start may have been
        // cut by a full line buffer).
        if has(PANIC_END_MARKER) {
            self.panic = PanicState::Ended;
        } else if has(PANIC_MARKER) && self.panic == PanicState::None {
            self.panic = PanicState::Started;
        } else if has(KERNEL_BANNER) && self.panic == PanicState::Started {
            self.panic = PanicState::None;
        }
        self.line.clear();
    }
}

impl<W: Write> Write for Console<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
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
        // vm-superio flushes after every byte, so output is never held back.
        self.out.write_all(buf)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

/// COM1: a 16550A whose output goes to a [`Console`].
pub struct SerialPort<T: Trigger, W: Write> {
    uart: Serial<T, NoEvents, Vec<u8>>,
    console: Console<W>,
}

impl<T: Trigger, W: Write> SerialPort<T, W> {
    /// A UART raising `irq` and writing to `out`.
    pub fn new(irq: T, out: W) -> Self {
        SerialPort {
            uart: Serial::new(irq, Vec::new()),
            console: Console::new(out),
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
        // Flushed at once as vm-superio does, so output is never held back.
        let res = self
            .console
            .write_all(out)
            .and_then(|()| self.console.flush());
        out.clear();
        res.map_err(|e| err(e.to_string()))
    }

    /// The console behind the UART.
    pub fn console(&self) -> &Console<W> {
        &self.console
    }

    /// Flushes the console output.
    pub fn flush(&mut self) -> io::Result<()> {
        self.console.flush()
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

    const THR: u8 = 0;
    const IER: u8 = 1;
    const IIR: u8 = 2;
    const LSR: u8 = 5;

    fn type_str<T: Trigger, W: Write>(port: &mut SerialPort<T, W>, s: &[u8]) {
        for &b in s {
            port.write(THR, b).unwrap();
        }
    }

    #[test]
    fn output_reaches_the_sink_and_interrupts_fire() {
        let irq = CountingIrq::default();
        let mut port = SerialPort::new(irq.clone(), Vec::new());
        assert_ne!(port.read(LSR) & 0x20, 0, "transmitter empty");
        port.write(IER, 0x02).unwrap(); // THR-empty interrupt on
        assert_eq!(irq.count(), 1, "enabling with THR empty asserts it");
        for &b in b"Linux version 7.2\n" {
            assert_eq!(port.read(IIR) & 0x0f, 0x02, "THR-empty pending");
            port.write(THR, b).unwrap();
        }
        assert_eq!(port.console().output().as_slice(), b"Linux version 7.2\n");
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
        let mut port = SerialPort::new(CountingIrq::default(), Vec::new());
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
        let mut port = SerialPort::new(CountingIrq::default(), Vec::new());
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
        let mut port = SerialPort::new(irq.clone(), Vec::new());
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
            port.console().output().as_slice(),
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
        let mut c = Console::new(Vec::new());
        c.write_all(b"Kernel panic - not syncing: late").unwrap();
        assert_eq!(c.panic_state(), PanicState::None, "no newline yet");
        let long = vec![b'x'; 3 * MAX_LINE];
        c.write_all(&long).unwrap();
        c.write_all(b"Kernel panic - not syncing: late\n").unwrap();
        assert_eq!(c.panic_state(), PanicState::Started);
        assert!(c.line.is_empty());
        assert_eq!(c.output().len(), 32 + 3 * MAX_LINE + 33);
        c.write_all(b"---[ end Kernel panic - not syncing ]---\n")
            .unwrap();
        assert_eq!(c.panic_state(), PanicState::Ended);
    }
}
