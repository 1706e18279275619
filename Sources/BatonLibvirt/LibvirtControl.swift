import BatonController
import Foundation

/// `HypervisorControl` through libvirt: pause and resume are libvirt's, so libvirt's view of
/// the domain stays true during an upgrade (virsh domstate shows paused, then running).
public struct LibvirtControl: HypervisorControl, @unchecked Sendable {
    public let domain: LibvirtDomain
    /// The domain's agent (control) socket from Baton's metadata: where its pid is known.
    let agent: VMMSocketControl?

    public init(domain: LibvirtDomain, agentSocket: String?) {
        self.domain = domain
        agent = agentSocket.map { VMMSocketControl(socketPath: $0) }
    }

    public var identity: String { "libvirt:\(domain.connection.uri)#\(domain.name)" }

    public func pid() throws -> Int32 {
        guard let agent else { throw VMMClient.Failure(description: "domain \(domain.name) names no agent socket") }
        return try agent.pid()
    }

    /// libvirt's state, spelled as the VMM API spells it.
    public func state() throws -> String {
        switch try domain.state().state {
        case .running: "Running"
        case .paused: "Paused"
        case .shutoff, .shutdown: "Shutdown"
        default: "Unknown"
        }
    }

    public func pause() throws { try domain.suspend() }
    public func resume() throws { try domain.resume() }
}
