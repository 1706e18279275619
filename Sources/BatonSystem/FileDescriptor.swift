import CBatonLinux
import Glibc
import Synchronization

/// Owns one file descriptor and closes it exactly once (on `close()` or deinit), even when two
/// threads close it at once (a failing lane and the agent stopping the lanes): the number is
/// taken atomically, so a second close never closes a descriptor reopened under that number.
public final class FileDescriptor: @unchecked Sendable, CustomStringConvertible {
    private let storage: Atomic<Int32>

    public var raw: Int32 { storage.load(ordering: .acquiring) }

    public init(owning raw: Int32) {
        precondition(raw >= 0, "FileDescriptor needs a valid descriptor, got \(raw)")
        storage = Atomic(raw)
    }

    deinit { let fd = storage.load(ordering: .acquiring); if fd >= 0 { Glibc.close(fd) } }

    public var description: String { "fd \(raw)" }

    public func close() {
        let fd = storage.exchange(-1, ordering: .acquiringAndReleasing)
        if fd >= 0 { Glibc.close(fd) }
    }

    /// Gives up ownership without closing (for example after handing the fd to exec).
    public func release() -> Int32 {
        storage.exchange(-1, ordering: .acquiringAndReleasing)
    }

    public func duplicate() throws -> FileDescriptor {
        let fd = try retryingEINTR("fcntl(F_DUPFD_CLOEXEC)") { _ in fcntl(raw, F_DUPFD_CLOEXEC, 0) }
        return FileDescriptor(owning: fd)
    }

    /// Reads up to `count` bytes; returns 0 at end of file.
    public func read(into buffer: UnsafeMutableRawPointer, count: Int) throws -> Int {
        try retryingEINTR("read") { limit in Glibc.read(raw, buffer, min(count, limit ?? count)) }
    }

    /// Reads exactly `count` bytes or throws; a premature end of file is EPIPE-free `nil`.
    public func readExactly(into buffer: UnsafeMutableRawPointer, count: Int) throws -> Bool {
        var done = 0
        while done < count {
            let n = try read(into: buffer + done, count: count - done)
            if n == 0 { return false }
            done += n
        }
        return true
    }

    public func write(from buffer: UnsafeRawPointer, count: Int) throws -> Int {
        try retryingEINTR("write") { limit in Glibc.write(raw, buffer, min(count, limit ?? count)) }
    }

    public func writeAll(from buffer: UnsafeRawPointer, count: Int) throws {
        var done = 0
        while done < count { done += try write(from: buffer + done, count: count - done) }
    }

    public func writeAll(_ bytes: [UInt8]) throws {
        try bytes.withUnsafeBytes { (raw: UnsafeRawBufferPointer) throws in
            try writeAll(from: raw.baseAddress!, count: raw.count)
        }
    }

    public func setNonBlocking(_ on: Bool) throws {
        let flags = try retryingEINTR("fcntl(F_GETFL)") { _ in fcntl(raw, F_GETFL) }
        let updated = on ? flags | O_NONBLOCK : flags & ~O_NONBLOCK
        _ = try retryingEINTR("fcntl(F_SETFL)") { _ in fcntl(raw, F_SETFL, updated) }
    }

    public func clearCloseOnExec() throws {
        _ = try retryingEINTR("fcntl(F_SETFD)") { _ in fcntl(raw, F_SETFD, 0) }
    }

    public func truncate(to size: Int) throws {
        _ = try retryingEINTR("ftruncate") { _ in ftruncate(raw, off_t(size)) }
    }

    public func status() throws -> stat {
        var st = stat()
        _ = try retryingEINTR("fstat") { _ in fstat(raw, &st) }
        return st
    }

    /// Waits until the descriptor is ready for `events` (POLLIN/POLLOUT) or the timeout passes.
    /// Returns false on timeout.
    public func wait(for events: Int16, timeoutMilliseconds: Int32) throws -> Bool {
        var pfd = pollfd(fd: raw, events: events, revents: 0)
        let n = try retryingEINTR("poll") { _ in poll(&pfd, 1, timeoutMilliseconds) }
        return n > 0
    }
}
