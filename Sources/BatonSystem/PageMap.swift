import CBatonLinux
import Glibc

/// Reads /proc/self/pagemap: whether a virtual page is resident and, with CAP_SYS_ADMIN,
/// which physical frame backs it. This is how Baton tells moved pages from copied ones.
public enum PageMap {
    public struct Entry: Equatable, Sendable {
        public let present: Bool
        /// 0 when the kernel hides frame numbers (unprivileged readers).
        public let frame: UInt64
    }

    public static func entries(for addresses: [UnsafeRawPointer], pageSize: Int) throws -> [Entry] {
        let fd = try retryingEINTR("open(/proc/self/pagemap)") { _ in open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC) }
        defer { close(fd) }
        return try addresses.map { address in
            var raw: UInt64 = 0
            let offset = off_t(UInt(bitPattern: address) / UInt(pageSize) * 8)
            let n = try retryingEINTR("pread(/proc/self/pagemap)") { _ in pread(fd, &raw, 8, offset) }
            guard n == 8 else { throw SyscallError("pread(/proc/self/pagemap) short", errno: EIO) }
            return Entry(present: raw & (1 << 63) != 0, frame: raw & ((1 << 55) - 1))
        }
    }

    /// Whether each page of `[base, base+length)` is resident (mincore).
    public static func residentPages(base: UnsafeMutableRawPointer, length: Int, pageSize: Int) throws -> Int {
        let pages = (length + pageSize - 1) / pageSize
        var vector = [UInt8](repeating: 0, count: pages)
        _ = try retryingEINTR("mincore") { _ in cbaton_mincore(base, length, &vector) }
        return vector.reduce(0) { $0 + Int($1 & 1) }
    }
}
