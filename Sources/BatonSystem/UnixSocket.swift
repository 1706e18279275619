import CBatonLinux
import Glibc

/// Credentials of the process at the other end of a Unix socket (SO_PEERCRED).
public struct PeerCredentials: Equatable, Sendable {
    public let pid: Int32
    public let uid: UInt32
    public let gid: UInt32
}

/// A connected Unix stream socket. Descriptors travel with SCM_RIGHTS.
public final class UnixSocket: @unchecked Sendable {
    public let fd: FileDescriptor

    public init(fd: FileDescriptor) { self.fd = fd }

    public static func pair() throws -> (UnixSocket, UnixSocket) {
        var fds: [Int32] = [-1, -1]
        _ = try retryingEINTR("socketpair") { _ in socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0, &fds) }
        return (UnixSocket(fd: FileDescriptor(owning: fds[0])), UnixSocket(fd: FileDescriptor(owning: fds[1])))
    }

    public static func connect(path: String) throws -> UnixSocket {
        let fd = FileDescriptor(owning: try newSocket())
        var address = try socketAddress(path)
        _ = try retryingEINTR("connect(\(path))") { _ in
            withUnsafePointer(to: &address) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                    Glibc.connect(fd.raw, $0, socklen_t(MemoryLayout<sockaddr_un>.size))
                }
            }
        }
        return UnixSocket(fd: fd)
    }

    /// Connects within `timeoutSeconds`: a listener that does not accept (backlog full, process
    /// wedged) makes a blocking connect(2) wait forever; this gives up with ETIMEDOUT instead.
    public static func connect(path: String, timeoutSeconds: Double) throws -> UnixSocket {
        let deadline = Host.monotonicNanoseconds() + UInt64(max(0, min(timeoutSeconds, 86_400)) * 1e9)
        var address = try socketAddress(path)
        while true {
            let fd = FileDescriptor(owning: try retryingEINTR("socket(AF_UNIX)") { _ in
                socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue) | Int32(SOCK_NONBLOCK.rawValue), 0)
            })
            let rc = withUnsafePointer(to: &address) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { Glibc.connect(fd.raw, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
            }
            if rc == 0 {
                try fd.setNonBlocking(false)
                return UnixSocket(fd: fd)
            }
            let code = errno
            // AF_UNIX answers a full backlog with EAGAIN at once (never EINPROGRESS): retry.
            guard code == EAGAIN || code == EINTR else { throw SyscallError("connect(\(path))", errno: code) }
            guard Host.monotonicNanoseconds() < deadline else {
                throw SyscallError("connect(\(path)) timed out after \(timeoutSeconds) s (the listener does not accept)", errno: ETIMEDOUT)
            }
            usleep(5_000)
        }
    }

    static func newSocket() throws -> Int32 {
        try retryingEINTR("socket(AF_UNIX)") { _ in
            socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        }
    }

    static func socketAddress(_ path: String) throws -> sockaddr_un {
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        let bytes = Array(path.utf8)
        let capacity = MemoryLayout.size(ofValue: address.sun_path)
        guard !bytes.isEmpty, bytes.count < capacity else {
            throw SyscallError("socket path '\(path)' (must be 1...\(capacity - 1) bytes)", errno: ENAMETOOLONG)
        }
        withUnsafeMutableBytes(of: &address.sun_path) { raw in
            raw.copyBytes(from: bytes)
            raw[bytes.count] = 0
        }
        return address
    }

    public func peerCredentials() throws -> PeerCredentials {
        var pid: Int32 = 0, uid: UInt32 = 0, gid: UInt32 = 0
        _ = try retryingEINTR("getsockopt(SO_PEERCRED)") { _ in cbaton_peer_credentials(fd.raw, &pid, &uid, &gid) }
        return PeerCredentials(pid: pid, uid: uid, gid: gid)
    }

    /// Sends all of `bytes`; `descriptors` ride on the first byte (one SCM_RIGHTS message).
    public func send(_ bytes: [UInt8], descriptors: [Int32] = []) throws {
        var sent = 0
        var fds = descriptors
        while sent < bytes.count {
            let n = try bytes.withUnsafeBytes { raw in
                try fds.withUnsafeBufferPointer { fdBuffer in
                    try retryingEINTR("sendmsg") { limit in
                        cbaton_send_with_fds(fd.raw, raw.baseAddress! + sent, min(bytes.count - sent, limit ?? Int.max),
                                             fdBuffer.baseAddress, Int32(fdBuffer.count))
                    }
                }
            }
            sent += n
            fds = []
        }
    }

    /// Receives `count` bytes, fewer only if the peer closed the stream first (`bytes.count`
    /// then tells how many arrived). Descriptors that arrive with these bytes are returned, owned.
    public func receive(count: Int) throws -> (bytes: [UInt8], descriptors: [FileDescriptor]) {
        var buffer = [UInt8](repeating: 0, count: count)
        var received = 0
        var owned: [FileDescriptor] = []
        while received < count {
            var fds = [Int32](repeating: -1, count: 64)
            var nfds: Int32 = 0
            var truncated: Int32 = 0
            let n = try buffer.withUnsafeMutableBytes { raw in
                try retryingEINTR("recvmsg") { limit in
                    cbaton_recv_with_fds(fd.raw, raw.baseAddress! + received, min(count - received, limit ?? Int.max),
                                         &fds, 64, &nfds, &truncated)
                }
            }
            owned += fds.prefix(Int(nfds)).map { FileDescriptor(owning: $0) }
            if truncated != 0 { throw SyscallError("recvmsg (descriptors truncated)", errno: EMSGSIZE) }
            if n == 0 { break }
            received += n
        }
        return (Array(buffer.prefix(received)), owned)
    }

    /// Bounds every blocking send/receive; a stalled peer then surfaces as EAGAIN.
    public func setTimeout(seconds requested: Double) throws {
        // Any Double is accepted: NaN, negatives and absurd values are clamped (Int(1e300) traps).
        let seconds = requested.isFinite ? min(max(requested, 0.001), 86_400) : 86_400
        var tv = timeval(tv_sec: Int(seconds), tv_usec: Int((seconds - Double(Int(seconds))) * 1_000_000))
        for option in [SO_RCVTIMEO, SO_SNDTIMEO] {
            _ = try retryingEINTR("setsockopt(SO_RCVTIMEO/SO_SNDTIMEO)") { _ in
                setsockopt(fd.raw, SOL_SOCKET, option, &tv, socklen_t(MemoryLayout<timeval>.size))
            }
        }
    }

    public func shutdownWrite() { _ = Glibc.shutdown(fd.raw, Int32(SHUT_WR)) }
    /// Ends reading: a thread blocked in a receive on this socket sees end of stream at once.
    public func shutdownRead() { _ = Glibc.shutdown(fd.raw, Int32(SHUT_RD)) }
}

/// A listening Unix socket bound to a path (created 0600; the caller keeps its directory 0700).
public final class UnixListener: @unchecked Sendable {
    public let fd: FileDescriptor
    public let path: String

    /// Binds and listens under a temporary name, then renames onto `path`: the path appears
    /// only once connections are accepted, so "socket exists" means "ready" to whoever waits.
    public init(path: String, backlog: Int32 = 16) throws {
        fd = FileDescriptor(owning: try UnixSocket.newSocket())
        self.path = path
        let staging = path + ".\(getpid()).tmp"
        unlink(staging)
        var address = try UnixSocket.socketAddress(staging)
        let oldMask = umask(0o177)
        defer { umask(oldMask) }
        _ = try retryingEINTR("bind(\(staging))") { _ in
            withUnsafePointer(to: &address) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                    bind(fd.raw, $0, socklen_t(MemoryLayout<sockaddr_un>.size))
                }
            }
        }
        _ = try retryingEINTR("listen(\(path))") { _ in listen(fd.raw, backlog) }
        _ = try retryingEINTR("rename(\(staging) → \(path))") { _ in rename(staging, path) }
    }

    /// Waits up to `timeoutSeconds` (nil: forever) for one connection.
    public func accept(timeoutSeconds: Double? = nil) throws -> UnixSocket {
        if let timeoutSeconds {
            guard try fd.wait(for: Int16(POLLIN), timeoutMilliseconds: Int32(timeoutSeconds * 1000)) else {
                throw SyscallError("accept(\(path)) timed out after \(timeoutSeconds) s", errno: ETIMEDOUT)
            }
        }
        let client = try retryingEINTR("accept(\(path))") { _ in cbaton_accept_cloexec(fd.raw) }
        return UnixSocket(fd: FileDescriptor(owning: client))
    }

    public func remove() { unlink(path) }
}

/// accept(2) with SOCK_CLOEXEC set atomically: a descriptor accepted just before an exec must
/// not leak into the new image (where nobody would answer it). -1 and errno on failure.
public func acceptCloseOnExec(_ listener: Int32) -> Int32 { cbaton_accept_cloexec(listener) }

extension UnixSocket {
    /// The path a Unix socket descriptor is bound to (getsockname), or nil if it has none.
    public static func boundPath(of fd: Int32) -> String? {
        var address = sockaddr_un()
        var length = socklen_t(MemoryLayout<sockaddr_un>.size)
        let rc = withUnsafeMutablePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &length) }
        }
        guard rc == 0, address.sun_family == sa_family_t(AF_UNIX) else { return nil }
        let path = withUnsafeBytes(of: &address.sun_path) { raw -> String in
            let bytes = raw.prefix(max(0, Int(length) - 2))
            return String(decoding: bytes.prefix { $0 != 0 }, as: UTF8.self)
        }
        return path.hasPrefix("/") ? path : nil
    }

    /// Whether some process listens on the Unix socket at `path` (from /proc/net/unix, without
    /// connecting: a probing connect would be taken as a real client by some servers).
    public static func isListening(path: String) -> Bool {
        guard let table = try? String(contentsOfFile: "/proc/net/unix", encoding: .utf8) else { return false }
        for line in table.split(separator: "\n").dropFirst() {
            let f = line.split(separator: " ", omittingEmptySubsequences: true)
            if f.count >= 8, f.last.map(String.init) == path, let flags = Int(f[3], radix: 16), flags & 0x10000 != 0 { return true }
        }
        return false
    }
}

extension UnixSocket {
    /// Writes all of `bytes` with MSG_NOSIGNAL: a peer that went away is EPIPE, never SIGPIPE
    /// (which would kill a controller in the middle of a handoff).
    public func sendAll(_ bytes: [UInt8]) throws {
        var done = 0
        while done < bytes.count {
            let n = try bytes[done...].withUnsafeBytes { raw in
                try retryingEINTR("send") { _ in Glibc.send(fd.raw, raw.baseAddress, raw.count, Int32(MSG_NOSIGNAL)) }
            }
            done += n
        }
    }
}
