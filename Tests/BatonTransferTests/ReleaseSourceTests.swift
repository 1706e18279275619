import BatonAgent
import BatonCore
import BatonSystem
import BatonHarness
import BatonTransfer
import Foundation
import Glibc
import Testing

/// A releasing sender frees each chunk once it is in a pipe, so the host never holds two
/// copies. The guarantee that must survive: if the handoff fails, every byte comes back.
@Suite("Releasing sender: one copy in memory, full rollback")
struct ReleaseSourceTests {
    static let size = 256 << 20

    func handOff(_ source: SourceRegion, receiver: ReceiverChild) throws -> PendingHandoff {
        var options = HandoffOptions()
        options.transport = .gift
        options.releaseSource = true
        options.stallTimeoutSeconds = 5
        let connection = AgentConnection(socket: try UnixSocket.connect(path: receiver.socket))
        return try OldInstanceAgent(connection: connection, options: options).handOff([source])
    }

    @Test("256 MiB arrives intact and the sender's pages are gone")
    func releasesAndArrives() throws {
        let seed: UInt64 = 0x5EED
        let source = try patternedRegion(bytes: Self.size, memfd: false, seed: seed)
        let receiver = try ReceiverChild(seed: seed)
        let pending = try handOff(source, receiver: receiver)
        try pending.commit()
        let done = receiver.finish()
        #expect(done.status == 0, "\(done.stderr)")
        #expect(done.outcome?.committed == true && done.outcome?.patternMismatchOffset == nil)
        #expect(pending.report.releasedSource)
        let resident = try PageMap.residentPages(base: source.base, length: Self.size, pageSize: Host.pageSize)
        #expect(resident == 0, "the sender still holds \(resident) pages")
    }

    @Test("a corrupted chunk fails the handoff and rollback restores every byte", arguments: ["corrupt-chunk:5", "kill-receiver-after-chunk:40", "corrupt-chunk:250"])
    func rollbackRestores(_ fault: String) throws {
        let seed: UInt64 = 0xFA17
        let source = try patternedRegion(bytes: Self.size, memfd: false, seed: seed)
        let receiver = try ReceiverChild(seed: seed, environment: ["BATON_FAULT": fault])
        #expect(throws: AgentError.self) { _ = try handOff(source, receiver: receiver) }
        _ = receiver.finish()
        let wrong = TestPattern.firstMismatch(source.base, count: Self.size, seed: seed)
        #expect(wrong == nil, "after rollback the byte at \(wrong ?? -1) differs: memory lost")
    }
}
