import ArgumentParser
import BatonAgent
import BatonCore
import BatonSystem
import BatonHarness
import BatonTransfer
import Foundation
import Glibc

/// The two agents as standalone processes, for two-process tests, `baton bench` and
/// debugging. A hypervisor embeds the same agents in-process.
struct AgentCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "agent",
        abstract: "Run one side of a handoff as its own process (tests, benchmarks, debugging).",
        subcommands: [Receive.self, Send.self])

    struct Receive: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Listen on a socket and receive one handoff (new-instance agent).")

        @Option(help: "Unix socket path to listen on (created 0600).")
        var socket: String

        @Option(help: "After commit, check every byte against the test pattern with this seed (Docs/PROTOCOL.md §11); a mismatch exits 4.")
        var seed: UInt64?

        @Option(help: "Seconds without progress before the peer counts as stalled.")
        var timeout: Double = 10

        @Flag(help: "Accept a sender that sends no chunk checksums (`baton bench transfer --transports gift+unchecked`); needs --seed, which then checks every byte.")
        var acceptUnchecked = false

        func validate() throws {
            if acceptUnchecked && seed == nil { throw ValidationError("--accept-unchecked needs --seed: without chunk checksums the pattern check is the only one") }
        }

        func run() throws {
            var outcome = ReceiverOutcome()
            var failure: Error?
            let listener = try UnixListener(path: socket)
            defer { listener.remove() }
            do {
                let connection = AgentConnection(socket: try listener.accept(timeoutSeconds: timeout))
                let agent = NewInstanceAgent(connection: connection, stallTimeoutSeconds: timeout, acceptsUnchecked: acceptUnchecked)
                let line = ProgressLine(), rate = RateMeter(), received = agent.progress
                line.tick { rate.describe(bytes: received.bytesMoved, of: nil, verb: "received") }
                defer { line.finish() }  // before the JSON below: it clears the line it is on
                let regions = try agent.receive()
                // Peak before the pattern check below touches every byte again.
                outcome.peakRssBytes = Host.statusBytes("VmHWM") ?? 0
                outcome.committed = true
                outcome.bytes = regions.reduce(0) { $0 + $1.region.length }
                if let seed {
                    outcome.patternChecked = true
                    for d in regions where outcome.patternMismatchOffset == nil {
                        outcome.patternMismatchOffset = TestPattern.firstMismatch(d.base, count: Int(d.region.length), seed: seed,
                                                                                  firstWord: d.region.guestAddress / 8)
                            .map { Int(d.region.guestAddress) + $0 }
                    }
                }
            } catch {
                outcome.error = "\(error)"
                failure = error
            }
            if outcome.peakRssBytes == 0 { outcome.peakRssBytes = Host.statusBytes("VmHWM") ?? 0 }
            printJSON(outcome)
            if let failure {
                throw fail("\(failure)", BatonExit.forHandoffFailure(failure))
            }
            if let offset = outcome.patternMismatchOffset {
                throw fail("committed, but the bytes differ from the test pattern (seed \(seed ?? 0)) at guest address 0x\(String(offset, radix: 16))", .integrity)
            }
        }
    }

    struct Send: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Fill a test region and hand it to a receiver (old-instance agent).")

        @Option(help: "Receiver's Unix socket.")
        var socket: String

        @Option(help: "Region size (e.g. 256MiB).")
        var size: String = "64MiB"

        @Option(help: "gift | memfd | copy | auto")
        var transport: TransportChoice = .auto

        @Flag(help: "Back the region with a memfd (needed for the memfd transport).")
        var memfd = false

        @Option(help: "Test pattern seed.")
        var seed: UInt64 = 1

        @Flag(help: "Free each chunk once handed over (gift/pipe-copy): host memory stays at RAM + window.")
        var releaseSource = false

        @Flag(help: "With --transport gift on a kernel that refuses vmsplice(SPLICE_F_GIFT): fail instead of streaming by pipe copy.")
        var strict = false

        @Option(help: "Seconds without progress before the peer counts as stalled.")
        var timeout: Double = 10

        func run() throws {
            let bytes = try parseSize(size, option: "--size")
            let mapping = memfd ? try MemoryMapping.memfd(name: "baton-agent", length: bytes) : try MemoryMapping.anonymous(length: bytes)
            TestPattern.fill(mapping.base, count: bytes, seed: seed)
            var options = HandoffOptions()
            options.transport = transport
            options.stallTimeoutSeconds = timeout
            options.releaseSource = releaseSource
            options.strict = strict
            let progress = TransferProgress()
            options.progress = progress
            let line = ProgressLine(), rate = RateMeter()
            line.tick { rate.describe(bytes: progress.bytesMoved, of: bytes, verb: "sent") }
            do {
                let connection = AgentConnection(socket: try UnixSocket.connect(path: socket))
                let pending = try OldInstanceAgent(connection: connection, options: options)
                    .handOff([SourceRegion(id: 0, guestAddress: 0, mapping: mapping)])
                try pending.commit()
                line.finish()
                for notice in pending.report.notices { FileHandle.standardError.write(Data("baton: notice: \(notice)\n".utf8)) }
                printJSON(pending.report)
            } catch {
                line.finish()
                throw fail("\(error)", BatonExit.forHandoffFailure(error))
            }
        }
    }
}

extension TransportChoice: ExpressibleByArgument {}
