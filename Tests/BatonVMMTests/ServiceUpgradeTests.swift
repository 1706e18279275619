import BatonTestSupport
import BatonSystem
import Foundation
import Glibc
import Testing

@Suite("baton serve runs upgrades one per VM, different VMs concurrently")
struct ServiceUpgradeTests {
    @Test("same VM twice at once: one runs, one is refused; two VMs at once: both complete")
    func concurrency() throws {
        let dir = try BatonProcess.makeRunDirectory("svc")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let socket = dir + "/serve.sock"
        let serve = try BatonProcess(["serve", "--socket", socket, "--state", dir + "/state"])
        defer { serve.kill(SIGTERM); _ = serve.finish() }
        #expect(BatonProcess.waitForPath(socket))
        let a = try RunningVMM(ram: "256MiB", simulated: true)
        let b = try RunningVMM(ram: "64MiB", simulated: true)
        defer { a.stop(); b.stop() }
        let next = dir + "/batonvmm-next"
        try Executable.copy(from: batonvmmPath, to: next)
        func submit(_ vm: RunningVMM) throws -> BatonProcess {
            try BatonProcess(["upgrade", "--service", socket, "--vm", vm.socket, "--binary", next, "--transport", "gift"])
        }
        // Same VM, twice at once.
        let first = try submit(a)
        // Submit the second only once the service reports the first in flight (no timing guess).
        var inFlight = false
        for _ in 0..<200 where !inFlight {
            inFlight = (try? BatonProcess(["status", "--socket", socket, "--json"]).finish().stdout.replacingOccurrences(of: "\\/", with: "/").contains(a.socket)) ?? false
            if !inFlight { usleep(5_000) }
        }
        #expect(inFlight, "the first upgrade never showed as in flight")
        let second = try submit(a)
        let r1 = first.finish(), r2 = second.finish()
        let outcomes = [r1, r2].map { $0.status == 0 ? "ran" : ($0.stderr.contains("refused: an upgrade of \(a.socket) is already running") ? "refused" : "other: \($0.stderr)") }
        #expect(outcomes.sorted() == ["ran", "refused"], "\(outcomes)")
        // Two different VMs at once.
        let ua = try submit(a), ub = try submit(b)
        let da = ua.finish(), db = ub.finish()
        #expect(da.status == 0, "\(da.stderr)")
        #expect(db.status == 0, "\(db.stderr)")
        #expect(da.stdout.contains("verified yes") && db.stdout.contains("verified yes"))
        let status = try BatonProcess(["status", "--socket", socket, "--json"]).finish()
        #expect(status.stdout.contains("\"completed\":3"), "\(status.stdout)")
        #expect(status.stdout.contains("\"refused\":1"))
    }
}
