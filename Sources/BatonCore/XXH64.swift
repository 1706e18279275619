/// XXH64 (Yann Collet's xxHash, 64-bit): the region digest over the chunk checksums, and the
/// tail of a chunk checksum (ChunkChecksum, whose body is an 8-lane variant, Docs/PROTOCOL.md §8);
/// with published test vectors.
public enum XXH64 {
    static let p1: UInt64 = 0x9E37_79B1_85EB_CA87
    static let p2: UInt64 = 0xC2B2_AE3D_27D4_EB4F
    static let p3: UInt64 = 0x1656_67B1_9E37_79F9
    static let p4: UInt64 = 0x85EB_CA77_C2B2_AE63
    static let p5: UInt64 = 0x27D4_EB2F_1656_67C5

    @inline(__always) static func round(_ acc: UInt64, _ input: UInt64) -> UInt64 {
        var a = acc &+ input &* p2
        a = (a << 31) | (a >> 33)
        return a &* p1
    }

    @inline(__always) static func merge(_ acc: UInt64, _ v: UInt64) -> UInt64 {
        (acc ^ round(0, v)) &* p1 &+ p4
    }

    public static func hash(_ bytes: UnsafeRawBufferPointer, seed: UInt64 = 0) -> UInt64 {
        guard let base = bytes.baseAddress else { return hash(base: nil, count: 0, seed: seed) }
        return hash(base: base, count: bytes.count, seed: seed)
    }

    public static func hash(_ bytes: [UInt8], seed: UInt64 = 0) -> UInt64 {
        bytes.withUnsafeBytes { hash($0, seed: seed) }
    }

    public static func hash(base: UnsafeRawPointer?, count: Int, seed: UInt64 = 0) -> UInt64 {
        var h: UInt64
        var offset = 0
        if count >= 32, let base {
            var v1 = seed &+ p1 &+ p2, v2 = seed &+ p2, v3 = seed, v4 = seed &- p1
            let limit = count - 32
            while offset <= limit {
                v1 = round(v1, base.loadUnaligned(fromByteOffset: offset, as: UInt64.self))
                v2 = round(v2, base.loadUnaligned(fromByteOffset: offset + 8, as: UInt64.self))
                v3 = round(v3, base.loadUnaligned(fromByteOffset: offset + 16, as: UInt64.self))
                v4 = round(v4, base.loadUnaligned(fromByteOffset: offset + 24, as: UInt64.self))
                offset += 32
            }
            h = ((v1 << 1) | (v1 >> 63)) &+ ((v2 << 7) | (v2 >> 57)) &+ ((v3 << 12) | (v3 >> 52)) &+ ((v4 << 18) | (v4 >> 46))
            h = merge(h, v1); h = merge(h, v2); h = merge(h, v3); h = merge(h, v4)
        } else {
            h = seed &+ p5
        }
        h = h &+ UInt64(count)
        guard let base else { return avalanche(h) }
        while offset + 8 <= count {
            let k = round(0, base.loadUnaligned(fromByteOffset: offset, as: UInt64.self))
            h ^= k
            h = ((h << 27) | (h >> 37)) &* p1 &+ p4
            offset += 8
        }
        if offset + 4 <= count {
            h ^= UInt64(base.loadUnaligned(fromByteOffset: offset, as: UInt32.self)) &* p1
            h = ((h << 23) | (h >> 41)) &* p2 &+ p3
            offset += 4
        }
        while offset < count {
            h ^= UInt64(base.load(fromByteOffset: offset, as: UInt8.self)) &* p5
            h = ((h << 11) | (h >> 53)) &* p1
            offset += 1
        }
        return avalanche(h)
    }

    @inline(__always) static func avalanche(_ value: UInt64) -> UInt64 {
        var h = value
        h ^= h >> 33
        h = h &* p2
        h ^= h >> 29
        h = h &* p3
        h ^= h >> 32
        return h
    }

    /// A region digest: the hash of its chunk checksums in order. Both sides compute it
    /// from checksums of the bytes they hold, so equal digests mean equal chunks in order.
    public static func digest(ofChunkChecksums checksums: [UInt64]) -> UInt64 {
        checksums.withUnsafeBytes { hash($0, seed: 0x4241_544F_4E00_0001) }
    }
}
