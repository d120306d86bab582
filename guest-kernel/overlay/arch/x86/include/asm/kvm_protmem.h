/* SPDX-License-Identifier: GPL-2.0 */
#ifndef _ASM_X86_KVM_PROTMEM_H
#define _ASM_X86_KVM_PROTMEM_H

#include <linux/types.h>

/*
 * KVM protected memory guest support, implemented in Rust in
 * arch/x86/coco/kvm/kvm_protmem.rs.
 */
#ifdef CONFIG_KVM_PROTMEM_GUEST
int kvm_protmem_setup(char *arg);
void kvm_protmem_init(void);
void kvm_protmem_share_early(void *ptr, unsigned long size);
bool kvm_protmem_kvmclock_usable(void);
#else
static inline void kvm_protmem_init(void) { }
static inline void kvm_protmem_share_early(void *ptr, unsigned long size) { }
static inline bool kvm_protmem_kvmclock_usable(void) { return true; }
#endif

#endif /* _ASM_X86_KVM_PROTMEM_H */
