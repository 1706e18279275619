import BatonController
import BatonCore
import BatonSystem
import Foundation
import Glibc

/// Random-timing SIGKILLs: each case upgrades a fresh batonvmm through a real `baton upgrade`
/// process (two-process with each transport, or in place) and SIGKILLs the controller, the old
/// instance or the new one at a random instant of the upgrade; `baton recover` then finishes
/// whatever the journal left unfinished. The verdict is the fault matrix's: one instance runs
/// the guest, continued exactly, never two; a loss passes only where it is physics (the
/// instance that ran the guest was the one killed), never where Baton could have saved it.
public struct RandomKillCampaign {
    public enum Victim: String, CaseIterable, Sendable { case controller, old, new }

    public let batonvmm: String
    public let workDirectory: String
    public var seed: UInt64
    public var ramBytes = 64 << 20
    public var progress: (String) -> Void = { _ in }
    public var caseDone: (CaseResult) -> Void = { _ in }

    public init(batonvmm: String, workDirectory: String, seed: UInt64) {
        self.batonvmm = batonvmm
        self.workDirectory = workDirectory
        self.seed = seed
    }

    /// `count` kills, round-robin over `modes` (transports, and `in-place`); each lands uniformly
    /// in the mode's upgrade time, learnt from clean cases (the shortest seen). A case whose victim
    /// was not running at that instant (the new instance not started yet, the upgrade already
    /// over) is reported but does not count as a kill; attempts stop at 4 × count.
    public func run(count: Int, modes: [String]) -> [CaseResult] {
        var random = SplitMix64(seed: seed)
        var results: [CaseResult] = []
        var windows: [String: Double] = [:]
        for mode in modes {
            for _ in 0..<2 {
                progress("harness: random-kill calibration × \(mode)")
                let clean = runCase(mode: mode, victim: nil, delaySeconds: 0, index: results.count)
                windows[mode] = min(windows[mode] ?? .infinity, max(0.02, clean.seconds))
                report(clean.result, &results)
            }
        }
        var kills = 0, attempt = 0
        while kills < count && attempt < 4 * count {
            let mode = modes[attempt % modes.count]
            attempt += 1
            // In place there is one process: killing it is the VM crashing, not an upgrade fault.
            let victim = mode == "in-place" ? .controller : Victim.allCases[Int(random.next() % 3)]
            let delay = Double(random.next() % 1_000_000) / 1_000_000 * (windows[mode] ?? 0.5)
            progress(String(format: "harness: random-kill %@ at %.0f ms × %@", victim.rawValue, delay * 1000, mode))
            let r = runCase(mode: mode, victim: victim, delaySeconds: delay, index: results.count)
            if r.killed { kills += 1 } else if victim != .new { windows[mode] = min(windows[mode] ?? .infinity, max(0.02, r.seconds)) }
            report(r.result, &results)
        }
        return results
    }

    func report(_ r: CaseResult, _ results: inout [CaseResult]) {
        progress("  → \(r.outcome.rawValue), verified \(r.verified), instances \(r.instancesRunning)\(r.passed ? "" : "  FAILED: \(r.detail)")")
        caseDone(r)
        results.append(r)
    }

    /// One upgrade with (or without) one kill; returns the verdict and how long the upgrade took.
    func runCase(mode: String, victim: Victim?, delaySeconds: Double, index: Int) -> (result: CaseResult, seconds: Double, killed: Bool) {
        let name = victim.map { String(format: "random-kill:%@@%.0fms", $0.rawValue, delaySeconds * 1000) } ?? "random-kill:calibration"
        var fault = HarnessFault(name: name, expected: .committed)
        var harnessCase = HarnessCase(fault: fault, transport: mode, ramBytes: ramBytes, batonvmm: batonvmm, workDirectory: workDirectory)
        harnessCase.digest = false
        var result = CaseResult(fault: name, transport: mode, ramBytes: ramBytes, outcome: .lost, expectedLoss: false, verified: false,
                                instancesRunning: 0, splitBrain: false, downtimeMs: nil, seconds: 0, detail: "", expectedOutcome: .committed, faultFired: true)
        let started = Date()
        let dir = workDirectory + "/k\(index)"
        try? FileManager.default.removeItem(atPath: dir)
        try? FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o700])
        let socket = dir + "/vm.sock", journal = dir + "/journal.jsonl"
        let client = VMMClient(socketPath: socket, timeoutSeconds: 20)
        var pids: [Int32] = []
        var upgradeSeconds = 0.0
        var didKill = false
        defer {
            for pid in pids + [(try? client.status())?.pid ?? 0] where pid > 0 { kill(pid, SIGKILL); _ = Spawn.exitStatus(pid) }
        }
        do {
            let old = try Spawn.detached(batonvmm, ["--ram", "\(ramBytes)", "--control", socket], logPath: dir + "/old.log")
            pids.append(old)
            guard BatonProcess.waitForPath(socket, timeoutSeconds: 15), let before = client.nextBeat(after: 0, timeout: 15) else {
                result.detail = "the old instance never ran the guest"
                return (result, 0, false)
            }
            var args = ["upgrade", "--vm", socket, "--binary", try harnessCase.newBinary(in: dir), "--journal", journal,
                        "--run-directory", dir + "/run", "--timeout", "15", "--json"]
            args += mode == "in-place" ? ["--in-place"] : ["--transport", mode]
            let t0 = Date()
            let controller = try BatonProcess(args)
            var killedAt: UInt64?
            var killed: Int32 = 0
            if let victim {
                usleep(UInt32(delaySeconds * 1_000_000))
                let entries = (try? UpgradeJournal.read(path: journal)) ?? []
                killed = switch victim {
                case .controller: controller.pid
                case .old: old
                case .new: entries.compactMap(\.newPid).last ?? 0  // 0: not started yet, nothing to kill
                }
                if killed > 0, Host.isAlive(killed) {
                    kill(killed, SIGKILL)
                    killedAt = Host.monotonicNanoseconds()
                    didKill = true
                } else {
                    killed = 0
                }
            }
            let finished = controller.finish()
            upgradeSeconds = Date().timeIntervalSince(t0)
            var detail = "upgrade exit \(finished.status): \(finished.stderr.split(separator: "\n").last ?? "")"
            if killed > 0 { detail = "SIGKILL \(victim!.rawValue) (pid \(killed)); " + detail }
            else if victim != nil { detail = "\(victim!.rawValue) not running at that instant: nothing killed; " + detail }
            // Whatever the journal left unfinished, recovery finishes (as an operator would).
            if FileManager.default.fileExists(atPath: journal), finished.status != 0 {
                let recovered = try BatonProcess(["recover", "--journal", journal]).finish()
                detail += "; baton recover exit \(recovered.status): \((recovered.stdout + recovered.stderr).split(separator: "\n").last ?? "")"
            }
            let entries = (try? UpgradeJournal.read(path: journal)) ?? []
            pids += entries.compactMap(\.newPid)
            // A loss is physics only if the killed process was the one running the guest: the old
            // instance before the pause took effect, the new one after it was committed.
            let phases = Set(entries.map(\.phase))
            let physics = killedAt != nil && killed > 0 && ((victim == .old && !phases.contains(.paused)) || (victim == .new && phases.contains(.committed)))
            fault.lossExpectedFor = physics ? [mode] : []
            harnessCase = HarnessCase(fault: fault, transport: mode, ramBytes: ramBytes, batonvmm: batonvmm, workDirectory: workDirectory)
            result.detail = detail
            result = harnessCase.evaluate(&result, client: client, before: before, pids: pids, digestsAgree: true)
            // In place the pid stays: the image generation says which binary runs the guest.
            if mode == "in-place", result.outcome == .rolledBack, ((try? client.status())?.execGeneration ?? 0) > 0 { result.outcome = .committed }
            // Back or forward are both right after a kill; which one is reported, not prescribed.
            if result.outcome != .lost { result.expectedOutcome = result.outcome }
        } catch {
            result.detail = "harness: \(error)"
        }
        result.seconds = Date().timeIntervalSince(started)
        return (result, upgradeSeconds, didKill)
    }
}
