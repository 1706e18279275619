import BatonAgent
import BatonCore
import BatonSystem
import BatonHarness
import BatonTransfer
import Foundation
import Glibc
import Testing

@Suite("Two-process transfers, every byte checked")
struct TwoProcessTransferTests {
    static let size = 256 << 20

    @Test("256 MiB moves between two processes intact with each transport",
          arguments: [(TransportChoice.gift, false), (.memfd, true), (.copy, false), (.auto, true), (.auto, false)])
    func transfers(_ transport: TransportChoice, _ memfd: Bool) throws {
        let seed = UInt64.random(in: 1...UInt64.max)
        let source = try patternedRegion(bytes: Self.size, memfd: memfd, seed: seed)
        let receiver = try ReceiverChild(seed: seed)
        var options = HandoffOptions()
        options.transport = transport
        let connection = AgentConnection(socket: try UnixSocket.connect(path: receiver.socket))
        let pending = try OldInstanceAgent(connection: connection, options: options).handOff([source])
        try pending.commit()
        let done = receiver.finish()
        #expect(done.status == 0, "\(done.stderr)")
        let outcome = try #require(done.outcome)
        #expect(outcome.committed)
        #expect(outcome.bytes == UInt64(Self.size))
        #expect(outcome.patternChecked)
        #expect(outcome.patternMismatchOffset == nil, "receiver found a wrong byte at \(outcome.patternMismatchOffset ?? -1)")
        let report = pending.report
        #expect(report.verified)
        #expect(report.bytes == UInt64(Self.size))
        let region = try #require(report.regions.first)
        switch (transport, memfd) {
        case (.memfd, _), (.auto, true):
            #expect(region.transport == "memfd")
            #expect(region.pages == .shared, "memfd pages are the same frames in both processes")
        case (.gift, _):
            #expect(region.transport == "gift")
            // Observed, not assumed: on mainline kernels the read side copies.
            #expect(region.pages == .copied || region.pages == .moved)
            #expect(report.pagesMoved == (region.pages == .moved))
        default:
            #expect(["gift", "process_vm_readv", "pipe-copy"].contains(region.transport))
            #expect(region.pages == .copied || region.pages == .moved)
        }
        // The old instance's memory is untouched by the handoff (rollback stays possible until commit).
        #expect(TestPattern.firstMismatch(source.base, count: Self.size, seed: seed) == nil)
    }

    @Test("gift without chunk checksums (the integrity-off benchmark) lands intact where the receiver accepts it, and is refused, before any byte moves, where it does not",
          arguments: [true, false])
    func unchecked(_ accepted: Bool) throws {
        let seed = UInt64.random(in: 1...UInt64.max)
        let size = 16 << 20
        let source = try patternedRegion(bytes: size, memfd: false, seed: seed)
        let receiver = try ReceiverChild(seed: seed, acceptUnchecked: accepted)
        var options = HandoffOptions()
        options.transport = .gift
        options.unchecked = true
        options.fullVerification = accepted  // both asked: one verification byte, 2, planned alike on both sides
        let connection = AgentConnection(socket: try UnixSocket.connect(path: receiver.socket))
        let result = Result { try OldInstanceAgent(connection: connection, options: options).handOff([source]) }
        if accepted {
            let pending = try result.get()
            try pending.commit()
            #expect(pending.report.verified)
        } else {
            #expect(throws: (any Error).self) { try result.get() }
        }
        let done = receiver.finish()
        if accepted {
            #expect(done.status == 0, "\(done.stderr)")
            let outcome = try #require(done.outcome)
            #expect(outcome.committed && outcome.patternChecked && outcome.patternMismatchOffset == nil)
        } else {
            #expect(done.status != 0)
            #expect(done.stderr.contains("invalid verification 2 (no chunk checksums: this receiver requires integrity checks)"), "\(done.stderr)")
            #expect(done.outcome?.committed != true)
        }
        #expect(TestPattern.firstMismatch(source.base, count: size, seed: seed) == nil)
    }

    @Test("agent receive --seed: bytes that commit but differ from the pattern exit 4, naming the address")
    func patternMismatchExits4() throws {
        let receiver = try ReceiverChild(seed: 2)  // agent send fills with seed 1
        let sent = try BatonProcess(["agent", "send", "--socket", receiver.socket, "--size", "4MiB", "--transport", "copy"]).finish()
        let done = receiver.finish()
        #expect(sent.status == 0)
        #expect(done.status == 4 && done.stderr.contains("differ from the test pattern (seed 2) at guest address 0x0"), "\(done.stderr)")
    }

    @Test("the memfd transport refuses anonymous memory before sending anything")
    func memfdNeedsMemfd() throws {
        let source = try patternedRegion(bytes: 1 << 20, memfd: false, seed: 3)
        let receiver = try ReceiverChild()
        var options = HandoffOptions()
        options.transport = .memfd
        let connection = AgentConnection(socket: try UnixSocket.connect(path: receiver.socket))
        #expect {
            _ = try OldInstanceAgent(connection: connection, options: options).handOff([source])
        } throws: { error in
            "\(error)" == "region 0 cannot travel by memfd: its memory is not backed by a memfd"
        }
        let done = receiver.finish()
        #expect(done.status != 0)
        #expect(done.outcome?.committed == false)
        #expect(done.outcome?.error?.contains("abandoned") == true, "\(done.outcome?.error ?? "")")
    }

    @Test("several regions in one handoff land at their own addresses")
    func severalRegions() throws {
        let seed: UInt64 = 77
        let a = try MemoryMapping.anonymous(length: 3 << 20)
        let b = try MemoryMapping.memfd(name: "second", length: 5 << 20)
        TestPattern.fill(a.base, count: a.length, seed: seed, firstWord: 0)
        TestPattern.fill(b.base, count: b.length, seed: seed, firstWord: (64 << 20) / 8)
        let receiver = try ReceiverChild(seed: seed)
        let connection = AgentConnection(socket: try UnixSocket.connect(path: receiver.socket))
        let pending = try OldInstanceAgent(connection: connection, options: HandoffOptions()).handOff([
            SourceRegion(id: 0, guestAddress: 0, mapping: a),
            SourceRegion(id: 1, guestAddress: 64 << 20, mapping: b),
        ])
        try pending.commit()
        let done = receiver.finish()
        #expect(done.status == 0, "\(done.stderr)")
        #expect(done.outcome?.bytes == 8 << 20)
        #expect(done.outcome?.patternMismatchOffset == nil)
        #expect(pending.report.regions.map(\.transport).sorted() == ["gift", "memfd"])
    }

    @Test("a progress line (bytes and rate) on a terminal only: `script` gives the sender a pty; through a pipe stderr stays empty")
    func progressOnTerminalOnly() throws {
        guard FileManager.default.isExecutableFile(atPath: "/usr/bin/script") else {
            print("skipped: /usr/bin/script (util-linux) is missing, no pty to test on"); return
        }
        let quiet = try ReceiverChild()
        let piped = try BatonProcess(["agent", "send", "--socket", quiet.socket, "--size", "64MiB", "--transport", "gift"]).finish()
        #expect(piped.status == 0, "\(piped.stderr)")
        #expect(piped.stderr.isEmpty, "progress went to a pipe: \(piped.stderr)")
        #expect(quiet.finish().stderr.isEmpty)
        let receiver = try ReceiverChild()
        let command = [BatonProcess.executablePath, "agent", "send", "--socket", receiver.socket, "--size", "512MiB", "--transport", "copy"].joined(separator: " ")
        let onTerminal = try Spawn.run("/usr/bin/script", ["-qec", command, "/dev/null"])
        #expect(onTerminal.status == 0, "\(onTerminal.output)")
        #expect(receiver.finish().status == 0)
        #expect(onTerminal.output.contains("\r\u{1B}[Ksent "), "no progress line on the pty: \(onTerminal.output.prefix(300))")
        #expect(onTerminal.output.contains("of 512MiB"))
        // The line is cleared before the report, so the JSON starts on a clean line.
        #expect(onTerminal.output.contains("\r\u{1B}[K{\"bytes\":536870912"), "\(onTerminal.output.suffix(300))")
    }

    @Test("bench transfer shows its run and bytes moved on a terminal only; through a pipe stderr stays empty")
    func benchProgressOnTerminalOnly() throws {
        guard FileManager.default.isExecutableFile(atPath: "/usr/bin/script") else {
            print("skipped: /usr/bin/script (util-linux) is missing, no pty to test on"); return
        }
        let arguments = ["bench", "transfer", "--size", "256MiB", "--runs", "2", "--transports", "copy", "--lanes", "1"]
        let piped = try BatonProcess(arguments).finish()
        #expect(piped.status == 0, "\(piped.stderr)")
        #expect(piped.stderr.isEmpty, "progress went to a pipe: \(piped.stderr)")
        #expect(piped.stdout.contains("copy      256MiB"), "\(piped.stdout)")
        let onTerminal = try Spawn.run("/usr/bin/script", ["-qec", ([BatonProcess.executablePath] + arguments).joined(separator: " "), "/dev/null"])
        #expect(onTerminal.status == 0, "\(onTerminal.output)")
        #expect(onTerminal.output.contains("\r\u{1B}[Kbench: copy run 1/2"), "\(onTerminal.output.prefix(400))")
        #expect(onTerminal.output.contains(" of 256MiB"), "\(onTerminal.output.prefix(400))")
    }
}
