import BatonSystem
import Foundation
import Glibc

/// The Baton service's state: which upgrades run (one per VM at a time, different VMs
/// concurrently), what finished, counters and a downtime histogram for Prometheus, and the
/// domains libvirt's hook told us about. Requests are newline-delimited JSON on a Unix socket.
public final class BatonService: @unchecked Sendable {
    public let stateDirectory: String
    let lock = NSLock()
    var inFlight: [String: Date] = [:]
    var handoffs: [String: Int] = [:]      // by transport
    var failures = 0
    var rollbacks = 0
    var refused = 0
    var bytesMoved: UInt64 = 0
    var downtimeBuckets: [Double: Int] = [:]
    var downtimeSum = 0.0
    var downtimeCount = 0
    var domains: [String: [String: String]] = [:]
    let started = Date()
    public static let downtimeBounds: [Double] = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 5000]

    /// Counts the host's stale hypervisor processes (QEMU domains on a binary no longer
    /// installed) for the metrics; set by `baton serve`, nil where it cannot tell.
    let staleDomainCount: @Sendable () -> Int?

    /// Told of every hook event of an opted-in domain (domain, operation), after it is recorded:
    /// where an upgrade policy hooks in. Never called with the lock held.
    let onHookEvent: @Sendable (String, String) -> Void

    public init(stateDirectory: String, staleDomainCount: @escaping @Sendable () -> Int? = { nil },
                onHookEvent: @escaping @Sendable (String, String) -> Void = { _, _ in }) {
        self.stateDirectory = stateDirectory
        self.staleDomainCount = staleDomainCount
        self.onHookEvent = onHookEvent
    }

    /// Marks an upgrade that runs outside `upgrade` (a QEMU batch started by the policy) as in
    /// flight under `key`, so that a drain waits for it; false if one runs under that key.
    public func begin(_ key: String) -> Bool {
        lock.lock(); defer { lock.unlock() }
        guard inFlight[key] == nil else { refused += 1; return false }
        inFlight[key] = Date()
        return true
    }

    public func end(_ key: String) { lock.lock(); inFlight[key] = nil; lock.unlock() }

    /// Counts one finished QEMU handoff in the metrics.
    public func count(mode: String, upgraded: Bool, rolledBack: Bool, pauseMs: Double, bytes: UInt64) {
        lock.lock(); defer { lock.unlock() }
        guard upgraded else {
            failures += 1
            if rolledBack { rollbacks += 1 }
            return
        }
        handoffs["qemu-" + mode, default: 0] += 1
        bytesMoved += bytes
        downtimeSum += pauseMs
        downtimeCount += 1
        for b in Self.downtimeBounds where pauseMs <= b { downtimeBuckets[b, default: 0] += 1 }
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
        default: return reply(["ok": false, "error": "unknown op '\(op)' (status, metrics, hook, upgrade)"])
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
        lock.lock()
        if let since = inFlight[vm] {
            refused += 1
            lock.unlock()
            return ["ok": false, "refused": "an upgrade of \(vm) is already running (since \(ISO8601DateFormatter().string(from: since))); one at a time per VM"]
        }
        inFlight[vm] = Date()
        lock.unlock()
        defer { lock.lock(); inFlight[vm] = nil; lock.unlock() }
        var options = UpgradeOptions(vmSocket: vm, binary: binary)
        options.transport = request["transport"] as? String ?? "auto"
        options.releaseSource = request["release_source"] as? Bool ?? false
        options.runDirectory = stateDirectory + "/run"
        options.journalPath = stateDirectory + "/journal-\(abs(vm.hashValue))-\(Int(Date().timeIntervalSince1970 * 1000)).jsonl"
        do {
            let report = try UpgradeController(options: options).run()
            lock.lock()
            handoffs[report.transport, default: 0] += 1
            bytesMoved += report.ramBytes
            downtimeSum += report.downtimeMs
            downtimeCount += 1
            for b in Self.downtimeBounds where report.downtimeMs <= b { downtimeBuckets[b, default: 0] += 1 }
            lock.unlock()
            return ["ok": true, "line": report.line, "report": encode(report)]
        } catch let failure as UpgradeFailure {
            lock.lock()
            failures += 1
            if failure.report.rolledBack { rollbacks += 1 }
            lock.unlock()
            return ["ok": false, "error": failure.description, "report": encode(failure.report)]
        } catch {
            lock.lock(); failures += 1; lock.unlock()
            return ["ok": false, "error": "\(error)"]
        }
    }

    func encode(_ report: UpgradeReport) -> Any {
        (try? JSONSerialization.jsonObject(with: JSONEncoder().encode(report))) ?? [:]
    }

    public func status() -> [String: Any] {
        lock.lock(); defer { lock.unlock() }
        return ["ok": true, "pid": Int(getpid()), "uptimeSeconds": Int(Date().timeIntervalSince(started)),
                "inFlight": inFlight.keys.sorted(), "completed": handoffs.values.reduce(0, +), "failed": failures,
                "rolledBack": rollbacks, "refused": refused, "domains": domains]
    }

    /// Prometheus text exposition (format 0.0.4).
    public func metrics() -> String {
        let stale = staleDomainCount()  // scans libvirt: outside the lock
        lock.lock(); defer { lock.unlock() }
        var out = ""
        if let stale {
            out += "# HELP baton_stale_domains Running domains whose hypervisor binary is no longer the one installed.\n# TYPE baton_stale_domains gauge\nbaton_stale_domains \(stale)\n"
        }
        out += "# HELP baton_handoffs_total Completed in-place upgrades.\n# TYPE baton_handoffs_total counter\n"
        for (t, n) in handoffs.sorted(by: { $0.key < $1.key }) { out += "baton_handoffs_total{transport=\"\(t)\"} \(n)\n" }
        if handoffs.isEmpty { out += "baton_handoffs_total 0\n" }
        out += "# HELP baton_handoff_failures_total Upgrades that did not complete.\n# TYPE baton_handoff_failures_total counter\nbaton_handoff_failures_total \(failures)\n"
        out += "# HELP baton_rollbacks_total Upgrades rolled back (the old instance kept the guest).\n# TYPE baton_rollbacks_total counter\nbaton_rollbacks_total \(rollbacks)\n"
        out += "# HELP baton_refused_total Upgrade requests refused because one was running for the same VM.\n# TYPE baton_refused_total counter\nbaton_refused_total \(refused)\n"
        out += "# HELP baton_bytes_moved_total Guest RAM handed over.\n# TYPE baton_bytes_moved_total counter\nbaton_bytes_moved_total \(bytesMoved)\n"
        out += "# HELP baton_downtime_milliseconds Pause to guest running in the new instance.\n# TYPE baton_downtime_milliseconds histogram\n"
        for b in Self.downtimeBounds { out += "baton_downtime_milliseconds_bucket{le=\"\(b)\"} \(downtimeBuckets[b] ?? 0)\n" }
        out += "baton_downtime_milliseconds_bucket{le=\"+Inf\"} \(downtimeCount)\nbaton_downtime_milliseconds_sum \(downtimeSum)\nbaton_downtime_milliseconds_count \(downtimeCount)\n"
        out += "# HELP baton_upgrades_in_flight Upgrades running now.\n# TYPE baton_upgrades_in_flight gauge\nbaton_upgrades_in_flight \(inFlight.count)\n"
        return out
    }

    public var busy: Bool { lock.lock(); defer { lock.unlock() }; return !inFlight.isEmpty }
}
