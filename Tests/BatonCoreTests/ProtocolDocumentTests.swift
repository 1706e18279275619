import BatonCore
import Foundation
import Testing

/// Docs/PROTOCOL.md's ```vectors block, read from the repository: `name: value` per line.
enum ProtocolDocument {
    static let path = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
        .appendingPathComponent("Docs/PROTOCOL.md").path

    static let vectors: [(key: String, value: String)] = {
        guard let text = try? String(contentsOfFile: path, encoding: .utf8) else { return [] }
        var inBlock = false
        var out: [(String, String)] = []
        for line in text.split(separator: "\n", omittingEmptySubsequences: false) {
            if line.hasPrefix("```") { inBlock = line == "```vectors"; continue }
            guard inBlock, let colon = line.range(of: ": ") else { continue }
            out.append((String(line[..<colon.lowerBound]), String(line[colon.upperBound...])))
        }
        return out
    }()

    static func value(_ key: String) -> String? { vectors.first { $0.key == key }?.value }

    /// A `0x…` value of the vector `key`.
    static func number(_ key: String) -> UInt64? {
        value(key).flatMap { UInt64($0.dropFirst(2), radix: 16) }
    }
}

@Suite("Docs/PROTOCOL.md: its vectors hold for the code")
struct ProtocolDocumentTests {
    static func bytes(_ count: Int) -> [UInt8] { (0..<count).map { UInt8($0 % 256) } }

    @Test("the document is there and has its vectors")
    func present() {
        #expect(ProtocolDocument.vectors.count >= 25, "\(ProtocolDocument.path): \(ProtocolDocument.vectors.count) vectors")
    }

    @Test("XXH64 is the reference XXH64")
    func xxh64() {
        #expect(ProtocolDocument.number(#"xxh64 "abc" seed 0"#) == XXH64.hash(Array("abc".utf8)))
        #expect(ProtocolDocument.number("xxh64 1024 bytes, byte k = k mod 256, seed 0") == XXH64.hash(Self.bytes(1024)))
    }

    @Test("chunk checksums: seed = chunk index, whole 64-byte blocks and a tail")
    func chunkChecksums() {
        for (count, chunk) in [(4096, 0), (4096, 5), (100, 1)] {
            let key = "chunk-checksum \(count) bytes, byte k = k mod 256, chunk \(chunk)"
            let computed = Self.bytes(count).withUnsafeBytes { ChunkChecksum.compute(base: $0.baseAddress!, count: count, seed: UInt64(chunk)) }
            #expect(ProtocolDocument.number(key) == computed, "\(key): the code computes 0x\(String(computed, radix: 16))")
        }
    }

    @Test("region digest: XXH64 of the chunk checksums, little-endian, with Baton's seed")
    func regionDigest() {
        let computed = XXH64.digest(ofChunkChecksums: [0x0123_4567_89AB_CDEF, 1, 2])
        #expect(ProtocolDocument.number("region-digest of 0x0123456789abcdef 0x1 0x2") == computed, "the code computes 0x\(String(computed, radix: 16))")
    }

    static func describe(_ plan: TransferPlan) -> String {
        plan.chunks.map { c in
            "\(c.index):\(c.regionID):0x\(String(c.offset, radix: 16)):0x\(String(c.length, radix: 16)):0x\(String(c.checkedLength, radix: 16)):\(c.lane.map(String.init) ?? "-")"
        }.joined(separator: " ")
    }

    @Test("plans: chunk order, sizes, sampled memfd chunks and the lane stripes")
    func plans() throws {
        let page = PageSize(4096)
        let table = try RegionTable([GuestRegion(id: 0, guestAddress: 0, length: 3 << 20),
                                     GuestRegion(id: 7, guestAddress: 1 << 30, length: 256 << 10, flags: [.fileBacked, .arrivesAsDescriptor])], pageSize: page)
        let plan = try TransferPlan(table: table, transfers: [RegionTransfer(regionID: 0, transport: .gift), RegionTransfer(regionID: 7, transport: .memfd, descriptorIndex: 2)],
                                    lanes: 2, chunkSize: 1 << 20, fullVerification: false)
        let key = "plan page 4096, chunk size 1048576, 2 lanes, region 0 gift 3145728, region 7 memfd 262144"
        #expect(ProtocolDocument.value(key) == Self.describe(plan), "the code plans \(Self.describe(plan))")

        let shared = try RegionTable([GuestRegion(id: 3, guestAddress: 0, length: 8 << 20, flags: [.fileBacked, .arrivesAsDescriptor])], pageSize: page)
        let sampled = try TransferPlan(table: shared, transfers: [RegionTransfer(regionID: 3, transport: .memfd, descriptorIndex: 0)], lanes: 1, chunkSize: 64 << 10, fullVerification: false)
        let sizes = Set(sampled.chunks.map(\.length)), checked = Set(sampled.chunks.map(\.checkedLength))
        let summary = "\(sampled.chunks.count) chunks of 0x\(String(sizes.first ?? 0, radix: 16)), checked 0x\(String(checked.first ?? 0, radix: 16)), "
            + (sampled.chunks.allSatisfy { $0.lane == nil } ? "no lane" : "lanes")
        #expect(sizes.count == 1 && checked.count == 1)
        #expect(ProtocolDocument.value("plan page 4096, chunk size 65536, 1 lane, region 3 memfd 8388608") == summary, "the code plans \(summary)")
    }

    @Test("the test pattern (a fixture of agent send/receive --seed)")
    func testPattern() {
        var words = [UInt64](repeating: 0, count: 4)
        words.withUnsafeMutableBytes { TestPattern.fill($0.baseAddress!, count: 32, seed: 1) }
        let text = words.map { "0x" + String($0, radix: 16) }.joined(separator: " ")
        #expect(ProtocolDocument.value("test-pattern seed 1, words 0 to 3") == text, "the code fills \(text)")
    }
}
