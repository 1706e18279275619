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

    public var identity: String { client.socketPath }

    struct Status: Decodable {
        let pid: Int32
        let state: String
        let startedAtMonotonicNs: UInt64
    }

    public func pid() throws -> Int32 { try client.expectOK("GET", "/api/v1/baton/status").decode(Status.self).pid }
    public func state() throws -> String { try client.expectOK("GET", "/api/v1/baton/status").decode(Status.self).state }
    public func pause() throws { try client.expectOK("PUT", "/api/v1/vm.pause") }
    public func resume() throws { try client.expectOK("PUT", "/api/v1/vm.resume") }
    public func startedAt() throws -> UInt64 { try client.expectOK("GET", "/api/v1/baton/status").decode(Status.self).startedAtMonotonicNs }
}
