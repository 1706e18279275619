import BatonCore
import BatonVMM
import Foundation
import Testing

/// Seeded random inputs (fixed seeds, bounded count) into every decoder that reads bytes
/// from another process: the agent protocol, the vCPU state blob and the VMM's HTTP request
/// parser. Each must reject garbage with an error, never crash, hang or over-read. Inputs
/// that once failed are kept below as regressions.
@Suite("Fuzzing decoders with seeded random input")
struct FuzzTests {


    /// Valid messages to mutate: a fuzzer that only sends noise never gets past the magic.
    static let seeds: [[UInt8]] = [
        Message.hello(version: 1, oldestVersion: 1, pageSize: 4096, capabilities: .all).encoded(),
        Message.regionTable(try! RegionTable([GuestRegion(id: 0, guestAddress: 0, length: 0x10000)], pageSize: PageSize(4096))).encoded(),
        Message.transferBegin(TransferBegin(lanes: 2, chunkSize: 1 << 20, pipeCapacity: 1 << 20, sourcePID: 1, fullVerification: false,
                                            regions: [RegionTransfer(regionID: 0, transport: .gift)], descriptorCount: 2)).encoded(),
        Message.chunkChecksums(firstChunk: 0, checksums: [1, 2, 3]).encoded(),
        Message.verify(digests: [0: 1]).encoded(),
        Message.verifyResult(mismatch: Mismatch(regionID: 0, offset: 0, detail: "x"), frames: [SampledFrame(regionID: 0, offset: 0, frame: 1)]).encoded(),
        Message.chunksVerified(indices: [1, 2]).encoded(),
        Message.failure(code: 1, message: "why").encoded(),
    ]

    /// Inputs that once broke a decoder (kept as regressions).
    static let regressions: [[UInt8]] = [
        // transferBegin whose region record was counted as 32 bytes instead of 28.
        Array(seeds[2].prefix(16 + 20 + 27)),
        // A count of 2^32-1 records with no bytes behind it.
        MessageHeader(version: 1, command: Command.chunkChecksums.rawValue, descriptorCount: 0, payloadLength: 8).encoded() + [0, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF],
    ]

    func decode(_ bytes: [UInt8]) {
        guard let header = try? MessageHeader.decode(bytes) else { return }
        let payload = Array(bytes.dropFirst(MessageHeader.size))
        if let m = try? Message.decode(header: header, payload: payload) {
            // Whatever decodes must re-encode to the same payload: no silent reinterpretation.
            #expect(m.encodedPayload() == payload || m.command == .verify, "re-encoding \(m.command) differs: \(payload)")
        }
    }

    @Test("protocol decoder: 20 000 mutated and random messages, seed 0xBA70")
    func protocolDecoder() {
        var rng = SplitMix64(seed: 0xBA70)
        for _ in 0..<20_000 {
            var input = Self.seeds[Int(rng.next() % UInt64(Self.seeds.count))]
            switch rng.next() % 4 {
            case 0: for _ in 0..<(1 + rng.next() % 4) { input[Int(rng.next() % UInt64(input.count))] = UInt8(truncatingIfNeeded: rng.next()) }
            case 1: input = Array(input.prefix(Int(rng.next() % UInt64(input.count + 1))))
            case 2: input += rng.bytes(Int(rng.next() % 64))
            default: input = rng.bytes(Int(rng.next() % 96))
            }
            decode(input)
        }
        for r in Self.regressions { decode(r) }
    }

    @Test("vCPU state decoder: 5 000 mutated blobs, seed 0x57A7E")
    func stateDecoder() {
        var state = VMState(backend: .simulated, config: VMConfig(ramBytes: 64 << 20, vcpus: 2, simulated: true))
        state.simulatedR15 = [1, 2]
        let blob = state.encoded()
        var rng = SplitMix64(seed: 0x57A7E)
        for _ in 0..<5_000 {
            var input = blob
            if rng.next() % 2 == 0 {
                for _ in 0..<(1 + rng.next() % 3) { input[Int(rng.next() % UInt64(input.count))] = UInt8(truncatingIfNeeded: rng.next()) }
            } else {
                input = Array(input.prefix(Int(rng.next() % UInt64(input.count))))
            }
            _ = try? VMState.decode(input)
        }
    }

    @Test("HTTP request parser: 3 000 mutated requests over a real socket pair, seed 0x477")
    func httpParser() throws {
        let base = Array("PUT /api/v1/vm.create HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nExpect: 100-continue\r\n\r\n5\r\nhello\r\n0\r\n\r\n".utf8)
        var rng = SplitMix64(seed: 0x477)
        for _ in 0..<3_000 {
            var input = base
            for _ in 0..<(1 + rng.next() % 4) { input[Int(rng.next() % UInt64(input.count))] = UInt8(truncatingIfNeeded: rng.next() % 128) }
            _ = HTTPFuzzProbe.parse(input)
        }
        // Regressions: a negative chunk size, an empty size line, a header line without a colon.
        #expect(HTTPFuzzProbe.parse(Array("PUT / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n-5\r\nhello\r\n0\r\n\r\n".utf8)) == nil)
        #expect(HTTPFuzzProbe.parse(Array("PUT / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n\r\n".utf8)) == nil)
        #expect(HTTPFuzzProbe.parse(Array("GET / HTTP/1.1\r\nno colon here\r\n\r\n".utf8)) == nil)
        #expect(HTTPFuzzProbe.parse(base)?.body == Array("hello".utf8))
    }

    /// One request each once killed batonvmm and its guest (issue: "One HTTP request kills
    /// batonvmm"): the handler, not only the parser, must answer them.
    @Test("handlers survive a bare '?' target, chunk sizes summing past Int.max and a 1e300 stall timeout")
    func handlerRegressions() throws {
        let service = VMMService()
        let bare = try #require(HTTPFuzzProbe.parse(Array("GET ? HTTP/1.1\r\nHost: x\r\n\r\n".utf8)))
        #expect(service.handle(bare).status == 404)
        let overflow = Array("PUT / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n7fffffffffffffff\r\nx\r\n0\r\n\r\n".utf8)
        #expect(HTTPFuzzProbe.parse(overflow) == nil)
        for value in ["1e300", "-1", "0"] {
            let body = #"{"agent_socket":"/nonexistent","stall_timeout_seconds":"# + value + "}"
            let request = try #require(HTTPFuzzProbe.parse(Array("PUT /api/v1/baton/handoff.prepare HTTP/1.1\r\nContent-Length: \(body.utf8.count)\r\n\r\n\(body)".utf8)))
            let response = service.handle(request)
            #expect(response.status == 400, "stall_timeout_seconds \(value): \(response.status)")
        }
    }
}

extension SplitMix64 {
    mutating func bytes(_ n: Int) -> [UInt8] { (0..<n).map { _ in UInt8(truncatingIfNeeded: next()) } }
}
