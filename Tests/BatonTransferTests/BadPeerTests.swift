import BatonAgent
import BatonCore
import BatonSystem
import BatonHarness
import BatonTransfer
import Foundation
import Glibc
import Testing

/// A real receiver agent on a thread, fed raw bytes through a socketpair: what a confused
/// or hostile peer could send. Each case must end in a one-line error naming the problem,
/// and the receiver must tell the peer with a `failure` message.
@Suite("Bad peers get clear errors")
struct BadPeerTests {
    final class Box: @unchecked Sendable { var error: Error? }

    /// Runs a receiver against `script` (raw bytes) and returns (receiver error, failure text sent back).
    func feed(_ chunks: [[UInt8]], closeAfter: Bool = true) throws -> (String, String?) {
        let (ours, theirs) = try UnixSocket.pair()
        let box = Box()
        let job = try LaneJob(lanes: 1, pin: false) { _ in
            let agent = NewInstanceAgent(connection: AgentConnection(socket: theirs), stallTimeoutSeconds: 3)
            do { _ = try agent.receive() } catch { box.error = error }
        }
        for c in chunks { try ours.send(c) }
        if closeAfter { ours.shutdownWrite() }
        try job.wait()
        theirs.fd.close()  // the agent is done: end of stream for our reads below
        // Read back whatever the receiver sent; the last message should be `failure`.
        let peer = AgentConnection(socket: ours, faults: FaultPlan())
        var failure: String?
        while true {
            do { _ = try peer.receive(whileIn: "test") } catch ProtocolError.peerFailed(_, let m) { failure = m; break } catch { break }
        }
        return ("\(box.error.map { "\($0)" } ?? "no error")", failure)
    }

    let hello = Message.hello(version: ProtocolVersion.current, oldestVersion: 1, pageSize: UInt32(Host.pageSize), capabilities: .all).encoded()

    /// A memfd region announced (and its memfd sent) on `regionTable`; `transferBegin` then names
    /// descriptor `index` of the descriptors it carries (`other`: one memfd that is another file).
    func memfdOnTransferBegin(index: Int32, other: Bool) throws -> (String, String?) {
        let (ours, theirs) = try UnixSocket.pair()
        let box = Box()
        let job = try LaneJob(lanes: 1, pin: false) { _ in
            let agent = NewInstanceAgent(connection: AgentConnection(socket: theirs), stallTimeoutSeconds: 3)
            do { _ = try agent.receive() } catch { box.error = error }
        }
        let peer = AgentConnection(socket: ours, faults: FaultPlan())
        try peer.send(.hello(version: ProtocolVersion.current, oldestVersion: 1, pageSize: UInt32(Host.pageSize), capabilities: .all))
        _ = try peer.receive(whileIn: "awaiting welcome")
        let page = Host.pageSize
        let announced = try MemoryMapping.memfd(name: "announced", length: page), otherFile = try MemoryMapping.memfd(name: "other", length: page)
        let table = try RegionTable([GuestRegion(id: 0, guestAddress: 0, length: UInt64(page), flags: [.fileBacked, .arrivesAsDescriptor])], pageSize: PageSize(page))
        try peer.send(.regionTable(table), descriptors: [announced.backing!])
        _ = try peer.receive(whileIn: "awaiting regionsReady")
        try peer.send(.transferBegin(TransferBegin(lanes: 1, chunkSize: UInt32(page), pipeCapacity: 0, sourcePID: getpid(), fullVerification: false,
                                                   regions: [RegionTransfer(regionID: 0, transport: .memfd, descriptorIndex: index)], descriptorCount: other ? 1 : 0)),
                      descriptors: other ? [otherFile.backing!] : [])
        var failure: String?
        while failure == nil {
            do { _ = try peer.receive(whileIn: "test") } catch ProtocolError.peerFailed(_, let m) { failure = m } catch { break }
        }
        try job.wait()
        return ("\(box.error.map { "\($0)" } ?? "no error")", failure)
    }

    @Test("a memfd region on transferBegin that names no descriptor (index -1) is refused, naming the region, never a crash", arguments: [true, false])
    func memfdWithoutDescriptor(_ withOther: Bool) throws {
        let (error, failure) = try memfdOnTransferBegin(index: -1, other: withOther)
        #expect(error.contains("transferBegin: invalid descriptor index of memfd region 0 -1 (none: a memfd region must name one of the descriptors"), "\(error)")
        #expect(failure?.contains("descriptor index of memfd region 0") == true, "the peer is told: \(failure ?? "nothing")")
    }

    @Test("a memfd on transferBegin that is not the one announced with the region table is named as such")
    func memfdSwapped() throws {
        let (error, failure) = try memfdOnTransferBegin(index: 0, other: true)
        #expect(error.contains("memfd region 0: descriptor 0 on transferBegin is not the memfd announced with the region table"), "\(error)")
        #expect(failure?.contains("not the memfd announced") == true, "the peer is told: \(failure ?? "nothing")")
    }

    @Test("one lane carrying two transports (process_vm_readv chunks, then pipe-copy chunks) is received intact")
    func mixedTransportsOnOneLane() throws {
        let (ours, theirs) = try UnixSocket.pair()
        final class Received: @unchecked Sendable { var regions: [DestinationRegion] = []; var error: Error? }
        let got = Received()
        let job = try LaneJob(lanes: 1, pin: false) { _ in
            let agent = NewInstanceAgent(connection: AgentConnection(socket: theirs), stallTimeoutSeconds: 5)
            do { got.regions = try agent.receive() } catch { got.error = error }
        }
        let peer = AgentConnection(socket: ours, faults: FaultPlan())
        try peer.send(.hello(version: ProtocolVersion.current, oldestVersion: 1, pageSize: UInt32(Host.pageSize), capabilities: .all))
        _ = try peer.receive(whileIn: "awaiting welcome")
        let size = 1 << 20, page = PageSize(Host.pageSize)
        let a = try MemoryMapping.anonymous(length: size), b = try MemoryMapping.anonymous(length: size)
        TestPattern.fill(a.base, count: size, seed: 5)
        TestPattern.fill(b.base, count: size, seed: 5, firstWord: UInt64(size / 8))
        let table = try RegionTable([GuestRegion(id: 0, guestAddress: 0, length: UInt64(size)), GuestRegion(id: 1, guestAddress: UInt64(size), length: UInt64(size))], pageSize: page)
        try peer.send(.regionTable(table))
        _ = try peer.receive(whileIn: "awaiting regionsReady")
        let transfers = [RegionTransfer(regionID: 0, transport: .processVmReadv, sourceAddress: UInt64(UInt(bitPattern: a.base))),
                         RegionTransfer(regionID: 1, transport: .pipeCopy)]
        let plan = try TransferPlan(table: table, transfers: transfers, lanes: 1, chunkSize: 256 << 10, fullVerification: false)
        #expect(Set(plan.chunks.map(\.lane)) == [0], "one lane carries both regions")
        let pipe = try BatonSystem.Pipe()
        try peer.send(.transferBegin(TransferBegin(lanes: 1, chunkSize: 256 << 10, pipeCapacity: 0, sourcePID: getpid(), fullVerification: false,
                                                   regions: transfers, descriptorCount: 1)), descriptors: [pipe.readEnd])
        pipe.readEnd.close()
        let bases: [UInt32: UnsafeMutableRawPointer] = [0: a.base, 1: b.base]
        for c in plan.chunks where c.regionID == 1 {
            var done = 0
            while done < Int(c.length) { done += try pipe.writeEnd.write(from: b.base + Int(c.offset) + done, count: Int(c.length) - done) }
        }
        pipe.writeEnd.close()
        let sums = plan.chunks.map { ChunkChecksum.compute(base: bases[$0.regionID]! + Int($0.offset), count: Int($0.checkedLength), seed: UInt64($0.index)) }
        try peer.send(.chunkChecksums(firstChunk: 0, checksums: sums))
        try peer.send(.transferEnd(chunkCount: UInt32(sums.count), bytes: table.totalBytes))
        try peer.send(.verify(digests: plan.regionDigests(checksums: sums, table: table)))
        let (result, _) = try peer.receive(whileIn: "awaiting verifyResult")
        guard case .verifyResult(nil, _) = result else { Issue.record("\(result) \(got.error.map { "\($0)" } ?? "")"); return }
        try peer.send(.commit)
        _ = try peer.receive(whileIn: "awaiting committed")
        try job.wait()
        #expect(got.error == nil, "\(got.error.map { "\($0)" } ?? "")")
        for d in got.regions {
            #expect(TestPattern.firstMismatch(d.base, count: size, seed: 5, firstWord: d.region.guestAddress / 8) == nil, "region \(d.region.id)")
        }
    }

    @Test("a peer speaking another protocol version")
    func otherVersion() throws {
        let (error, failure) = try feed([Message.hello(version: 9, oldestVersion: 9, pageSize: 4096, capabilities: .all).encoded(version: 9)])
        #expect(error == "protocol: peer speaks protocol version 9; this side accepts \(ProtocolVersion.oldestAccepted)...\(ProtocolVersion.current)")
        #expect(failure == error)
    }

    @Test("an unknown command")
    func unknownCommand() throws {
        var bytes = Message.commit.encoded()
        bytes[6] = 0x77
        let (error, failure) = try feed([bytes])
        #expect(error == "protocol: unknown command 0x77")
        #expect(failure == error)
    }

    @Test("another dialect entirely (HTTP on the agent socket)")
    func otherDialect() throws {
        let (error, _) = try feed([Array("GET /api/v1/vmm.ping HTTP/1.1\r\n\r\n".utf8)])
        #expect(error == "protocol: not a Baton message: magic 0x20544547 (expected 0x4e544142)")
    }

    @Test("a truncated message")
    func truncated() throws {
        let (error, _) = try feed([Array(hello.prefix(20))])
        #expect(error == "protocol: message truncated at 'payload of hello': needs 16 bytes, 4 left")
    }

    @Test("an oversize message is refused from its header")
    func oversize() throws {
        var header = MessageHeader(version: 1, command: Command.hello.rawValue, descriptorCount: 0, payloadLength: 64 << 20).encoded()
        header += [1, 2, 3]
        let (error, _) = try feed([header])
        #expect(error == "protocol: message hello claims 67108864 payload bytes (limit 1048576)")
    }

    @Test("overlapping regions")
    func overlappingRegions() throws {
        var w = WireWriter()
        w.u32(UInt32(Host.pageSize)); w.u32(2)
        w.u32(0); w.u32(0); w.u64(0); w.u64(0x3000)
        w.u32(1); w.u32(0); w.u64(0x2000); w.u64(0x1000)
        let table = MessageHeader(version: 1, command: Command.regionTable.rawValue, descriptorCount: 0, payloadLength: UInt32(w.bytes.count)).encoded() + w.bytes
        let (error, failure) = try feed([hello, table])
        #expect(error == "protocol: bad region table: region 1 overlaps region 0 at guest address 0x2000")
        #expect(failure == error)
    }

    @Test("unaligned regions")
    func unalignedRegions() throws {
        var w = WireWriter()
        w.u32(UInt32(Host.pageSize)); w.u32(1)
        w.u32(5); w.u32(0); w.u64(0x1800); w.u64(0x1000)
        let table = MessageHeader(version: 1, command: Command.regionTable.rawValue, descriptorCount: 0, payloadLength: UInt32(w.bytes.count)).encoded() + w.bytes
        let (error, _) = try feed([hello, table])
        #expect(error == "protocol: bad region table: region 5: guest address 0x1800 is not aligned to the 4096-byte page size")
    }

    @Test("messages out of order")
    func outOfOrder() throws {
        let (error, _) = try feed([Message.commit.encoded()])
        #expect(error == "protocol: commit is not valid while awaiting hello")
    }

    @Test("a peer that hangs up between messages")
    func hangUp() throws {
        let (error, _) = try feed([hello])
        #expect(error == "protocol: peer closed the connection while awaiting the region table")
    }

    @Test("a peer running as another uid is refused before any descriptor is passed")
    func otherUID() throws {
        guard getuid() == 0 else { try Test.cancel("needs root to start a peer as uid 65534 (running as uid \(getuid()))") }
        guard FileManager.default.isExecutableFile(atPath: "/usr/bin/setpriv") else { try Test.cancel("setpriv (util-linux) is not installed") }
        // The peer must reach the socket: a world-searchable directory and a 0666 socket, for this test only.
        let dir = "/tmp/baton-uid-test-\(getpid())"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o755])
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let listener = try UnixListener(path: dir + "/agent.sock")
        chmod(listener.path, 0o666)
        let probe = Process()
        probe.executableURL = URL(fileURLWithPath: "/usr/bin/setpriv")
        probe.arguments = ["--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/test", "-x", BatonProcess.executablePath]
        try probe.run()
        probe.waitUntilExit()
        let nobodyCanRun = probe.terminationStatus == 0
        guard nobodyCanRun else { try Test.cancel("uid 65534 cannot execute \(BatonProcess.executablePath)") }
        let peer = try BatonProcess(["agent", "send", "--socket", listener.path, "--size", "1MiB"],
                                    wrapper: ["/usr/bin/setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"])
        let connection = AgentConnection(socket: try listener.accept(timeoutSeconds: 10))
        let agent = NewInstanceAgent(connection: connection)
        #expect {
            _ = try agent.receive()
        } throws: { error in
            "\(error)".hasPrefix("refused peer pid \(peer.pid): uid 65534 is not the expected uid 0 (SO_PEERCRED)")
        }
        let done = peer.finish()
        #expect(done.status != 0)
        // The sender refuses too: it checks the receiver's uid (0) against its own (65534).
        #expect(done.stderr.contains("uid 0 is not the expected uid 65534"), "\(done.stderr)")
    }
}
