import BatonCore
import Synchronization

/// Pairs each chunk's expected checksum (from the sender, over the socket) with the one the
/// receiver computed when the chunk landed (in a lane), whichever comes second, so a
/// releasing sender learns chunk by chunk that it may free its copy. Each chunk is judged
/// once, however often its checksum is repeated.
public final class ChunkVerifier: Sendable {
    public enum Verdict: Equatable, Sendable {
        case verified(Int)
        case mismatch(Int, got: UInt64, expected: UInt64)
    }

    struct State {
        var expected: [Int: UInt64] = [:]
        var landed: [Int: UInt64] = [:]
        var judged: Set<Int> = []
    }

    private let state = Mutex(State())

    public init() {}

    public func expect(_ index: Int, _ checksum: UInt64) -> Verdict? {
        state.withLock { s in
            s.expected[index] = checksum
            guard let got = s.landed[index], s.judged.insert(index).inserted else { return nil }
            return Self.judge(index, got: got, expected: checksum)
        }
    }

    public func landed(_ index: Int, _ checksum: UInt64) -> Verdict? {
        state.withLock { s in
            s.landed[index] = checksum
            guard let want = s.expected[index], s.judged.insert(index).inserted else { return nil }
            return Self.judge(index, got: checksum, expected: want)
        }
    }

    static func judge(_ index: Int, got: UInt64, expected: UInt64) -> Verdict {
        got == expected ? .verified(index) : .mismatch(index, got: got, expected: expected)
    }
}
