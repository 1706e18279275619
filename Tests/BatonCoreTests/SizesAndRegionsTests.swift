import BatonCore
import Testing

@Suite("Sizes, regions and page ranges")
struct SizesAndRegionsTests {
    @Test("byte sizes parse binary units and print them back")
    func byteSizes() {
        #expect(ByteSize(parsing: "256MiB")?.bytes == 256 << 20)
        #expect(ByteSize(parsing: "1GiB")?.bytes == 1 << 30)
        #expect(ByteSize(parsing: "4096")?.bytes == 4096)
        #expect(ByteSize(parsing: "2G")?.bytes == 2 << 30)
        #expect(ByteSize(parsing: "lots") == nil)
        #expect(ByteSize(parsing: "-1MiB") == nil)
        #expect(ByteSize(parsing: "99999999999TiB") == nil)
        #expect(ByteSize(1 << 30).description == "1GiB")
        #expect(ByteSize(4097).description == "4097B")
    }

    let page = PageSize(4096)

    @Test("a region table accepts aligned, disjoint regions")
    func validTable() throws {
        let table = try RegionTable([
            GuestRegion(id: 0, guestAddress: 0, length: 1 << 20),
            GuestRegion(id: 1, guestAddress: 1 << 20, length: 8192),  // touching is fine
        ], pageSize: page)
        #expect(table.totalBytes == (1 << 20) + 8192)
    }

    @Test("a region table refuses bad layouts, naming the region and value")
    func invalidTables() {
        func refusal(_ regions: [GuestRegion]) -> RegionTableError? {
            do { _ = try RegionTable(regions, pageSize: page); return nil } catch { return error }
        }
        #expect(refusal([]) == .empty)
        #expect(refusal([GuestRegion(id: 3, guestAddress: 0x1001, length: 4096)]) == .unalignedAddress(region: 3, address: 0x1001, pageSize: 4096))
        #expect(refusal([GuestRegion(id: 4, guestAddress: 0, length: 100)]) == .unalignedLength(region: 4, length: 100, pageSize: 4096))
        #expect(refusal([GuestRegion(id: 5, guestAddress: 0, length: 0)]) == .zeroLength(region: 5))
        #expect(refusal([GuestRegion(id: 6, guestAddress: UInt64.max - 4095, length: 8192)]) == .wrapsAddressSpace(region: 6))
        #expect(refusal([GuestRegion(id: 1, guestAddress: 0, length: 4096), GuestRegion(id: 1, guestAddress: 8192, length: 4096)]) == .duplicateID(region: 1))
        let overlap = refusal([GuestRegion(id: 0, guestAddress: 0, length: 0x3000), GuestRegion(id: 1, guestAddress: 0x2000, length: 0x2000)])
        #expect(overlap == .overlap(region: 1, with: 0, at: 0x2000))
        #expect(overlap?.description == "region 1 overlaps region 0 at guest address 0x2000")
        #expect(RegionTableError.unalignedAddress(region: 3, address: 0x1001, pageSize: 4096).description
            == "region 3: guest address 0x1001 is not aligned to the 4096-byte page size")
    }

    @Test("page range tables coalesce like a naive set of pages (seeded random layouts)")
    func pageRangesMatchNaiveModel() {
        var rng = SplitMix64(seed: 42)
        for _ in 0..<200 {
            var table = PageRangeTable()
            var naive = Set<UInt64>()
            for _ in 0..<Int(rng.next() % 40) {
                let first = rng.next() % 200, count = rng.next() % 12
                table.insert(PageRange(first: first, count: count))
                for p in first..<(first + count) { naive.insert(p) }
            }
            #expect(table.pageCount == UInt64(naive.count))
            for p in 0..<UInt64(220) { #expect(table.contains(page: p) == naive.contains(p)) }
            // Coalesced: sorted, and no two ranges touch or overlap.
            for (a, b) in zip(table.ranges, table.ranges.dropFirst()) { #expect(a.end < b.first) }
            let pieces = table.split(maxPages: 5)
            #expect(pieces.allSatisfy { $0.count <= 5 })
            #expect(pieces.reduce(0) { $0 + $1.count } == table.pageCount)
        }
    }

    @Test("single pages inserted one by one become one range per run")
    func coalescesRuns() {
        let table = PageRangeTable(pages: [5, 3, 4, 10, 11, 0])
        #expect(table.ranges == [PageRange(first: 0, count: 1), PageRange(first: 3, count: 3), PageRange(first: 10, count: 2)])
    }
}
