import BatonCore
import BatonSystem
import BatonTransfer
import Glibc

/// The old instance's side: offers its regions to a new instance over `connection` and
/// hands the bytes over. It assumes the VM is paused (gifted pages must not change), and
/// keeps its own pages intact until `commit()`, so `abandon()` leaves it able to resume.
public final class OldInstanceAgent {
    public let connection: AgentConnection
    public let options: HandoffOptions
    let pageSize = PageSize(Host.pageSize)

    public init(connection: AgentConnection, options: HandoffOptions) {
        self.connection = connection
        self.options = options
    }

    /// Chooses how each region travels before anything is sent, so an impossible request
    /// fails in preflight rather than halfway.
    /// `giftRefusal` is what the kernel said to a one-page SPLICE_F_GIFT probe (nil: it gifts):
    /// then `auto` never picks gift, and an explicit `gift` streams by pipe copy with a notice,
    /// or is refused when `options.strict`.
    public static func chooseTransports(_ sources: [SourceRegion], options: HandoffOptions, agreed: Capabilities,
                                        giftRefusal: SyscallError? = nil) throws -> (kinds: [UInt32: TransportKind], notices: [String]) {
        let giftUsable = agreed.contains(.gift) && giftRefusal == nil
        var streamDefault: TransportKind = agreed.contains(options.autoStreamTransport.capability) ? options.autoStreamTransport
            : (giftUsable ? .gift : .pipeCopy)
        if streamDefault == .gift && !giftUsable { streamDefault = .pipeCopy }
        var out: [UInt32: TransportKind] = [:]
        var notices: [String] = []
        for s in sources {
            let id = s.region.id
            let kind: TransportKind
            switch options.transport {
            case .gift:
                if let giftRefusal {
                    if options.strict {
                        throw AgentError.noTransport(regionID: id, wanted: "gift", reason: "this kernel refuses vmsplice(SPLICE_F_GIFT) (\(giftRefusal)); --strict forbids the pipe-copy fallback")
                    }
                    if notices.isEmpty { notices.append("gift: this kernel refuses vmsplice(SPLICE_F_GIFT) (\(giftRefusal.errnoName)); streaming by pipe copy instead") }
                    kind = .pipeCopy
                } else {
                    kind = .gift
                }
            case .copy: kind = agreed.contains(.processVmReadv) ? .processVmReadv : .pipeCopy
            case .memfd:
                guard s.memfd != nil else {
                    throw AgentError.noTransport(regionID: id, wanted: "memfd", reason: "its memory is not backed by a memfd")
                }
                kind = .memfd
            case .auto: kind = s.memfd != nil && agreed.contains(.memfd) ? .memfd : streamDefault
            }
            guard agreed.contains(kind.capability) else {
                throw AgentError.noTransport(regionID: id, wanted: "\(kind)", reason: "the peer did not offer it")
            }
            out[id] = kind
        }
        return (out, notices)
    }

    /// Runs hello → region table → transfer → verify. Returns with the receiver verified
    /// and waiting for `commit`; throws (after telling the peer to abandon) otherwise.
    public func handOff(_ sources: [SourceRegion]) throws -> PendingHandoff {
        try prepare(sources).transfer()
    }

    /// Everything that can happen while the VM still runs: hello, transport choice, region
    /// table, and the receiver mapping (and pre-faulting) its destination memory.
    public func prepare(_ sources: [SourceRegion]) throws -> PreparedHandoff {
        let prepared = PreparedHandoff(agent: self, sources: sources)
        try guarded(prepared) { try self.negotiate(prepared) }
        return prepared
    }

    /// Runs `body`; on failure tells the peer to abandon, takes back any freed pages, and
    /// rethrows with the most telling reason (the receiver's own, when it sent one).
    func guarded<T>(_ prepared: PreparedHandoff, _ body: () throws -> T) throws -> T {
        do {
            return try body()
        } catch {
            try? connection.send(.abandon(reason: "\(AgentError.wrap(error))"))
            let peerReason = peerFailureReason()
            let restored = try restoreReleasedPages(prepared.rollback)
            let cause = peerReason.map { AgentError.peerFailed($0.message, after: "\(AgentError.wrap(error))", code: $0.code) } ?? AgentError.wrap(error)
            if let restored, !restored.lostChunks.isEmpty {
                throw AgentError.rollbackLost(chunks: restored.lostChunks, cause: "\(cause)")
            }
            throw cause
        }
    }

    /// A `failure` the receiver already sent, read without waiting long: confirmations of
    /// chunks (release mode) queued ahead of it are passed over.
    private func peerFailureReason() -> (code: UInt16, message: String)? {
        while (try? connection.socket.fd.wait(for: Int16(POLLIN), timeoutMilliseconds: 200)) == true {
            do {
                guard case .chunksVerified = try connection.receive(whileIn: "failing").0 else { return nil }
            } catch ProtocolError.peerFailed(let code, let message) {
                return (code, message)
            } catch {
                return nil
            }
        }
        return nil
    }

    /// What a releasing sender needs to undo its frees if the handoff fails.
    final class RollbackState {
        var restore: SourceRollback?
        var released: [Int] = []
        var outcome: SourceRollback.Outcome?
    }

    /// Takes every chunk this sender freed back from the receiver's memfd (they were all
    /// confirmed there before being freed). Safe whether the receiver is alive or dead.
    private func restoreReleasedPages(_ state: RollbackState) throws -> SourceRollback.Outcome? {
        guard let restore = state.restore, !state.released.isEmpty else { return nil }
        let outcome = try restore.restore(released: state.released)
        state.outcome = outcome
        return outcome
    }

    func negotiate(_ prepared: PreparedHandoff) throws {
        let sources = prepared.sources
        signal(SIGPIPE, SIG_IGN)  // a vanished reader must be EPIPE, not death
        try connection.setTimeout(seconds: options.stallTimeoutSeconds)
        try connection.authenticate(expectedUID: options.peerUID)
        var report = TransferReport()

        try connection.send(.hello(version: ProtocolVersion.current, oldestVersion: ProtocolVersion.oldestAccepted,
                                   pageSize: UInt32(pageSize.bytes), capabilities: .all))
        let (welcome, _) = try connection.receive(whileIn: "awaiting welcome")
        guard case let .welcome(version, agreed) = welcome else {
            throw ProtocolError.invalidMessage(state: "awaiting welcome", message: "\(welcome.command)")
        }
        guard ProtocolVersion.accepted.contains(version) else {
            throw ProtocolError.unsupportedVersion(peer: version, accepted: ProtocolVersion.accepted)
        }
        connection.sessionVersion = version
        report.protocolVersion = version

        // Asked of the kernel before anything moves, only where gift could be chosen.
        let mayGift = options.transport == .gift || (options.transport == .auto && sources.contains { $0.memfd == nil || !agreed.contains(.memfd) })
        let (kinds, notices) = try Self.chooseTransports(sources, options: options, agreed: agreed, giftRefusal: mayGift ? Splice.giftRefusal() : nil)
        report.notices = notices
        if options.releaseSource && !kinds.values.contains(where: { $0 == .gift || $0 == .pipeCopy }) {
            report.notices.append("release-source: no region streams through pipes (\(Set(kinds.values.map { "\($0)" }).sorted().joined(separator: ", "))), so nothing is freed early")
        }
        // Regions that arrive as a descriptor need no destination memory on the other side;
        // piped regions of a releasing sender land in a memfd we can take pages back from.
        let regions = sources.map { s in
            let kind = kinds[s.region.id]!
            var flags = s.region.flags.subtracting([.arrivesAsDescriptor, .releasedBySender, .heldForAdoption])
            if kind == .memfd { flags.insert(.arrivesAsDescriptor) }
            if options.releaseSource && (kind == .gift || kind == .pipeCopy) { flags.insert(.releasedBySender) }
            // A streamed region in a memfd: its memfd goes along too, so that the new instance can
            // adopt the guest from it if this process dies after the pause.
            if s.memfd != nil && kind != .memfd && !flags.contains(.releasedBySender) { flags.insert(.heldForAdoption) }
            return GuestRegion(id: s.region.id, guestAddress: s.region.guestAddress, length: s.region.length, flags: flags)
        }
        let table = try RegionTable(regions, pageSize: pageSize)
        let early = table.regions.filter(\.flags.carriesDescriptor).compactMap { r in sources.first { $0.region.id == r.id }?.memfd }
        try connection.send(.regionTable(table), descriptors: early)
        // Mapping and pre-faulting the destination scales with RAM (seconds per GiB on a busy
        // host): this one wait gets a budget in proportion, the rest keep the stall timeout.
        try connection.setTimeout(seconds: options.stallTimeoutSeconds + 10 * Double(table.totalBytes) / Double(1 << 30))
        let (ready, rollbackDescriptors) = try connection.receive(whileIn: "awaiting regionsReady")
        try connection.setTimeout(seconds: options.stallTimeoutSeconds)
        guard case .regionsReady = ready else {
            throw ProtocolError.invalidMessage(state: "awaiting regionsReady", message: "\(ready.command)")
        }
        let released = table.regions.filter { $0.flags.contains(.releasedBySender) }
        guard rollbackDescriptors.count == released.count else {
            throw ProtocolError.unexpectedDescriptors(command: "regionsReady", expected: released.count, received: rollbackDescriptors.count)
        }
        let receiverMemfds = Dictionary(uniqueKeysWithValues: zip(released.map(\.id), rollbackDescriptors))
        report.releasedSource = !released.isEmpty
        prepared.report = report
        prepared.kinds = kinds
        prepared.table = table
        prepared.receiverMemfds = receiverMemfds
    }

    /// The part inside the pause: frames sampled, bytes moved, everything verified.
    func move(_ prepared: PreparedHandoff) throws -> PendingHandoff {
        let sources = prepared.sources
        let kinds = prepared.kinds
        let table = prepared.table!
        let receiverMemfds = prepared.receiverMemfds
        let rollback = prepared.rollback
        var report = prepared.report
        let byID = Dictionary(uniqueKeysWithValues: sources.map { ($0.region.id, $0) })
        let framesBefore = try Dictionary(uniqueKeysWithValues: sources.map {
            ($0.region.id, try MoveDetection.frames(base: $0.base, regionLength: $0.region.length, pageSize: pageSize))
        })

        // Descriptors: pipe read ends first (one per lane), then memfds.
        let piped = kinds.values.contains { $0 == .gift || $0 == .pipeCopy }
        let lanes = max(1, min(options.lanes, 64))
        let pipeLanes = piped ? try PipeLanes(count: lanes, requestedCapacity: options.pipeCapacity) : nil
        var descriptors: [FileDescriptor] = pipeLanes?.pipes.map(\.readEnd) ?? []
        var transfers: [RegionTransfer] = []
        for s in sources {
            let kind = kinds[s.region.id]!
            var index: Int32 = -1
            if kind == .memfd, let fd = s.memfd {
                index = Int32(descriptors.count)
                descriptors.append(fd)
            }
            transfers.append(RegionTransfer(regionID: s.region.id, transport: kind, descriptorIndex: index,
                                            descriptorOffset: UInt64(s.memfdOffset), sourceAddress: UInt64(UInt(bitPattern: s.base))))
        }
        // One verification byte on the wire: unchecked (2) wins over full (1), on both sides.
        let fullVerification = options.fullVerification && !options.unchecked
        let begin = TransferBegin(lanes: UInt8(lanes), chunkSize: UInt32(options.chunkSize),
                                  pipeCapacity: UInt32(pipeLanes?.capacity ?? 0), sourcePID: getpid(),
                                  fullVerification: fullVerification, unchecked: options.unchecked, regions: transfers, descriptorCount: descriptors.count)
        let plan = try TransferPlan(table: table, transfers: transfers, lanes: lanes, chunkSize: options.chunkSize,
                                    fullVerification: fullVerification, unchecked: options.unchecked)
        report.lanes = lanes
        report.pipeCapacity = pipeLanes?.capacity ?? 0
        report.pipeSizeRefusals = pipeLanes?.refusals.map(\.description) ?? []
        report.chunkCount = plan.chunks.count
        report.bytes = table.totalBytes

        let started = Host.monotonicNanoseconds()
        let checksums = ChunkChecksums(count: plan.chunks.count)
        let releasing = report.releasedSource
        if releasing {
            rollback.restore = SourceRollback(plan: plan, sources: byID, receiverMemfds: receiverMemfds, checksums: checksums)
        }
        try connection.send(.transferBegin(begin), descriptors: descriptors)
        pipeLanes?.pipes.forEach { $0.readEnd.close() }  // only the receiver reads: its exit must give us EPIPE

        // Lanes send, the peer socket is watched; a releasing sender streams each chunk's
        // checksum ahead of its bytes and frees the chunk once the receiver confirms it.
        let control = TransferControl(stallTimeoutSeconds: options.stallTimeoutSeconds, peerSocket: releasing ? nil : connection.socket.fd,
                                      progress: options.progress ?? TransferProgress())
        let streamChecksum: ((Chunk, UInt64) throws -> Void)? = releasing ? { [connection] chunk, sum in
            try connection.send(.chunkChecksums(firstChunk: UInt32(chunk.index), checksums: [sum]))
        } : nil
        // No thread at all when no chunk rides a lane (memfd only: its spot checks run below):
        // starting and joining the lane threads cost more than the checks, inside the pause.
        let job = try LaneJob(lanes: plan.hasLaneChunks ? lanes : 0) { lane in
            // A lane may carry chunks of several regions with different transports: each run of
            // one transport in plan order, piped ones into this lane's pipe.
            defer { pipeLanes?.pipes[lane].writeEnd.close() }
            for (kind, run) in plan.chunks(onLane: lane).runs(by: { kinds[$0.regionID]! }) {
                switch kind {
                case .gift, .pipeCopy:
                    try PipeLaneSender(lane: lane, pipe: pipeLanes!.pipes[lane].writeEnd, gift: kind == .gift, control: control, beforeChunk: streamChecksum)
                        .send(run, sources: byID, checksums: checksums)
                case .processVmReadv, .memfd:
                    for c in run {
                        checksums[c.index] = c.checksum(regionBase: byID[c.regionID]!.base)
                        control.progress.add(c.length)
                    }
                }
            }
        }
        if releasing {
            do {
                try releaseConfirmedChunks(plan: plan, sources: byID, job: job, control: control, rollback: rollback)
            } catch {
                control.cancel()
                try? job.wait()
                throw error
            }
        }
        try job.wait()
        for c in plan.chunks where c.lane == nil { checksums[c.index] = c.checksum(regionBase: byID[c.regionID]!.base) }
        report.sendSeconds = Double(Host.monotonicNanoseconds() - started) / 1e9

        let sums = checksums.values
        let batch = Int(MessageHeader.maximumPayload / 8) - 2
        var first = 0
        while first < sums.count {
            let slice = Array(sums[first..<min(sums.count, first + batch)])
            try connection.send(.chunkChecksums(firstChunk: UInt32(first), checksums: slice))
            first += slice.count
        }
        try connection.send(.transferEnd(chunkCount: UInt32(sums.count), bytes: table.totalBytes))
        try connection.send(.verify(digests: plan.regionDigests(checksums: sums, table: table)))
        let (result, _) = try connection.receive(whileIn: "awaiting verifyResult")
        guard case let .verifyResult(mismatch, frames) = result else {
            throw ProtocolError.invalidMessage(state: "awaiting verifyResult", message: "\(result.command)")
        }
        if let mismatch { throw AgentError.integrity(mismatch) }
        report.transferAndVerifySeconds = Double(Host.monotonicNanoseconds() - started) / 1e9
        report.verified = true
        report.injectedFaults = SyscallFaults.shared.injectedCounts()

        for s in sources {
            let after = frames.filter { $0.regionID == s.region.id }.sorted { $0.offset < $1.offset }.map(\.frame)
            // The sampled pages only: a mincore over all of RAM costs milliseconds inside the pause.
            let samples = TransferPlan.frameSampleOffsets(regionLength: s.region.length, pageSize: pageSize).map { UnsafeRawPointer(s.base + Int($0)) }
            let stillResident = try PageMap.entries(for: samples, pageSize: pageSize.bytes).contains { $0.present }
            let disposition = MoveDetection.disposition(before: framesBefore[s.region.id]!, after: after, sourceStillResident: stillResident)
            report.regions.append(RegionReport(id: s.region.id, transport: "\(kinds[s.region.id]!)", bytes: s.region.length, pages: disposition))
        }
        return PendingHandoff(connection: connection, report: report)
    }
}

extension OldInstanceAgent {
    /// While the lanes run: read `chunksVerified` and free each confirmed chunk, until every
    /// streamed chunk is confirmed. A `failure` from the receiver ends it with the reason.
    func releaseConfirmedChunks(plan: TransferPlan, sources: [UInt32: SourceRegion], job: LaneJob, control: TransferControl, rollback: RollbackState) throws {
        let streamed = plan.chunks.filter { $0.lane != nil }.count
        var waited = 0.0
        while rollback.released.count < streamed {
            if job.hasFailed { try job.wait() }
            guard try connection.socket.fd.wait(for: Int16(POLLIN), timeoutMilliseconds: 50) else {
                waited += 0.05
                if waited >= options.stallTimeoutSeconds {
                    throw TransferError.stalled(what: "confirmations of chunks (\(rollback.released.count) of \(streamed))", seconds: options.stallTimeoutSeconds)
                }
                continue
            }
            waited = 0
            let (message, _) = try connection.receive(whileIn: "awaiting chunksVerified")
            guard case .chunksVerified(let indices) = message else {
                throw ProtocolError.invalidMessage(state: "awaiting chunksVerified", message: "\(message.command)")
            }
            for i in indices.map(Int.init) {
                guard i < plan.chunks.count, plan.chunks[i].lane != nil, let source = sources[plan.chunks[i].regionID] else {
                    throw ProtocolError.invalidField(command: "chunksVerified", field: "chunk index", value: "\(i)")
                }
                try source.releasePages(offset: Int(plan.chunks[i].offset), length: Int(plan.chunks[i].length))
                rollback.released.append(i)
            }
        }
    }
}

/// A handoff whose receiver is ready (destinations mapped) and which waits for the pause.
public final class PreparedHandoff {
    let agent: OldInstanceAgent
    let sources: [SourceRegion]
    let rollback = OldInstanceAgent.RollbackState()
    var report = TransferReport()
    var kinds: [UInt32: TransportKind] = [:]
    var table: RegionTable?
    var receiverMemfds: [UInt32: FileDescriptor] = [:]

    init(agent: OldInstanceAgent, sources: [SourceRegion]) {
        self.agent = agent
        self.sources = sources
    }

    /// How each region will travel, decided in preflight.
    public var transports: [UInt32: String] { kinds.mapValues { "\($0)" } }
    /// What was decided differently from what was asked (before the pause), one line each.
    public var notices: [String] { report.notices }

    /// Maps the pages the memfd spot checks will read (CheckedPages), with the guest running:
    /// after any page-table drop, so that the checks inside the pause take no page faults.
    public func populateCheckedPages() {
        guard let table else { return }
        let byID = Dictionary(uniqueKeysWithValues: sources.map { ($0.region.id, $0) })
        CheckedPages.populate(table: table, sharedRegions: Set(kinds.filter { $0.value == .memfd }.keys), chunkSize: agent.options.chunkSize,
                              fullVerification: agent.options.fullVerification) { byID[$0]?.mapping }
    }

    /// Moves and verifies the bytes. The sources must not change from here on (VM paused).
    public func transfer() throws -> PendingHandoff {
        try agent.guarded(self) { try agent.move(self) }
    }

    /// Gives up before anything moved; the receiver drops its destinations.
    public func abandon(reason: String) {
        try? agent.connection.send(.abandon(reason: reason))
    }
}

/// A verified handoff waiting for the controller's decision. Until `commit()` returns,
/// the old instance's memory is intact and it can resume.
public final class PendingHandoff {
    public let connection: AgentConnection
    public let report: TransferReport

    init(connection: AgentConnection, report: TransferReport) {
        self.connection = connection
        self.report = report
    }

    /// The one explicit commit step: after it the new instance owns the guest.
    public func commit() throws {
        do {
            try connection.send(.commit)
            let (reply, _) = try connection.receive(whileIn: "awaiting committed")
            guard case .committed = reply else {
                throw ProtocolError.invalidMessage(state: "awaiting committed", message: "\(reply.command)")
            }
        } catch {
            throw AgentError.wrap(error)
        }
    }

    public func abandon(reason: String) {
        try? connection.send(.abandon(reason: reason))
    }
}
