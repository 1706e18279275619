import BatonLibvirt
import BatonSystem
import Foundation
import Glibc

/// `baton serve`'s upgrade policy for QEMU domains: when libvirtd reconnects to an opted-in
/// domain (it was restarted, as after a package upgrade) and/or on a periodic check, upgrade
/// every opted-in domain whose QEMU is stale, as one batch. The libvirt hook only forwards the
/// event and returns; this runs on its own thread, after libvirtd answers again.
///
/// A domain whose upgrade failed is not retried automatically while the same QEMU process
/// runs it: a rolled-back batch restarts libvirtd, which reconnects, which would trigger the
/// same failing upgrade forever.
public final class QEMUAutoUpgrader: @unchecked Sendable {
    public struct Settings: Sendable {
        public var uri: String
        /// Per-domain options (domain and new emulator are set per target).
        public var template: QEMUUpgradeOptions
        public var parallel: Int
        public var onReconnect: Bool
        /// Seconds between periodic checks; nil: none.
        public var periodicSeconds: Double?
        /// Reconnect events arrive one per domain: wait this long for the rest before scanning.
        public var settleSeconds = 2.0
        public init(uri: String, template: QEMUUpgradeOptions, parallel: Int, onReconnect: Bool, periodicSeconds: Double?) {
            self.uri = uri
            self.template = template
            self.parallel = parallel
            self.onReconnect = onReconnect
            self.periodicSeconds = periodicSeconds
        }
    }

    let settings: Settings
    /// Wraps a batch (the service marks it in flight so a drain waits for it); returns false to refuse.
    let guardBatch: @Sendable (() -> Void) -> Bool
    let onOutcome: @Sendable (QEMUBatchOutcome) -> Void
    let onNote: @Sendable (String) -> Void
    private let condition = NSCondition()
    private var pendingSince: Date?
    private var stopping = false
    private var exited = false
    private var failedPids: [String: Int32] = [:]
    private var thread: Thread?

    public init(settings: Settings, guardBatch: @escaping @Sendable (() -> Void) -> Bool,
                onOutcome: @escaping @Sendable (QEMUBatchOutcome) -> Void, onNote: @escaping @Sendable (String) -> Void) {
        self.settings = settings
        self.guardBatch = guardBatch
        self.onOutcome = onOutcome
        self.onNote = onNote
    }

    public func start() {
        let t = Thread { [self] in loop() }
        t.name = "baton-auto-upgrade"
        thread = t
        t.start()
    }

    /// No new batch starts after this; one that runs finishes. Returns once the thread is done
    /// (or `deadline` passed): the service drains only after that.
    public func stop(waitingUntil deadline: Date) {
        condition.lock()
        stopping = true
        condition.broadcast()
        while !exited && condition.wait(until: deadline) {}
        condition.unlock()
    }

    var isStopping: Bool { condition.lock(); defer { condition.unlock() }; return stopping }

    /// A hook event of an opted-in domain.
    public func hookEvent(domain: String, operation: String) {
        guard settings.onReconnect, operation == "reconnect" else { return }
        trigger()
    }

    /// Asks for a scan soon (after the settle time).
    public func trigger() {
        condition.lock()
        if pendingSince == nil { pendingSince = Date() }
        condition.broadcast()
        condition.unlock()
    }

    func loop() {
        var nextPeriodic = settings.periodicSeconds.map { Date().addingTimeInterval($0) }
        while true {
            condition.lock()
            while !stopping {
                let now = Date()
                if let since = pendingSince, now >= since.addingTimeInterval(settings.settleSeconds) { break }
                if let p = nextPeriodic, now >= p { pendingSince = pendingSince ?? now; break }
                let wake = [pendingSince?.addingTimeInterval(settings.settleSeconds), nextPeriodic].compactMap { $0 }.min() ?? now.addingTimeInterval(3600)
                _ = condition.wait(until: wake)
            }
            if stopping {
                exited = true
                condition.broadcast()
                condition.unlock()
                return
            }
            pendingSince = nil
            condition.unlock()
            nextPeriodic = settings.periodicSeconds.map { Date().addingTimeInterval($0) }
            runOnce()
        }
    }

    /// One scan and, if anything opted in is stale, one batch.
    func runOnce() {
        // libvirtd may still be starting (its reconnect hooks run before it serves clients).
        let deadline = Date().addingTimeInterval(60)
        var connection: LibvirtConnection?
        while connection == nil && Date() < deadline {
            connection = try? LibvirtConnection.connect(uri: settings.uri, answeringWithin: 5)
            if connection == nil { usleep(200_000) }
        }
        guard let connection else { onNote("libvirt at \(settings.uri) did not answer within 60 s: no stale check"); return }
        let inventory: [QEMUDomainStatus]
        do { inventory = try QEMUInventory.scan(uri: settings.uri) } catch { onNote("stale check failed: \(error)"); return }
        let optedIn = inventory.filter { d in
            guard d.stale, let handle = try? connection.domain(named: d.domain) else { return false }
            return ((try? handle.metadata()) ?? nil) != nil
        }
        condition.lock()
        let retryable = optedIn.filter { failedPids[$0.domain] != $0.pid }
        condition.unlock()
        for d in optedIn where !retryable.contains(d) {
            onNote("\(d.domain) is stale but its last automatic upgrade failed on QEMU pid \(d.pid): not retried (run `baton upgrade --domain \(d.domain)`)")
        }
        let targets = QEMUBatchUpgrade.staleTargets(retryable, binary: nil)
        guard !targets.isEmpty, !isStopping else { return }
        onNote("upgrading \(targets.count) stale opted-in domain(s): \(targets.map(\.domain).joined(separator: ", "))")
        let accepted = guardBatch {
            let batch = QEMUBatchUpgrade(targets: targets, template: settings.template, parallel: settings.parallel)
            do {
                let summary = try batch.run()
                for o in summary.outcomes {
                    if o.status != .upgraded, let pid = retryable.first(where: { $0.domain == o.domain })?.pid {
                        condition.lock(); failedPids[o.domain] = pid; condition.unlock()
                    }
                    onOutcome(o)
                }
            } catch {
                // Not retried automatically while the same QEMUs run these domains.
                condition.lock()
                for d in retryable { failedPids[d.domain] = d.pid }
                condition.unlock()
                onNote("batch upgrade failed: \(error)")
            }
        }
        if !accepted { onNote("a batch upgrade is already running: this one waits for the next trigger") }
    }
}
