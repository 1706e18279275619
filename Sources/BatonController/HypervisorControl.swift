import BatonCore
import Foundation

/// What the upgrade sequence needs from whoever runs the guest. The sequence never knows
/// whether it talks to a VMM's control socket or to libvirt.
public protocol HypervisorControl: Sendable {
    /// A stable name for logs and the journal (socket path or libvirt domain).
    var identity: String { get }
    func pid() throws -> Int32
    func state() throws -> String
    func pause() throws
    func resume() throws
}

/// The reference VMM's own control socket (Cloud Hypervisor API dialect).
public struct VMMSocketControl: HypervisorControl {
    public let client: VMMClient
    public init(socketPath: String) { client = VMMClient(socketPath: socketPath) }
    public init(client: VMMClient) { self.client = client }

    public var identity: String { client.socketPath }

    public func pid() throws -> Int32 { try client.status().pid }
    public func state() throws -> String { try client.status().state.rawValue }
    public func pause() throws { try client.expectOK("PUT", BatonVMMAPI.pause) }
    public func resume() throws { try client.expectOK("PUT", BatonVMMAPI.resume) }
    public func startedAt() throws -> UInt64 { try client.status().startedAtMonotonicNs }
}
