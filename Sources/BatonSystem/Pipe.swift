import CBatonLinux
import Glibc

/// A pipe's two ends. Both are O_CLOEXEC; pass them to other processes with SCM_RIGHTS.
public struct Pipe: Sendable {
    public let readEnd: FileDescriptor
    public let writeEnd: FileDescriptor

    public init() throws {
        var fds: [Int32] = [-1, -1]
        _ = try retryingEINTR("pipe2") { _ in cbaton_pipe2_cloexec(&fds) }
        readEnd = FileDescriptor(owning: fds[0])
        writeEnd = FileDescriptor(owning: fds[1])
    }

    /// The pipe's capacity in bytes (F_GETPIPE_SZ).
    public static func capacity(of fd: FileDescriptor) throws -> Int {
        Int(try retryingEINTR("F_GETPIPE_SZ") { _ in cbaton_get_pipe_size(fd.raw) })
    }

    /// Bytes written and not yet read (FIONREAD).
    public static func queuedBytes(in fd: FileDescriptor) throws -> Int {
        var bytes: Int32 = 0
        _ = try retryingEINTR("ioctl(FIONREAD)") { _ in cbaton_pipe_bytes_queued(fd.raw, &bytes) }
        return Int(bytes)
    }

    /// Asks for `requested` bytes of capacity (F_SETPIPE_SZ). When the kernel refuses
    /// (EPERM above /proc/sys/fs/pipe-max-size, or the user's pipe budget is spent),
    /// halves the request until it is accepted or reaches one page, and returns what
    /// the pipe really holds. Never touches the host sysctl.
    @discardableResult
    public func resize(toAtMost requested: Int, minimum: Int = 4096) throws -> SizeOutcome {
        var attempt = requested
        var refusals: [SyscallError] = []
        while attempt >= minimum {
            do {
                _ = try retryingEINTR("F_SETPIPE_SZ") { _ in cbaton_set_pipe_size(writeEnd.raw, Int32(clamping: attempt)) }
                return SizeOutcome(requested: requested, granted: try Pipe.capacity(of: writeEnd), refusals: refusals)
            } catch let error as SyscallError where [EPERM, EBUSY, ENOMEM].contains(error.errno) {
                refusals.append(error)
                attempt /= 2
            }
        }
        return SizeOutcome(requested: requested, granted: try Pipe.capacity(of: writeEnd), refusals: refusals)
    }

    public struct SizeOutcome: Sendable {
        public let requested: Int
        public let granted: Int
        public let refusals: [SyscallError]
    }
}
