/// One page-aligned range of guest-physical memory that is handed over as a unit.
public struct GuestRegion: Equatable, Hashable, Sendable, CustomStringConvertible {
    public struct Flags: OptionSet, Hashable, Sendable {
        public let rawValue: UInt32
        public init(rawValue: UInt32) { self.rawValue = rawValue }
        /// The region lives in a memfd, so it can be handed over as a file descriptor.
        public static let fileBacked = Flags(rawValue: 1 << 0)
        /// The sender will hand this region over as a descriptor (memfd): no destination to prepare.
        public static let arrivesAsDescriptor = Flags(rawValue: 1 << 1)
        /// The sender frees its pages as they go: receive into a memfd (not pre-faulted, so
        /// the host holds one copy plus the in-flight window) and give the sender its
        /// descriptor, so a rollback can take the pages back.
        public static let releasedBySender = Flags(rawValue: 1 << 2)
        /// The region streams (gift or copy) but lives in a memfd: that memfd rides on the table
        /// too, and the receiver keeps it unmapped, only to adopt the guest from it should the
        /// sender die before `commit` (the sender's pages outlive it there).
        public static let heldForAdoption = Flags(rawValue: 1 << 3)
        /// Every flag this protocol version defines; a table with another bit is refused.
        public static let known: Flags = [.fileBacked, .arrivesAsDescriptor, .releasedBySender, .heldForAdoption]
        /// Regions whose memfd rides on `regionTable`, in table order.
        public var carriesDescriptor: Bool { !isDisjoint(with: [.arrivesAsDescriptor, .heldForAdoption]) }
    }

    public let id: UInt32
    public let guestAddress: UInt64
    public let length: UInt64
    public let flags: Flags

    public init(id: UInt32, guestAddress: UInt64, length: UInt64, flags: Flags = []) {
        self.id = id
        self.guestAddress = guestAddress
        self.length = length
        self.flags = flags
    }

    public var end: UInt64 { guestAddress &+ length }

    public var description: String {
        "region \(id) [0x\(String(guestAddress, radix: 16)), +\(ByteSize(Int(clamping: length))))"
    }
}

/// Why a region table was refused. Each case names the region and the offending value.
public enum RegionTableError: Error, Equatable, CustomStringConvertible, Sendable {
    case empty
    case tooManyRegions(count: Int, limit: Int)
    case unalignedAddress(region: UInt32, address: UInt64, pageSize: Int)
    case unalignedLength(region: UInt32, length: UInt64, pageSize: Int)
    case zeroLength(region: UInt32)
    case wrapsAddressSpace(region: UInt32)
    case duplicateID(region: UInt32)
    case overlap(region: UInt32, with: UInt32, at: UInt64)

    public var description: String {
        func hex(_ v: UInt64) -> String { "0x" + String(v, radix: 16) }
        switch self {
        case .empty: return "region table is empty"
        case .tooManyRegions(let count, let limit): return "region table has \(count) regions (limit \(limit))"
        case .unalignedAddress(let r, let a, let p): return "region \(r): guest address \(hex(a)) is not aligned to the \(p)-byte page size"
        case .unalignedLength(let r, let l, let p): return "region \(r): length \(l) is not a multiple of the \(p)-byte page size"
        case .zeroLength(let r): return "region \(r): length is zero"
        case .wrapsAddressSpace(let r): return "region \(r): address + length overflows 64 bits"
        case .duplicateID(let r): return "region id \(r) appears twice"
        case .overlap(let r, let o, let at): return "region \(r) overlaps region \(o) at guest address \(hex(at))"
        }
    }
}

/// A validated set of regions: page-aligned, non-empty, non-overlapping, unique ids.
public struct RegionTable: Equatable, Sendable {
    public static let maximumRegions = 4096
    public let regions: [GuestRegion]
    public let pageSize: PageSize

    public init(_ regions: [GuestRegion], pageSize: PageSize) throws(RegionTableError) {
        guard !regions.isEmpty else { throw .empty }
        guard regions.count <= RegionTable.maximumRegions else {
            throw .tooManyRegions(count: regions.count, limit: RegionTable.maximumRegions)
        }
        var seen = Set<UInt32>()
        for r in regions {
            guard seen.insert(r.id).inserted else { throw .duplicateID(region: r.id) }
            guard r.length > 0 else { throw .zeroLength(region: r.id) }
            guard pageSize.isAligned(r.guestAddress) else {
                throw .unalignedAddress(region: r.id, address: r.guestAddress, pageSize: pageSize.bytes)
            }
            guard pageSize.isAligned(r.length) else {
                throw .unalignedLength(region: r.id, length: r.length, pageSize: pageSize.bytes)
            }
            guard r.guestAddress.addingReportingOverflow(r.length).overflow == false else {
                throw .wrapsAddressSpace(region: r.id)
            }
        }
        let sorted = regions.sorted { $0.guestAddress < $1.guestAddress }
        for (a, b) in zip(sorted, sorted.dropFirst()) where b.guestAddress < a.end {
            throw .overlap(region: b.id, with: a.id, at: b.guestAddress)
        }
        self.regions = regions
        self.pageSize = pageSize
    }

    public var totalBytes: UInt64 { regions.reduce(0) { $0 + $1.length } }

    public func region(id: UInt32) -> GuestRegion? { regions.first { $0.id == id } }
}
