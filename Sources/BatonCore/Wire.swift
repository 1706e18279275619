/// Little-endian encoder for Baton's wire format.
public struct WireWriter {
    public private(set) var bytes: [UInt8] = []

    public init() {}

    public mutating func u8(_ v: UInt8) { bytes.append(v) }
    public mutating func u16(_ v: UInt16) { withUnsafeBytes(of: v.littleEndian) { bytes += $0 } }
    public mutating func u32(_ v: UInt32) { withUnsafeBytes(of: v.littleEndian) { bytes += $0 } }
    public mutating func u64(_ v: UInt64) { withUnsafeBytes(of: v.littleEndian) { bytes += $0 } }
    public mutating func i32(_ v: Int32) { u32(UInt32(bitPattern: v)) }

    /// A string as a u16 byte count followed by UTF-8 (truncated to 1024 bytes).
    public mutating func string(_ s: String) {
        let utf8 = Array(s.utf8.prefix(1024))
        u16(UInt16(utf8.count))
        bytes += utf8
    }
}

/// Little-endian decoder that never reads past its buffer: every read checks what is left.
public struct WireReader {
    let bytes: [UInt8]
    public private(set) var offset = 0

    public init(_ bytes: [UInt8]) { self.bytes = bytes }

    public var remaining: Int { bytes.count - offset }

    mutating func take(_ n: Int, _ field: String) throws(ProtocolError) -> ArraySlice<UInt8> {
        guard n <= remaining else {
            throw .truncatedPayload(field: field, needed: n, available: remaining)
        }
        defer { offset += n }
        return bytes[offset..<offset + n]
    }

    mutating func integer<T: FixedWidthInteger>(_ type: T.Type, _ field: String) throws(ProtocolError) -> T {
        let slice = try take(MemoryLayout<T>.size, field)
        var value: T = 0
        for (i, b) in slice.enumerated() { value |= T(b) << (8 * i) }
        return value
    }

    public mutating func u8(_ field: String) throws(ProtocolError) -> UInt8 { try integer(UInt8.self, field) }
    public mutating func u16(_ field: String) throws(ProtocolError) -> UInt16 { try integer(UInt16.self, field) }
    public mutating func u32(_ field: String) throws(ProtocolError) -> UInt32 { try integer(UInt32.self, field) }
    public mutating func u64(_ field: String) throws(ProtocolError) -> UInt64 { try integer(UInt64.self, field) }
    public mutating func i32(_ field: String) throws(ProtocolError) -> Int32 { Int32(bitPattern: try u32(field)) }

    public mutating func string(_ field: String) throws(ProtocolError) -> String {
        let n = Int(try u16(field))
        return String(decoding: try take(n, field), as: UTF8.self)
    }

    /// A count of following records, bounded by what the payload can hold.
    public mutating func count(_ field: String, recordSize: Int) throws(ProtocolError) -> Int {
        let n = Int(try u32(field))
        guard n * recordSize <= remaining else {
            throw .truncatedPayload(field: field, needed: n * recordSize, available: remaining)
        }
        return n
    }

    public func expectEnd(_ command: String) throws(ProtocolError) {
        if remaining != 0 { throw .trailingBytes(command: command, count: remaining) }
    }
}
