// BatonSystem owns the typed wrappers over Linux calls: one wrapper per libc call,
// errors that name the call and errno, EINTR retried, errno injectable for tests.
// It must not know about regions, protocols or VMs.
import Glibc

/// A failed system call: `'vmsplice' failed: (11) EAGAIN`.
public struct SyscallError: Error, Equatable, CustomStringConvertible, Sendable {
    public let operation: String
    public let errno: Int32

    public init(_ operation: String, errno: Int32) {
        self.operation = operation
        self.errno = errno
    }

    public var errnoName: String { ErrnoName.of(errno) }

    public var description: String {
        "'\(operation)' failed: (\(errno)) \(errnoName) \(String(cString: strerror(errno)))"
    }
}

/// Symbolic errno names, because `strerror` text alone is hard to search for.
public enum ErrnoName {
    static let table: [Int32: String] = [
        EPERM: "EPERM", ENOENT: "ENOENT", ESRCH: "ESRCH", EINTR: "EINTR", EIO: "EIO",
        EBADF: "EBADF", EAGAIN: "EAGAIN", ENOMEM: "ENOMEM", EACCES: "EACCES", EFAULT: "EFAULT",
        EBUSY: "EBUSY", EEXIST: "EEXIST", EINVAL: "EINVAL", EMFILE: "EMFILE", ENOSPC: "ENOSPC",
        EPIPE: "EPIPE", ERANGE: "ERANGE", ENOSYS: "ENOSYS", ENOTSOCK: "ENOTSOCK",
        ECONNREFUSED: "ECONNREFUSED", ECONNRESET: "ECONNRESET", ETIMEDOUT: "ETIMEDOUT",
        ENOTCONN: "ENOTCONN", EOVERFLOW: "EOVERFLOW", E2BIG: "E2BIG", ENOTTY: "ENOTTY",
        EOPNOTSUPP: "EOPNOTSUPP", ENOBUFS: "ENOBUFS", ENFILE: "ENFILE",
    ]

    public static func of(_ code: Int32) -> String { table[code] ?? "E\(code)" }

    public static func code(named name: String) -> Int32? {
        table.first { $0.value == name.uppercased() }?.key
    }
}

/// Calls `body` until it stops failing with EINTR; returns its result or throws the errno.
/// `body` gets the injected byte limit for this attempt, if a fault rule set one.
@inline(__always)
func retryingEINTR<T: BinaryInteger>(_ operation: String, _ body: (_ byteLimit: Int?) -> T) throws(SyscallError) -> T {
    while true {
        var limit: Int? = nil
        switch SyscallFaults.shared.consume(operation) {
        case .errno(let code)?:
            if code == EINTR { continue }  // an injected EINTR takes the same retry as a real one
            throw SyscallError(operation, errno: code)
        case .limit(let bytes)?:
            limit = bytes
        case nil:
            break
        }
        let result = body(limit)
        if result >= 0 { return result }
        let code = Glibc.errno
        if code == EINTR { continue }
        throw SyscallError(operation, errno: code)
    }
}

/// A raw call for layers above (ioctls): EINTR retried, errno turned into `SyscallError(operation)`.
public func checkedCall<T: BinaryInteger>(_ operation: String, _ body: () -> T) throws -> T {
    try retryingEINTR(operation) { _ in body() }
}
