// BatonCore is pure: sizes, regions, page ranges, the wire codec, the receiver's state
// machine and hashing. It makes no system calls, so every rule here is testable anywhere.

/// A byte count that parses and prints operator-friendly units (`256MiB`, `1GiB`, `4096`).
public struct ByteSize: Equatable, Comparable, Hashable, Sendable, CustomStringConvertible {
    public let bytes: Int

    public init(_ bytes: Int) { self.bytes = bytes }

    public static func < (a: ByteSize, b: ByteSize) -> Bool { a.bytes < b.bytes }

    static let units: [(String, Int)] = [
        ("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10),
        ("T", 1 << 40), ("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10), ("B", 1),
    ]

    /// Parses `N`, `NB`, `NKiB`, `NMiB`, `NGiB`, `NTiB` (and K/M/G/T as binary units).
    public init?(parsing text: String) {
        let trimmed = text.filter { !$0.isWhitespace }
        for (suffix, scale) in ByteSize.units where trimmed.hasSuffix(suffix) {
            guard let n = Int(trimmed.dropLast(suffix.count)), n >= 0 else { return nil }
            let (product, overflow) = n.multipliedReportingOverflow(by: scale)
            if overflow { return nil }
            self.init(product)
            return
        }
        guard let n = Int(trimmed), n >= 0 else { return nil }
        self.init(n)
    }

    public var description: String {
        for (suffix, scale) in ByteSize.units.prefix(4) where bytes >= scale && bytes % scale == 0 {
            return "\(bytes / scale)\(suffix)"
        }
        return "\(bytes)B"
    }
}

/// The page size every region and transfer is aligned to (4096 on x86-64 Linux).
public struct PageSize: Equatable, Sendable {
    public let bytes: Int

    public init(_ bytes: Int) {
        precondition(bytes > 0 && bytes & (bytes - 1) == 0, "page size must be a power of two, got \(bytes)")
        self.bytes = bytes
    }

    public func isAligned(_ value: UInt64) -> Bool { value & UInt64(bytes - 1) == 0 }
    public func isAligned(_ value: Int) -> Bool { value & (bytes - 1) == 0 }
    public func roundUp(_ value: Int) -> Int { (value + bytes - 1) & ~(bytes - 1) }
    public func roundDown(_ value: Int) -> Int { value & ~(bytes - 1) }
    public func pages(in length: UInt64) -> UInt64 { length / UInt64(bytes) }
}
