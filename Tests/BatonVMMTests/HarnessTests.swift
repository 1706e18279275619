import BatonHarness
import Foundation
import Testing

@Suite("Harness on real batonvmm processes")
struct HarnessTests {
    @Test("a slice of the fault matrix: every case ends with exactly one instance running the guest, continued exactly")
    func faultSlice() throws {
        let work = try BatonProcess.makeRunDirectory("harness-test")
        defer { try? FileManager.default.removeItem(atPath: work) }
        let names = ["none", "kill-new-after:paused", "crash-controller-after:committing", "corrupt-chunk:3", "new-binary-crashes-on-start"]
        let faults = HarnessFault.all.filter { names.contains($0.name) }
        #expect(faults.count == names.count)
        var report = HarnessReport()
        report.cases = Harness(batonvmm: batonvmmPath, workDirectory: work).faultMatrix(faults, transports: ["memfd", "gift"], ramBytes: 64 << 20)
        report.summarize()
        #expect(report.summary.total == 10)
        for c in report.cases {
            #expect(c.passed, "\(c.fault) × \(c.transport): \(c.outcome.rawValue), verified \(c.verified), instances \(c.instancesRunning), fired \(c.faultFired): \(c.detail)")
        }
        #expect(report.summary.unexpectedLoss == 0 && report.summary.splitBrain == 0)
        #expect(report.cases.first { $0.fault == "crash-controller-after:committing" }?.outcome == .committed)
        #expect(report.cases.first { $0.fault == "corrupt-chunk:3" }?.outcome == .rolledBack)
        let svg = HarnessCharts.faultGrid(report.cases)
        #expect(svg.hasPrefix("<svg") && svg.contains("corrupt-chunk:3"))
    }
}
