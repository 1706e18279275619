/* CBatonKVM: <linux/kvm.h> structs import directly; the _IO/_IOR/_IOW request macros are
 * function-like and do not, so they are re-exported as constants. Flexible arrays get
 * accessors. No logic here: BatonVMM owns it. */
#ifndef CBATON_KVM_H
#define CBATON_KVM_H
#include <linux/kvm.h>

#define CBATON_KVM_REQ(name) static const unsigned long CBATON_KVM_##name = KVM_##name;
CBATON_KVM_REQ(GET_API_VERSION)
CBATON_KVM_REQ(CREATE_VM)
CBATON_KVM_REQ(GET_VCPU_MMAP_SIZE)
CBATON_KVM_REQ(CHECK_EXTENSION)
CBATON_KVM_REQ(GET_SUPPORTED_CPUID)
CBATON_KVM_REQ(GET_MSR_INDEX_LIST)
CBATON_KVM_REQ(SET_USER_MEMORY_REGION)
CBATON_KVM_REQ(CREATE_VCPU)
CBATON_KVM_REQ(RUN)
CBATON_KVM_REQ(GET_REGS)
CBATON_KVM_REQ(SET_REGS)
CBATON_KVM_REQ(GET_SREGS)
CBATON_KVM_REQ(SET_SREGS)
CBATON_KVM_REQ(GET_XSAVE)
CBATON_KVM_REQ(SET_XSAVE)
CBATON_KVM_REQ(GET_XCRS)
CBATON_KVM_REQ(SET_XCRS)
CBATON_KVM_REQ(GET_MSRS)
CBATON_KVM_REQ(SET_MSRS)
CBATON_KVM_REQ(GET_CPUID2)
CBATON_KVM_REQ(SET_CPUID2)
CBATON_KVM_REQ(GET_VCPU_EVENTS)
CBATON_KVM_REQ(SET_VCPU_EVENTS)
CBATON_KVM_REQ(GET_DEBUGREGS)
CBATON_KVM_REQ(SET_DEBUGREGS)
CBATON_KVM_REQ(GET_CLOCK)
CBATON_KVM_REQ(SET_CLOCK)
CBATON_KVM_REQ(GET_TSC_KHZ)
#undef CBATON_KVM_REQ

static const unsigned int CBATON_KVM_VCPUEVENT_VALID_NMI_PENDING = KVM_VCPUEVENT_VALID_NMI_PENDING;

static inline struct kvm_cpuid_entry2 *cbaton_kvm_cpuid_entries(struct kvm_cpuid2 *c) { return c->entries; }
static inline __u32 *cbaton_kvm_msr_indices(struct kvm_msr_list *l) { return l->indices; }
static inline struct kvm_msr_entry *cbaton_kvm_msr_entries(struct kvm_msrs *m) { return m->entries; }
#endif
