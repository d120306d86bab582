/* SPDX-License-Identifier: GPL-2.0 */
#ifndef _ASM_X86_KVM_PROTMEM_H
#define _ASM_X86_KVM_PROTMEM_H

#include <linux/types.h>

/*
 * Paravirt features whose data the host writes into the per-CPU decrypted
 * section (arch/x86/kernel/kvm.c).
 */
enum kvm_protmem_pv {
	KVM_PROTMEM_PV_ASYNC_PF,
	KVM_PROTMEM_PV_STEAL_TIME,
	KVM_PROTMEM_PV_EOI,
};

/*
 * KVM protected memory guest support, implemented in Rust in
 * arch/x86/coco/kvm/kvm_protmem.rs.
 */
#ifdef CONFIG_KVM_PROTMEM_GUEST
int kvm_protmem_setup(char *arg);
void kvm_protmem_init(void);
void kvm_protmem_share_early(void *ptr, unsigned long size);
bool kvm_protmem_kvmclock_usable(void);
bool kvm_protmem_pv_usable(enum kvm_protmem_pv feature);
bool kvm_protmem_kexec_load_ok(void);
bool kvm_protmem_kexec_image_ok(bool protmem_kernel);
bool kvm_protmem_kexec_cmdline_ok(const char *cmdline, unsigned long len);
#else
static inline void kvm_protmem_init(void) { }
static inline void kvm_protmem_share_early(void *ptr, unsigned long size) { }
static inline bool kvm_protmem_kvmclock_usable(void) { return true; }
static inline bool kvm_protmem_pv_usable(enum kvm_protmem_pv feature) { return true; }
static inline bool kvm_protmem_kexec_load_ok(void) { return true; }
static inline bool kvm_protmem_kexec_image_ok(bool protmem_kernel) { return true; }
static inline bool kvm_protmem_kexec_cmdline_ok(const char *cmdline, unsigned long len)
{
	return true;
}
#endif

#endif /* _ASM_X86_KVM_PROTMEM_H */
