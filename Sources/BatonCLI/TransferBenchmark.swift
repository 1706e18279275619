import BatonAgent
import BatonCore
import BatonSystem
import BatonHarness
import BatonTransfer
import Foundation
import Glibc

public struct BenchResult: Codable, Sendable {
    public let transport: String
    public let bytes: Int
    public let runs: Int
    public let seconds: Spread
    public let gibPerSecond: Double
    /// Median memcpy time / median time of this path, measured in the same run.
    public let ratioToMemcpy: Double
    /// Largest combined resident memory of both processes sampled every 1 ms during the runs
    /// (shared memfd frames counted once).
    public let peakRssBytes: Int
    public let peakRssOverGuestBytes: Int
    /// Sum of both processes' VmHWM: an upper bound (their peaks need not coincide).
    public let peakRssUpperBoundBytes: Int
    /// Bytes the pipes can hold in flight (lanes × capacity): held by the kernel, in no RSS.
    public let inFlightWindowBytes: Int
    public let pagesMoved: Bool
    public let pageDisposition: String
    public let verified: Bool
    public let lanes: Int
    public let pipeCapacity: Int
    public let note: String
}

public struct BenchReport: Codable, Sendable {
    public let host: String
    public let kernel: String
    public let command: String
    public let results: [BenchResult]
}

/// Every transport side by side with a memcpy of the same size, in one run, between two
/// real processes (this one sends; a spawned `baton agent receive` receives and checks
/// every byte against the pattern after commit).
public struct TransferBenchmark {
    public var sizes: [Int]
    public var runs: Int
    /// What to measure: a transport, optionally with the sender releasing its pages, or with
    /// no chunk checksums (`+unchecked`: the integrity-off figure; the receiver's check of every
    /// byte against the pattern, after the timer, still runs).
    public struct Variant: Sendable, CustomStringConvertible {
        public let transport: TransportChoice
        public let releaseSource: Bool
        public let unchecked: Bool
        public init(_ transport: TransportChoice, releaseSource: Bool = false, unchecked: Bool = false) {
            self.transport = transport
            self.releaseSource = releaseSource
            self.unchecked = unchecked
        }
        /// `gift`, `memfd`, `copy`, `auto`, each optionally with `+release` and/or `+unchecked`.
        public init?(parsing text: String) {
            let parts = text.split(separator: "+").map(String.init)
            let modifiers = Set(parts.dropFirst())
            guard let first = parts.first, let t = TransportChoice(rawValue: first), modifiers.count == parts.count - 1,
                  modifiers.isSubset(of: ["release", "unchecked"]) else { return nil }
            self.init(t, releaseSource: modifiers.contains("release"), unchecked: modifiers.contains("unchecked"))
        }
        public var description: String { transport.rawValue + (releaseSource ? "+release" : "") + (unchecked ? "+unchecked" : "") }
    }

    public var transports: [Variant]
    public var options: HandoffOptions
    /// Told as each run starts: what it is, and the counter of the bytes it moves.
    public var progress: (_ run: String, _ moved: TransferProgress, _ of: Int) -> Void = { _, _, _ in }

    public func run() throws -> BenchReport {
        var results: [BenchResult] = []
        for size in sizes {
            let memcpyTimes = try measureMemcpy(size: size)
            let memcpyMedian = Spread(memcpyTimes).median
            results.append(BenchResult(transport: "memcpy", bytes: size, runs: memcpyTimes.count, seconds: Spread(memcpyTimes),
                                       gibPerSecond: gib(size, memcpyMedian), ratioToMemcpy: 1, peakRssBytes: 0, peakRssOverGuestBytes: 0,
                                       peakRssUpperBoundBytes: 0, inFlightWindowBytes: 0,
                                       pagesMoved: false, pageDisposition: "copied", verified: true, lanes: 1, pipeCapacity: 0,
                                       note: "single-threaded memcpy into a pre-faulted THP destination, same process"))
            for transport in transports {
                results.append(try measure(transport, size: size, memcpyMedian: memcpyMedian))
            }
        }
        var u = utsname()
        uname(&u)
        let release = withUnsafeBytes(of: u.release) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
        return BenchReport(host: ProcessInfo.processInfo.hostName, kernel: release,
                           command: CommandLine.arguments.joined(separator: " "), results: results)
    }

    func gib(_ bytes: Int, _ seconds: Double) -> Double { seconds > 0 ? Double(bytes) / Double(1 << 30) / seconds : 0 }

    func measureMemcpy(size: Int) throws -> [Double] {
        let src = try MemoryMapping.anonymous(length: size)
        let dst = try MemoryMapping.anonymous(length: size)
        for m in [src, dst] { m.adviseHugePages(); m.prefault(pageSize: Host.pageSize) }
        TestPattern.fill(src.base, count: size, seed: 7)
        var times: [Double] = []
        for _ in 0..<runs {
            let t0 = Host.monotonicNanoseconds()
            memcpy(dst.base, src.base, size)
            times.append(Double(Host.monotonicNanoseconds() - t0) / 1e9)
        }
        guard memcmp(dst.base, src.base, size) == 0 else { throw BenchError("memcpy baseline produced different bytes") }
        return times
    }

    struct BenchError: Error, CustomStringConvertible {
        let description: String
        init(_ d: String) { description = d }
    }

    func measure(_ variant: Variant, size: Int, memcpyMedian: Double) throws -> BenchResult {
        let transport = variant.transport
        let seed: UInt64 = 0xBA70_0000 + UInt64(size)
        let mapping = transport == .memfd ? try MemoryMapping.memfd(name: "baton-bench", length: size) : try MemoryMapping.anonymous(length: size)
        mapping.adviseHugePages()
        TestPattern.fill(mapping.base, count: size, seed: seed)
        let dir = try BatonProcess.makeRunDirectory("bench")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        var times: [Double] = []
        var peak = 0
        var sampledPeak = 0
        var verified = true
        var last: TransferReport?
        for run in 0..<runs {
            let moved = TransferProgress()
            progress("\(variant) run \(run + 1)/\(runs)", moved, size)
            let socket = "\(dir)/agent-\(run).sock"
            let receiver = try BatonProcess(["agent", "receive", "--socket", socket, "--seed", "\(seed)"] + (variant.unchecked ? ["--accept-unchecked"] : []))
            guard BatonProcess.waitForPath(socket) else {
                receiver.kill()
                throw BenchError("receiver did not listen on \(socket): \(receiver.finish().stderr)")
            }
            var options = self.options
            options.transport = transport
            options.progress = moved
            options.releaseSource = variant.releaseSource
            options.unchecked = variant.unchecked
            if variant.releaseSource && run > 0 { TestPattern.fill(mapping.base, count: size, seed: seed) }  // the last run freed it
            Host.resetPeakRSS()
            let sampler = RSSSampler(peerPID: receiver.pid, sharedFrames: transport == .memfd)
            sampler.start()
            let connection = AgentConnection(socket: try UnixSocket.connect(path: socket))
            let pending = try OldInstanceAgent(connection: connection, options: options)
                .handOff([SourceRegion(id: 0, guestAddress: 0, mapping: mapping)])
            try pending.commit()
            sampledPeak = max(sampledPeak, sampler.finish())
            let senderPeak = Host.statusBytes("VmHWM") ?? 0
            let done = receiver.finish()
            guard done.status == 0, let outcome = ReceiverOutcome.parse(done.stdout) else {
                throw BenchError("receiver failed (\(done.status)): \(done.stderr)")
            }
            verified = verified && pending.report.verified && outcome.patternChecked && outcome.patternMismatchOffset == nil
            peak = max(peak, senderPeak + outcome.peakRssBytes)
            times.append(pending.report.transferAndVerifySeconds)
            last = pending.report
        }
        let spread = Spread(times)
        let report = last!
        let disposition = Set(report.regions.map(\.pages.rawValue)).sorted().joined(separator: ",")
        let kinds = Set(report.regions.map(\.transport)).sorted().joined(separator: ",")
        return BenchResult(transport: variant.description, bytes: size, runs: runs, seconds: spread,
                           gibPerSecond: gib(size, spread.median), ratioToMemcpy: spread.median > 0 ? memcpyMedian / spread.median : 0,
                           peakRssBytes: sampledPeak, peakRssOverGuestBytes: sampledPeak - size, peakRssUpperBoundBytes: peak,
                           inFlightWindowBytes: report.lanes * report.pipeCapacity, pagesMoved: report.pagesMoved,
                           pageDisposition: disposition, verified: verified, lanes: report.lanes, pipeCapacity: report.pipeCapacity,
                           note: "\(kinds)\(report.releasedSource ? ", sender freed each chunk once piped (receiver writes a fresh memfd)" : ""); timed from transferBegin to the receiver's verified reply (\(variant.unchecked ? "no chunk checksums: every byte checked against the pattern after the timer" : "checksums on both sides included")); destination pre-faulted before the timer")
    }
}
