//! The network backend: a TAP interface with virtio-net headers.
//!
//! The TAP is opened with `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR` and a
//! 12-byte vnet header (`struct virtio_net_hdr_v1`), so every frame read or
//! written carries the same header the guest's driver uses: checksum and
//! segmentation offloads pass through unchanged in both directions, and
//! the host kernel does the work the header asks for. Non-blocking: a
//! read with nothing queued fails with `EAGAIN`.
//!
//! The device talks to the backend through [`NetBackend`], so tests use a
//! datagram socket pair, which keeps frame boundaries as a TAP does.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
#[cfg(test)]
use std::os::unix::net::UnixDatagram;

use vmm_sys_util::ioctl::{ioctl_with_mut_ref, ioctl_with_ref, ioctl_with_val};

/// The clone device of TUN/TAP.
const TUN: &str = "/dev/net/tun";
/// `IFNAMSIZ`: interface names are at most 15 bytes.
const IFNAMSIZ: usize = 16;
/// Bytes of the vnet header on the TAP (`struct virtio_net_hdr_v1`).
pub const VNET_HDR_LEN: usize = 12;

/// `TUNSETIFF`: `_IOW('T', 202, int)`.
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
/// `TUNSETOFFLOAD`: `_IOW('T', 208, unsigned int)`.
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
/// `TUNSETVNETHDRSZ`: `_IOW('T', 216, int)`.
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;

/// `IFF_TAP`, `IFF_NO_PI`, `IFF_VNET_HDR` (include/uapi/linux/if_tun.h).
const IFF_TAP: i16 = 0x0002;
const IFF_NO_PI: i16 = 0x1000;
const IFF_VNET_HDR: i16 = 0x4000;

/// `TUN_F_*` offloads: the TAP may hand frames that need them to us.
pub const TUN_F_CSUM: u32 = 0x01;
/// TCP segmentation over IPv4.
pub const TUN_F_TSO4: u32 = 0x02;
/// TCP segmentation over IPv6.
pub const TUN_F_TSO6: u32 = 0x04;
/// TSO with ECN.
pub const TUN_F_TSO_ECN: u32 = 0x08;

/// `struct ifreq` as TUNSETIFF reads it: the name and the flags.
#[repr(C)]
struct IfReq {
    name: [u8; IFNAMSIZ],
    flags: i16,
    _rest: [u8; 22],
}

/// Errors opening the TAP.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// The interface name is empty, too long or not a name.
    #[error("TAP interface name {0:?}: expected 1 to 15 bytes, no '/', ' ' or NUL")]
    Name(String),
    /// Opening `/dev/net/tun` failed.
    #[error("opening {TUN} for TAP {name}: {err}")]
    Open {
        /// The interface.
        name: String,
        /// The OS error.
        err: io::Error,
    },
    /// An ioctl on the TAP failed.
    #[error("{op} on TAP {name}: {err}")]
    Ioctl {
        /// The ioctl.
        op: &'static str,
        /// The interface.
        name: String,
        /// The OS error.
        err: io::Error,
    },
}

/// What the virtio-net device needs of its backend.
pub trait NetBackend: Send {
    /// The descriptor to wait on for frames to read.
    fn fd(&self) -> RawFd;
    /// Reads one frame (vnet header first) into `buf`; `WouldBlock` when
    /// none is queued. A frame longer than `buf` is cut.
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize>;
    /// Writes one frame (vnet header first).
    fn write_frame(&mut self, frame: &[u8]) -> io::Result<()>;
    /// Sets the offloads (`TUN_F_*`) the guest accepts on received frames.
    fn set_offload(&mut self, flags: u32) -> io::Result<()>;
}

/// A TAP interface.
pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Opens (or, if it does not exist and we may, creates) TAP `name`
    /// with 12-byte vnet headers and no offloads yet.
    pub fn open(name: &str) -> Result<Tap, TapError> {
        let bytes = name.as_bytes();
        if bytes.is_empty() || bytes.len() >= IFNAMSIZ || bytes.iter().any(|b| b"/ \0".contains(b))
        {
            return Err(TapError::Name(name.to_string()));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(TUN)
            .map_err(|err| TapError::Open {
                name: name.to_string(),
                err,
            })?;
        let mut req = IfReq {
            name: [0; IFNAMSIZ],
            flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR,
            _rest: [0; 22],
        };
        req.name[..bytes.len()].copy_from_slice(bytes);
        let ioctl_err = |op| {
            move |err| TapError::Ioctl {
                op,
                name: name.to_string(),
                err,
            }
        };
        // SAFETY: TUNSETIFF reads and writes one `struct ifreq`, which
        // `IfReq` lays out (name, then the flags at offset 16, 40 bytes).
        let rc = unsafe { ioctl_with_mut_ref(&file, TUNSETIFF, &mut req) };
        if rc < 0 {
            return Err(ioctl_err("TUNSETIFF")(io::Error::last_os_error()));
        }
        let size = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int, which `size` is.
        let rc = unsafe { ioctl_with_ref(&file, TUNSETVNETHDRSZ, &size) };
        if rc < 0 {
            return Err(ioctl_err("TUNSETVNETHDRSZ")(io::Error::last_os_error()));
        }
        let tap = Tap {
            file,
            name: name.to_string(),
        };
        let mut t = tap;
        t.set_offload(0).map_err(ioctl_err("TUNSETOFFLOAD(0)"))?;
        Ok(t)
    }

    /// The interface's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl NetBackend for Tap {
    fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.file.read(buf)
    }

    fn write_frame(&mut self, frame: &[u8]) -> io::Result<()> {
        let n = self.file.write(frame)?;
        if n != frame.len() {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                format!("the TAP took {n} of {} bytes", frame.len()),
            ));
        }
        Ok(())
    }

    fn set_offload(&mut self, flags: u32) -> io::Result<()> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value.
        let rc = unsafe { ioctl_with_val(&self.file, TUNSETOFFLOAD, libc::c_ulong::from(flags)) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

/// One end of a datagram socket pair standing in for a TAP (tests): one
/// datagram is one frame, offloads are recorded.
#[cfg(test)]
pub struct SocketBackend {
    sock: UnixDatagram,
    /// The offloads last set.
    pub offload: Option<u32>,
}

#[cfg(test)]
impl SocketBackend {
    /// A backend and the peer that plays the host's side of the TAP.
    pub fn pair() -> io::Result<(SocketBackend, UnixDatagram)> {
        let (a, b) = UnixDatagram::pair()?;
        a.set_nonblocking(true)?;
        Ok((
            SocketBackend {
                sock: a,
                offload: None,
            },
            b,
        ))
    }
}

#[cfg(test)]
impl NetBackend for SocketBackend {
    fn fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }

    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.sock.recv(buf)
    }

    fn write_frame(&mut self, frame: &[u8]) -> io::Result<()> {
        self.sock.send(frame).map(|_| ())
    }

    fn set_offload(&mut self, flags: u32) -> io::Result<()> {
        self.offload = Some(flags);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ifreq_is_the_kernels_size_and_names_are_checked() {
        assert_eq!(std::mem::size_of::<IfReq>(), 40);
        assert_eq!(std::mem::offset_of!(IfReq, flags), 16);
        for bad in ["", "a23456789abcdef0", "a/b", "a b"] {
            assert!(matches!(Tap::open(bad), Err(TapError::Name(_))), "{bad:?}");
        }
        const T: u32 = b'T' as u32;
        vmm_sys_util::ioctl_iow_nr!(SETIFF, T, 202, libc::c_int);
        vmm_sys_util::ioctl_iow_nr!(SETOFFLOAD, T, 208, libc::c_uint);
        vmm_sys_util::ioctl_iow_nr!(SETVNETHDRSZ, T, 216, libc::c_int);
        assert_eq!(TUNSETIFF, SETIFF());
        assert_eq!(TUNSETOFFLOAD, SETOFFLOAD());
        assert_eq!(TUNSETVNETHDRSZ, SETVNETHDRSZ());
    }

    #[test]
    fn the_socket_pair_keeps_frames_apart() {
        let (mut b, peer) = SocketBackend::pair().unwrap();
        let mut buf = [0u8; 64];
        assert_eq!(
            b.read_frame(&mut buf).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
        peer.send(b"one").unwrap();
        peer.send(b"second").unwrap();
        assert_eq!(b.read_frame(&mut buf).unwrap(), 3);
        assert_eq!(b.read_frame(&mut buf).unwrap(), 6);
        b.write_frame(b"out").unwrap();
        assert_eq!(peer.recv(&mut buf).unwrap(), 3);
    }
}
