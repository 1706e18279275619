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
    /// At most 1024 bytes, cut at a character boundary (the peer refuses invalid UTF-8).
    public mutating func string(_ s: String) {
        var utf8: [UInt8] = []
        for c in s {
            let bytes = Array(String(c).utf8)
            if utf8.count + bytes.count > 1024 { break }
            utf8 += bytes
        }
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

    /// The next `n` bytes, copied out in one piece.
    public mutating func copy(_ n: Int, _ field: String) throws(ProtocolError) -> [UInt8] {
        Array(try take(n, field))
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

    /// Strict: invalid UTF-8 is refused rather than repaired, so what decodes re-encodes identically.
    public mutating func string(_ field: String) throws(ProtocolError) -> String {
        let n = Int(try u16(field))
        guard n <= 1024 else { throw .invalidField(command: "string", field: field, value: "\(n) bytes (at most 1024)") }
        let bytes = try take(n, field)
        let text = String(decoding: bytes, as: UTF8.self)
        guard Array(text.utf8) == Array(bytes) else { throw .invalidField(command: "string", field: field, value: "invalid UTF-8") }
        return text
    }

    /// A flag byte: 0 or 1, nothing else.
    public mutating func bool(_ field: String) throws(ProtocolError) -> Bool {
        let v = try u8(field)
        guard v <= 1 else { throw .invalidField(command: "flag", field: field, value: "\(v) (must be 0 or 1)") }
        return v == 1
    }

    /// Reserved bytes must be zero: a later version may give them meaning.
    public mutating func reserved(_ count: Int, _ field: String) throws(ProtocolError) {
        for b in try take(count, field) where b != 0 {
            throw .invalidField(command: "reserved", field: field, value: "non-zero byte \(b)")
        }
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
