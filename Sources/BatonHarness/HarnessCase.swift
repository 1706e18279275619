import BatonController
import BatonCore
import BatonSystem
import BatonVMM
import Foundation
import Glibc

/// How a case ended. `lost` means no instance holds a good copy of the guest any more.
public enum CaseOutcome: String, Codable, Sendable {
    case committed, rolledBack, lost
}

public struct CaseResult: Codable, Sendable {
    public var fault: String
    public var transport: String
    public var ramBytes: Int
    public var outcome: CaseOutcome
    /// True only where physics allows the loss (documented in Docs/FAULTS.md).
    public var expectedLoss: Bool
    /// The guest continued exactly (independent model), counters monotonic, digests equal when measured.
    public var verified: Bool
    public var instancesRunning: Int
    public var splitBrain: Bool
    public var downtimeMs: Double?
    public var seconds: Double
    public var detail: String
    public var expectedOutcome: CaseOutcome
    /// The fault demonstrably fired: its evidence text appears in the outcome.
    public var faultFired: Bool
    public var passed: Bool {
        if outcome == .lost { return expectedLoss && instancesRunning == 0 && faultFired }
        return verified && instancesRunning == 1 && !splitBrain && outcome == expectedOutcome && faultFired
    }
}

/// Runs one scenario: a fresh batonvmm, one upgrade with one fault, then the verdict.
public struct HarnessCase {
    public let fault: HarnessFault
    public let transport: String
    public let ramBytes: Int
    public let batonvmm: String
    public let workDirectory: String
    /// A ready new binary shared by concurrent cases (copying it per case races with forks).
    public var newBinaryPath: String?
    /// Digest all guest RAM at pause and before resume (fault cases); off for downtime runs,
    /// where it would add two full passes over RAM to the figure being measured.
    public var digest = true

    public init(fault: HarnessFault, transport: String, ramBytes: Int, batonvmm: String, workDirectory: String, newBinaryPath: String? = nil) {
        self.newBinaryPath = newBinaryPath
        self.fault = fault
        self.transport = transport
        self.ramBytes = ramBytes
        self.batonvmm = batonvmm
        self.workDirectory = workDirectory
    }

    func status(_ client: VMMClient) -> VMStatus? { try? client.status() }

    func waitBeat(_ client: VMMClient, after counter: UInt64, timeout: Double = 8) -> GuestBeat? {
        client.nextBeat(after: counter, timeout: timeout)
    }

    public func run() -> CaseResult {
        let started = Date()
        var result = CaseResult(fault: fault.name, transport: transport, ramBytes: ramBytes, outcome: .lost, expectedLoss: false,
                                verified: false, instancesRunning: 0, splitBrain: false, downtimeMs: nil, seconds: 0, detail: "",
                                expectedOutcome: fault.expected, faultFired: false)
        // Short: Unix socket paths are limited to 107 bytes.
        let dir = workDirectory + "/c\(abs(("\(fault.name)/\(transport)/\(ramBytes)").hashValue) % 1_000_000)"
        try? FileManager.default.removeItem(atPath: dir)
        try? FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o700])
        let socket = dir + "/vm.sock"
        let client = VMMClient(socketPath: socket, timeoutSeconds: 20)
        var pids: [Int32] = []
        defer {
            for pid in pids + [status(client)?.pid ?? 0] where pid > 0 { kill(pid, SIGKILL); _ = Spawn.exitStatus(pid) }
            result.seconds = Date().timeIntervalSince(started)
        }
        do {
            let memory = fault.oldMemory[transport] ?? "shared"
            let old = try Spawn.detached(batonvmm, ["--ram", "\(ramBytes)", "--control", socket, "--memory", memory], logPath: dir + "/old.log", environment: fault.oldEnvironment)
            pids.append(old)
            // Booting fills guest RAM with a pattern: seconds per GiB on this host.
            let bootBudget = 10 + 5 * Double(ramBytes) / Double(1 << 30)
            guard BatonProcess.waitForPath(socket, timeoutSeconds: bootBudget), let before = waitBeat(client, after: 0, timeout: bootBudget) else {
                result.detail = "the old instance never ran the guest"
                return result
            }
            var options = UpgradeOptions(vmSocket: socket, binary: try newBinary(in: dir))
            options.transport = transport
            options.runDirectory = dir + "/run"
            options.journalPath = dir + "/journal.jsonl"
            options.digest = digest
            options.stallTimeoutSeconds = fault.stallTimeout
            options.readyTimeoutSeconds = 15
            options.newInstanceEnvironment = fault.newEnvironment
            options.fault = fault.controller
            var detail: String
            do {
                let report = try UpgradeController(options: options).run()
                pids.append(report.newPid)
                result.downtimeMs = report.error == nil ? report.downtimeMs : nil
                detail = report.error.map { "rolled forward: \($0)" } ?? report.line
                if let atPause = report.ramDigestAtPause, atPause != report.ramDigestBeforeResume {
                    result.detail = "RAM digest at pause \(report.ramDigestAtPause ?? "-") != before resume \(report.ramDigestBeforeResume ?? "-")"
                    return evaluate(&result, client: client, before: before, pids: pids, digestsAgree: false)
                }
            } catch let crash as ControllerCrashed {
                let entries = (try? UpgradeJournal.read(path: crash.journalPath)) ?? []
                if let new = entries.compactMap(\.newPid).last { pids.append(new) }
                let recovered = (try? UpgradeRecovery.recover(journalPath: crash.journalPath))?.description ?? "recover failed"
                detail = "\(crash); baton recover: \(recovered)"
            } catch let failure as UpgradeFailure {
                if failure.report.newPid > 0 { pids.append(failure.report.newPid) }
                detail = failure.description
            } catch {
                detail = "\(error)"
            }
            result.detail = detail
            return evaluate(&result, client: client, before: before, pids: pids, digestsAgree: true)
        } catch {
            result.detail = "harness: \(error)"
            return result
        }
    }

    /// Exactly one instance must run the guest, serve its socket, and continue it exactly.
    func evaluate(_ result: inout CaseResult, client: VMMClient, before: GuestBeat, pids: [Int32], digestsAgree: Bool) -> CaseResult {
        result.faultFired = fault.evidence.map { result.detail.contains($0) } ?? true
        // An old instance that handed over stops its vCPUs at once but may take a moment to
        // unmap gigabytes and exit: allow it a bounded grace before counting instances.
        var living = Set(pids.filter { Host.isAlive($0) })
        for _ in 0..<100 where living.count > 1 {
            usleep(50_000)
            living = Set(pids.filter { Host.isAlive($0) })
        }
        let serving = status(client)
        result.instancesRunning = living.count
        result.splitBrain = living.count > 1  // two live instances of one guest, whatever their states
        guard let serving, serving.state == .running, living.contains(serving.pid) else {
            // Nobody runs the guest: an instance still alive is on its way out (an old instance
            // that handed over, unmapping its RAM); give it the same bounded grace.
            for _ in 0..<100 where !living.isEmpty {
                usleep(50_000)
                living = Set(pids.filter { Host.isAlive($0) })
            }
            result.instancesRunning = living.count
            result.outcome = .lost
            result.expectedLoss = fault.lossExpectedFor.contains(transport)
            result.detail += " | no running instance serves the VM"
            if result.expectedLoss { result.detail += " (expected: the process killed held the only copy of the guest)" }
            return result
        }
        result.outcome = serving.pid == pids.first ? .rolledBack : .committed
        guard let after = waitBeat(client, after: before.counter) else {
            result.detail += " | the guest did not make progress"
            return result
        }
        var model = GuestModel(heartbeatMask: 0xFFFF)
        model.step(to: after.counter)
        result.verified = digestsAgree && model.beat == after && after.counter > before.counter && after.beats >= before.beats
        if model.beat != after { result.detail += " | guest state differs from the model at counter \(after.counter)" }
        return result
    }

    func newBinary(in dir: String) throws -> String {
        if let newBinaryPath, fault.binary == nil { return newBinaryPath }
        let path = dir + "/batonvmm-next"
        switch fault.binary {
        case "missing"?:
            return dir + "/no-such-batonvmm"
        case "not-executable"?:
            try Executable.copy(from: batonvmm, to: path)
            chmod(path, 0o644)
        case "crashes"?:
            FileManager.default.createFile(atPath: path, contents: Data("#!/bin/sh\necho 'segfault in the new build (simulated)' >&2\nkill -SEGV $$\n".utf8),
                                           attributes: [.posixPermissions: 0o755])
        default:
            try Executable.copy(from: batonvmm, to: path)
        }
        return path
    }
}
