import Glibc

/// A listening IPv4 TCP socket (the service's metrics endpoint, for Prometheus to scrape).
public final class TCPListener: @unchecked Sendable {
    public let fd: FileDescriptor
    /// "ADDRESS:PORT" as bound (port 0 asked: the port the kernel chose).
    public let address: String

    /// Binds `address` ("127.0.0.1:9464", "localhost:9464", "0.0.0.0:9464"; port 0 = any) and listens.
    public init(address text: String, backlog: Int32 = 16) throws {
        guard let colon = text.lastIndex(of: ":"), let port = UInt16(text[text.index(after: colon)...]) else {
            throw SyscallError("'\(text)' is not ADDRESS:PORT", errno: EINVAL)
        }
        var host = String(text[..<colon])
        if host == "localhost" { host = "127.0.0.1" }
        var sin = sockaddr_in()
        sin.sin_family = sa_family_t(AF_INET)
        sin.sin_port = port.bigEndian
        guard inet_pton(AF_INET, host, &sin.sin_addr) == 1 else { throw SyscallError("'\(host)' is not an IPv4 address", errno: EINVAL) }
        let raw = try checkedCall("socket(AF_INET)") { socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0) }
        fd = FileDescriptor(owning: raw)
        var one: Int32 = 1
        setsockopt(raw, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
        _ = try checkedCall("bind(\(text))") {
            withUnsafePointer(to: &sin) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(raw, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) } }
        }
        _ = try checkedCall("listen(\(text))") { listen(raw, backlog) }
        var bound = sockaddr_in()
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        _ = withUnsafeMutablePointer(to: &bound) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(raw, $0, &length) } }
        address = "\(host):\(UInt16(bigEndian: bound.sin_port))"
    }
}
