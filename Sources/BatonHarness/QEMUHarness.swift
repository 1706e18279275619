import BatonController
import BatonLibvirt
import BatonQEMU
import BatonSystem
import Foundation
import Glibc

/// One fault of the QEMU matrix: what is done to the upgrade of a real libvirt domain running
/// the test guest, and where the guest must end up.
public struct QEMUHarnessFault: Sendable, CustomStringConvertible {
    public enum Binary: String, Sendable {
        /// The new binary does not exist.
        case missing
        /// Passes every probe, exits at its real start.
        case crashesAtStart = "crashes-at-start"
        /// The domain's machine type is one the new binary does not have (a 10.0 domain, a 7.2 "new" binary).
        case lacksMachineType = "lacks-machine-type"
        /// Starts with one device more than the running QEMU.
        case extraDevice = "extra-device"
    }
    public let name: String
    public var controller: ControllerFault?
    public var binary: Binary?
    /// libvirtd is stopped (SIGSTOP) for the upgrade: it accepts connections and never answers.
    public var libvirtdStopped = false
    /// cpr-transfer: the domain is first moved to QEMU 10.0 (not counted), then upgraded 10.0 → 10.0.
    public var cpr = false
    /// Two domains upgraded as one batch (`controller` fires in the batch's process).
    public var batch = false
    public var expected: CaseOutcome
    /// Losing the guest is physics here (documented in Docs/FAULTS.md), not a defect.
    public var lossExpected = false
    /// Text the upgrade's or the recovery's output must contain, proving the fault fired.
    public var evidence: String?
    public var description: String { name }

    static func controller(_ action: ControllerFault.Action, _ phase: UpgradeJournal.Phase, _ expected: CaseOutcome, lossExpected: Bool = false, cpr: Bool = false) -> QEMUHarnessFault {
        QEMUHarnessFault(name: "\(cpr ? "cpr:" : "")\(action.rawValue):\(phase.rawValue)", controller: ControllerFault(action: action, phase: phase), cpr: cpr,
                         expected: expected, lossExpected: lossExpected,
                         evidence: action == .crash ? "controller crashed (injected) after \(phase.rawValue)" : nil)
    }

    /// The matrix: the controller, the old QEMU, the new QEMU and libvirtd killed at each phase,
    /// bad new binaries, libvirtd not answering, and clean upgrades in both modes.
    public static let all: [QEMUHarnessFault] = {
        var f: [QEMUHarnessFault] = [
            QEMUHarnessFault(name: "none", expected: .committed),
            QEMUHarnessFault(name: "cpr:none", cpr: true, expected: .committed),
        ]
        // A controller SIGKILLed right after it journaled each phase: `baton recover` rolls back
        // before `committing`, forward after.
        for p: UpgradeJournal.Phase in [.started, .prepared, .newInstanceReady, .paused, .transferred] { f.append(.controller(.sigkillController, p, .rolledBack)) }
        for p: UpgradeJournal.Phase in [.committing, .committed, .adopted] { f.append(.controller(.sigkillController, p, .committed)) }
        f.append(.controller(.crash, .transferred, .rolledBack))
        // A batch of two whose controller dies once the first domain committed: one recover
        // finishes both (forward, back) and starts libvirtd once.
        var crashedBatch = QEMUHarnessFault.controller(.sigkillController, .committed, .committed)
        crashedBatch = QEMUHarnessFault(name: "batch:" + crashedBatch.name, controller: crashedBatch.controller, batch: true, expected: .committed)
        f.append(crashedBatch)
        // The new QEMU dies: back while the old one can take the guest; after the new one ran
        // it, the guest is gone with it (the old QEMU's state is stale and is never resumed).
        for p: UpgradeJournal.Phase in [.newInstanceReady, .paused, .transferred, .committing] { f.append(.controller(.killNew, p, .rolledBack)) }
        f.append(.controller(.killNew, .committed, .lost, lossExpected: true))
        f.append(.controller(.killNew, .transferred, .rolledBack, cpr: true))
        // The old QEMU dies: before the new one holds the whole state, the guest's CPU and device
        // state dies with it; after, the new one carries on.
        for p: UpgradeJournal.Phase in [.started, .newInstanceReady, .paused] { f.append(.controller(.killOld, p, .lost, lossExpected: true)) }
        for p: UpgradeJournal.Phase in [.transferred, .committing, .committed] { f.append(.controller(.killOld, p, .committed)) }
        // libvirtd dies before the pause, or right after it adopted the new QEMU (its init
        // system, here the harness, starts it again).
        f.append(.controller(.killLibvirtd, .started, .committed))
        f.append(.controller(.killLibvirtd, .adopted, .committed))
        f.append(QEMUHarnessFault(name: "binary-missing", binary: .missing, expected: .rolledBack, evidence: "missing"))
        f.append(QEMUHarnessFault(name: "binary-crashes-at-start", binary: .crashesAtStart, expected: .rolledBack, evidence: "injected crash at start"))
        f.append(QEMUHarnessFault(name: "binary-lacks-machine-type", binary: .lacksMachineType, expected: .rolledBack, evidence: "does not support machine type"))
        f.append(QEMUHarnessFault(name: "binary-extra-device", binary: .extraDevice, expected: .rolledBack, evidence: "device sets differ"))
        f.append(QEMUHarnessFault(name: "libvirtd-not-answering", libvirtdStopped: true, expected: .rolledBack, evidence: "did not answer"))
        return f
    }()
}

/// The fault matrix on real libvirt domains running the real test guest under TCG: each case
/// boots a fresh domain on the old QEMU, runs `baton upgrade` (a separate process, as an
/// operator would) with one fault, runs `baton recover` where a journal was left unfinished,
/// and judges what is left: exactly one QEMU running the guest, libvirt managing it, the
/// guest's checksum, boot id and uptime continued, and evidence that the fault fired.
public struct QEMUHarness {
    public var baton: String
    public var workDirectory: String
    public var oldQEMU = "/usr/bin/qemu-system-x86_64"
    public var newQEMU = "/opt/baton/qemu-10.0/usr/bin/qemu-system-x86_64"
    public var guest = "/var/lib/baton/guest"
    public var uri = "qemu:///system"
    public var ramMiB = 128
    public var fillMiB = 16
    public var progress: (String) -> Void = { _ in }
    /// Told of each verdict as it is reached (the command's progress line counts them).
    public var caseDone: (CaseResult) -> Void = { _ in }

    public init(baton: String, workDirectory: String) {
        self.baton = baton
        self.workDirectory = workDirectory
    }

    /// Why the matrix cannot run here, or nil.
    public var unavailableReason: String? {
        if getuid() != 0 { return "needs root (libvirtd, QEMU)" }
        for b in [oldQEMU, newQEMU, "/usr/sbin/libvirtd"] where !FileManager.default.isExecutableFile(atPath: b) { return "\(b) is missing (Scripts/install-qemu.sh)" }
        for f in ["vmlinuz", "initrd.gz"] where !FileManager.default.fileExists(atPath: "\(guest)/\(f)") { return "\(guest)/\(f) is missing (Scripts/build-guest.sh)" }
        if (try? LibvirtDaemon.running()) == nil { return "libvirtd is not running (Scripts/libvirt-up.sh)" }
        return nil
    }

    public func faultMatrix(_ faults: [QEMUHarnessFault]) -> [CaseResult] {
        faults.enumerated().flatMap { i, fault in
            let results = fault.batch ? crashedBatch(fault, index: i) : [runCase(fault, index: i)]
            for r in results {
                progress(String(format: "  qemu %-34@ %@ %@ (%.1f s)", r.fault, r.outcome.rawValue, r.passed ? "ok" : "FAILED: \(r.detail.prefix(300))", r.seconds))
                caseDone(r)
            }
            return results
        }
    }

    /// Two domains as one batch, the controller SIGKILLed once the first has committed: one
    /// `baton recover` must finish the first forward and take the second back, starting libvirtd
    /// only after both.
    func crashedBatch(_ fault: QEMUHarnessFault, index: Int) -> [CaseResult] {
        let started = Date()
        var domains: [QEMUTestDomain] = []
        defer { domains.forEach { $0.remove() } }
        func result(_ name: String, _ expected: CaseOutcome) -> CaseResult {
            CaseResult(fault: "\(fault.name):\(name)", transport: "ignore-shared", ramBytes: ramMiB << 20, outcome: .lost, expectedLoss: false, verified: false,
                       instancesRunning: 0, splitBrain: false, downtimeMs: nil, seconds: 0, detail: "", expectedOutcome: expected, faultFired: false)
        }
        do {
            for i in 0..<2 {
                domains.append(try QEMUTestDomain.boot(name: "baton-harness-\(getpid())-\(index)b\(i)", uri: uri, emulator: oldQEMU, ramMiB: ramMiB, fillMiB: fillMiB,
                                                       guest: guest, directory: workDirectory))
            }
            let before = try domains.map { try $0.console.ask("check", timeoutSeconds: 60) }
            let oldPids = domains.map { $0.processes.first ?? 0 }
            let runDirectory = "\(workDirectory)/run-batch-\(index)"
            let daemon = try LibvirtDaemon.running()
            let batch = try Spawn.run(baton, ["upgrade", "--connect", uri, "--binary", newQEMU, "--parallel", "2", "--run-directory", runDirectory, "--json"]
                                      + domains.flatMap { ["--domain", $0.name] }, environment: ["BATON_CONTROLLER_FAULT": fault.controller!.description])
            let journals = ((try? FileManager.default.contentsOfDirectory(atPath: runDirectory)) ?? []).filter { $0.hasPrefix("journal-qemu-") }.sorted()
            let recover = journals.first.map { try? Spawn.run(baton, ["recover", "--journal", "\(runDirectory)/\($0)"]) } ?? nil
            if daemon.pid == nil { _ = try? daemon.start(uri: uri) }  // its init system's job; recover should have done it
            return domains.enumerated().map { i, d in
                var r = result(d.name, i == 0 ? .committed : .rolledBack)
                let running = d.processes
                r.instancesRunning = running.count
                r.splitBrain = running.count > 1
                let check = running.isEmpty ? nil : try? d.console.ask("check", timeoutSeconds: 20)
                let continued = check.map { $0.md5 == before[i].md5 && $0.boot == before[i].boot && $0.uptime > before[i].uptime } ?? false
                r.outcome = running.count == 1 && continued ? (running[0] == oldPids[i] ? .rolledBack : .committed) : .lost
                let expectedBinary = r.outcome == .committed ? newQEMU : oldQEMU
                r.verified = continued && running.count == 1 && managedByLibvirt(d.name, pid: running[0])
                    && (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/\(running[0])/exe")) == expectedBinary
                r.faultFired = batch.status == 128 + SIGKILL
                r.detail = "batch exit \(batch.status), \(journals.count) journals; recover exit \(recover?.status ?? -1): \(recover?.output.split(separator: "\n").last ?? "")"
                r.seconds = Date().timeIntervalSince(started)
                return r
            }
        } catch {
            var r = result("setup", .committed)
            r.detail = "harness error: \(error)"
            return [r]
        }
    }

    /// `count` domains upgraded as one batch (`baton upgrade --domain ... --parallel count`):
    /// one case per domain, each verified as the fault cases are.
    public func concurrent(_ count: Int, ramMiB: Int) -> [CaseResult] {
        var domains: [QEMUTestDomain] = []
        defer { domains.forEach { $0.remove() } }
        var results: [CaseResult] = []
        func result(_ name: String) -> CaseResult {
            CaseResult(fault: "concurrent-\(count):\(name)", transport: "ignore-shared", ramBytes: ramMiB << 20, outcome: .lost, expectedLoss: false, verified: false,
                       instancesRunning: 0, splitBrain: false, downtimeMs: nil, seconds: 0, detail: "", expectedOutcome: .committed, faultFired: true)
        }
        let started = Date()
        do {
            for i in 0..<count {
                domains.append(try QEMUTestDomain.boot(name: "baton-harness-\(getpid())-c\(i)", uri: uri, emulator: oldQEMU, ramMiB: ramMiB, fillMiB: fillMiB,
                                                       guest: guest, directory: workDirectory))
            }
            let before = try domains.map { try $0.console.ask("check", timeoutSeconds: 60) }
            let oldPids = domains.map { $0.processes.first ?? 0 }
            let args = ["upgrade", "--connect", uri, "--binary", newQEMU, "--parallel", "\(count)", "--run-directory", "\(workDirectory)/run", "--json"]
                + domains.flatMap { ["--domain", $0.name] }
            let batch = try Spawn.run(baton, args)
            let lines = batch.output.split(separator: "\n").filter { $0.hasPrefix("{") }
            let outcomes = lines.compactMap { try? JSONDecoder().decode(QEMUBatchOutcome.self, from: Data($0.utf8)) }
            for (i, d) in domains.enumerated() {
                var r = result(d.name)
                let outcome = outcomes.first { $0.domain == d.name }
                let running = d.processes
                r.instancesRunning = running.count
                r.splitBrain = running.count > 1
                let check = running.isEmpty ? nil : try? d.console.ask("check", timeoutSeconds: 20)
                let continued = check.map { $0.md5 == before[i].md5 && $0.boot == before[i].boot && $0.uptime > before[i].uptime } ?? false
                let onNew = running.count == 1 && (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/\(running[0])/exe")) == newQEMU
                r.outcome = running.count == 1 && continued ? (running[0] == oldPids[i] ? .rolledBack : .committed) : .lost
                r.verified = continued && onNew && running.count == 1 && managedByLibvirt(d.name, pid: running[0]) && outcome?.report?.verified == true
                r.downtimeMs = outcome?.report?.pauseMs
                r.detail = "batch exit \(batch.status); \(outcome?.status.rawValue ?? "no outcome") \(outcome?.reason ?? ""); libvirt gap \(Int(outcome?.report?.managementGapMs ?? 0)) ms"
                r.seconds = Date().timeIntervalSince(started)
                results.append(r)
            }
        } catch {
            var r = result("setup")
            r.detail = "harness error: \(error)"
            results.append(r)
        }
        return results
    }

    /// Writes a shell wrapper around the new QEMU for a bad-binary fault. Probes (`-machine
    /// none`, `--version`: Baton's and libvirt's) reach the real binary, so only the real start
    /// of the domain's QEMU misbehaves.
    func wrapper(_ kind: QEMUHarnessFault.Binary) throws -> String {
        let path = "\(workDirectory)/qemu-\(kind.rawValue)"
        let real: String
        switch kind {
        case .crashesAtStart: real = "echo 'injected crash at start' >&2; exit 1"
        case .extraDevice: real = "exec \(newQEMU) \"$@\" -device virtio-rng-pci"
        case .missing, .lacksMachineType: return ""
        }
        try """
            #!/bin/sh
            # baton harness: \(kind.rawValue)
            prev=
            for a in "$@"; do
                case "$prev:$a" in -machine:none|-machine:none,*|*:--version|*:-version) exec \(newQEMU) "$@";; esac
                prev=$a
            done
            \(real)

            """.write(toFile: path, atomically: true, encoding: .utf8)
        chmod(path, 0o755)
        return path
    }

    func runCase(_ fault: QEMUHarnessFault, index: Int) -> CaseResult {
        let started = Date()
        var result = CaseResult(fault: fault.name, transport: fault.cpr ? "cpr-transfer" : "ignore-shared", ramBytes: ramMiB << 20, outcome: .lost,
                                expectedLoss: false, verified: false, instancesRunning: 0, splitBrain: false, downtimeMs: nil, seconds: 0,
                                detail: "", expectedOutcome: fault.expected, faultFired: false)
        let name = "baton-harness-\(getpid())-\(index)"
        var notes: [String] = []
        var domain: QEMUTestDomain?
        defer { domain?.remove() }
        do {
            let machineFromTheFuture = fault.binary == .lacksMachineType
            domain = try QEMUTestDomain.boot(name: name, uri: uri, emulator: machineFromTheFuture ? newQEMU : oldQEMU,
                                             machine: machineFromTheFuture ? "pc-i440fx-10.0" : "pc-i440fx-7.2",
                                             ramMiB: ramMiB, fillMiB: fillMiB, guest: guest, directory: workDirectory)
            let d = domain!
            let runDirectory = "\(workDirectory)/run"
            if fault.cpr {
                let pre = try Spawn.run(baton, ["upgrade", "--domain", name, "--connect", uri, "--binary", newQEMU, "--run-directory", runDirectory])
                guard pre.status == 0 else { throw HarnessError("moving the domain to QEMU 10.0 first failed: \(pre.output)") }
            }
            let before = try d.console.ask("check", timeoutSeconds: 60)
            let oldPid = d.processes.first ?? 0
            let daemon = try LibvirtDaemon.running()
            let libvirtdPid = daemon.pid ?? 0
            let binary: String
            switch fault.binary {
            case .missing?: binary = "\(workDirectory)/missing/qemu-system-x86_64"
            case .lacksMachineType?: binary = oldQEMU
            case let kind?: binary = try wrapper(kind)
            case nil: binary = newQEMU
            }
            let journal = "\(workDirectory)/journal-\(index).jsonl"
            var environment: [String: String] = [:]
            if let c = fault.controller { environment["BATON_CONTROLLER_FAULT"] = c.description }
            if fault.libvirtdStopped { kill(libvirtdPid, SIGSTOP) }
            let upgrade = try Spawn.run(baton, ["upgrade", "--domain", name, "--connect", uri, "--binary", binary, "--journal", journal,
                                               "--run-directory", runDirectory, "--timeout", fault.libvirtdStopped ? "3" : "30", "--json"], environment: environment)
            if fault.libvirtdStopped { kill(libvirtdPid, SIGCONT) }
            var output = upgrade.output
            notes.append("upgrade exit \(upgrade.status)")
            if let line = upgrade.output.split(separator: "\n").last(where: { $0.hasPrefix("{") }),
               let report = try? JSONDecoder().decode(QEMUUpgradeReport.self, from: Data(line.utf8)), report.pauseMs > 0 {
                result.downtimeMs = report.pauseMs
            }
            // An operator's next step where a journal was left unfinished.
            let entries = (try? UpgradeJournal.read(path: journal)) ?? []
            let phases = Set(entries.map(\.phase))
            if !entries.isEmpty, !phases.contains(.done), !phases.contains(.rolledBack) {
                let recover = try Spawn.run(baton, ["recover", "--journal", journal])
                output += recover.output
                notes.append("recover exit \(recover.status): \(recover.output.split(separator: "\n").last ?? "")")
            }
            // libvirtd's init system restarts it after a crash; here the harness does.
            if daemon.pid == nil { try daemon.start(uri: uri); notes.append("libvirtd restarted") }

            // The verdict, from what is observed.
            let running = d.processes
            result.instancesRunning = running.count
            result.splitBrain = running.count > 1
            let check = running.isEmpty ? nil : try? d.console.ask("check", timeoutSeconds: 20)
            let continued = check.map { $0.md5 == before.md5 && $0.boot == before.boot && $0.uptime > before.uptime && $0.beats > before.beats } ?? false
            let managed = running.count == 1 && managedByLibvirt(name, pid: running[0])
            if running.count == 1, continued {
                result.outcome = running[0] == oldPid ? .rolledBack : .committed
            } else {
                result.outcome = .lost
            }
            let startBinary = fault.cpr || machineFromTheFuture ? newQEMU : oldQEMU
            let expectedBinary = result.outcome == .committed ? binary : startBinary
            let onBinary = running.count == 1 && (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/\(running[0])/exe")) == expectedBinary
            result.verified = result.outcome != .lost && continued && managed && onBinary
            result.expectedLoss = fault.lossExpected && result.outcome == .lost
            switch fault.controller?.action {
            case .sigkillController?:
                // Killed by SIGKILL (status 128 + 9), with the fault's phase the last thing journaled.
                result.faultFired = upgrade.status == 128 + SIGKILL && entries.last?.phase == fault.controller?.phase
            case let action? where action != .crash:
                // The journal names the process the fault killed; it must be gone.
                let fired = entries.compactMap(\.note).first { $0.hasPrefix("injected \(fault.controller!)") }
                let target = fired.flatMap { $0.split(separator: " ").last }.flatMap { pid_t($0) } ?? 0
                result.faultFired = target > 0 && !Host.isAlive(target)
            default: result.faultFired = fault.evidence.map { output.contains($0) } ?? (upgrade.status == 0)
            }
            if !continued { notes.append("guest check: \(check.map { "\($0)" } ?? "no answer") vs before \(before)") }
            if !managed { notes.append("libvirt does not manage the running QEMU (\(running))") }
            if !onBinary && result.outcome != .lost { notes.append("running binary is not \(expectedBinary)") }
            notes.append(String(output.split(separator: "\n").filter { !$0.hasPrefix("{") }.last ?? ""))
        } catch {
            notes.append("harness error: \(error)")
        }
        result.detail = notes.joined(separator: "; ")
        result.seconds = Date().timeIntervalSince(started)
        return result
    }

    /// libvirt reports the domain running, its pid file names `pid`, and its monitor answers.
    func managedByLibvirt(_ name: String, pid: pid_t) -> Bool {
        guard let c = try? LibvirtConnection(uri: uri), let d = try? c.domain(named: name), (try? d.state().state) == .running else { return false }
        guard Host.readSmallFile("/run/libvirt/qemu/\(name).pid")?.trimmingCharacters(in: .whitespacesAndNewlines) == "\(pid)" else { return false }
        guard let r = try? Spawn.run("/usr/bin/virsh", ["-c", uri, "qemu-monitor-command", name, #"{"execute":"query-status"}"#]) else { return false }
        return r.status == 0 && r.output.contains("\"running\":true")
    }
}

struct HarnessError: Error, CustomStringConvertible {
    let description: String
    init(_ d: String) { description = d }
}
