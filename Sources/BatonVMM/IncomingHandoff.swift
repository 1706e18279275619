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

    /// What a new instance holds when its old instance dies mid-handoff: guest RAM and the
    /// state region, both memfds shared with the dead process (so nothing was lost with it).
    public struct Orphan: @unchecked Sendable {
        public let regions: [DestinationRegion]
        public let prebuilt: PrebuiltKVM?
        public let oldPID: Int32?
        public let digestBeforeResume: Bool

        /// Restores the state the old instance saved at its pause and runs the guest.
        public func adopt() throws -> VirtualMachine {
            guard let state = regions.first(where: { $0.region.id == VMMService.stateRegionID }),
                  let ram = regions.first(where: { $0.region.id == 0 }) else { throw VMError.noVM }
            let vm = try VirtualMachine.restore(try StateRegion.read(from: state.base, capacity: Int(state.region.length)),
                                                ram: ram.mapping, prebuilt: prebuilt)
            if digestBeforeResume { vm.ramDigestBeforeResume = String(RAMDigest.of(vm.ram.base, count: vm.config.ramBytes), radix: 16) }
            try vm.startRestored()
            return vm
        }
    }

    /// Whether the failure is the old instance's side going away (socket closed or reset, a
    /// message cut off, a pipe broken), decided on the error's type, never its text: only then
    /// may this instance check whether the old one died and hold the guest for adoption.
    static func isPeerGone(_ error: Error) -> Bool {
        func gone(_ e: SyscallError) -> Bool { e.errno == EPIPE || e.errno == ECONNRESET }
        switch AgentError.wrap(error) {
        case .protocolViolation(.peerClosed), .protocolViolation(.truncatedHeader), .protocolViolation(.truncatedPayload): return true
        // A dying sender's pipes end too; whether it really died is checked by its pid after.
        case .transfer(.pipeClosedEarly): return true
        case .system(let e): return gone(e)
        // process_vm_readv from a sender that died: ESRCH, or EFAULT while its memory is torn down.
        case .transfer(.syscall(let e, _, _, _)): return gone(e) || e.errno == ESRCH || e.errno == EFAULT
        default: return false
        }
    }

    public enum Outcome {
        case running(VirtualMachine)
        /// The old instance died; the guest can be adopted (`PUT /api/v1/baton/adopt`).
        case orphaned(Orphan, reason: String)
    }

    /// Returns the restored, running VM, or an orphan if the old instance died holding the
    /// guest. Throws if the handoff was abandoned or failed; the old instance still holds the
    /// guest then.
    public func run() throws -> Outcome {
        let prebuilt = KVMHost.unavailableReason == nil ? expectedVCPUs.flatMap { try? PrebuiltKVM(vcpus: $0) } : nil
        VMState.warmUp()  // the state's decode runs inside the pause: warm it before we are ready
        let listener = try UnixListener(path: agentSocket)
        defer { listener.remove() }
        let connection = AgentConnection(socket: try listener.accept(timeoutSeconds: acceptTimeoutSeconds))
        listener.remove()
        let agent = NewInstanceAgent(connection: connection, stallTimeoutSeconds: stallTimeoutSeconds, destinations: Self.destination)
        var restored: VirtualMachine?
        agent.destinationsMapped = { regions in
            // Best effort: a restore that finds the slot unset sets it itself.
            if let prebuilt, let ram = regions.first(where: { $0.region.id == 0 && $0.region.guestAddress == 0 }) { try? prebuilt.register(ram: ram.mapping) }
        }
        agent.prepareCommit = { regions in
            guard let stateRegion = regions.first(where: { $0.region.id == VMMService.stateRegionID }),
                  let ram = regions.first(where: { $0.region.id == 0 }) else {
                throw VMError.noVM
            }
            restored = try VirtualMachine.restore(try StateRegion.read(from: stateRegion.base, capacity: Int(stateRegion.region.length)),
                                                  ram: ram.mapping, prebuilt: prebuilt)
        }
        do {
            _ = try agent.receive()
        } catch {
            let held = Array(agent.destinations.values)
            // A SIGKILLed process stays visible for a moment while the kernel tears it down:
            // when the connection broke (not an orderly abandon), give its death a bounded wait.
            var oldDead = agent.peerPID.map { !Host.isAlive($0) } ?? false
            if !oldDead, let pid = agent.peerPID, Self.isPeerGone(error) {
                for _ in 0..<250 where Host.isAlive(pid) { usleep(20_000) }
                oldDead = !Host.isAlive(pid)
            }
            if oldDead, held.contains(where: { $0.region.id == 0 }), held.contains(where: { $0.region.id == VMMService.stateRegionID }) {
                // A VM restored after the verification holds the prebuilt KVM VM: the orphan
                // builds its own rather than share it.
                let unused = restored == nil ? prebuilt : nil
                restored = nil
                return .orphaned(Orphan(regions: held, prebuilt: unused, oldPID: agent.peerPID, digestBeforeResume: digestBeforeResume), reason: "\(error)")
            }
            throw error
        }
        guard let vm = restored else { throw VMError.noVM }
        if digestBeforeResume { vm.ramDigestBeforeResume = String(RAMDigest.of(vm.ram.base, count: vm.config.ramBytes), radix: 16) }
        try vm.startRestored()
        return .running(vm)
    }
}
