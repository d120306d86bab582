/* SPDX-License-Identifier: GPL-2.0 */
#ifndef _ASM_X86_KVM_PROTMEM_H
#define _ASM_X86_KVM_PROTMEM_H

/*
 * KVM protected memory guest support, implemented in Rust in
 * arch/x86/coco/kvm/kvm_protmem.rs.
 */
#ifdef CONFIG_KVM_PROTMEM_GUEST
void kvm_protmem_init(void);
void kvm_protmem_share_early(void *ptr, unsigned long size);
#else
static inline void kvm_protmem_init(void) { }
static inline void kvm_protmem_share_early(void *ptr, unsigned long size) { }
#endif

#endif /* _ASM_X86_KVM_PROTMEM_H */
