import BatonSystem
import Foundation
import Glibc
import Logging

/// The Baton service's state: which upgrades run (one per VM at a time, different VMs
/// concurrently), what finished (counts for `status`; metrics through BatonMetrics), and the
/// domains libvirt's hook told us about. Requests are newline-delimited JSON on a Unix socket.
public final class BatonService: @unchecked Sendable {
    public let stateDirectory: String
    let lock = NSLock()
    var inFlight: [String: Date] = [:]
    /// What `status` shows for an in-flight key (the VM's socket as the request spelled it).
    var inFlightNames: [String: String] = [:]
    var completed = 0
    var failures = 0
    var rollbacks = 0
    var refused = 0
    var domains: [String: [String: String]] = [:]
    let started = Date()

    /// Counts the host's stale hypervisor processes (QEMU domains on a binary no longer
    /// installed) for the metrics; set by `baton serve`, nil where it cannot tell.
    let staleDomainCount: @Sendable () -> Int?

    /// Told of every hook event of an opted-in domain (domain, operation), after it is recorded:
    /// where an upgrade policy hooks in. Never called with the lock held.
    let onHookEvent: @Sendable (String, String) -> Void

    /// The metrics backend's text (Prometheus exposition format), for `{"op":"metrics"}`.
    let metricsText: @Sendable () -> String

    /// Where the service's own lines go (one structured line per batonvmm upgrade).
    public var logger = Logger(label: "baton.serve")

    /// Runs one QEMU upgrade request to the end (set by `baton serve`; this module does not
    /// know QEMU). Called with the domain marked in flight.
    public var qemuUpgrade: (@Sendable ([String: Any]) -> [String: Any])?

    /// What a batonvmm upgrade request does not say (`[upgrade]` in baton.toml, set by `baton
    /// serve`; a request's own field wins).
    public struct UpgradeDefaults: Sendable {
        public var transport = "auto"
        public var releaseSource = false
        public var digest = false
        public var readyTimeoutSeconds = 30.0
        public var stallTimeoutSeconds = 10.0
        /// nil: `run` under the state directory.
        public var runDirectory: String?
        public init() {}
    }
    public var upgradeDefaults = UpgradeDefaults()

    public init(stateDirectory: String, staleDomainCount: @escaping @Sendable () -> Int? = { nil },
                onHookEvent: @escaping @Sendable (String, String) -> Void = { _, _ in },
                metricsText: @escaping @Sendable () -> String = { "" }) {
        self.stateDirectory = stateDirectory
        self.staleDomainCount = staleDomainCount
        self.onHookEvent = onHookEvent
        self.metricsText = metricsText
    }

    /// Marks an upgrade that runs outside `upgrade` (a QEMU batch started by the policy) as in
    /// flight under `key`, so that a drain waits for it; false if one runs under that key.
    public func begin(_ key: String) -> Bool {
        lock.lock(); defer { lock.unlock() }
        guard inFlight[key] == nil else { refused += 1; return false }
        inFlight[key] = Date()
        BatonMetrics.inFlight(inFlight.count)
        return true
    }

    public func end(_ key: String) { lock.lock(); inFlight[key] = nil; BatonMetrics.inFlight(inFlight.count); lock.unlock() }

    /// Counts one finished QEMU handoff (status counts and metrics; its start was counted when
    /// it started).
    public func count(mode: String, outcome: BatonMetrics.Outcome, pauseMs: Double, phasesMs: [(String, Double)], bytes: Int64) {
        BatonMetrics.ended(hypervisor: "qemu", outcome: outcome, mode: mode, downtimeMs: pauseMs, phasesMs: phasesMs, bytes: bytes)
        lock.lock(); defer { lock.unlock() }
        switch outcome {
        case .succeeded: completed += 1
        case .rolledBack: failures += 1; rollbacks += 1
        case .refused: refused += 1
        default: failures += 1
        }
    }

    /// Handles one request line and returns the reply line.
    public func handle(_ line: String) -> String {
        guard let data = line.data(using: .utf8), let request = try? JSONSerialization.jsonObject(with: data) as? [String: Any],
              let op = request["op"] as? String else {
            return reply(["ok": false, "error": "not a JSON object with an \"op\": \(line.prefix(80))"])
        }
        switch op {
        case "status": return reply(status())
        case "metrics": return reply(["ok": true, "metrics": metrics()])
        case "hook": return reply(recordHook(request))
        case "upgrade": return reply(upgrade(request))
        case "upgrade-qemu": return reply(upgradeQEMU(request))
        default: return reply(["ok": false, "error": "unknown op '\(op)' (status, metrics, hook, upgrade, upgrade-qemu)"])
        }
    }

    func reply(_ object: [String: Any]) -> String {
        let data = (try? JSONSerialization.data(withJSONObject: object, options: [.sortedKeys])) ?? Data("{}".utf8)
        return String(decoding: data, as: UTF8.self)
    }

    func recordHook(_ request: [String: Any]) -> [String: Any] {
        guard let domain = request["domain"] as? String, let operation = request["operation"] as? String else {
            return ["ok": false, "error": "hook event needs domain and operation"]
        }
        lock.lock()
        if operation == "stopped" || operation == "release" {
            domains[domain] = nil
        } else {
            domains[domain] = ["agent": request["agent"] as? String ?? "", "uuid": request["uuid"] as? String ?? "", "lastOperation": operation]
        }
        lock.unlock()
        onHookEvent(domain, operation)
        return ["ok": true]
    }

    /// Runs one upgrade to the end (the caller's connection waits), or refuses at once if
    /// another upgrade of the same VM is running.
    func upgrade(_ request: [String: Any]) -> [String: Any] {
        guard let vm = request["vm"] as? String, let binary = request["binary"] as? String else {
            return ["ok": false, "error": "upgrade needs \"vm\" (control socket) and \"binary\""]
        }
        // Keyed by the VM's real identity: `vm.sock` and `./vm.sock` are one VM.
        let key = VMLock.identity(of: vm).map { "vm:" + $0 } ?? vm
        lock.lock()
        if let since = inFlight[key] {
            refused += 1
            lock.unlock()
            BatonMetrics.ended(hypervisor: "batonvmm", outcome: .refused, mode: request["transport"] as? String ?? "auto", downtimeMs: nil)
            return ["ok": false, "refused": "an upgrade of \(vm) is already running (since \(ISO8601DateFormatter().string(from: since))); one at a time per VM"]
        }
        inFlight[key] = Date()
        inFlightNames[key] = vm
        BatonMetrics.inFlight(inFlight.count)
        lock.unlock()
        defer { lock.lock(); inFlight[key] = nil; inFlightNames[key] = nil; BatonMetrics.inFlight(inFlight.count); lock.unlock() }
        BatonMetrics.started(hypervisor: "batonvmm")
        var options = UpgradeOptions(vmSocket: vm, binary: binary)
        options.transport = request["transport"] as? String ?? upgradeDefaults.transport
        options.releaseSource = request["release_source"] as? Bool ?? upgradeDefaults.releaseSource
        options.inPlace = request["in_place"] as? Bool ?? false
        options.digest = request["digest"] as? Bool ?? upgradeDefaults.digest
        options.strict = request["strict"] as? Bool ?? false
        options.readyTimeoutSeconds = upgradeDefaults.readyTimeoutSeconds
        options.stallTimeoutSeconds = upgradeDefaults.stallTimeoutSeconds
        options.runDirectory = upgradeDefaults.runDirectory ?? stateDirectory + "/run"
        options.journalPath = stateDirectory + "/journal-\(vm.hashValue.magnitude)-\(Int(Date().timeIntervalSince1970 * 1000)).jsonl"
        // The fault switch (tests, the harness): the same variable the CLI reads.
        options.fault = ProcessInfo.processInfo.environment["BATON_CONTROLLER_FAULT"].flatMap(ControllerFault.init(parsing:))
        do {
            let report = try UpgradeController(options: options).run()
            BatonMetrics.ended(hypervisor: "batonvmm", outcome: report.rolledForward ? .rolledForward : .succeeded, mode: report.transport, downtimeMs: report.downtimeMs,
                               phasesMs: report.phasesMs,
                               bytes: Int64(report.ramBytes))
            lock.lock(); completed += 1; lock.unlock()
            logUpgrade(report, outcome: report.rolledForward ? "rolledForward" : "upgraded", reason: report.error)
            return ["ok": true, "line": report.line, "report": encode(report)]
        } catch let failure as UpgradeFailure where failure.refused {
            // A `baton upgrade` outside the service holds the VM.
            lock.lock(); refused += 1; lock.unlock()
            BatonMetrics.ended(hypervisor: "batonvmm", outcome: .refused, mode: options.transport, downtimeMs: nil)
            return ["ok": false, "refused": failure.description]
        } catch let failure as UpgradeFailure {
            BatonMetrics.ended(hypervisor: "batonvmm", outcome: failure.report.rolledBack ? .rolledBack : .failed, mode: failure.report.transport, downtimeMs: nil)
            lock.lock()
            failures += 1
            if failure.report.rolledBack { rollbacks += 1 }
            lock.unlock()
            logUpgrade(failure.report, outcome: failure.report.rolledBack ? "rolledBack" : "failed", reason: failure.description)
            return ["ok": false, "error": failure.description, "kind": failure.kind.rawValue, "report": encode(failure.report)]
        } catch {
            BatonMetrics.ended(hypervisor: "batonvmm", outcome: .failed, mode: options.transport, downtimeMs: nil)
            lock.lock(); failures += 1; lock.unlock()
            logger.error("upgrade", metadata: ["vm": "\(vm)", "outcome": "failed", "mode": "\(options.transport)", "reason": "\(error)"])
            return ["ok": false, "error": "\(error)"]
        }
    }

    /// A QEMU domain's upgrade, one per domain at a time (refused at once otherwise).
    func upgradeQEMU(_ request: [String: Any]) -> [String: Any] {
        guard let domain = request["domain"] as? String, !domain.isEmpty, let handler = qemuUpgrade else {
            return ["ok": false, "error": qemuUpgrade == nil ? "this service runs no QEMU upgrades" : "upgrade-qemu needs \"domain\""]
        }
        let key = "qemu:" + domain
        guard begin(key) else { return ["ok": false, "refused": "an upgrade of \(domain) is already running; one at a time per domain"] }
        defer { end(key) }
        BatonMetrics.started(hypervisor: "qemu")
        return handler(request)
    }

    /// One structured line per upgrade: VM, transport, pids, downtime, outcome.
    func logUpgrade(_ r: UpgradeReport, outcome: String, reason: String? = nil) {
        var metadata: Logger.Metadata = ["vm": "\(r.vm)", "outcome": "\(outcome)", "mode": "\(r.transport)", "oldPid": "\(r.oldPid)",
                                         "newPid": "\(r.newPid)", "downtimeMs": "\(String(format: "%.2f", r.downtimeMs))"]
        if let reason { metadata["reason"] = "\(reason)" }
        logger.info("upgrade", metadata: metadata)
    }

    func encode(_ report: UpgradeReport) -> Any {
        (try? JSONSerialization.jsonObject(with: JSONEncoder().encode(report))) ?? [:]
    }

    public func status() -> [String: Any] {
        lock.lock(); defer { lock.unlock() }
        return ["ok": true, "pid": Int(getpid()), "uptimeSeconds": Int(Date().timeIntervalSince(started)),
                "inFlight": inFlight.keys.map { inFlightNames[$0] ?? $0 }.sorted(), "completed": completed, "failed": failures,
                "rolledBack": rollbacks, "refused": refused, "domains": domains]
    }

    /// Prometheus text exposition (format 0.0.4).
    /// Prometheus text from the metrics backend, with the stale-domain gauge refreshed first.
    public func metrics() -> String {
        // Scans libvirt (outside the lock), but not while an upgrade runs: a QEMU handoff keeps
        // libvirtd stopped on purpose, and the gauge keeps its last value meanwhile.
        if !busy, let stale = staleDomainCount() { BatonMetrics.staleDomains(stale) }
        return metricsText()
    }

    public var busy: Bool { lock.lock(); defer { lock.unlock() }; return !inFlight.isEmpty || repliesPending > 0 }

    /// Requests handled whose reply line is not written yet: a drain waits for them too, or an
    /// upgrade that just finished would exit the service before its client heard the outcome.
    var repliesPending = 0
    public func replyStarted() { lock.lock(); repliesPending += 1; lock.unlock() }
    public func replyWritten() { lock.lock(); repliesPending -= 1; lock.unlock() }
}
