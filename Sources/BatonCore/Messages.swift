/// One region's entry in `transferBegin`: how it travels and where its bytes are.
public struct RegionTransfer: Equatable, Sendable {
    public let regionID: UInt32
    public let transport: TransportKind
    /// Index into the message's descriptors of the region's memfd (memfd transport), else -1.
    public let descriptorIndex: Int32
    /// Offset of the region inside that memfd.
    public let descriptorOffset: UInt64
    /// The region's address in the sender (process_vm_readv reads from here).
    public let sourceAddress: UInt64

    public init(regionID: UInt32, transport: TransportKind, descriptorIndex: Int32 = -1, descriptorOffset: UInt64 = 0, sourceAddress: UInt64 = 0) {
        self.regionID = regionID
        self.transport = transport
        self.descriptorIndex = descriptorIndex
        self.descriptorOffset = descriptorOffset
        self.sourceAddress = sourceAddress
    }
}

public struct TransferBegin: Equatable, Sendable {
    /// Streams (pipes) for gift/pipe-copy, or reader threads for process_vm_readv.
    public let lanes: UInt8
    /// Integrity granularity: one checksum per chunk.
    public let chunkSize: UInt32
    public let pipeCapacity: UInt32
    public let sourcePID: Int32
    /// memfd regions: checksum every byte instead of one page per chunk.
    public let fullVerification: Bool
    /// Streamed chunks carry no checksum (their checked length is 0): the integrity-off figure
    /// of `baton bench transfer --transports gift+unchecked`, which checks every byte afterwards.
    /// Receivers refuse it unless they were started to accept it (never in an upgrade).
    public let unchecked: Bool
    public let regions: [RegionTransfer]
    /// Descriptors that ride on the message: pipe read ends first (one per lane if any
    /// region is piped), then memfds referenced by `descriptorIndex`.
    public let descriptorCount: Int

    public init(lanes: UInt8, chunkSize: UInt32, pipeCapacity: UInt32, sourcePID: Int32, fullVerification: Bool, unchecked: Bool = false,
                regions: [RegionTransfer], descriptorCount: Int) {
        self.unchecked = unchecked
        self.lanes = lanes
        self.chunkSize = chunkSize
        self.pipeCapacity = pipeCapacity
        self.sourcePID = sourcePID
        self.fullVerification = fullVerification
        self.regions = regions
        self.descriptorCount = descriptorCount
    }

    public var usesPipes: Bool { regions.contains { $0.transport == .gift || $0.transport == .pipeCopy } }
}

public struct SampledFrame: Equatable, Sendable {
    public let regionID: UInt32
    public let offset: UInt64
    public let frame: UInt64
    public init(regionID: UInt32, offset: UInt64, frame: UInt64) {
        self.regionID = regionID
        self.offset = offset
        self.frame = frame
    }
}

public struct Mismatch: Equatable, Sendable, CustomStringConvertible {
    public let regionID: UInt32
    public let offset: UInt64
    public let detail: String
    public init(regionID: UInt32, offset: UInt64, detail: String) {
        self.regionID = regionID
        self.offset = offset
        self.detail = detail
    }
    public var description: String { "region \(regionID) offset 0x\(String(offset, radix: 16)): \(detail)" }
}

/// Every message of Baton's agent protocol. See Docs/PROTOCOL.md for the sequence.
public enum Message: Equatable, Sendable {
    case hello(version: UInt16, oldestVersion: UInt16, pageSize: UInt32, capabilities: Capabilities)
    case welcome(version: UInt16, capabilities: Capabilities)
    case regionTable(RegionTable)
    /// The receiver mapped its destinations. `rollbackDescriptors` memfds (one per region,
    /// in table order, when non-zero) let the sender recover pages it already released.
    case regionsReady(rollbackDescriptors: UInt8)
    case transferBegin(TransferBegin)
    case chunkChecksums(firstChunk: UInt32, checksums: [UInt64])
    case transferEnd(chunkCount: UInt32, bytes: UInt64)
    case verify(digests: [UInt32: UInt64])
    case verifyResult(mismatch: Mismatch?, frames: [SampledFrame])
    case commit
    case committed
    case abandon(reason: String)
    /// `code` is a `FailureCode`.
    case failure(code: UInt16, message: String)
    /// Receiver → releasing sender: these chunks landed and match their checksums; the
    /// sender may now free its copy of them.
    case chunksVerified(indices: [UInt32])

    public var command: Command {
        switch self {
        case .hello: .hello
        case .welcome: .welcome
        case .regionTable: .regionTable
        case .regionsReady: .regionsReady
        case .transferBegin: .transferBegin
        case .chunkChecksums: .chunkChecksums
        case .transferEnd: .transferEnd
        case .verify: .verify
        case .verifyResult: .verifyResult
        case .commit: .commit
        case .committed: .committed
        case .abandon: .abandon
        case .failure: .failure
        case .chunksVerified: .chunksVerified
        }
    }

    /// How many descriptors must ride on this message.
    public var descriptorCount: Int {
        switch self {
        case .regionsReady(let n): Int(n)
        // Regions handed over as descriptors travel with the table, before the pause, so the
        // new instance already holds guest RAM if the old one dies (roll forward).
        case .regionTable(let table): table.regions.filter(\.flags.carriesDescriptor).count
        case .transferBegin(let b): b.descriptorCount
        default: 0
        }
    }

    public func encodedPayload() -> [UInt8] {
        var w = WireWriter()
        switch self {
        case let .hello(version, oldest, pageSize, caps):
            w.u16(version); w.u16(oldest); w.u32(pageSize); w.u64(caps.rawValue)
        case let .welcome(version, caps):
            w.u16(version); w.u16(0); w.u64(caps.rawValue)
        case .regionTable(let table):
            w.u32(UInt32(table.pageSize.bytes))
            w.u32(UInt32(table.regions.count))
            for r in table.regions { w.u32(r.id); w.u32(r.flags.rawValue); w.u64(r.guestAddress); w.u64(r.length) }
        case .regionsReady(let n):
            w.u8(n)
        case .transferBegin(let b):
            w.u8(b.lanes); w.u8(b.unchecked ? 2 : b.fullVerification ? 1 : 0); w.u16(UInt16(b.descriptorCount))
            w.u32(b.chunkSize); w.u32(b.pipeCapacity); w.i32(b.sourcePID)
            w.u32(UInt32(b.regions.count))
            for r in b.regions {
                w.u32(r.regionID); w.u8(r.transport.rawValue); w.u8(0); w.u16(0)
                w.i32(r.descriptorIndex); w.u64(r.descriptorOffset); w.u64(r.sourceAddress)
            }
        case let .chunkChecksums(first, sums):
            w.u32(first); w.u32(UInt32(sums.count))
            for s in sums { w.u64(s) }
        case let .transferEnd(chunks, bytes):
            w.u32(chunks); w.u64(bytes)
        case .verify(let digests):
            w.u32(UInt32(digests.count))
            for (id, d) in digests.sorted(by: { $0.key < $1.key }) { w.u32(id); w.u64(d) }
        case let .verifyResult(mismatch, frames):
            if let m = mismatch {
                w.u8(1); w.u32(m.regionID); w.u64(m.offset); w.string(m.detail)
            } else {
                w.u8(0)
            }
            w.u32(UInt32(frames.count))
            for f in frames { w.u32(f.regionID); w.u64(f.offset); w.u64(f.frame) }
        case .commit, .committed:
            break
        case .abandon(let reason):
            w.string(reason)
        case let .failure(code, message):
            w.u16(code); w.string(message)
        case .chunksVerified(let indices):
            w.u32(UInt32(indices.count))
            for i in indices { w.u32(i) }
        }
        return w.bytes
    }

    /// Header + payload, ready for the socket (descriptors go alongside, not inside).
    public func encoded(version: UInt16 = ProtocolVersion.current) -> [UInt8] {
        let payload = encodedPayload()
        let header = MessageHeader(version: version, command: command.rawValue,
                                   descriptorCount: UInt8(descriptorCount), payloadLength: UInt32(payload.count))
        return header.encoded() + payload
    }

    public static func decode(header: MessageHeader, payload: [UInt8]) throws(ProtocolError) -> Message {
        guard let command = Command(rawValue: header.command) else { throw .unknownCommand(header.command) }
        var r = WireReader(payload)
        let name = "\(command)"
        let message: Message
        switch command {
        case .hello:
            let version = try r.u16("version"), oldest = try r.u16("oldest version")
            let pageSize = try r.u32("page size"), caps = try r.u64("capabilities")
            guard pageSize > 0, pageSize & (pageSize - 1) == 0 else {
                throw .invalidField(command: name, field: "page size", value: "\(pageSize)")
            }
            message = .hello(version: version, oldestVersion: oldest, pageSize: pageSize, capabilities: Capabilities(rawValue: caps))
        case .welcome:
            let version = try r.u16("version")
            try r.reserved(2, "welcome reserved")
            message = .welcome(version: version, capabilities: Capabilities(rawValue: try r.u64("capabilities")))
        case .regionTable:
            let pageSize = try r.u32("page size")
            guard pageSize > 0, pageSize & (pageSize - 1) == 0 else {
                throw .invalidField(command: name, field: "page size", value: "\(pageSize)")
            }
            let n = try r.count("region count", recordSize: 24)
            var regions: [GuestRegion] = []
            for _ in 0..<n {
                let id = try r.u32("region id"), flags = try r.u32("region flags")
                let address = try r.u64("guest address"), length = try r.u64("length")
                guard flags & ~GuestRegion.Flags.known.rawValue == 0 else {
                    throw .invalidField(command: name, field: "flags of region \(id)", value: "0x\(String(flags, radix: 16)) (unknown bits)")
                }
                let f = GuestRegion.Flags(rawValue: flags)
                // Held for adoption means streamed: not with a region that is its memfd, nor with
                // one whose sender frees its pages (there would be nothing left to adopt).
                if f.contains(.heldForAdoption) && !f.isDisjoint(with: [.arrivesAsDescriptor, .releasedBySender]) {
                    throw .invalidField(command: name, field: "flags of region \(id)", value: "0x\(String(flags, radix: 16)) (held-for-adoption with arrives-as-descriptor or released-by-sender)")
                }
                regions.append(GuestRegion(id: id, guestAddress: address, length: length, flags: f))
            }
            do {
                message = .regionTable(try RegionTable(regions, pageSize: PageSize(Int(pageSize))))
            } catch {
                throw .badRegionTable(error)
            }
        case .regionsReady:
            message = .regionsReady(rollbackDescriptors: try r.u8("rollback descriptors"))
        case .transferBegin:
            let lanes = try r.u8("lanes"), verification = try r.u8("verification")
            guard verification <= 2 else { throw .invalidField(command: name, field: "verification", value: "\(verification) (must be 0, 1 or 2)") }
            let full = verification == 1
            let descriptors = Int(try r.u16("descriptor count"))
            let chunk = try r.u32("chunk size"), pipe = try r.u32("pipe capacity"), pid = try r.i32("source pid")
            let n = try r.count("region count", recordSize: 28)
            var regions: [RegionTransfer] = []
            for _ in 0..<n {
                let id = try r.u32("region id"), t = try r.u8("transport")
                try r.reserved(3, "region transfer reserved")
                let index = try r.i32("descriptor index"), offset = try r.u64("descriptor offset")
                let source = try r.u64("source address")
                guard let kind = TransportKind(rawValue: t) else {
                    throw .invalidField(command: name, field: "transport of region \(id)", value: "\(t)")
                }
                guard index >= -1, Int(index) < descriptors else {
                    throw .invalidField(command: name, field: "descriptor index of region \(id)", value: "\(index)")
                }
                regions.append(RegionTransfer(regionID: id, transport: kind, descriptorIndex: index, descriptorOffset: offset, sourceAddress: source))
            }
            guard chunk > 0, lanes > 0 else {
                throw .invalidField(command: name, field: chunk == 0 ? "chunk size" : "lanes", value: "0")
            }
            message = .transferBegin(TransferBegin(lanes: lanes, chunkSize: chunk, pipeCapacity: pipe, sourcePID: pid,
                                                   fullVerification: full, unchecked: verification == 2, regions: regions, descriptorCount: descriptors))
        case .chunkChecksums:
            let first = try r.u32("first chunk")
            let n = try r.count("checksum count", recordSize: 8)
            var sums: [UInt64] = []
            sums.reserveCapacity(n)
            for _ in 0..<n { sums.append(try r.u64("checksum")) }
            message = .chunkChecksums(firstChunk: first, checksums: sums)
        case .transferEnd:
            message = .transferEnd(chunkCount: try r.u32("chunk count"), bytes: try r.u64("bytes"))
        case .verify:
            let n = try r.count("digest count", recordSize: 12)
            var digests: [UInt32: UInt64] = [:]
            var previous: UInt32?
            for _ in 0..<n {
                let id = try r.u32("region id")
                if let previous, id <= previous {
                    throw .invalidField(command: name, field: "region id", value: "\(id) after \(previous) (ascending, each once)")
                }
                previous = id
                digests[id] = try r.u64("digest")
            }
            message = .verify(digests: digests)
        case .verifyResult:
            var mismatch: Mismatch? = nil
            if try r.bool("mismatch flag") {
                mismatch = Mismatch(regionID: try r.u32("region id"), offset: try r.u64("offset"), detail: try r.string("detail"))
            }
            let n = try r.count("frame count", recordSize: 20)
            var frames: [SampledFrame] = []
            for _ in 0..<n {
                frames.append(SampledFrame(regionID: try r.u32("region id"), offset: try r.u64("offset"), frame: try r.u64("frame")))
            }
            message = .verifyResult(mismatch: mismatch, frames: frames)
        case .commit: message = .commit
        case .committed: message = .committed
        case .abandon: message = .abandon(reason: try r.string("reason"))
        case .failure: message = .failure(code: try r.u16("code"), message: try r.string("message"))
        case .chunksVerified:
            let n = try r.count("chunk count", recordSize: 4)
            var indices: [UInt32] = []
            for _ in 0..<n { indices.append(try r.u32("chunk index")) }
            message = .chunksVerified(indices: indices)
        }
        try r.expectEnd(name)
        guard Int(header.descriptorCount) == message.descriptorCount else {
            throw .unexpectedDescriptors(command: name, expected: message.descriptorCount, received: Int(header.descriptorCount))
        }
        return message
    }
}

extension Message: CustomStringConvertible {
    public var description: String { "\(command)" }
}

/// The `code` of a `failure` message: what kind of failure the peer reports (its message says
/// what and where). Exit codes and decisions come from this, never from the message's text.
public enum FailureCode {
    /// The handoff failed (transfer, protocol, system error); the message names it.
    public static let failed: UInt16 = 1
    /// A chunk checksum or region digest differed.
    public static let integrity: UInt16 = 4
}
