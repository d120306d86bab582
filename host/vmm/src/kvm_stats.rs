//! KVM's own statistics of the VM and its vCPUs (`KVM_GET_STATS_FD`,
//! Documentation/virt/kvm/api.rst "The binary statistics"), read when the
//! VMM stops, for the stats file: the exits, page faults and emulations
//! KVM counted, which tell where a guest spends host time.
//!
//! The file a stats descriptor returns holds a header, the names and
//! descriptors of the statistics, and their values (u64 each; a histogram
//! has several, summed here).

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;

/// `KVM_GET_STATS_FD`: `_IO(KVMIO, 0xce)`, on a VM or vCPU descriptor.
const KVM_GET_STATS_FD: libc::c_ulong = 0xaece;

/// Bytes of `struct kvm_stats_header` and of a descriptor without its name.
const HEADER: usize = 24;
const DESC: usize = 16;

/// Opens the statistics of the VM or vCPU behind `fd`.
pub fn open(fd: &impl AsRawFd) -> io::Result<File> {
    // SAFETY: KVM_GET_STATS_FD takes no argument and returns a new
    // descriptor, which only the returned File owns.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), KVM_GET_STATS_FD, 0) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a descriptor KVM just created for us.
    Ok(unsafe { File::from_raw_fd(rc) })
}

/// Reads every statistic of `file` (from [`open`]): name -> value, the
/// values of a histogram summed.
pub fn read(file: &File) -> io::Result<BTreeMap<String, u64>> {
    let mut header = [0u8; HEADER];
    file.read_exact_at(&mut header, 0)?;
    let word = |b: &[u8], at: usize| u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
    let (name_size, num_desc, desc_offset, data_offset) = (
        word(&header, 4) as usize,
        word(&header, 8) as usize,
        word(&header, 16) as u64,
        word(&header, 20) as u64,
    );
    let mut descs = vec![0u8; num_desc * (DESC + name_size)];
    file.read_exact_at(&mut descs, desc_offset)?;
    // Data follows the descriptors; read what the largest offset needs.
    let parsed = parse_descs(&descs, num_desc, name_size);
    let end = parsed
        .iter()
        .map(|d| d.offset + d.count * 8)
        .max()
        .unwrap_or(0);
    let mut data = vec![0u8; end];
    file.read_exact_at(&mut data, data_offset)?;
    Ok(values(&parsed, &data))
}

/// One statistic's descriptor: name, byte offset in the data, u64 count.
#[derive(Debug, PartialEq, Eq)]
struct Desc {
    name: String,
    offset: usize,
    count: usize,
}

fn parse_descs(descs: &[u8], num: usize, name_size: usize) -> Vec<Desc> {
    let step = DESC + name_size;
    (0..num)
        .filter_map(|i| {
            let d = descs.get(i * step..(i + 1) * step)?;
            let size = u16::from_le_bytes([d[6], d[7]]) as usize;
            let offset = u32::from_le_bytes([d[8], d[9], d[10], d[11]]) as usize;
            let name = &d[DESC..];
            let len = name.iter().position(|&b| b == 0).unwrap_or(name.len());
            Some(Desc {
                name: String::from_utf8_lossy(&name[..len]).into_owned(),
                offset,
                count: size,
            })
        })
        .collect()
}

fn values(descs: &[Desc], data: &[u8]) -> BTreeMap<String, u64> {
    descs
        .iter()
        .map(|d| {
            let sum = (0..d.count)
                .filter_map(|k| {
                    let at = d.offset + 8 * k;
                    data.get(at..at + 8)
                        .map(|b| u64::from_le_bytes(b.try_into().unwrap_or([0; 8])))
                })
                .fold(0u64, u64::saturating_add);
            (d.name.clone(), sum)
        })
        .collect()
}

/// Adds `b` into `a` (the vCPUs' statistics into one set).
pub fn add(a: &mut BTreeMap<String, u64>, b: &BTreeMap<String, u64>) {
    for (k, v) in b {
        let e = a.entry(k.clone()).or_default();
        *e = e.saturating_add(*v);
    }
}

/// KVM's counters over a whole VMM run, as the stats file lists them: the
/// VMs' and the vCPUs' (summed over vCPUs and boots).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct KvmCounters {
    /// VM statistics (`pages_4k`, `remote_tlb_flush`, ...).
    pub vm: BTreeMap<String, u64>,
    /// vCPU statistics (`exits`, `pf_taken`, `insn_emulation`, ...).
    pub vcpu: BTreeMap<String, u64>,
}

/// The statistics files of the current boot's VM and vCPUs.
#[derive(Debug, Default)]
pub struct Watch {
    vm: Option<File>,
    vcpus: Vec<File>,
    totals: KvmCounters,
}

impl Watch {
    /// Starts watching a new VM and its vCPUs (a host without binary
    /// statistics, before Linux 5.14, gives none: the totals stay empty).
    pub fn start(&mut self, vm: &impl AsRawFd, vcpus: &[impl AsRawFd]) {
        self.vm = open(vm).ok();
        self.vcpus = vcpus.iter().filter_map(|v| open(v).ok()).collect();
    }

    /// Adds the current VM's counters to the totals (at a reboot, when the
    /// VM goes away, and when the run ends).
    pub fn harvest(&mut self) {
        if let Some(v) = self.vm.take().and_then(|f| read(&f).ok()) {
            add(&mut self.totals.vm, &v);
        }
        for f in std::mem::take(&mut self.vcpus) {
            if let Ok(v) = read(&f) {
                add(&mut self.totals.vcpu, &v);
            }
        }
    }

    /// The totals so far (`None` if the host offered no statistics).
    pub fn totals(&self) -> Option<KvmCounters> {
        (!self.totals.vm.is_empty() || !self.totals.vcpu.is_empty()).then(|| self.totals.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stats file as KVM lays it out: header, descriptors, data.
    fn file_bytes() -> Vec<u8> {
        let name_size = 16usize;
        let descs: [(&str, u16, u32); 2] = [("exits", 1, 0), ("halt_hist", 3, 8)];
        let desc_offset = HEADER;
        let data_offset = desc_offset + descs.len() * (DESC + name_size);
        let mut b = Vec::new();
        for w in [
            0u32,
            name_size as u32,
            descs.len() as u32,
            0,
            desc_offset as u32,
            data_offset as u32,
        ] {
            b.extend_from_slice(&w.to_le_bytes());
        }
        for (name, size, offset) in descs {
            b.extend_from_slice(&0u32.to_le_bytes()); // flags
            b.extend_from_slice(&0i16.to_le_bytes()); // exponent
            b.extend_from_slice(&size.to_le_bytes());
            b.extend_from_slice(&offset.to_le_bytes());
            b.extend_from_slice(&0u32.to_le_bytes()); // bucket_size
            let mut n = name.as_bytes().to_vec();
            n.resize(name_size, 0);
            b.extend_from_slice(&n);
        }
        for v in [42u64, 1, 2, 3] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        b
    }

    #[test]
    fn reads_values_and_sums_histograms() {
        let path = std::env::temp_dir().join(format!("kvm-stats-{}", std::process::id()));
        std::fs::write(&path, file_bytes()).unwrap();
        let f = File::open(&path).unwrap();
        let v = read(&f).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(v["exits"], 42);
        assert_eq!(v["halt_hist"], 6);
        let mut sum = v.clone();
        add(&mut sum, &v);
        assert_eq!(sum["exits"], 84);
    }

    #[test]
    fn ioctl_number() {
        vmm_sys_util::ioctl_io_nr!(GET_STATS_FD, 0xae, 0xce);
        assert_eq!(KVM_GET_STATS_FD, GET_STATS_FD());
    }
}
