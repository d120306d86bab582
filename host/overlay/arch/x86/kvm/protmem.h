/* SPDX-License-Identifier: GPL-2.0-only */
#ifndef __ARCH_X86_KVM_PROTMEM_H
#define __ARCH_X86_KVM_PROTMEM_H

#include <linux/kvm_host.h>

#ifdef CONFIG_KVM_SW_PROTECTED_VM
/*
 * KVM-owned protected memory of a software-protected VM
 * (KVM_CAP_X86_PROTECTED_MEMORY); see protmem.c.
 */
struct kvm_protmem {
	/* Serializes conversions, the ENABLE window and populating it. */
	struct mutex lock;
	/*
	 * Set when the guest first issues KVM_HC_ENABLE_MEM_PROTECTED:
	 * userspace may no longer access vCPU state, create vCPUs or change
	 * memslots.  Never cleared.
	 */
	bool locked;
	/* An ENABLE succeeded: SHARE and UNSHARE are allowed. */
	bool enabled;
	/* The vCPU whose ENABLE awaits completion by userspace, or NULL. */
	struct kvm_vcpu *enabling;
	/* During that ENABLE: the gfns below @end that were shared... */
	unsigned long *shared;
	/* ...and those of them that userspace may still populate, once. */
	unsigned long *populate;
	gfn_t end;
};

static inline bool kvm_protmem_enabled(struct kvm *kvm)
{
	return !!READ_ONCE(kvm->arch.protmem);
}

static inline bool kvm_protmem_locked(struct kvm *kvm)
{
	struct kvm_protmem *pm = READ_ONCE(kvm->arch.protmem);

	return pm && READ_ONCE(pm->locked);
}

int kvm_protmem_enable_cap(struct kvm *kvm, u64 flags);
void kvm_protmem_destroy(struct kvm *kvm);
int kvm_protmem_hypercall(struct kvm_vcpu *vcpu, unsigned long nr, u64 a0,
			  u64 a1, u64 a2,
			  int (*complete_hypercall)(struct kvm_vcpu *));
int kvm_protmem_complete_hypercall(struct kvm_vcpu *vcpu);
int kvm_protmem_populate(struct kvm *kvm, struct kvm_sw_protected_populate *p);
int kvm_sw_protected_populate(struct kvm *kvm,
			      struct kvm_sw_protected_populate *p);
bool kvm_protmem_vcpu_ioctl_allowed(unsigned int ioctl);
#else
static inline bool kvm_protmem_enabled(struct kvm *kvm)
{
	return false;
}

static inline bool kvm_protmem_locked(struct kvm *kvm)
{
	return false;
}

static inline bool kvm_protmem_vcpu_ioctl_allowed(unsigned int ioctl)
{
	return true;
}

static inline void kvm_protmem_destroy(struct kvm *kvm) {}

static inline int kvm_protmem_hypercall(struct kvm_vcpu *vcpu,
					unsigned long nr, u64 a0, u64 a1,
					u64 a2,
					int (*complete_hypercall)(struct kvm_vcpu *))
{
	return -KVM_ENOSYS;
}

static inline int kvm_protmem_complete_hypercall(struct kvm_vcpu *vcpu)
{
	return -EIO;
}
#endif

#endif /* __ARCH_X86_KVM_PROTMEM_H */
