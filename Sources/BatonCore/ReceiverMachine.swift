/// The new-instance agent's protocol logic as a pure step function: `(state, message) →
/// (state, action)`. The agent performs the action (map memory, pump pipes, verify) and
/// reports local outcomes back through `verificationFinished`. No I/O happens here.
public enum ReceiverState: Equatable, Sendable {
    case awaitingHello
    case awaitingRegions(Session)
    case awaitingTransfer(Session, RegionTable)
    case receiving(Session, RegionTable, TransferBegin)
    /// `transferEnd` arrived: every checksum has been sent; `verify` comes next.
    case transferEnded(Session, RegionTable, TransferBegin)
    case verifying(Session, RegionTable)
    case awaitingCommit(Session, RegionTable)
    case committed(RegionTable)
    case abandoned(reason: String)
    case failed(reason: String)

    public var name: String {
        switch self {
        case .awaitingHello: "awaiting hello"
        case .awaitingRegions: "awaiting the region table"
        case .awaitingTransfer: "awaiting transferBegin"
        case .receiving: "receiving"
        case .transferEnded: "awaiting verify"
        case .verifying: "verifying"
        case .awaitingCommit: "awaiting commit"
        case .committed: "committed"
        case .abandoned: "abandoned"
        case .failed: "failed"
        }
    }

    public var isFinal: Bool {
        switch self {
        case .committed, .abandoned, .failed: true
        default: false
        }
    }
}

/// What both ends agreed in hello/welcome.
public struct Session: Equatable, Sendable {
    public let version: UInt16
    public let capabilities: Capabilities
    public let pageSize: PageSize
}

public enum ReceiverAction: Equatable, Sendable {
    case reply(Message)
    /// Map (and pre-fault) destination memory for these regions, then reply `regionsReady`.
    case prepareDestinations(RegionTable)
    /// Start pulling pages for this plan (pipes / process_vm_readv / map memfds).
    case startReceiving(TransferPlan, TransferBegin)
    case recordChecksums(firstChunk: Int, checksums: [UInt64])
    case noteTransferEnd(chunkCount: Int, bytes: UInt64)
    /// Wait for the data, compare checksums and digests, then call `verificationFinished`.
    case verify(expectedDigests: [UInt32: UInt64])
    /// Make the received memory the live guest RAM and acknowledge.
    case commit
    /// Drop everything received; the old instance keeps running the guest.
    case discard(reason: String)
}

public struct ReceiverMachine: Sendable {
    public let localCapabilities: Capabilities
    public let pageSize: PageSize
    /// Whether a `transferBegin` without chunk checksums (verification 2) is accepted: only by a
    /// benchmark's receiver that checks every byte itself afterwards.
    public let acceptsUnchecked: Bool

    public init(localCapabilities: Capabilities, pageSize: PageSize, acceptsUnchecked: Bool = false) {
        self.localCapabilities = localCapabilities
        self.pageSize = pageSize
        self.acceptsUnchecked = acceptsUnchecked
    }

    public func step(_ state: ReceiverState, _ message: Message) throws(ProtocolError) -> (ReceiverState, ReceiverAction) {
        // abandon is valid in every state that is not final.
        if case .abandon(let reason) = message, !state.isFinal {
            return (.abandoned(reason: reason), .discard(reason: reason))
        }
        switch (state, message) {
        case let (.awaitingHello, .hello(peerVersion, peerOldest, peerPageSize, caps)):
            // The highest version both sides speak: a newer sender that still speaks ours gets ours.
            guard peerOldest <= peerVersion else {
                throw .invalidField(command: "hello", field: "oldest version", value: "\(peerOldest) (above the version it offers, \(peerVersion))")
            }
            guard let version = ProtocolVersion.negotiate(peerCurrent: peerVersion, peerOldest: peerOldest) else {
                throw .unsupportedVersion(peer: peerVersion, accepted: ProtocolVersion.accepted)
            }
            guard Int(peerPageSize) == pageSize.bytes else {
                throw .invalidField(command: "hello", field: "page size", value: "\(peerPageSize) (this side uses \(pageSize.bytes))")
            }
            let agreed = caps.intersection(localCapabilities)
            let session = Session(version: version, capabilities: agreed, pageSize: pageSize)
            return (.awaitingRegions(session), .reply(.welcome(version: version, capabilities: agreed)))

        case let (.awaitingRegions(session), .regionTable(table)):
            guard table.pageSize == session.pageSize else {
                throw .invalidField(command: "regionTable", field: "page size", value: "\(table.pageSize.bytes)")
            }
            return (.awaitingTransfer(session, table), .prepareDestinations(table))

        case let (.awaitingTransfer(session, table), .transferBegin(begin)):
            for r in begin.regions where !session.capabilities.contains(r.transport.capability) {
                throw .invalidField(command: "transferBegin", field: "transport of region \(r.regionID)", value: "\(r.transport) (not negotiated)")
            }
            for r in begin.regions where table.region(id: r.regionID)?.flags.contains(.releasedBySender) == true && r.transport != .gift && r.transport != .pipeCopy {
                throw .invalidField(command: "transferBegin", field: "transport of released region \(r.regionID)", value: "\(r.transport) (release mode needs gift or pipe-copy)")
            }
            for r in begin.regions where r.transport == .memfd && r.descriptorIndex < 0 {
                throw .invalidField(command: "transferBegin", field: "descriptor index of memfd region \(r.regionID)", value: "-1 (none: a memfd region must name one of the descriptors sent with transferBegin)")
            }
            if begin.unchecked && !acceptsUnchecked {
                throw .invalidField(command: "transferBegin", field: "verification", value: "2 (no chunk checksums: this receiver requires integrity checks)")
            }
            if begin.usesPipes && begin.descriptorCount < Int(begin.lanes) {
                throw .unexpectedDescriptors(command: "transferBegin", expected: Int(begin.lanes), received: begin.descriptorCount)
            }
            let plan: TransferPlan
            do {
                plan = try TransferPlan(table: table, transfers: begin.regions, lanes: Int(begin.lanes),
                                        chunkSize: Int(begin.chunkSize), fullVerification: begin.fullVerification, unchecked: begin.unchecked)
            } catch {
                throw .invalidField(command: "transferBegin", field: "plan", value: "\(error)")
            }
            return (.receiving(session, table, begin), .startReceiving(plan, begin))

        case let (.receiving, .chunkChecksums(first, sums)):
            return (state, .recordChecksums(firstChunk: Int(first), checksums: sums))

        case let (.receiving(session, table, begin), .transferEnd(chunks, bytes)):
            return (.transferEnded(session, table, begin), .noteTransferEnd(chunkCount: Int(chunks), bytes: bytes))

        case let (.transferEnded(session, table, _), .verify(digests)):
            for region in table.regions where digests[region.id] == nil {
                throw .invalidField(command: "verify", field: "digest of region \(region.id)", value: "missing")
            }
            return (.verifying(session, table), .verify(expectedDigests: digests))

        case let (.awaitingCommit(_, table), .commit):
            return (.committed(table), .commit)

        default:
            throw .invalidMessage(state: state.name, message: "\(message.command)")
        }
    }

    /// The agent's verification outcome: on success the receiver waits for commit, on a
    /// mismatch it has failed and the sender must roll back.
    public func verificationFinished(_ state: ReceiverState, mismatch: Mismatch?) -> ReceiverState {
        guard case let .verifying(session, table) = state else { return state }
        if let mismatch { return .failed(reason: "\(mismatch)") }
        return .awaitingCommit(session, table)
    }
}
