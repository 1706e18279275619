import ArgumentParser
import BatonCore
import BatonHarness
import BatonQEMU
import BatonSystem
import Foundation
import Glibc

struct HarnessCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "harness",
        abstract: "Run upgrade scenarios against real batonvmm processes, or (--hypervisor qemu) real libvirt QEMU domains with the test guest: fault matrix, concurrency, downtime by size.")

    @Option(help: "batonvmm (the reference VMM) or qemu (libvirt QEMU domains: needs libvirtd, both QEMUs and the test guest).")
    var hypervisor: String = "batonvmm"

    @Option(help: "Faults to inject: 'all', 'none', or comma-separated names (see Docs/FAULTS.md).")
    var faults: String?

    @Option(help: "Transports for the fault matrix and downtime runs.")
    var transports: String = "memfd,gift,copy"

    @Option(help: "Guest RAM for fault and concurrent cases.")
    var ram: String = "64MiB"

    @Option(help: "Upgrade this many VMs at the same time; all must end verified.")
    var concurrent: Int?

    @Option(help: "Comma-separated RAM sizes: downtime min/median/max per size and transport, and the SVG chart.")
    var sizes: String?

    @Option(help: "Clean upgrades per size and transport for --sizes.")
    var runs: Int = 3

    @Option(name: .customLong("random-kills"), help: "This many upgrades through real `baton upgrade` processes, each with a SIGKILL of the controller, the old or the new instance at a random instant (round-robin over --transports and in-place), then `baton recover`.")
    var randomKills: Int?

    @Option(help: "Seed for --random-kills (printed in the report; the same seed replays the same kills).")
    var seed: UInt64?

    @Option(help: "Where the Markdown report and SVG charts go.")
    var reportDirectory: String = "harness-report"

    @Flag(help: "Print one JSON object at the end.")
    var json = false

    func validate() throws {
        guard faults != nil || concurrent != nil || sizes != nil || randomKills != nil else {
            throw ValidationError("give --faults, --concurrent, --sizes or --random-kills")
        }
        if let randomKills, !(1...10_000).contains(randomKills) { throw ValidationError("--random-kills must be 1...10000") }
        if randomKills != nil, hypervisor == "qemu" { throw ValidationError("--random-kills: batonvmm only for now (the QEMU matrix kills at every phase boundary)") }
        guard ["batonvmm", "qemu"].contains(hypervisor) else { throw ValidationError("--hypervisor: '\(hypervisor)' is not batonvmm or qemu") }
        if hypervisor == "qemu", sizes != nil { throw ValidationError("--sizes: downtime by size is `baton bench qemu` for QEMU") }
        if let faults, faults != "all", faults != "none" {
            let names = hypervisor == "qemu" ? QEMUHarnessFault.all.map(\.name) : HarnessFault.all.map(\.name)
            for f in faults.split(separator: ",") where !names.contains(String(f)) {
                throw ValidationError("--faults: unknown fault '\(f)' (known: \(names.joined(separator: ", ")))")
            }
        }
        if let concurrent, !(1...64).contains(concurrent) { throw ValidationError("--concurrent must be 1...64") }
    }

    func run() throws {
        if hypervisor == "qemu" { return try runQEMU() }
        let vmm = Executable.besideThisProcess("batonvmm")
        let work = try BatonProcess.makeRunDirectory("harness")
        defer { try? FileManager.default.removeItem(atPath: work) }
        var harness = Harness(batonvmm: vmm, workDirectory: work)
        let ramBytes = try parseSize(ram, option: "--ram")
        let transportList = transports.split(separator: ",").map(String.init)
        let selected = faults.map { f in f == "all" ? HarnessFault.all : HarnessFault.all.filter { f.split(separator: ",").map(String.init).contains($0.name) } } ?? []
        let sizeList = try sizes.map { try $0.split(separator: ",").map { try parseSize(String($0), option: "--sizes") } } ?? []
        let killModes = transportList + ["in-place"]
        let counter = CaseCounter(total: selected.reduce(0) { n, f in n + transportList.filter(f.applies).count } + (concurrent ?? 0)
                                  + sizeList.count * transportList.count * runs + (randomKills.map { $0 + 2 * killModes.count } ?? 0), json: json)
        harness.progress = counter.note
        harness.caseDone = counter.done
        defer { counter.line.finish() }
        var report = HarnessReport()
        if !selected.isEmpty {
            report.cases += harness.faultMatrix(selected, transports: transportList, ramBytes: ramBytes)
        }
        if let concurrent {
            report.concurrent = concurrent
            let results = harness.concurrent(concurrent, transport: transportList.first ?? "memfd", ramBytes: ramBytes)
            results.forEach(counter.done)
            report.cases += results
        }
        if !sizeList.isEmpty {
            report.downtime = harness.downtime(sizes: sizeList, transports: transportList, runs: runs)
        }
        if let randomKills {
            let seed = self.seed ?? UInt64.random(in: 0...UInt64(UInt32.max))
            counter.note("harness: random kills, seed \(seed) (replay with --seed \(seed))")
            var campaign = RandomKillCampaign(batonvmm: vmm, workDirectory: work, seed: seed)
            campaign.ramBytes = ramBytes
            campaign.progress = counter.note
            campaign.caseDone = counter.done
            report.cases += campaign.run(count: randomKills, modes: killModes)
            report.seed = seed
        }
        counter.line.finish()  // before the summary: it clears the line it is on
        try finish(report)
    }

    /// The QEMU matrix and batch on real libvirt domains.
    func runQEMU() throws {
        let work = try BatonProcess.makeRunDirectory("harness-qemu")
        defer { try? FileManager.default.removeItem(atPath: work) }
        var harness = QEMUHarness(baton: try FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe"), workDirectory: work)
        if let why = harness.unavailableReason { throw fail("harness --hypervisor qemu cannot run here: \(why)", .checkFailed) }
        let selected = faults.flatMap { f in f == "none" ? nil : f == "all" ? QEMUHarnessFault.all : QEMUHarnessFault.all.filter { f.split(separator: ",").map(String.init).contains($0.name) } } ?? []
        let counter = CaseCounter(total: selected.reduce(0) { $0 + ($1.batch ? 2 : 1) } + (concurrent ?? 0), json: json)
        harness.progress = counter.note
        harness.caseDone = counter.done
        defer { counter.line.finish() }
        var report = HarnessReport()
        if !selected.isEmpty {
            report.cases += harness.faultMatrix(selected)
        }
        if let concurrent {
            report.concurrent = concurrent
            let results = harness.concurrent(concurrent, ramMiB: try parseSize(ram, option: "--ram") >> 20)
            results.forEach(counter.done)
            report.cases += results
        }
        counter.line.finish()  // before the summary: it clears the line it is on
        try finish(report)
    }

    func finish(_ report: HarnessReport) throws {
        var report = report
        report.summarize()
        try FileManager.default.createDirectory(atPath: reportDirectory, withIntermediateDirectories: true)
        let command = CommandLine.arguments.joined(separator: " ")
        try HarnessCharts.markdown(report, command: command).write(toFile: reportDirectory + "/REPORT.md", atomically: true, encoding: .utf8)
        if !report.cases.isEmpty { try HarnessCharts.faultGrid(report.cases).write(toFile: reportDirectory + "/faults.svg", atomically: true, encoding: .utf8) }
        if !report.downtime.isEmpty { try HarnessCharts.downtimeChart(report.downtime).write(toFile: reportDirectory + "/downtime.svg", atomically: true, encoding: .utf8) }
        if json {
            printJSON(report)
        } else {
            let s = report.summary
            print("harness: \(s.passed)/\(s.total) passed, lost \(s.lost) (unexpected \(s.unexpectedLoss)), split brain \(s.splitBrain); report in \(reportDirectory)/REPORT.md")
            for r in report.downtime {
                print("  downtime \(r.transport) \(ByteSize(r.ramBytes)): " + String(format: "%.2f / %.2f / %.2f ms", r.downtimeMs.min, r.downtimeMs.median, r.downtimeMs.max))
            }
        }
        if report.summary.passed != report.summary.total || report.summary.unexpectedLoss > 0 || report.summary.splitBrain > 0 {
            throw BatonExit.failure.code
        }
    }
}

/// The harness's progress: its lines (never with --json) and, on a terminal, a status line
/// under them with cases done and failed.
final class CaseCounter: @unchecked Sendable {
    let line: ProgressLine
    let total: Int
    let json: Bool
    private let lock = NSLock()
    private var finished = 0, failed = 0

    init(total: Int, json: Bool) {
        self.total = total
        self.json = json
        line = ProgressLine(json: json)
    }

    func note(_ text: String) {
        guard !json else { return }
        line.note(text)
        redraw()
    }

    func done(_ result: CaseResult) {
        lock.lock()
        finished += 1
        if !result.passed { failed += 1 }
        lock.unlock()
        redraw()
    }

    private func redraw() {
        lock.lock(); let (n, f) = (finished, failed); lock.unlock()
        line.show("harness: \(n)/\(total) cases done, \(f) failed")
    }
}
