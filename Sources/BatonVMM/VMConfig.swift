/// A VM's configuration in Cloud Hypervisor's vm.create JSON shape (the subset batonvmm
/// uses), so `curl` users and libvirt's ch driver can send what they already send.
public struct VMConfig: Codable, Equatable, Sendable {
    public struct CPUs: Codable, Equatable, Sendable {
        public var boot_vcpus: Int
        public var max_vcpus: Int?
    }
    public struct Memory: Codable, Equatable, Sendable {
        public var size: Int
        /// Guest RAM in a memfd (MAP_SHARED) instead of anonymous memory: enables the memfd transport.
        public var shared: Bool?
    }
    public struct Payload: Codable, Equatable, Sendable {
        /// The guest program: a file with raw 64-bit CPL-3 code, or "builtin:reference".
        public var kernel: String?
    }
    /// libvirt's ch driver sends `"kernel":{"path":…}` (Cloud Hypervisor's older shape).
    public struct KernelPath: Codable, Equatable, Sendable {
        public var path: String
    }
    /// Baton's own knobs for the reference guest.
    public struct Guest: Codable, Equatable, Sendable {
        /// Spin iterations between guest iterations (keeps the model cheap to replay).
        public var delay_spins: UInt64?
        /// Heartbeat when (counter & mask) == 0.
        public var heartbeat_mask: UInt64?
        /// Force the simulated vCPU even where /dev/kvm works.
        public var simulated: Bool?
    }

    public var cpus: CPUs
    public var memory: Memory
    public var payload: Payload?
    public var kernel: KernelPath?
    public var baton_guest: Guest?

    public init(ramBytes: Int, vcpus: Int = 1, shared: Bool = true, kernel: String? = nil, simulated: Bool = false) {
        cpus = CPUs(boot_vcpus: vcpus, max_vcpus: vcpus)
        memory = Memory(size: ramBytes, shared: shared)
        payload = Payload(kernel: kernel)
        baton_guest = Guest(delay_spins: nil, heartbeat_mask: nil, simulated: simulated ? true : nil)
    }

    /// The guest program's path, from either shape.
    public var kernelPath: String? { payload?.kernel ?? kernel?.path }

    public var vcpus: Int { cpus.boot_vcpus }
    public var ramBytes: Int { memory.size }
    public var sharedMemory: Bool { memory.shared ?? true }
    public var delaySpins: UInt64 { baton_guest?.delay_spins ?? 4096 }
    public var heartbeatMask: UInt64 { baton_guest?.heartbeat_mask ?? 0xFFFF }
    public var simulated: Bool { baton_guest?.simulated ?? false }

    public enum Invalid: Error, CustomStringConvertible {
        case field(String, String)
        public var description: String {
            switch self { case let .field(name, why): "vm.create: \(name) \(why)" }
        }
    }

    /// Checks what the guest layout needs; each refusal names the field.
    public func validate() throws {
        guard (1...GuestLayout.maximumVCPUs).contains(vcpus) else {
            throw Invalid.field("cpus.boot_vcpus", "must be 1...\(GuestLayout.maximumVCPUs), got \(vcpus)")
        }
        let minimum = Int(GuestLayout.reservedBytes(vcpus: vcpus)) + (2 << 20)
        guard ramBytes >= minimum, ramBytes <= GuestLayout.maximumRAM, ramBytes % (2 << 20) == 0 else {
            throw Invalid.field("memory.size", "must be a multiple of 2 MiB in \(minimum)...\(GuestLayout.maximumRAM), got \(ramBytes)")
        }
        guard heartbeatMask & (heartbeatMask &+ 1) == 0 else {
            throw Invalid.field("baton_guest.heartbeat_mask", "must be 2^n - 1, got \(heartbeatMask)")
        }
        guard delaySpins >= 1 else { throw Invalid.field("baton_guest.delay_spins", "must be at least 1") }
    }
}
