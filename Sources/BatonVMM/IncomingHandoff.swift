import BatonAgent
import BatonCore
import BatonSystem
import BatonTransfer
import Foundation
import Glibc

/// The new instance's side of an upgrade: wait on the agent socket, receive RAM and vCPU
/// state, build the VM paused (before acknowledging commit), then run it and take over the
/// API socket path.
public struct IncomingHandoff {
    public let agentSocket: String
    public let acceptTimeoutSeconds: Double
    public let stallTimeoutSeconds: Double
    public var digestBeforeResume = false
    /// vCPUs to create before the pause (the controller's hint from the old instance).
    public var expectedVCPUs: Int?

    public init(agentSocket: String, acceptTimeoutSeconds: Double = 60, stallTimeoutSeconds: Double = 10) {
        self.agentSocket = agentSocket
        self.acceptTimeoutSeconds = acceptTimeoutSeconds
        self.stallTimeoutSeconds = stallTimeoutSeconds
    }

    /// Guest RAM that came as a memfd stays a memfd (so the next upgrade can pass it along);
    /// anonymous RAM arrives into anonymous memory. Both pre-faulted before the pause.
    static func destination(_ region: GuestRegion) throws -> MemoryMapping {
        let m = region.flags.contains(.fileBacked)
            ? try MemoryMapping.memfd(name: region.id == VMMService.stateRegionID ? "batonvmm-vcpu-state" : "batonvmm-guest-ram", length: Int(region.length))
            : try MemoryMapping.anonymous(length: Int(region.length))
        m.adviseHugePages()
        m.prefault(pageSize: Host.pageSize)
        return m
    }

    /// Returns the restored, running VM. Throws if the handoff was abandoned or failed; the
    /// old instance still holds the guest then.
    public func run() throws -> VirtualMachine {
        let prebuilt = KVMHost.unavailableReason == nil ? expectedVCPUs.flatMap { try? PrebuiltKVM(vcpus: $0) } : nil
        let listener = try UnixListener(path: agentSocket)
        defer { listener.remove() }
        let connection = AgentConnection(socket: try listener.accept(timeoutSeconds: acceptTimeoutSeconds))
        listener.remove()
        let agent = NewInstanceAgent(connection: connection, stallTimeoutSeconds: stallTimeoutSeconds, destinations: Self.destination)
        var restored: VirtualMachine?
        agent.prepareCommit = { regions in
            guard let stateRegion = regions.first(where: { $0.region.id == VMMService.stateRegionID }),
                  let ram = regions.first(where: { $0.region.id == 0 }) else {
                throw VMError.noVM
            }
            let length = Int(UInt32(littleEndian: stateRegion.base.load(as: UInt32.self)))
            guard length > 0, length + 4 <= Int(stateRegion.region.length) else { throw VMState.DecodeError.truncated("state length \(length)") }
            let blob = Array(UnsafeRawBufferPointer(start: stateRegion.base + 4, count: length))
            restored = try VirtualMachine.restore(try VMState.decode(blob), ram: ram.mapping, prebuilt: prebuilt)
        }
        _ = try agent.receive()
        guard let vm = restored else { throw VMError.noVM }
        if digestBeforeResume { vm.ramDigestBeforeResume = String(RAMDigest.of(vm.ram.base, count: vm.config.ramBytes), radix: 16) }
        try vm.startRestored()
        return vm
    }
}
