import BatonCore
import Testing

@Suite("Checksums and digests")
struct ChecksumTests {
    @Test("XXH64 matches the reference implementation's vectors")
    func xxh64Vectors() {
        // From python-xxhash 3.x (the C reference), seed 0 and 0x1234.
        #expect(XXH64.hash([]) == 0xEF46_DB37_51D8_E999)
        #expect(XXH64.hash(Array("a".utf8)) == 0xD24E_C4F1_A98C_6E5B)
        #expect(XXH64.hash(Array("abc".utf8)) == 0x44BC_2CF5_AD77_0999)
        #expect(XXH64.hash(Array("Nobody inspects the spammish repetition".utf8)) == 0xFBCE_A83C_8A37_8BF1)
        let kib = (0..<1024).map { UInt8($0 % 256) }
        #expect(XXH64.hash(kib) == 0x6F39_14F1_8FE4_DF57)
        #expect(XXH64.hash(kib, seed: 0x1234) == 0x8CA9_9DAD_C837_70FA)
        #expect(XXH64.hash(Array("abc".utf8), seed: 0x1234) == 0xFC77_5F09_1949_E650)
    }

    @Test("the chunk checksum notices every single flipped bit, swapped words and truncation")
    func chunkChecksumDetects() {
        var bytes = (0..<4096).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ 7) }
        let reference = bytes.withUnsafeBytes { ChunkChecksum.compute(base: $0.baseAddress!, count: 4096, seed: 9) }
        for bit in stride(from: 0, to: 4096 * 8, by: 7) {
            bytes[bit / 8] ^= UInt8(1 << (bit % 8))
            let sum = bytes.withUnsafeBytes { ChunkChecksum.compute(base: $0.baseAddress!, count: 4096, seed: 9) }
            #expect(sum != reference, "bit \(bit) flip went unnoticed")
            bytes[bit / 8] ^= UInt8(1 << (bit % 8))
        }
        var swapped = bytes
        for i in 0..<8 { swapped.swapAt(64 + i, 128 + i) }  // two whole words in the same lane trade places
        #expect(swapped.withUnsafeBytes { ChunkChecksum.compute(base: $0.baseAddress!, count: 4096, seed: 9) } != reference)
        #expect(bytes.withUnsafeBytes { ChunkChecksum.compute(base: $0.baseAddress!, count: 4032, seed: 9) } != reference)
        #expect(bytes.withUnsafeBytes { ChunkChecksum.compute(base: $0.baseAddress!, count: 4096, seed: 10) } != reference)
    }

    @Test("a transfer plan covers every byte once, in contiguous stripes per lane")
    func transferPlan() throws {
        let page = PageSize(4096)
        let table = try RegionTable([
            GuestRegion(id: 0, guestAddress: 0, length: 10 << 20),
            GuestRegion(id: 1, guestAddress: 64 << 20, length: (3 << 20) + 8192, flags: .fileBacked),
        ], pageSize: page)
        let plan = try TransferPlan(table: table, transfers: [
            RegionTransfer(regionID: 0, transport: .gift), RegionTransfer(regionID: 1, transport: .memfd, descriptorIndex: 2),
        ], lanes: 3, chunkSize: 1 << 20, fullVerification: false)
        #expect(plan.chunks.count == 10 + 4)
        #expect(plan.chunks.filter { $0.regionID == 0 }.reduce(0) { $0 + $1.length } == 10 << 20)
        #expect(plan.chunks.filter { $0.regionID == 1 }.reduce(0) { $0 + $1.length } == (3 << 20) + 8192)
        #expect(plan.chunks.filter { $0.regionID == 1 }.allSatisfy { $0.lane == nil && $0.checkedLength == 4096 })
        #expect(plan.streamedBytes == 10 << 20)
        for lane in 0..<3 {
            let offsets = plan.chunks(onLane: lane).map(\.offset)
            #expect(!offsets.isEmpty)
            #expect(zip(offsets, offsets.dropFirst()).allSatisfy { $1 == $0 + (1 << 20) })
        }
        let full = try TransferPlan(table: table, transfers: [
            RegionTransfer(regionID: 0, transport: .gift), RegionTransfer(regionID: 1, transport: .memfd, descriptorIndex: 2),
        ], lanes: 3, chunkSize: 1 << 20, fullVerification: true)
        #expect(full.chunks.allSatisfy { $0.checkedLength == $0.length })
        #expect(throws: TransferPlan.PlanError.chunkSizeUnaligned(1000, pageSize: 4096)) {
            try TransferPlan(table: table, transfers: [], lanes: 1, chunkSize: 1000, fullVerification: false)
        }
        #expect(throws: TransferPlan.PlanError.regionMissing(1)) {
            try TransferPlan(table: table, transfers: [RegionTransfer(regionID: 0, transport: .gift)], lanes: 1, chunkSize: 4096, fullVerification: false)
        }
    }
}
