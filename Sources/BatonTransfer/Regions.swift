// BatonTransfer moves the bytes: pipes and vmsplice, memfd adoption, process_vm_readv,
// per-chunk checksums and moved-or-copied detection. It knows regions and plans (BatonCore)
// and syscalls (BatonSystem), never the protocol's message order (that is BatonAgent's).
import BatonCore
import BatonSystem
import Glibc

/// A region as the old instance holds it: the bytes at `base` in this process, and the
/// memfd behind them when there is one (that is what the memfd transport hands over).
public struct SourceRegion: @unchecked Sendable {
    public let region: GuestRegion
    public let base: UnsafeMutableRawPointer
    public let memfd: FileDescriptor?
    public let memfdOffset: Int
    /// The mapping that owns `base`, kept alive for as long as the region is in use.
    public let mapping: MemoryMapping?

    public init(region: GuestRegion, base: UnsafeMutableRawPointer, memfd: FileDescriptor? = nil, memfdOffset: Int = 0, mapping: MemoryMapping? = nil) {
        self.region = region
        self.base = base
        self.memfd = memfd
        self.memfdOffset = memfdOffset
        self.mapping = mapping
    }

    /// A region backed by `mapping` (file-backed if the mapping is a memfd).
    public init(id: UInt32, guestAddress: UInt64, mapping: MemoryMapping) {
        let flags: GuestRegion.Flags = mapping.backing == nil ? [] : .fileBacked
        self.init(region: GuestRegion(id: id, guestAddress: guestAddress, length: UInt64(mapping.length), flags: flags),
                  base: mapping.base, memfd: mapping.backing, memfdOffset: mapping.backingOffset, mapping: mapping)
    }

    public var bytes: UnsafeMutableRawBufferPointer { UnsafeMutableRawBufferPointer(start: base, count: Int(region.length)) }

    /// Frees the pages of `[offset, offset+length)` (hole punch for a memfd, MADV_DONTNEED otherwise).
    public func releasePages(offset: Int, length: Int) throws {
        if let mapping {
            try mapping.release(offset: offset, length: length)
        } else if madvise(base + offset, length, MADV_DONTNEED) != 0 {
            throw SyscallError("madvise(MADV_DONTNEED)", errno: errno)
        }
    }
}

/// Where the new instance puts a region: its own mapping (pre-faulted before the pause),
/// or the sender's memfd mapped in place (memfd transport).
public struct DestinationRegion: @unchecked Sendable {
    public let region: GuestRegion
    public let mapping: MemoryMapping

    public init(region: GuestRegion, mapping: MemoryMapping) {
        precondition(mapping.length >= Int(region.length))
        self.region = region
        self.mapping = mapping
    }

    public var base: UnsafeMutableRawPointer { mapping.base }
}

/// Checksums written by several lane threads at disjoint indices, read after they join.
public final class ChunkChecksums: @unchecked Sendable {
    private let storage: UnsafeMutableBufferPointer<UInt64>
    public init(count: Int) {
        storage = .allocate(capacity: max(1, count))
        storage.initialize(repeating: 0)
        self.count = count
    }
    deinit { storage.deallocate() }
    public let count: Int
    public subscript(i: Int) -> UInt64 {
        get { storage[i] }
        set { storage[i] = newValue }
    }
    public var values: [UInt64] { Array(storage.prefix(count)) }
}

extension Chunk {
    /// The checksum of this chunk's checked bytes at `regionBase`.
    public func checksum(regionBase: UnsafeRawPointer) -> UInt64 {
        ChunkChecksum.compute(base: regionBase + Int(offset), count: Int(checkedLength), seed: UInt64(index))
    }
}

/// The pages the checks inside the pause read, mapped into this process's page tables ahead
/// of it (MADV_POPULATE_READ): the memfd spot checks' pages and the frame samples
/// (MoveDetection). The first touch of a page through a fresh or dropped mapping is a page
/// fault, ~7 µs each on this host (measured): ~0.5 ms for the 65 pages a 1 GiB guest and its
/// state region check, inside the pause on both sides. Best effort: a page not populated
/// here is simply faulted in when it is read.
public enum CheckedPages {
    /// Populates every region's frame samples and the checked pages of the shared (memfd)
    /// regions, as the plan for `chunkSize` cuts them; `mapping` gives each region's mapping
    /// in this process (nil: skipped).
    public static func populate(table: RegionTable, sharedRegions: Set<UInt32>, chunkSize: Int, fullVerification: Bool,
                                mapping: (UInt32) -> MemoryMapping?) {
        for region in table.regions {
            guard let m = mapping(region.id) else { continue }
            for offset in TransferPlan.frameSampleOffsets(regionLength: region.length, pageSize: table.pageSize) {
                m.populateForReading(offset: Int(offset), length: table.pageSize.bytes)
            }
        }
        guard !fullVerification, !sharedRegions.isEmpty else { return }
        let transfers = table.regions.map { RegionTransfer(regionID: $0.id, transport: sharedRegions.contains($0.id) ? .memfd : .gift) }
        guard let plan = try? TransferPlan(table: table, transfers: transfers, lanes: 1, chunkSize: chunkSize, fullVerification: false) else { return }
        for chunk in plan.chunks where chunk.lane == nil {
            guard let m = mapping(chunk.regionID) else { continue }
            m.populateForReading(offset: Int(chunk.offset), length: Int(chunk.checkedLength))
        }
    }
}
