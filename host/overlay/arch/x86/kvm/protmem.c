// SPDX-License-Identifier: GPL-2.0-only
/*
 * KVM-owned protected memory of software-protected VMs
 * (KVM_CAP_X86_PROTECTED_MEMORY).
 *
 * A guest that finds KVM_FEATURE_MEM_PROTECTED makes all of its RAM
 * private with KVM_HC_ENABLE_MEM_PROTECTED and shares the pages the host
 * must see with KVM_HC_MEM_SHARE and KVM_HC_MEM_UNSHARE
 * (Documentation/virt/kvm/x86/hypercalls.rst).  Without this capability
 * KVM forwards the three hypercalls to userspace, which then decides what
 * is private: the very party the guest keeps its memory from.
 *
 * With it, KVM applies each conversion to the memory attributes itself,
 * frees the guest_memfd pages of a range that becomes shared, and only
 * then exits to userspace (KVM_EXIT_HYPERCALL with
 * KVM_EXIT_HYPERCALL_APPLIED) so that the VMM can update its own view.
 * Userspace may refuse a conversion, which KVM then undoes, but it cannot
 * make the guest see success for a conversion that did not happen.
 *
 * Private memory gets data from userspace only while the guest's ENABLE
 * waits for userspace, and only in pages that were shared when that
 * ENABLE started, once each (KVM_SW_PROTECTED_POPULATE): the contents the
 * guest had in shared memory, which userspace could write anyway.
 *
 * From the guest's first ENABLE on, userspace is also locked out of what
 * would let it read or change the guest's state other than through memory
 * the guest shares: vCPU registers and other vCPU state, new vCPUs,
 * memslots (kvm_protmem_locked() in x86.c).  It can still stop the guest,
 * refuse conversions, inject interrupts and corrupt shared memory: denial
 * of service, which the host can always cause.
 */
#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/kvm_host.h>
#include <linux/slab.h>

#include "protmem.h"
#include "x86.h"

int kvm_protmem_enable_cap(struct kvm *kvm, u64 flags)
{
	struct kvm_protmem *pm;

	if (flags || kvm->arch.vm_type != KVM_X86_SW_PROTECTED_VM)
		return -EINVAL;

	guard(mutex)(&kvm->lock);

	if (kvm->arch.protmem)
		return 0;

	if (kvm->created_vcpus)
		return -EBUSY;

	/* RDMSR/WRMSR exits would show userspace what the guest writes. */
	if (kvm->arch.user_space_msr_mask)
		return -EINVAL;

	pm = kzalloc_obj(*pm, GFP_KERNEL_ACCOUNT);
	if (!pm)
		return -ENOMEM;

	mutex_init(&pm->lock);

	/* No KVM_CAP_SYNC_REGS: it puts registers in kvm_run on every exit. */
	kvm->arch.has_protected_state = true;
	/* KVM alone sets memory attributes and discards guest_memfd pages. */
	WRITE_ONCE(kvm->private_mem_locked, true);
	WRITE_ONCE(kvm->arch.protmem, pm);
	return 0;
}

void kvm_protmem_destroy(struct kvm *kvm)
{
	struct kvm_protmem *pm = kvm->arch.protmem;

	if (!pm)
		return;

	kvfree(pm->populate);
	kvfree(pm->shared);
	kfree(pm);
}

/* Whether [@start, @end) lies entirely in guest_memfd memslots. */
static bool kvm_protmem_range_is_ram(struct kvm *kvm, gfn_t start, gfn_t end)
{
	struct kvm_memslot_iter iter;
	gfn_t next = start;

	kvm_for_each_memslot_in_gfn_range(&iter, kvm_memslots(kvm), start, end) {
		struct kvm_memory_slot *slot = iter.slot;

		if (slot->base_gfn > next || !kvm_slot_has_gmem(slot))
			return false;

		next = slot->base_gfn + slot->npages;
	}

	return next >= end;
}

/*
 * Makes [@start, @end) private or shared; frees the guest_memfd pages of
 * what becomes shared, so that no copy of its private data is kept.
 */
static int kvm_protmem_set(struct kvm *kvm, gfn_t start, gfn_t end,
			   bool private)
{
	struct kvm_memslot_iter iter;
	int r;

	lockdep_assert_held(&kvm->slots_lock);

	r = kvm_set_mem_attributes_locked(kvm, start, end,
					  private ? KVM_MEMORY_ATTRIBUTE_PRIVATE : 0);
	if (r || private)
		return r;

	kvm_for_each_memslot_in_gfn_range(&iter, kvm_memslots(kvm), start, end) {
		struct kvm_memory_slot *slot = iter.slot;

		if (kvm_slot_has_gmem(slot))
			kvm_gmem_discard(slot, max(start, slot->base_gfn),
					 min(end, slot->base_gfn + slot->npages));
	}

	return 0;
}

/* Sets every run of @bits below @end private or shared. */
static int kvm_protmem_set_runs(struct kvm *kvm, unsigned long *bits,
				gfn_t end, bool private)
{
	unsigned int start, stop;
	int r;

	for_each_set_bitrange(start, stop, bits, end) {
		r = kvm_protmem_set(kvm, start, stop, private);
		if (r)
			return r;
	}

	return 0;
}

/*
 * KVM_HC_ENABLE_MEM_PROTECTED: makes every shared page of guest RAM
 * private and opens the window in which userspace may populate them with
 * their shared contents.
 */
static int kvm_protmem_enable(struct kvm_vcpu *vcpu)
{
	struct kvm *kvm = vcpu->kvm;
	struct kvm_protmem *pm = kvm->arch.protmem;
	unsigned long *shared, *populate, index;
	struct kvm_memory_slot *slot;
	gfn_t end = 0;
	void *entry;
	int bkt, r;

	lockdep_assert_held(&pm->lock);

	/* Another vCPU's ENABLE waits for userspace. */
	if (pm->enabling)
		return -KVM_EPERM;

	guard(mutex)(&kvm->slots_lock);

	kvm_for_each_memslot(slot, bkt, kvm_memslots(kvm))
		if (kvm_slot_has_gmem(slot))
			end = max(end, slot->base_gfn + slot->npages);

	if (end > UINT_MAX)
		return -KVM_E2BIG;

	shared = kvcalloc(BITS_TO_LONGS(end), sizeof(long), GFP_KERNEL_ACCOUNT);
	populate = kvcalloc(BITS_TO_LONGS(end), sizeof(long), GFP_KERNEL_ACCOUNT);
	if (!shared || !populate) {
		r = -KVM_ENOMEM;
		goto out_free;
	}

	kvm_for_each_memslot(slot, bkt, kvm_memslots(kvm)) {
		gfn_t last = slot->base_gfn + slot->npages - 1;

		if (!kvm_slot_has_gmem(slot))
			continue;

		bitmap_set(shared, slot->base_gfn, slot->npages);
		xa_for_each_range(&kvm->mem_attr_array, index, entry,
				  slot->base_gfn, last)
			if (xa_to_value(entry) & KVM_MEMORY_ATTRIBUTE_PRIVATE)
				__clear_bit(index, shared);
	}

	if (kvm_protmem_set_runs(kvm, shared, end, true)) {
		/* Making memory shared needs no allocation: it cannot fail. */
		WARN_ON_ONCE(kvm_protmem_set_runs(kvm, shared, end, false));
		r = -KVM_ENOMEM;
		goto out_free;
	}

	bitmap_copy(populate, shared, end);
	WRITE_ONCE(pm->locked, true);
	/*
	 * Userspace may neither take memory away from the guest nor map its
	 * own where the guest could run it.
	 */
	kvm->memslots_locked = true;
	pm->enabling = vcpu;
	pm->shared = shared;
	pm->populate = populate;
	pm->end = end;
	return 0;

out_free:
	kvfree(populate);
	kvfree(shared);
	return r;
}

/* Userspace completed (@refused != 0: refused) the ENABLE of @vcpu. */
static void kvm_protmem_enable_done(struct kvm_vcpu *vcpu, bool refused)
{
	struct kvm *kvm = vcpu->kvm;
	struct kvm_protmem *pm = kvm->arch.protmem;

	lockdep_assert_held(&pm->lock);

	if (WARN_ON_ONCE(pm->enabling != vcpu))
		return;

	if (refused) {
		/* Back to shared, dropping whatever was populated. */
		guard(mutex)(&kvm->slots_lock);
		WARN_ON_ONCE(kvm_protmem_set_runs(kvm, pm->shared, pm->end,
						  false));
	} else {
		pm->enabled = true;
	}

	kvfree(pm->populate);
	kvfree(pm->shared);
	pm->populate = NULL;
	pm->shared = NULL;
	pm->end = 0;
	pm->enabling = NULL;
}

/* KVM_HC_MEM_SHARE (@private false) and KVM_HC_MEM_UNSHARE. */
static int kvm_protmem_convert(struct kvm *kvm, gfn_t start, gfn_t end,
			       bool private)
{
	struct kvm_protmem *pm = kvm->arch.protmem;

	lockdep_assert_held(&pm->lock);

	if (!pm->enabled || pm->enabling)
		return -KVM_EPERM;

	guard(mutex)(&kvm->slots_lock);

	if (!kvm_protmem_range_is_ram(kvm, start, end))
		return -KVM_EFAULT;

	if (kvm_protmem_set(kvm, start, end, private))
		return -KVM_ENOMEM;

	return 0;
}

/*
 * Applies protected-memory hypercall @nr.  Returns 0 if it was applied
 * and userspace must now be told (the caller exits with
 * KVM_EXIT_HYPERCALL_APPLIED and kvm_protmem_complete_hypercall() as the
 * completion), else the negative KVM error code for the guest.
 */
int kvm_protmem_hypercall(struct kvm_vcpu *vcpu, unsigned long nr, u64 a0,
			  u64 a1, u64 a2,
			  int (*complete_hypercall)(struct kvm_vcpu *))
{
	struct kvm *kvm = vcpu->kvm;
	struct kvm_protmem *pm = kvm->arch.protmem;
	gfn_t start = 0, end = 0;
	int r;

	if (nr != KVM_HC_ENABLE_MEM_PROTECTED) {
		/* Whole pages, at least one, no flags, no wraparound. */
		if (!PAGE_ALIGNED(a0) || !a1 || a2 ||
		    a1 > (U64_MAX - a0) >> PAGE_SHIFT)
			return -KVM_EINVAL;

		start = gpa_to_gfn(a0);
		end = start + a1;
	}

	/*
	 * Conversions sleep, take kvm->slots_lock and zap SPTEs: leave the
	 * SRCU read side, as memslot updates wait for it under slots_lock.
	 */
	kvm_vcpu_srcu_read_unlock(vcpu);
	mutex_lock(&pm->lock);
	if (nr == KVM_HC_ENABLE_MEM_PROTECTED)
		r = kvm_protmem_enable(vcpu);
	else
		r = kvm_protmem_convert(kvm, start, end,
					nr == KVM_HC_MEM_UNSHARE);
	mutex_unlock(&pm->lock);
	kvm_vcpu_srcu_read_lock(vcpu);

	if (r)
		return r;

	vcpu->arch.protmem.nr = nr;
	vcpu->arch.protmem.start = start;
	vcpu->arch.protmem.end = end;
	vcpu->arch.protmem.complete_hypercall = complete_hypercall;
	return 0;
}

/*
 * Completion of an applied hypercall: userspace left run->hypercall.ret
 * at 0 (accepted) or set it to refuse; a refusal is undone.  The guest
 * gets 0 or the refusal, as a negative error code.
 */
int kvm_protmem_complete_hypercall(struct kvm_vcpu *vcpu)
{
	struct kvm *kvm = vcpu->kvm;
	struct kvm_protmem *pm = kvm->arch.protmem;
	unsigned long nr = vcpu->arch.protmem.nr;
	u64 refusal = vcpu->run->hypercall.ret;

	if (refusal && !IS_ERR_VALUE((unsigned long)refusal))
		refusal = -KVM_EPERM;

	kvm_vcpu_srcu_read_unlock(vcpu);
	mutex_lock(&pm->lock);
	if (nr == KVM_HC_ENABLE_MEM_PROTECTED) {
		kvm_protmem_enable_done(vcpu, refusal);
	} else if (refusal) {
		mutex_lock(&kvm->slots_lock);
		/* A SHARE goes back to private, an UNSHARE to shared. */
		kvm_protmem_set(kvm, vcpu->arch.protmem.start,
				vcpu->arch.protmem.end, nr == KVM_HC_MEM_SHARE);
		mutex_unlock(&kvm->slots_lock);
	}
	mutex_unlock(&pm->lock);
	kvm_vcpu_srcu_read_lock(vcpu);

	vcpu->run->hypercall.ret = refusal;
	return vcpu->arch.protmem.complete_hypercall(vcpu);
}

/*
 * KVM_SW_PROTECTED_POPULATE of a protected-memory VM: only while a guest
 * ENABLE waits for userspace, only into pages that were shared when it
 * started, and each page once.  Anything else would let userspace write
 * private memory.
 */
int kvm_protmem_populate(struct kvm *kvm, struct kvm_sw_protected_populate *p)
{
	struct kvm_protmem *pm = kvm->arch.protmem;
	gfn_t start = gpa_to_gfn(p->gpa);
	gfn_t end = gpa_to_gfn(p->gpa + p->size);
	int r;

	guard(mutex)(&pm->lock);

	if (!pm->enabling || end > pm->end ||
	    find_next_zero_bit(pm->populate, end, start) < end)
		return -EPERM;

	r = kvm_sw_protected_populate(kvm, p);
	bitmap_clear(pm->populate, start, gpa_to_gfn(p->gpa) - start);
	return r;
}

/*
 * The vCPU ioctls userspace may still issue once the guest enabled
 * protected memory: running the vCPU, delivering interrupts, queries
 * that reveal no guest state, and mapping memory ahead of the guest's
 * accesses as the attributes KVM owns say.  Everything else reads or
 * changes registers or other vCPU state and fails with -EPERM.
 */
bool kvm_protmem_vcpu_ioctl_allowed(unsigned int ioctl)
{
	switch (ioctl) {
	case KVM_RUN:
	case KVM_SET_SIGNAL_MASK:
	case KVM_GET_STATS_FD:
	case KVM_GET_MP_STATE:
	case KVM_INTERRUPT:
	case KVM_NMI:
	case KVM_KVMCLOCK_CTRL:
	case KVM_GET_TSC_KHZ:
	case KVM_GET_CPUID2:
	case KVM_PRE_FAULT_MEMORY:
		return true;
	default:
		return false;
	}
}
