// SPDX-License-Identifier: GPL-2.0

//! KVM protected memory: guest support.
//!
//! C header: [`arch/x86/include/uapi/asm/kvm_para.h`](srctree/arch/x86/include/uapi/asm/kvm_para.h)

#[path = "hypercall_abi.rs"]
pub mod abi;

#[cfg(CONFIG_KVM_PROTMEM_KUNIT_TEST)]
#[kernel::macros::kunit_tests(kvm_protmem_abi)]
mod tests {
    use super::abi::*;
    use kernel::bindings;

    #[test]
    fn uapi_header_matches_abi() {
        assert_eq!(
            u64::from(bindings::KVM_HC_ENABLE_MEM_PROTECTED),
            KVM_HC_ENABLE_MEM_PROTECTED
        );
        assert_eq!(u64::from(bindings::KVM_HC_MEM_SHARE), KVM_HC_MEM_SHARE);
        assert_eq!(u64::from(bindings::KVM_HC_MEM_UNSHARE), KVM_HC_MEM_UNSHARE);
        assert_eq!(bindings::KVM_FEATURE_MEM_PROTECTED, KVM_FEATURE_MEM_PROTECTED);
        assert_eq!(u64::from(bindings::KVM_ENOSYS), KVM_ENOSYS);
        assert_eq!(u64::from(bindings::KVM_EINVAL), KVM_EINVAL);
        assert_eq!(u64::from(bindings::KVM_EFAULT), KVM_EFAULT);
        assert_eq!(u64::from(bindings::KVM_EPERM), KVM_EPERM);
        assert_eq!(bindings::KVM_CPUID_FEATURES, KVM_CPUID_FEATURES);
        assert_eq!(bindings::KVM_CPUID_SIGNATURE, KVM_CPUID_SIGNATURE);
    }

    #[test]
    fn return_values_decode() {
        assert_eq!(decode_ret(0), Ok(()));
        assert_eq!(decode_ret(KVM_ENOSYS.wrapping_neg()), Err(Error::NotSupported));
        assert_eq!(decode_ret(KVM_EINVAL.wrapping_neg()), Err(Error::Invalid));
        assert_eq!(decode_ret(KVM_EFAULT.wrapping_neg()), Err(Error::Fault));
        assert_eq!(decode_ret(KVM_EPERM.wrapping_neg()), Err(Error::Permission));
        // A hostile or newer host: never mistaken for success.
        assert_eq!(decode_ret(1), Err(Error::Unexpected(1)));
        assert_eq!(decode_ret(1 << 63), Err(Error::Unexpected(1 << 63)));
        // -1 is -KVM_EPERM, not garbage.
        assert_eq!(decode_ret(u64::MAX), Err(Error::Permission));
        assert_eq!(encode_ret(Err(Error::Invalid)), KVM_EINVAL.wrapping_neg());
    }

    #[test]
    fn ranges_are_checked() -> Result<(), Error> {
        assert_eq!(GpaRange::new(0x1001, 1), Err(Error::Invalid));
        assert_eq!(GpaRange::new(0x1000, 0), Err(Error::Invalid));
        assert_eq!(GpaRange::new(0, 1 << 52), Err(Error::Invalid));
        assert_eq!(GpaRange::new(!0xfff_u64, 1), Err(Error::Invalid));
        let r = GpaRange::new(0x20_0000, 512)?;
        assert_eq!(r.first_pfn(), 0x200);
        assert_eq!(r.end_pfn(), 0x400);
        assert!(r.contains(0x3f_ffff) && !r.contains(0x40_0000));
        Ok(())
    }

    /// A software host that records what the guest side put in registers.
    struct Recorder {
        calls: [(u64, [u64; 3]); 2],
        n: usize,
    }

    impl Hypervisor for Recorder {
        fn hypercall(&mut self, nr: u64, args: [u64; 3]) -> u64 {
            if let Some(slot) = self.calls.get_mut(self.n) {
                *slot = (nr, args);
            }
            self.n += 1;
            match Hypercall::decode(nr, args) {
                Some(Ok(_)) => 0,
                Some(Err(e)) => e.to_ret(),
                None => Error::NotSupported.to_ret(),
            }
        }
    }

    #[test]
    fn calls_encode_and_host_decodes() -> Result<(), Error> {
        let mut hv = Recorder {
            calls: [(0, [0; 3]); 2],
            n: 0,
        };
        issue(&mut hv, Hypercall::Enable)?;
        issue(&mut hv, Hypercall::Share(GpaRange::new(0x7000, 3)?))?;
        assert_eq!(hv.n, 2);
        assert_eq!(hv.calls[0].0, 13);
        assert_eq!(hv.calls[1].0, 14);
        assert_eq!(hv.calls[1].1, [0x7000, 3, 0]);
        assert_eq!(
            Hypercall::decode(KVM_HC_MEM_UNSHARE, [0x7000, 3, 1]),
            Some(Err(Error::Invalid))
        );
        Ok(())
    }
}
