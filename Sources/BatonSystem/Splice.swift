import CBatonLinux
import Glibc

/// vmsplice flags, named as in <fcntl.h>.
public struct SpliceFlags: OptionSet, Sendable {
    public let rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }
    public static let move = SpliceFlags(rawValue: CBATON_SPLICE_F_MOVE)
    public static let nonBlocking = SpliceFlags(rawValue: CBATON_SPLICE_F_NONBLOCK)
    public static let gift = SpliceFlags(rawValue: CBATON_SPLICE_F_GIFT)
}

/// At most this many iovecs per vmsplice/process_vm_readv call (1025 gives EINVAL).
public let maxIOVecs = Int(CBATON_IOV_MAX)

/// Linux moves at most this many bytes in one read/write/vmsplice (2 GiB − 4 KiB), silently.
public let maxBytesPerCall = 0x7fff_f000

public enum Splice {
    /// One `vmsplice(2)` call: user pages → pipe (write end) or pipe → user memory (read end).
    /// Returns the bytes moved, which may be fewer than asked (pipe full/empty, 2 GiB cap).
    /// EINTR is retried; EAGAIN (only with `.nonBlocking`) is thrown for the caller to wait.
    public static func vmsplice(_ pipe: FileDescriptor, _ iovecs: UnsafeBufferPointer<iovec>, flags: SpliceFlags) throws -> Int {
        precondition(iovecs.count <= maxIOVecs, "vmsplice takes at most \(maxIOVecs) iovecs")
        return Int(try retryingEINTR("vmsplice") { limit in
            guard let limit else {
                return cbaton_vmsplice(pipe.raw, iovecs.baseAddress, UInt(iovecs.count), flags.rawValue)
            }
            var truncated = IOVecs.truncate(iovecs, toBytes: limit)
            return truncated.withUnsafeMutableBufferPointer {
                cbaton_vmsplice(pipe.raw, $0.baseAddress, UInt($0.count), flags.rawValue)
            }
        })
    }
}

public enum IOVecs {
    /// The first `bytes` bytes of `iovecs` (used to emulate a short transfer).
    public static func truncate(_ iovecs: UnsafeBufferPointer<iovec>, toBytes bytes: Int) -> [iovec] {
        var left = bytes
        var out: [iovec] = []
        for v in iovecs where left > 0 {
            let take = min(v.iov_len, left)
            out.append(iovec(iov_base: v.iov_base, iov_len: take))
            left -= take
        }
        return out
    }

    public static func totalBytes(_ iovecs: UnsafeBufferPointer<iovec>) -> Int {
        iovecs.reduce(0) { $0 + $1.iov_len }
    }
}

extension Splice {
    /// One contiguous range through `vmsplice(2)`.
    public static func vmsplice(_ pipe: FileDescriptor, base: UnsafeMutableRawPointer, length: Int, flags: SpliceFlags) throws -> Int {
        var v = iovec(iov_base: base, iov_len: length)
        return try withUnsafePointer(to: &v) { try vmsplice(pipe, UnsafeBufferPointer(start: $0, count: 1), flags: flags) }
    }
}

extension Splice {
    /// Whether this kernel accepts `vmsplice(SPLICE_F_GIFT)`: one page gifted into a fresh pipe.
    /// Kernels that dropped gifting (linux-next) answer EOPNOTSUPP; then gift cannot be used and
    /// Baton streams by plain pipe copy instead. Goes through the same wrapper as the transfer,
    /// so `BATON_SYSCALL_FAULTS=vmsplice=EOPNOTSUPP@*` exercises the refusal. Nil: refused
    /// (with the error); otherwise accepted.
    public static func giftRefusal() -> SyscallError? {
        guard let pipe = try? Pipe() else { return nil }
        let page = Int(sysconf(Int32(_SC_PAGESIZE)))
        guard let raw = mmap(nil, page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0), raw != MAP_FAILED else { return nil }
        defer { munmap(raw, page) }
        raw.storeBytes(of: 0x42, as: UInt8.self)
        do {
            _ = try vmsplice(pipe.writeEnd, base: raw, length: page, flags: [.gift, .nonBlocking])
            return nil
        } catch let e as SyscallError where e.errno == EOPNOTSUPP {
            return e
        } catch {
            return nil  // anything else (EAGAIN, ENOMEM) says nothing about gifting itself
        }
    }
}
