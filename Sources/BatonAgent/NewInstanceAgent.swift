import BatonCore
import BatonSystem
import BatonTransfer
import Glibc
import Synchronization

/// Supplies the new instance's guest-RAM mapping for a region. Called before the pause, so
/// it should map and pre-fault (or ask for THP) now: page faults cost more than the copy.
public typealias DestinationProvider = (GuestRegion) throws -> MemoryMapping

public enum DestinationProviders {
    /// Private anonymous memory with THP requested and every page faulted in.
    public static func prefaultedAnonymous(_ region: GuestRegion) throws -> MemoryMapping {
        let m = try MemoryMapping.anonymous(length: Int(region.length))
        m.adviseHugePages()
        m.prefault(pageSize: Host.pageSize)
        return m
    }
}

/// The new instance's side. Each message goes through the pure `ReceiverMachine`; this
/// type only performs the actions it returns (map memory, pump lanes, verify, commit).
public final class NewInstanceAgent {
    public let connection: AgentConnection
    public let machine: ReceiverMachine
    public let stallTimeoutSeconds: Double
    public let expectedUID: UInt32
    let provide: DestinationProvider
    /// Runs once the transfer is verified, before `commit` arrives: the embedding hypervisor
    /// builds (paused) what it will run, while the controller journals the commit decision, so
    /// the work is off the path from the commit to the guest running. If it throws, `commit`
    /// gets `failure` instead of `committed` and the sender keeps the guest.
    public var prepareCommit: (([DestinationRegion]) throws -> Void)?
    /// Told the destinations as soon as they are mapped (before `regionsReady`, so before the
    /// pause): what can be set up around them then (KVM's memory slot) is out of the downtime.
    public var destinationsMapped: (([DestinationRegion]) -> Void)?
    /// What `prepareCommit` gave, run after the verification.
    private var preparedForCommit: Result<Void, any Error>?
    let pageSize = PageSize(Host.pageSize)

    public private(set) var state: ReceiverState = .awaitingHello
    public private(set) var destinations: [UInt32: DestinationRegion] = [:]
    /// The old instance's pid (SO_PEERCRED), to tell its death from a mere hang-up.
    public private(set) var peerPID: Int32?
    var plan: TransferPlan?
    var job: LaneJob?
    var control: TransferControl?
    var checksums: ChunkChecksums?
    var expected: [Int: UInt64] = [:]
    var pipes: [FileDescriptor] = []
    /// Set when the sender releases its pages: chunks are confirmed to it one by one.
    var verifier: ChunkVerifier?
    var plannedChunks: [Chunk] = []
    /// Bytes received so far (read by a progress line from another thread).
    public let progress = TransferProgress()
    /// The memfds of streamed regions (held-for-adoption), by region id, until commit or failure.
    var heldForAdoption: [UInt32: (region: GuestRegion, fd: FileDescriptor)] = [:]
    /// Who sent this side's one `failure` (a lane, or the agent thread), if it was sent.
    private let failureReporter = Mutex<FailureReporter?>(nil)
    private enum FailureReporter { case lane, agent }

    public init(connection: AgentConnection, capabilities: Capabilities = .all, stallTimeoutSeconds: Double = 10,
                expectedUID: UInt32 = getuid(), destinations: @escaping DestinationProvider = DestinationProviders.prefaultedAnonymous,
                acceptsUnchecked: Bool = false) {
        self.connection = connection
        self.machine = ReceiverMachine(localCapabilities: capabilities, pageSize: PageSize(Host.pageSize), acceptsUnchecked: acceptsUnchecked)
        self.stallTimeoutSeconds = stallTimeoutSeconds
        self.expectedUID = expectedUID
        self.provide = destinations
    }

    /// Runs the protocol to the end. Returns the committed regions (the new guest RAM);
    /// throws if the handoff was abandoned or failed, after dropping what it received.
    public func receive() throws -> [DestinationRegion] {
        signal(SIGPIPE, SIG_IGN)
        do {
            try connection.setTimeout(seconds: stallTimeoutSeconds)
            try connection.authenticate(expectedUID: expectedUID)
            peerPID = try? connection.socket.peerCredentials().pid
            while true {
                let (message, descriptors) = try connection.receive(whileIn: state.name)
                let (next, action) = try machine.step(state, message)
                if case .awaitingRegions(let session) = next { connection.sessionVersion = session.version }
                state = next
                if let done = try perform(action, descriptors: descriptors) { return done }
            }
        } catch {
            var abandoned = false
            if case .abandoned = state { abandoned = true }
            // This thread's own finding is told to the sender before the lanes' pipes close, so
            // the sender reads the reason before its lanes see EPIPE.
            if !abandoned, !Self.isSocketEnd(error), !isPeerGone(error) { reportFailure(error, by: .agent) }
            // A lane's failure is the cause when the agent thread only saw the socket end, or
            // when the lane already told the sender (whose abandon may have arrived since); a
            // lane stopped by the others' failure never is.
            let laneError = stopLanes()
            var cause = error
            if let laneError, Self.isSocketEnd(error) || failureReporter.withLock({ $0 }) == .lane {
                cause = laneError
            }
            let wrapped = AgentError.wrap(cause)
            if !abandoned, !isPeerGone(cause) { reportFailure(cause, by: .agent) }
            // What an adoption after the old instance's death could use: everything, if it was
            // all received and verified (only the commit was missing); else only what was handed
            // over as a descriptor (shared with the old instance, complete by construction).
            // (Once `commit` arrived everything was verified too: a sender that dies before it hears
            // `committed` leaves the guest whole here.)
            if case .awaitingCommit = state {} else if case .committed = state {} else {
                destinations = destinations.filter { $0.value.region.flags.contains(.arrivesAsDescriptor) }
                for (id, held) in heldForAdoption {
                    guard let mapping = try? MemoryMapping.shared(fd: held.fd, offset: 0, length: Int(held.region.length)) else { continue }
                    destinations[id] = DestinationRegion(region: held.region, mapping: mapping)
                }
            }
            heldForAdoption = [:]
            throw wrapped
        }
    }

    /// Sends this side's one `failure` (code 4 for an integrity failure), once whoever finds it first.
    private func reportFailure(_ error: Error, by reporter: FailureReporter) {
        let first = failureReporter.withLock { current in
            if current != nil { return false }
            current = reporter
            return true
        }
        guard first else { return }
        let wrapped = AgentError.wrap(error)
        let code: UInt16 = if case .integrity = wrapped { FailureCode.integrity } else { FailureCode.failed }
        try? connection.send(.failure(code: code, message: "\(wrapped)"))
    }

    private func isPeerGone(_ error: Error) -> Bool {
        if case ProtocolError.peerClosed = error { return true }
        return false
    }

    /// Stops the lanes and returns the first real error one of them had, if any.
    @discardableResult
    private func stopLanes() -> Error? {
        control?.cancel()
        pipes.forEach { $0.close() }
        do { try job?.wait(); return nil } catch TransferError.cancelled { return nil } catch { return error }
    }

    /// What the agent thread sees when a lane shut the socket's read side (or the peer went quiet).
    private static func isSocketEnd(_ error: Error) -> Bool {
        switch error {
        case ProtocolError.peerClosed, ProtocolError.truncatedHeader, ProtocolError.truncatedPayload, TransferError.stalled: return true
        default: return false
        }
    }

    private func perform(_ action: ReceiverAction, descriptors: [FileDescriptor]) throws -> [DestinationRegion]? {
        switch action {
        case .reply(let message):
            try connection.send(message)
        case .prepareDestinations(let table):
            // memfd regions: map what came with the table now (lazily), so this instance holds
            // guest RAM before the pause and could adopt it if the old instance died.
            let early = table.regions.filter(\.flags.carriesDescriptor)
            for (region, fd) in zip(early, descriptors) {
                let size = Int(try fd.status().st_size)
                guard size >= Int(region.length) else {
                    throw TransferError.memfdTooSmall(regionID: region.id, size: size, needed: Int(region.length))
                }
                if region.flags.contains(.heldForAdoption) {
                    heldForAdoption[region.id] = (region, fd)  // kept unmapped: only an adoption maps it
                } else {
                    destinations[region.id] = DestinationRegion(region: region, mapping: try MemoryMapping.shared(fd: fd, offset: 0, length: Int(region.length)))
                }
            }
            var rollback: [FileDescriptor] = []
            for region in table.regions where !region.flags.contains(.arrivesAsDescriptor) {
                if region.flags.contains(.releasedBySender) {
                    // Not pre-faulted: the sender frees a chunk as we take it, so the host never
                    // holds two copies. The sender keeps this memfd's descriptor for rollback.
                    let mapping = try MemoryMapping.memfd(name: "baton-guest-\(region.id)", length: Int(region.length))
                    rollback.append(mapping.backing!)
                    destinations[region.id] = DestinationRegion(region: region, mapping: mapping)
                } else {
                    destinations[region.id] = DestinationRegion(region: region, mapping: try provide(region))
                }
            }
            // The pages the spot checks will read, as the default chunk size cuts them (a sender
            // with another chunk size only loses the head start): no page faults in the pause.
            CheckedPages.populate(table: table, sharedRegions: Set(early.map(\.id)), chunkSize: HandoffOptions.defaultChunkSize, fullVerification: false) {
                destinations[$0]?.mapping
            }
            destinationsMapped?(destinations.values.sorted { $0.region.guestAddress < $1.region.guestAddress })
            try connection.send(.regionsReady(rollbackDescriptors: UInt8(rollback.count)), descriptors: rollback)
        case let .startReceiving(plan, begin):
            try start(plan: plan, begin: begin, descriptors: descriptors)
        case let .recordChecksums(first, sums):
            if let plan, first + sums.count > plan.chunks.count {
                throw ProtocolError.invalidField(command: "chunkChecksums", field: "chunks", value: "\(first)..<\(first + sums.count) (the plan has \(plan.chunks.count) chunks)")
            }
            for (i, s) in sums.enumerated() {
                expected[first + i] = s
                if let verdict = verifier?.expect(first + i, s) { try confirm(verdict) }
            }
        case let .noteTransferEnd(chunkCount, bytes):
            // Both sides derived the same plan; a sender that counts otherwise planned otherwise.
            if let plan, chunkCount != plan.chunks.count {
                throw ProtocolError.invalidField(command: "transferEnd", field: "chunk count", value: "\(chunkCount) (the plan has \(plan.chunks.count) chunks)")
            }
            if case let .transferEnded(_, table, _) = state, bytes != table.totalBytes {
                throw ProtocolError.invalidField(command: "transferEnd", field: "bytes", value: "\(bytes) (the region table holds \(table.totalBytes))")
            }
        case .verify(let digests):
            let mismatch = try verify(digests)
            try connection.send(.verifyResult(mismatch: mismatch, frames: mismatch == nil ? try sampleFrames() : []))
            state = machine.verificationFinished(state, mismatch: mismatch)
            if let mismatch { throw AgentError.integrity(mismatch) }
            if let prepareCommit {
                let regions = destinations.values.sorted { $0.region.guestAddress < $1.region.guestAddress }
                preparedForCommit = Result { try prepareCommit(regions) }
            }
        case .commit:
            heldForAdoption = [:]  // the guest is ours in our own memory: the sender's memfds go
            let regions = destinations.values.sorted { $0.region.guestAddress < $1.region.guestAddress }
            if let preparedForCommit { try preparedForCommit.get() } else { try prepareCommit?(regions) }
            try connection.send(.committed)
            return regions
        case .discard(let reason):
            throw AgentError.abandoned(reason)
        }
        return nil
    }

    /// Tells a releasing sender that a chunk is safely here, or fails the handoff naming it.
    private func confirm(_ verdict: ChunkVerifier.Verdict) throws {
        switch verdict {
        case .verified(let index):
            try connection.send(.chunksVerified(indices: [UInt32(index)]))
        case let .mismatch(index, got, want):
            let chunk = plannedChunks[index]
            let mismatch = Mismatch(regionID: chunk.regionID, offset: chunk.offset,
                                    detail: "chunk \(index) checksum 0x\(String(got, radix: 16)) != sender's 0x\(String(want, radix: 16))")
            throw AgentError.integrity(mismatch)  // reportFailure sends the one `failure` (code 4)
        }
    }

    private func start(plan: TransferPlan, begin: TransferBegin, descriptors: [FileDescriptor]) throws {
        guard case let .receiving(_, table, _) = state else { return }
        self.plan = plan
        let kinds = Dictionary(uniqueKeysWithValues: begin.regions.map { ($0.regionID, $0) })
        for region in table.regions where kinds[region.id]?.transport == .memfd {
            let t = kinds[region.id]!
            if let early = destinations[region.id]?.mapping.backing, Int(t.descriptorIndex) < descriptors.count {
                // Already mapped from the table's descriptor: it must be the very same file.
                let a = try early.status(), b = try descriptors[Int(t.descriptorIndex)].status()
                guard a.st_ino == b.st_ino && a.st_dev == b.st_dev && t.descriptorOffset == 0 else {
                    throw TransferError.descriptorMismatch(regionID: region.id, index: t.descriptorIndex)
                }
                continue
            }
            guard Int(t.descriptorIndex) < descriptors.count else {
                throw TransferError.descriptorMissing(regionID: region.id, index: t.descriptorIndex)
            }
            let fd = descriptors[Int(t.descriptorIndex)]
            let size = Int(try fd.status().st_size)
            guard size >= Int(t.descriptorOffset + region.length) else {
                throw TransferError.memfdTooSmall(regionID: region.id, size: size, needed: Int(t.descriptorOffset + region.length))
            }
            // Map lazily: populating page tables costs ~80 ms/GiB, the guest faults them in as it runs.
            destinations[region.id] = DestinationRegion(region: region, mapping: try MemoryMapping.shared(fd: fd, offset: Int(t.descriptorOffset), length: Int(region.length)))
        }
        for region in table.regions where destinations[region.id] == nil {
            throw TransferError.destinationMissing(lane: nil, regionID: region.id, offset: 0)
        }
        let sums = ChunkChecksums(count: plan.chunks.count)
        let control = TransferControl(stallTimeoutSeconds: stallTimeoutSeconds, progress: progress)
        self.checksums = sums
        self.control = control
        pipes = begin.usesPipes ? Array(descriptors.prefix(Int(begin.lanes))) : []
        let pipes = self.pipes
        let destinations = self.destinations
        let sourceAddresses = Dictionary(uniqueKeysWithValues: begin.regions.map { ($0.regionID, $0.sourceAddress) })
        plannedChunks = plan.chunks
        let releasing = table.regions.contains { $0.flags.contains(.releasedBySender) }
        let verifier = releasing ? ChunkVerifier() : nil
        self.verifier = verifier
        let landed: ((Chunk, UInt64) throws -> Void)? = verifier.map { verifier in
            { [self] chunk, sum in
                if let verdict = verifier.landed(chunk.index, sum) { try self.confirm(verdict) }
            }
        }
        job = try LaneJob(lanes: plan.hasLaneChunks ? plan.laneCount : 0) { lane in  // none for memfd only
            do {
                // Runs of one transport in plan order (a lane may carry several regions' chunks).
                for (kind, run) in plan.chunks(onLane: lane).runs(by: { kinds[$0.regionID]?.transport ?? .memfd }) {
                    switch kind {
                    case .gift, .pipeCopy:
                        let lazy = destinations[run[0].regionID]?.region.flags.contains(.releasedBySender) ?? false
                        try PipeLaneReceiver(lane: lane, pipe: pipes[lane], gift: kind == .gift, control: control, populateAhead: lazy, afterChunk: landed)
                            .receive(run, destinations: destinations, checksums: sums)
                    case .processVmReadv:
                        try RemoteLaneReader(sourcePID: begin.sourcePID, control: control)
                            .receive(run, sourceAddresses: sourceAddresses, destinations: destinations, checksums: sums)
                    case .memfd:
                        break
                    }
                }
            } catch {
                // A chunk judged bad here (release mode) is told to the sender before its pipe
                // closes: otherwise it may see only EPIPE and report that instead.
                if case .integrity = AgentError.wrap(error) { self.reportFailure(error, by: .lane) }
                control.cancel()
                if !pipes.isEmpty { pipes[lane].close() }  // the sender sees EPIPE instead of waiting
                // Wake the agent thread, blocked reading the socket: it reports this error.
                self.connection.socket.shutdownRead()
                throw error
            }
        }
        let faults = FaultPlan.fromEnvironment
        for c in plan.chunks where c.lane == nil {
            sums[c.index] = c.checksum(regionBase: destinations[c.regionID]!.base)
            // A shared page cannot be corrupted in transit without corrupting the guest, so the
            // fault point spoils the check's reading instead.
            if faults.corruptChunk == c.index { sums[c.index] ^= 1 }
            progress.add(c.length)
        }
    }

    private func verify(_ digests: [UInt32: UInt64]) throws -> Mismatch? {
        guard case let .verifying(_, table) = state, let plan, let checksums else { return nil }
        try job?.wait()
        for chunk in plan.chunks {
            guard let want = expected[chunk.index] else {
                return Mismatch(regionID: chunk.regionID, offset: chunk.offset, detail: "no checksum arrived for chunk \(chunk.index)")
            }
            let got = checksums[chunk.index]
            if got != want {
                return Mismatch(regionID: chunk.regionID, offset: chunk.offset,
                                detail: "chunk \(chunk.index) checksum 0x\(String(got, radix: 16)) != sender's 0x\(String(want, radix: 16))")
            }
        }
        let ours = plan.regionDigests(checksums: checksums.values, table: table)
        for region in table.regions where ours[region.id] != digests[region.id] {
            return Mismatch(regionID: region.id, offset: 0, detail: "region digest differs from the sender's")
        }
        return nil
    }

    private func sampleFrames() throws -> [SampledFrame] {
        var out: [SampledFrame] = []
        for (id, d) in destinations {
            let offsets = TransferPlan.frameSampleOffsets(regionLength: d.region.length, pageSize: pageSize)
            let frames = try MoveDetection.frames(base: d.base, regionLength: d.region.length, pageSize: pageSize)
            out += zip(offsets, frames).map { SampledFrame(regionID: id, offset: $0, frame: $1) }
        }
        return out
    }
}
