import Foundation
import Glibc

/// systemd's readiness protocol (sd_notify(3)) without libsystemd: one datagram of
/// `KEY=VALUE` lines to the socket named by $NOTIFY_SOCKET (a path, or `@name` in the abstract
/// namespace). Under `Type=notify` the unit is started only once `READY=1` arrives, and
/// `EXTEND_TIMEOUT_USEC` keeps a long drain from being cut by TimeoutStopSec.
public struct SystemdNotify: Sendable {
    public let socket: String

    /// The manager's socket, taken out of the environment (nil: not under systemd) so that the
    /// processes the service starts (hypervisor instances) cannot speak for it.
    public static func takeFromEnvironment() -> SystemdNotify? {
        guard let socket = ProcessInfo.processInfo.environment["NOTIFY_SOCKET"], !socket.isEmpty else { return nil }
        unsetenv("NOTIFY_SOCKET")
        return SystemdNotify(socket: socket)
    }

    public init(socket: String) { self.socket = socket }

    /// Sends `state`; false when the send fails (the service runs on either way: readiness is
    /// advice to the manager, not a dependency).
    @discardableResult
    public func send(_ state: String) -> Bool {
        guard var address = Self.address(socket) else { return false }
        let fd = Glibc.socket(AF_UNIX, Int32(SOCK_DGRAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { return false }
        defer { close(fd) }
        let bytes = Array(state.utf8)
        let sent = withUnsafePointer(to: &address.storage) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { sendto(fd, bytes, bytes.count, Int32(MSG_NOSIGNAL), $0, address.length) }
        }
        return sent == bytes.count
    }

    /// The address of `name`, with the length that counts for the abstract namespace (no
    /// terminating NUL, every byte significant); nil for a name that cannot be one.
    static func address(_ name: String) -> (storage: sockaddr_un, length: socklen_t)? {
        var storage = sockaddr_un()
        storage.sun_family = sa_family_t(AF_UNIX)
        var bytes = Array(name.utf8)
        let abstract = bytes.first == UInt8(ascii: "@")
        if abstract { bytes[0] = 0 }
        let capacity = MemoryLayout.size(ofValue: storage.sun_path)
        guard bytes.count > 1 || (!abstract && bytes.count == 1), bytes.count < capacity,
              abstract || bytes.first == UInt8(ascii: "/") else { return nil }
        withUnsafeMutableBytes(of: &storage.sun_path) { raw in
            for (i, b) in bytes.enumerated() { raw[i] = b }
        }
        let header = MemoryLayout<sockaddr_un>.offset(of: \.sun_path)!
        return (storage, socklen_t(header + bytes.count + (abstract ? 0 : 1)))
    }
}
