/// A deterministic, position-dependent fill for guest RAM: word i of a buffer filled with
/// seed s is splitmix64(s ^ (base + i)), so a receiver can check any byte independently of
/// Baton's own checksums. Pure, and specified (Docs/PROTOCOL.md §11): batonvmm fills guest RAM
/// with it, `baton agent send/receive --seed` write and check it, tests and benchmarks use it.
public enum TestPattern {
    @inline(__always) static func word(_ seed: UInt64, _ index: UInt64) -> UInt64 {
        var z = (seed ^ index) &+ 0x9E37_79B9_7F4A_7C15
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }

    /// Fills `count` bytes (a multiple of 8) at `base`; `firstWord` positions the fill inside a larger region.
    public static func fill(_ base: UnsafeMutableRawPointer, count: Int, seed: UInt64, firstWord: UInt64 = 0) {
        let words = base.bindMemory(to: UInt64.self, capacity: count / 8)
        for i in 0..<(count / 8) { words[i] = word(seed, firstWord + UInt64(i)) }
    }

    /// The byte offset of the first word that differs from the pattern, or nil if all match.
    public static func firstMismatch(_ base: UnsafeRawPointer, count: Int, seed: UInt64, firstWord: UInt64 = 0) -> Int? {
        let words = base.assumingMemoryBound(to: UInt64.self)
        for i in 0..<(count / 8) where words[i] != word(seed, firstWord + UInt64(i)) { return i * 8 }
        return nil
    }
}
