import BatonCore
import BatonSystem
import Glibc

/// Undoes a releasing sender's frees after a failed handoff, so the old instance resumes
/// with every byte. The sender frees a chunk only after the receiver confirmed it
/// (`chunksVerified`), so every freed chunk is, verified, in the receiver's memfd, whose
/// descriptor the sender holds even if the receiver died. Each restored chunk is checked
/// again against the checksum taken before it was gifted.
public struct SourceRollback {
    public let plan: TransferPlan
    public let sources: [UInt32: SourceRegion]
    /// The receiver's destination memfd per region (handed to us in `regionsReady`).
    public let receiverMemfds: [UInt32: FileDescriptor]
    public let checksums: ChunkChecksums

    public init(plan: TransferPlan, sources: [UInt32: SourceRegion], receiverMemfds: [UInt32: FileDescriptor], checksums: ChunkChecksums) {
        self.plan = plan
        self.sources = sources
        self.receiverMemfds = receiverMemfds
        self.checksums = checksums
    }

    public struct Outcome: Sendable, Codable {
        public var restoredChunks = 0
        public var restoredBytes = 0
        /// Chunks whose restored bytes do not match the checksum taken before the gift: lost.
        public var lostChunks: [Int] = []
    }

    public enum RollbackError: Error, CustomStringConvertible {
        case receiverMemfdMissing(regionID: UInt32)
        case shortRead(regionID: UInt32, offset: Int)

        public var description: String {
            switch self {
            case .receiverMemfdMissing(let id): "rollback: no receiver memfd for region \(id)"
            case let .shortRead(id, offset): "rollback: receiver memfd ended early at region \(id) offset 0x\(String(offset, radix: 16))"
            }
        }
    }

    /// Copies every chunk in `released` back from the receiver's memfd into our mapping.
    public func restore(released: [Int]) throws -> Outcome {
        var outcome = Outcome()
        for index in released.sorted() {
            let chunk = plan.chunks[index]
            guard let memfd = receiverMemfds[chunk.regionID], let source = sources[chunk.regionID] else {
                throw RollbackError.receiverMemfdMissing(regionID: chunk.regionID)
            }
            let base = source.base + Int(chunk.offset)
            let length = Int(chunk.length)
            var done = 0
            while done < length {
                let n = pread(memfd.raw, base + done, length - done, off_t(Int(chunk.offset) + done))
                if n < 0 && errno == EINTR { continue }
                if n < 0 { throw SyscallError("pread(receiver memfd)", errno: errno) }
                if n == 0 { throw RollbackError.shortRead(regionID: chunk.regionID, offset: Int(chunk.offset) + done) }
                done += n
            }
            outcome.restoredChunks += 1
            outcome.restoredBytes += length
            if chunk.checksum(regionBase: source.base) != checksums[index] { outcome.lostChunks.append(index) }
        }
        return outcome
    }
}
