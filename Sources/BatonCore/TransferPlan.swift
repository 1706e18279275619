/// One unit of integrity checking: a slice of a region with its own checksum.
public struct Chunk: Equatable, Sendable {
    public let index: Int
    public let regionID: UInt32
    public let offset: UInt64
    public let length: UInt64
    /// Bytes covered by the checksum: all of them, or the first page for sampled memfd chunks.
    public let checkedLength: UInt64
    /// The pipe / reader thread that carries it; nil when nothing is streamed (memfd).
    public let lane: Int?
}

/// The deterministic schedule both agents derive from the region table and `transferBegin`,
/// so page contents need no framing: lane k carries its chunks in order, back to back.
public struct TransferPlan: Equatable, Sendable {
    /// How many pages of a shared region are spot-checked when not verifying every byte.
    public static let sampledChunksPerRegion = 64

    public let chunks: [Chunk]
    public let laneCount: Int
    public let chunkSize: Int
    private let chunkRanges: [UInt32: Range<Int>]

    public enum PlanError: Error, Equatable, CustomStringConvertible, Sendable {
        case chunkSizeUnaligned(Int, pageSize: Int)
        case regionNotInTable(UInt32)
        case regionMissing(UInt32)

        public var description: String {
            switch self {
            case .chunkSizeUnaligned(let c, let p): "chunk size \(c) is not a positive multiple of the \(p)-byte page size"
            case .regionNotInTable(let id): "transfer names region \(id), which is not in the region table"
            case .regionMissing(let id): "transfer does not say how region \(id) travels"
            }
        }
    }

    /// `unchecked`: streamed chunks get a checked length of 0 (TransferBegin.unchecked).
    public init(table: RegionTable, transfers: [RegionTransfer], lanes: Int, chunkSize: Int, fullVerification: Bool, unchecked: Bool = false) throws(PlanError) {
        let page = table.pageSize
        guard chunkSize > 0, page.isAligned(chunkSize) else { throw .chunkSizeUnaligned(chunkSize, pageSize: page.bytes) }
        var byID: [UInt32: RegionTransfer] = [:]
        for t in transfers {
            guard table.region(id: t.regionID) != nil else { throw .regionNotInTable(t.regionID) }
            byID[t.regionID] = t
        }
        var plain: [(region: GuestRegion, offset: UInt64, length: UInt64, streamed: Bool, checked: UInt64)] = []
        for region in table.regions {
            guard let t = byID[region.id] else { throw .regionMissing(region.id) }
            let streamed = t.transport == .gift || t.transport == .pipeCopy || t.transport == .processVmReadv
            // Shared (memfd) regions are not copied, so unless asked for every byte they are
            // spot-checked: at most `sampledChunksPerRegion` chunks, one page each, whatever the
            // size, keeping the handoff O(1) in RAM.
            var size = UInt64(chunkSize)
            if !streamed && !fullVerification {
                let spread = (region.length + UInt64(Self.sampledChunksPerRegion) - 1) / UInt64(Self.sampledChunksPerRegion)
                size = max(size, UInt64(page.roundUp(Int(spread))))
            }
            var offset: UInt64 = 0
            while offset < region.length {
                let n = min(size, region.length - offset)
                let checked = streamed && unchecked ? 0 : (streamed || fullVerification) ? n : min(n, UInt64(page.bytes))
                plain.append((region, offset, n, streamed, checked))
                offset += n
            }
        }
        let streamedCount = plain.filter(\.streamed).count
        let laneCount = max(1, lanes)
        var chunks: [Chunk] = []
        var ranges: [UInt32: Range<Int>] = [:]
        var streamedSeen = 0
        for (i, c) in plain.enumerated() {
            var lane: Int? = nil
            if c.streamed {
                lane = streamedSeen * laneCount / max(1, streamedCount)  // contiguous stripes per lane
                streamedSeen += 1
            }
            chunks.append(Chunk(index: i, regionID: c.region.id, offset: c.offset, length: c.length, checkedLength: c.checked, lane: lane))
            let r = ranges[c.region.id] ?? i..<i
            ranges[c.region.id] = r.lowerBound..<(i + 1)
        }
        self.chunks = chunks
        self.laneCount = laneCount
        self.chunkSize = chunkSize
        self.chunkRanges = ranges
    }

    public func chunks(onLane lane: Int) -> [Chunk] { chunks.filter { $0.lane == lane } }
    /// Whether any chunk rides a lane (memfd regions' spot checks do not).
    public var hasLaneChunks: Bool { chunks.contains { $0.lane != nil } }

    public func chunkIndices(ofRegion id: UInt32) -> Range<Int> { chunkRanges[id] ?? 0..<0 }

    public var streamedBytes: UInt64 { chunks.filter { $0.lane != nil }.reduce(0) { $0 + $1.length } }

    /// The region digest from per-chunk checksums in plan order.
    public func regionDigests(checksums: [UInt64], table: RegionTable) -> [UInt32: UInt64] {
        var out: [UInt32: UInt64] = [:]
        for region in table.regions {
            out[region.id] = XXH64.digest(ofChunkChecksums: Array(checksums[chunkIndices(ofRegion: region.id)]))
        }
        return out
    }

    /// Page offsets inside a region whose physical frames are compared to tell moved
    /// pages from copied ones: up to `count`, spread evenly.
    public static func frameSampleOffsets(regionLength: UInt64, pageSize: PageSize, count: Int = 16) -> [UInt64] {
        let pages = pageSize.pages(in: regionLength)
        guard pages > 0 else { return [] }
        let n = UInt64(min(UInt64(count), pages))
        return (0..<n).map { i in (i * pages / n) * UInt64(pageSize.bytes) }
    }
}

extension Array where Element == Chunk {
    /// Consecutive chunks grouped by `key` (a lane's chunks by transport), order kept.
    public func runs<K: Equatable>(by key: (Chunk) -> K) -> [(K, [Chunk])] {
        var out: [(K, [Chunk])] = []
        for c in self {
            let k = key(c)
            if let last = out.last, last.0 == k { out[out.count - 1].1.append(c) } else { out.append((k, [c])) }
        }
        return out
    }
}
