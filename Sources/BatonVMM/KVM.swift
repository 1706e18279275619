// BatonVMM is the reference hypervisor: guest RAM, vCPUs on KVM (or a simulated vCPU when
// /dev/kvm is missing), the reference guest and its independent model, the versioned
// vCPU state format, and the Cloud-Hypervisor-dialect control API. It embeds Baton's agents.
import BatonSystem
import CBatonKVM
import Glibc

/// /dev/kvm, probed more than by existence: it can exist yet be unusable.
public enum KVMHost {
    public static let unavailableReason: String? = {
        let fd = open("/dev/kvm", O_RDWR | O_CLOEXEC)
        if fd < 0 { return "cannot open /dev/kvm: \(String(cString: strerror(errno)))" }
        defer { close(fd) }
        let api = ioctl(fd, CBATON_KVM_GET_API_VERSION)
        if api != 12 { return "KVM_GET_API_VERSION returned \(api) (errno \(errno))" }
        let vm = ioctl(fd, CBATON_KVM_CREATE_VM, 0)
        if vm < 0 { return "KVM_CREATE_VM failed: \(String(cString: strerror(errno)))" }
        close(vm)
        return nil
    }()
}

/// An ioctl with a pointer argument; the error names the request.
@inline(__always)
func kvmIoctl(_ fd: Int32, _ request: UInt, _ name: String, _ arg: UnsafeMutableRawPointer) throws -> Int32 {
    try checkedCall("ioctl(\(name))") { ioctl(fd, request, arg) }
}

@inline(__always)
func kvmIoctl(_ fd: Int32, _ request: UInt, _ name: String, value: Int32 = 0) throws -> Int32 {
    try checkedCall("ioctl(\(name))") { ioctl(fd, request, value) }
}

/// One KVM virtual machine: its fd, guest memory slots and clock. KVM fds cannot be used
/// from another process (EIO), so a new instance always builds its own.
public final class KVMMachine: @unchecked Sendable {
    public let system: FileDescriptor
    public let vm: FileDescriptor
    public let vcpuMmapSize: Int
    /// Slot 0 as last set (host address, length): a VM restored around the same mapping
    /// need not set it again.
    public private(set) var slot0: (host: UnsafeMutableRawPointer, length: Int)?

    public init() throws {
        system = FileDescriptor(owning: try checkedCall("open(/dev/kvm)") { open("/dev/kvm", O_RDWR | O_CLOEXEC) })
        let api = try kvmIoctl(system.raw, CBATON_KVM_GET_API_VERSION, "KVM_GET_API_VERSION")
        guard api == 12 else { throw SyscallError("KVM API version \(api) (need 12)", errno: ENOTSUP) }
        vm = FileDescriptor(owning: try kvmIoctl(system.raw, CBATON_KVM_CREATE_VM, "KVM_CREATE_VM"))
        vcpuMmapSize = Int(try kvmIoctl(system.raw, CBATON_KVM_GET_VCPU_MMAP_SIZE, "KVM_GET_VCPU_MMAP_SIZE"))
    }

    public func setMemory(slot: UInt32, guestAddress: UInt64, host: UnsafeMutableRawPointer, length: Int) throws {
        var region = kvm_userspace_memory_region(slot: slot, flags: 0, guest_phys_addr: guestAddress,
                                                 memory_size: UInt64(length), userspace_addr: UInt64(UInt(bitPattern: host)))
        _ = try kvmIoctl(vm.raw, CBATON_KVM_SET_USER_MEMORY_REGION, "KVM_SET_USER_MEMORY_REGION", &region)
        if slot == 0 && guestAddress == 0 { slot0 = (host, length) }
    }

    public func supportedCPUID() throws -> [kvm_cpuid_entry2] {
        try withCPUIDBuffer { buffer in
            _ = try kvmIoctl(system.raw, CBATON_KVM_GET_SUPPORTED_CPUID, "KVM_GET_SUPPORTED_CPUID", buffer)
        }
    }

    public func msrIndexList() throws -> [UInt32] {
        let capacity = 1024
        let raw = UnsafeMutableRawPointer.allocate(byteCount: MemoryLayout<kvm_msr_list>.size + capacity * 4, alignment: 8)
        defer { raw.deallocate() }
        let list = raw.bindMemory(to: kvm_msr_list.self, capacity: 1)
        list.pointee.nmsrs = UInt32(capacity)
        _ = try kvmIoctl(system.raw, CBATON_KVM_GET_MSR_INDEX_LIST, "KVM_GET_MSR_INDEX_LIST", raw)
        return Array(UnsafeBufferPointer(start: cbaton_kvm_msr_indices(list), count: Int(list.pointee.nmsrs)))
    }

    public func clock() throws -> kvm_clock_data {
        var data = kvm_clock_data()
        _ = try kvmIoctl(vm.raw, CBATON_KVM_GET_CLOCK, "KVM_GET_CLOCK", &data)
        return data
    }

    public func setClock(_ data: kvm_clock_data) throws {
        var d = data
        d.flags = 0  // restore the saved kvmclock value as is: frozen across the pause
        _ = try kvmIoctl(vm.raw, CBATON_KVM_SET_CLOCK, "KVM_SET_CLOCK", &d)
    }
}

/// Runs `body` with a kvm_cpuid2 buffer for 256 entries and returns the entries it holds.
func withCPUIDBuffer(_ body: (UnsafeMutableRawPointer) throws -> Void) throws -> [kvm_cpuid_entry2] {
    let capacity = 256
    let raw = UnsafeMutableRawPointer.allocate(byteCount: MemoryLayout<kvm_cpuid2>.size + capacity * MemoryLayout<kvm_cpuid_entry2>.stride, alignment: 8)
    defer { raw.deallocate() }
    memset(raw, 0, MemoryLayout<kvm_cpuid2>.size + capacity * MemoryLayout<kvm_cpuid_entry2>.stride)
    let c = raw.bindMemory(to: kvm_cpuid2.self, capacity: 1)
    c.pointee.nent = UInt32(capacity)
    try body(raw)
    return Array(UnsafeBufferPointer(start: cbaton_kvm_cpuid_entries(c), count: Int(c.pointee.nent)))
}

/// One KVM vCPU: its fd and the shared kvm_run page.
public final class KVMVCPU: @unchecked Sendable {
    public let fd: FileDescriptor
    public let run: UnsafeMutablePointer<kvm_run>
    let runSize: Int

    public init(machine: KVMMachine, index: Int) throws {
        fd = FileDescriptor(owning: try kvmIoctl(machine.vm.raw, CBATON_KVM_CREATE_VCPU, "KVM_CREATE_VCPU", value: Int32(index)))
        runSize = machine.vcpuMmapSize
        let p = mmap(nil, runSize, PROT_READ | PROT_WRITE, MAP_SHARED, fd.raw, 0)
        guard let p, p != MAP_FAILED else { throw SyscallError("mmap(kvm_run)", errno: errno) }
        run = p.bindMemory(to: kvm_run.self, capacity: 1)
    }

    deinit { munmap(run, runSize) }

    func get<T>(_ request: UInt, _ name: String, _ initial: T) throws -> T {
        var value = initial
        _ = try kvmIoctl(fd.raw, request, name, &value)
        return value
    }

    func set<T>(_ request: UInt, _ name: String, _ value: T) throws {
        var v = value
        _ = try kvmIoctl(fd.raw, request, name, &v)
    }

    public func setCPUID(_ entries: [kvm_cpuid_entry2]) throws {
        _ = try withCPUIDBuffer { raw in
            let c = raw.bindMemory(to: kvm_cpuid2.self, capacity: 1)
            c.pointee.nent = UInt32(entries.count)
            let dst = cbaton_kvm_cpuid_entries(c)!
            for (i, e) in entries.enumerated() { dst[i] = e }
            _ = try kvmIoctl(fd.raw, CBATON_KVM_SET_CPUID2, "KVM_SET_CPUID2", raw)
        }
    }

    public func cpuid() throws -> [kvm_cpuid_entry2] {
        try withCPUIDBuffer { raw in _ = try kvmIoctl(fd.raw, CBATON_KVM_GET_CPUID2, "KVM_GET_CPUID2", raw) }
    }

    /// Reads `indices` (skipping any this host refuses) as (index, value) pairs, in as few
    /// ioctls as possible (each vCPU ioctl costs ~8 µs on this host).
    public func msrs(_ indices: [UInt32]) throws -> [(UInt32, UInt64)] {
        var out: [(UInt32, UInt64)] = []
        var rest = indices.map { ($0, UInt64(0)) }
        while !rest.isEmpty {
            let (done, values) = try msrBatch(rest, read: true)
            out += values.prefix(done)
            rest = Array(rest.dropFirst(done + 1))  // KVM stops at the first index it refuses: skip it
        }
        return out
    }

    /// Writes MSRs in as few ioctls as possible; returns the indices the host refused
    /// (e.g. PV EOI without an in-kernel irqchip).
    public func setMSRs(_ values: [(UInt32, UInt64)]) throws -> [UInt32] {
        var refused: [UInt32] = []
        var rest = values
        while !rest.isEmpty {
            let (done, _) = try msrBatch(rest, read: false)
            if done < rest.count { refused.append(rest[done].0) }
            rest = Array(rest.dropFirst(done + 1))
        }
        return refused
    }

    /// One KVM_GET_MSRS/KVM_SET_MSRS: returns how many entries it processed (it stops at the
    /// first failure) and the entries as they are after the call.
    private func msrBatch(_ entries: [(UInt32, UInt64)], read: Bool) throws -> (Int, [(UInt32, UInt64)]) {
        let size = MemoryLayout<kvm_msrs>.size + entries.count * MemoryLayout<kvm_msr_entry>.stride
        let raw = UnsafeMutableRawPointer.allocate(byteCount: size, alignment: 8)
        defer { raw.deallocate() }
        memset(raw, 0, size)
        let m = raw.bindMemory(to: kvm_msrs.self, capacity: 1)
        m.pointee.nmsrs = UInt32(entries.count)
        let e = cbaton_kvm_msr_entries(m)!
        for (i, v) in entries.enumerated() { e[i].index = v.0; e[i].data = v.1 }
        let n = try kvmIoctl(fd.raw, read ? CBATON_KVM_GET_MSRS : CBATON_KVM_SET_MSRS, read ? "KVM_GET_MSRS" : "KVM_SET_MSRS", raw)
        return (Int(n), (0..<entries.count).map { (e[$0].index, e[$0].data) })
    }
}
