import BatonController
import BatonCore
import BatonSystem
import Foundation
import Glibc

public struct HarnessSummary: Codable, Sendable {
    public init(total: Int = 0, passed: Int = 0, lost: Int = 0, unexpectedLoss: Int = 0, splitBrain: Int = 0) {
        self.total = total
        self.passed = passed
        self.lost = lost
        self.unexpectedLoss = unexpectedLoss
        self.splitBrain = splitBrain
    }
    public var total = 0
    public var passed = 0
    public var lost = 0
    public var unexpectedLoss = 0
    public var splitBrain = 0
}

public struct DowntimeRow: Codable, Sendable {
    public let transport: String
    public let ramBytes: Int
    public let runs: Int
    public let downtimeMs: Spread
    public let allVerified: Bool
}

public struct HarnessReport: Codable, Sendable {
    public var cases: [CaseResult] = []
    public var summary = HarnessSummary()
    public var downtime: [DowntimeRow] = []
    public var concurrent: Int?
    /// The seed of a random-kill campaign (the same seed replays the same kills).
    public var seed: UInt64?

    public init() {}

    public mutating func summarize() {
        summary = HarnessSummary(total: cases.count, passed: cases.filter(\.passed).count,
                                 lost: cases.filter { $0.outcome == .lost }.count,
                                 unexpectedLoss: cases.filter { $0.outcome == .lost && !$0.expectedLoss }.count,
                                 splitBrain: cases.filter(\.splitBrain).count)
    }
}

/// Runs scenarios: the fault matrix, concurrent upgrades, downtime by RAM size.
public struct Harness {
    public var batonvmm: String
    public var workDirectory: String
    public var progress: (String) -> Void = { _ in }
    /// Told of each case as it ends (the command's progress line counts them).
    public var caseDone: (CaseResult) -> Void = { _ in }

    public init(batonvmm: String, workDirectory: String) {
        self.batonvmm = batonvmm
        self.workDirectory = workDirectory
    }

    public func faultMatrix(_ faults: [HarnessFault], transports: [String], ramBytes: Int) -> [CaseResult] {
        var results: [CaseResult] = []
        for fault in faults {
            for transport in transports where fault.applies(to: transport) {
                progress("harness: \(fault.name) × \(transport)")
                let r = HarnessCase(fault: fault, transport: transport, ramBytes: ramBytes, batonvmm: batonvmm, workDirectory: workDirectory).run()
                progress("  → \(r.outcome.rawValue), verified \(r.verified), instances \(r.instancesRunning)\(r.passed ? "" : "  FAILED: \(r.detail)")")
                caseDone(r)
                results.append(r)
            }
        }
        return results
    }

    /// `count` VMs upgraded at the same time (one thread each); every one must end verified.
    public func concurrent(_ count: Int, transport: String, ramBytes: Int) -> [CaseResult] {
        final class Box: @unchecked Sendable {
            var results: [CaseResult?]
            let lock = NSLock()
            init(results: [CaseResult?]) { self.results = results }
        }
        let box = Box(results: Array(repeating: nil, count: count))
        let group = DispatchGroup()
        let (vmm, work) = (batonvmm, workDirectory)
        let shared = workDirectory + "/batonvmm-next"
        try? Executable.copy(from: batonvmm, to: shared)
        for i in 0..<count {
            group.enter()
            Thread {
                let c = HarnessCase(fault: HarnessFault(name: "concurrent-\(i)", expected: .committed, evidence: "verified yes"),
                                    transport: transport, ramBytes: ramBytes, batonvmm: vmm, workDirectory: work, newBinaryPath: shared)
                let r = c.run()
                box.lock.lock(); box.results[i] = r; box.lock.unlock()
                group.leave()
            }.start()
        }
        group.wait()
        return box.results.compactMap { $0 }
    }

    /// Repeated clean upgrades per size and transport, for the downtime chart.
    public func downtime(sizes: [Int], transports: [String], runs: Int) -> [DowntimeRow] {
        var rows: [DowntimeRow] = []
        for size in sizes {
            for transport in transports {
                var times: [Double] = []
                var verified = true
                for i in 0..<runs {
                    progress("harness: downtime \(transport) \(ByteSize(size)) run \(i + 1)/\(runs)")
                    var c = HarnessCase(fault: HarnessFault(name: "downtime-\(i)", expected: .committed, evidence: "verified yes"), transport: transport, ramBytes: size,
                                        batonvmm: batonvmm, workDirectory: workDirectory)
                    c.digest = false
                    let r = c.run()
                    if !r.passed { progress("  case failed: \(r.detail)") }
                    caseDone(r)
                    verified = verified && r.passed
                    if let d = r.downtimeMs { times.append(d) }
                }
                rows.append(DowntimeRow(transport: transport, ramBytes: size, runs: runs, downtimeMs: Spread(times), allVerified: verified))
            }
        }
        return rows
    }
}
