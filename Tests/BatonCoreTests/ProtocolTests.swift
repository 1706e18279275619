import BatonCore
import Testing

func hex(_ bytes: [UInt8]) -> String { bytes.map { String($0, radix: 16).count == 1 ? "0" + String($0, radix: 16) : String($0, radix: 16) }.joined() }
func unhex(_ s: String) -> [UInt8] {
    let chars = Array(s.filter { !$0.isWhitespace })
    return stride(from: 0, to: chars.count, by: 2).map { UInt8(String(chars[$0...$0 + 1]), radix: 16)! }
}

let page = PageSize(4096)
let sampleTable = try! RegionTable([
    GuestRegion(id: 0, guestAddress: 0, length: 0x10000),
    GuestRegion(id: 7, guestAddress: 0x100000, length: 0x2000, flags: [.fileBacked, .arrivesAsDescriptor]),
], pageSize: page)

/// Every message of the protocol by the name of its vector in Docs/PROTOCOL.md, whose bytes the
/// document holds (ProtocolDocumentTests reads them): the document is the specification.
let goldenMessages: [(String, Message)] = [
    ("hello", .hello(version: 1, oldestVersion: 1, pageSize: 4096, capabilities: .all)),
    ("welcome", .welcome(version: 1, capabilities: [.gift, .memfd])),
    ("regionTable", .regionTable(sampleTable)),
    ("regionTable (release mode)", .regionTable(try! RegionTable([GuestRegion(id: 0, guestAddress: 0, length: 4 << 20, flags: [.releasedBySender])], pageSize: page))),
    ("regionsReady", .regionsReady(rollbackDescriptors: 0)),
    ("regionsReady (release mode, one memfd)", .regionsReady(rollbackDescriptors: 1)),
    ("transferBegin", .transferBegin(TransferBegin(lanes: 2, chunkSize: 1 << 20, pipeCapacity: 1 << 20, sourcePID: 4242,
                                                   fullVerification: false, regions: [
                                                       RegionTransfer(regionID: 0, transport: .gift, sourceAddress: 0x7f00_0000_0000),
                                                       RegionTransfer(regionID: 7, transport: .memfd, descriptorIndex: 2),
                                                   ], descriptorCount: 3))),
    ("chunkChecksums", .chunkChecksums(firstChunk: 4, checksums: [0x1122_3344_5566_7788, 1])),
    ("transferEnd", .transferEnd(chunkCount: 14, bytes: 0x1_0000_0000)),
    ("verify", .verify(digests: [7: 0xAB, 0: 0xCD])),
    ("verifyResult ok", .verifyResult(mismatch: nil, frames: [SampledFrame(regionID: 0, offset: 0x1000, frame: 0x1234)])),
    ("verifyResult mismatch", .verifyResult(mismatch: Mismatch(regionID: 7, offset: 0x2000, detail: "bad"), frames: [])),
    ("commit", .commit),
    ("committed", .committed),
    ("abandon", .abandon(reason: "stop")),
    ("failure", .failure(code: FailureCode.integrity, message: "bad.")),
    ("chunksVerified", .chunksVerified(indices: [3, 0x100])),
]

/// The bytes Docs/PROTOCOL.md gives for the message vector `name`.
func goldenBytes(_ name: String) -> [UInt8]? { ProtocolDocument.value("message " + name).map(unhex) }

func decodeFull(_ bytes: [UInt8]) throws -> Message {
    let header = try MessageHeader.decode(bytes)
    return try Message.decode(header: header, payload: Array(bytes.dropFirst(MessageHeader.size)))
}

@Suite("Wire protocol")
struct ProtocolTests {
    @Test("every message encodes to the bytes Docs/PROTOCOL.md gives and decodes back", arguments: goldenMessages.indices)
    func golden(_ i: Int) throws {
        let (name, message) = goldenMessages[i]
        let golden = try #require(goldenBytes(name), "Docs/PROTOCOL.md has no vector 'message \(name)'")
        #expect(hex(message.encoded()) == hex(golden), "\(name): the code encodes \(hex(message.encoded()))")
        #expect(try decodeFull(golden) == message, "\(name)")
    }

    @Test("the golden set covers every command, and every message vector in the document is checked")
    func coversEveryCommand() {
        #expect(Set(goldenMessages.map(\.1.command)) == Set(Command.allCases))
        let documented = Set(ProtocolDocument.vectors.map(\.key).filter { $0.hasPrefix("message ") })
        #expect(documented == Set(goldenMessages.map { "message " + $0.0 }))
    }

    @Test("headers with a foreign magic, unknown command or oversize length are refused from the header alone")
    func badHeaders() {
        var foreign = Message.commit.encoded()
        foreign[0] = 0x47  // "GATN"
        #expect(throws: ProtocolError.badMagic(0x4E54_4147)) { try MessageHeader.decode(foreign) }
        var unknown = Message.commit.encoded()
        unknown[6] = 0x99
        #expect(throws: ProtocolError.unknownCommand(0x99)) { try MessageHeader.decode(unknown) }
        #expect((try? MessageHeader.decode(unknown)) == nil)
        #expect(ProtocolError.unknownCommand(0x99).description == "unknown command 0x99")
        var big = MessageHeader(version: 1, command: Command.verify.rawValue, descriptorCount: 0, payloadLength: MessageHeader.maximumPayload + 1).encoded()
        big += [0, 0]
        #expect(throws: ProtocolError.oversizeMessage(command: 8, length: MessageHeader.maximumPayload + 1, limit: MessageHeader.maximumPayload)) {
            try MessageHeader.decode(big)
        }
        #expect(throws: ProtocolError.truncatedHeader(received: 5)) { try MessageHeader.decode([1, 2, 3, 4, 5]) }
    }

    @Test("truncated, padded and lying payloads are refused with the field named")
    func badPayloads() throws {
        let full = Message.transferEnd(chunkCount: 14, bytes: 99).encoded()
        let header = try MessageHeader.decode(full)
        #expect(throws: ProtocolError.truncatedPayload(field: "bytes", needed: 8, available: 4)) {
            try Message.decode(header: header, payload: Array(full.dropFirst(16).prefix(8)))
        }
        #expect(throws: ProtocolError.trailingBytes(command: "transferEnd", count: 1)) {
            try Message.decode(header: header, payload: Array(full.dropFirst(16)) + [0])
        }
        // A count that promises more records than the payload holds.
        var lying = WireWriter()
        lying.u32(0); lying.u32(1_000_000)
        let h = MessageHeader(version: 1, command: Command.chunkChecksums.rawValue, descriptorCount: 0, payloadLength: UInt32(lying.bytes.count))
        #expect(throws: ProtocolError.truncatedPayload(field: "checksum count", needed: 8_000_000, available: 0)) {
            try Message.decode(header: h, payload: lying.bytes)
        }
        // Overlapping regions on the wire are a bad region table, named.
        var w = WireWriter()
        w.u32(4096); w.u32(2)
        w.u32(0); w.u32(0); w.u64(0); w.u64(0x3000)
        w.u32(1); w.u32(0); w.u64(0x2000); w.u64(0x1000)
        let rh = MessageHeader(version: 1, command: Command.regionTable.rawValue, descriptorCount: 0, payloadLength: UInt32(w.bytes.count))
        #expect(throws: ProtocolError.badRegionTable(.overlap(region: 1, with: 0, at: 0x2000))) { try Message.decode(header: rh, payload: w.bytes) }
        // Unknown flag bits, and held-for-adoption beside arrives-as-descriptor or
        // released-by-sender, are refused with the region named; a held region carries a descriptor.
        for (flags, why) in [(UInt32(0x10), "unknown bits"), (0xA, "held-for-adoption with arrives-as-descriptor or released-by-sender"),
                             (0xC, "held-for-adoption with arrives-as-descriptor or released-by-sender")] {
            var f = WireWriter()
            f.u32(4096); f.u32(1); f.u32(3); f.u32(flags); f.u64(0); f.u64(0x1000)
            let carried = GuestRegion.Flags(rawValue: flags).carriesDescriptor ? 1 : 0
            let fh = MessageHeader(version: 1, command: Command.regionTable.rawValue, descriptorCount: UInt8(carried), payloadLength: UInt32(f.bytes.count))
            #expect(throws: ProtocolError.invalidField(command: "regionTable", field: "flags of region 3", value: "0x\(String(flags, radix: 16)) (\(why))")) {
                try Message.decode(header: fh, payload: f.bytes)
            }
        }
        let held = Message.regionTable(try RegionTable([GuestRegion(id: 0, guestAddress: 0, length: 0x1000, flags: [.fileBacked, .heldForAdoption])], pageSize: page))
        #expect(held.descriptorCount == 1)
        #expect(try decodeFull(held.encoded()).descriptorCount == 1)
        // Descriptor counts must match what the message says it carries.
        let begin = goldenMessages.first { $0.0 == "transferBegin" }!.1.encoded()
        var bh = try MessageHeader.decode(begin)
        bh.descriptorCount = 1
        #expect(throws: ProtocolError.unexpectedDescriptors(command: "transferBegin", expected: 3, received: 1)) {
            try Message.decode(header: bh, payload: Array(begin.dropFirst(16)))
        }
    }
}

@Suite("Receiver state machine")
struct ReceiverMachineTests {
    let machine = ReceiverMachine(localCapabilities: .all, pageSize: page)
    let hello = Message.hello(version: ProtocolVersion.current, oldestVersion: ProtocolVersion.oldestAccepted, pageSize: 4096, capabilities: [.gift, .processVmReadv])
    var begin: TransferBegin {
        TransferBegin(lanes: 1, chunkSize: 1 << 20, pipeCapacity: 1 << 20, sourcePID: 1, fullVerification: false,
                      regions: [RegionTransfer(regionID: 0, transport: .gift), RegionTransfer(regionID: 7, transport: .gift)], descriptorCount: 1)
    }

    @Test("the happy path: hello → regions → transfer → verify → commit")
    func happyPath() throws {
        var (state, action) = try machine.step(.awaitingHello, hello)
        #expect(action == .reply(.welcome(version: ProtocolVersion.current, capabilities: [.gift, .processVmReadv])))
        (state, action) = try machine.step(state, .regionTable(sampleTable))
        #expect(action == .prepareDestinations(sampleTable))
        (state, action) = try machine.step(state, .transferBegin(begin))
        guard case .startReceiving(let plan, _) = action else { Issue.record("expected startReceiving, got \(action)"); return }
        #expect(plan.chunks.count == 1 + 1)
        (state, action) = try machine.step(state, .chunkChecksums(firstChunk: 0, checksums: [1, 2]))
        #expect(action == .recordChecksums(firstChunk: 0, checksums: [1, 2]))
        (state, action) = try machine.step(state, .transferEnd(chunkCount: 2, bytes: 0x12000))
        (state, action) = try machine.step(state, .verify(digests: [0: 1, 7: 2]))
        #expect(action == .verify(expectedDigests: [0: 1, 7: 2]))
        #expect(throws: ProtocolError.invalidMessage(state: "verifying", message: "commit")) { try machine.step(state, .commit) }
        state = machine.verificationFinished(state, mismatch: nil)
        (state, action) = try machine.step(state, .commit)
        #expect(action == .commit)
        #expect(state == .committed(sampleTable))
        #expect(state.isFinal)
    }

    @Test("transferBegin without chunk checksums (verification 2): encoded as 2, refused by a receiver that requires integrity, planned with 0 checked bytes per streamed chunk where accepted; other values refused")
    func uncheckedTransfer() throws {
        let unchecked = TransferBegin(lanes: 1, chunkSize: 1 << 20, pipeCapacity: 1 << 20, sourcePID: 1, fullVerification: false, unchecked: true,
                                      regions: begin.regions, descriptorCount: 1)
        let bytes = Message.transferBegin(unchecked).encoded()
        #expect(bytes[16 + 1] == 2, "the verification byte follows lanes")
        #expect(try decodeFull(bytes) == .transferBegin(unchecked))
        var bad = bytes
        bad[16 + 1] = 3
        #expect(throws: ProtocolError.invalidField(command: "transferBegin", field: "verification", value: "3 (must be 0, 1 or 2)")) { try decodeFull(bad) }
        for accepting in [false, true] {
            let m = ReceiverMachine(localCapabilities: .all, pageSize: page, acceptsUnchecked: accepting)
            var (state, _) = try m.step(.awaitingHello, hello)
            (state, _) = try m.step(state, .regionTable(sampleTable))
            if !accepting {
                #expect(throws: ProtocolError.invalidField(command: "transferBegin", field: "verification", value: "2 (no chunk checksums: this receiver requires integrity checks)")) {
                    try m.step(state, .transferBegin(unchecked))
                }
                continue
            }
            let (_, action) = try m.step(state, .transferBegin(unchecked))
            guard case .startReceiving(let plan, _) = action else { Issue.record("expected startReceiving, got \(action)"); return }
            #expect(!plan.chunks.isEmpty && plan.chunks.allSatisfy { $0.checkedLength == 0 && $0.lane != nil })
        }
    }

    @Test("a mismatch fails the handoff and names region and offset")
    func mismatchFails() throws {
        var (state, _) = try machine.step(.awaitingHello, hello)
        (state, _) = try machine.step(state, .regionTable(sampleTable))
        (state, _) = try machine.step(state, .transferBegin(begin))
        #expect(throws: ProtocolError.invalidMessage(state: "receiving", message: "verify"), "verify needs transferEnd first") {
            try machine.step(state, .verify(digests: [0: 1, 7: 2]))
        }
        (state, _) = try machine.step(state, .transferEnd(chunkCount: 2, bytes: 0x12000))
        (state, _) = try machine.step(state, .verify(digests: [0: 1, 7: 2]))
        state = machine.verificationFinished(state, mismatch: Mismatch(regionID: 7, offset: 0x1000, detail: "chunk 1 checksum differs"))
        #expect(state == .failed(reason: "region 7 offset 0x1000: chunk 1 checksum differs"))
        #expect(throws: ProtocolError.invalidMessage(state: "failed", message: "commit")) { try machine.step(state, .commit) }
    }

    @Test("a newer sender that also speaks this version gets this version; ranges that do not meet are refused")
    func negotiation() throws {
        let newer = ProtocolVersion.current + 1
        let (state, action) = try machine.step(.awaitingHello, .hello(version: newer, oldestVersion: ProtocolVersion.current, pageSize: 4096, capabilities: .all))
        #expect(action == .reply(.welcome(version: ProtocolVersion.current, capabilities: .all)))
        if case .awaitingRegions(let session) = state { #expect(session.version == ProtocolVersion.current) } else { Issue.record("\(state)") }
        #expect(ProtocolVersion.negotiate(peerCurrent: newer, peerOldest: newer) == nil)
        #expect(throws: ProtocolError.invalidField(command: "hello", field: "oldest version", value: "2 (above the version it offers, 1)")) {
            try machine.step(.awaitingHello, .hello(version: 1, oldestVersion: 2, pageSize: 4096, capabilities: .all))
        }
        #expect(ProtocolVersion.negotiate(peerCurrent: 1, peerOldest: 2) == nil)
        #expect(ProtocolVersion.negotiate(peerCurrent: ProtocolVersion.current, peerOldest: 1) == ProtocolVersion.current)
    }

    @Test("a peer speaking another protocol version is refused at hello")
    func otherVersion() {
        #expect(throws: ProtocolError.unsupportedVersion(peer: 7, accepted: ProtocolVersion.accepted)) {
            try machine.step(.awaitingHello, .hello(version: 7, oldestVersion: 7, pageSize: 4096, capabilities: .all))
        }
        #expect(ProtocolError.unsupportedVersion(peer: 7, accepted: 1...1).description == "peer speaks protocol version 7; this side accepts 1...1")
    }

    @Test("messages out of order are refused with the state named")
    func outOfOrder() throws {
        #expect(throws: ProtocolError.invalidMessage(state: "awaiting hello", message: "regionTable")) {
            try machine.step(.awaitingHello, .regionTable(sampleTable))
        }
        let (s, _) = try machine.step(.awaitingHello, hello)
        #expect(throws: ProtocolError.invalidMessage(state: "awaiting the region table", message: "hello")) { try machine.step(s, hello) }
        #expect(throws: ProtocolError.invalidMessage(state: "awaiting the region table", message: "commit")) { try machine.step(s, .commit) }
    }

    @Test("abandon is accepted in every state that is not final")
    func abandonAnywhere() throws {
        var states: [ReceiverState] = [.awaitingHello]
        var (s, _) = try machine.step(.awaitingHello, hello)
        states.append(s)
        (s, _) = try machine.step(s, .regionTable(sampleTable))
        states.append(s)
        (s, _) = try machine.step(s, .transferBegin(begin))
        states.append(s)
        for state in states {
            let (next, action) = try machine.step(state, .abandon(reason: "controller said so"))
            #expect(next == .abandoned(reason: "controller said so"))
            #expect(action == .discard(reason: "controller said so"))
        }
        #expect(throws: ProtocolError.self) { try machine.step(.committed(sampleTable), .abandon(reason: "late")) }
    }

    @Test("a transport the session did not negotiate is refused")
    func unnegotiatedTransport() throws {
        var (s, _) = try machine.step(.awaitingHello, hello)
        (s, _) = try machine.step(s, .regionTable(sampleTable))
        let memfdBegin = TransferBegin(lanes: 1, chunkSize: 1 << 20, pipeCapacity: 0, sourcePID: 1, fullVerification: false,
                                       regions: [RegionTransfer(regionID: 0, transport: .gift), RegionTransfer(regionID: 7, transport: .memfd, descriptorIndex: 1)],
                                       descriptorCount: 2)
        #expect(throws: ProtocolError.invalidField(command: "transferBegin", field: "transport of region 7", value: "memfd (not negotiated)")) {
            try machine.step(s, .transferBegin(memfdBegin))
        }
    }
}
