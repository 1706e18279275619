import BatonController
import BatonSystem
import Foundation
import Glibc

/// How one domain of a batch ended.
public struct QEMUBatchOutcome: Codable, Sendable {
    public enum Status: String, Codable, Sendable {
        /// The new QEMU runs the guest and libvirt manages it.
        case upgraded
        /// Refused at preflight (private RAM, machine type, ...): never paused.
        case skipped
        /// Failed before the new QEMU ran the guest: the old QEMU runs it again.
        case rolledBack = "rolled-back"
        /// Failed after the new QEMU ran the guest: it still does; `baton recover` finishes.
        case incomplete
    }
    public var domain: String
    public var status: Status
    public var reason: String?
    public var report: QEMUUpgradeReport?
    public var journal: String?
}

public struct QEMUBatchSummary: Codable, Sendable {
    public var outcomes: [QEMUBatchOutcome] = []
    /// libvirtd stopped → answering again with every domain adopted: one gap for the batch.
    public var managementGapMs = 0.0
    public var wallMs = 0.0
    public var parallel = 1

    public init(parallel: Int = 1) { self.parallel = parallel }

    public func count(_ status: QEMUBatchOutcome.Status) -> Int { outcomes.filter { $0.status == status }.count }
}

/// Upgrades many domains of one host: every domain is preflighted with libvirtd up (a refusal
/// skips it, unpaused), libvirtd is stopped once, up to `parallel` handoffs run at a time (each
/// its own pause, journal and rollback), each finished domain's status file names its new QEMU,
/// and libvirtd is started once to adopt them all.
public final class QEMUBatchUpgrade {
    public struct Target: Sendable {
        public var domain: String
        public var newEmulator: String
        public init(domain: String, newEmulator: String) { self.domain = domain; self.newEmulator = newEmulator }
    }

    let targets: [Target]
    /// Applied to every domain (its `domain` and `newEmulator` are replaced per target).
    let template: QEMUUpgradeOptions
    let parallel: Int

    public init(targets: [Target], template: QEMUUpgradeOptions, parallel: Int) {
        self.targets = targets
        self.template = template
        self.parallel = max(1, parallel)
    }

    /// The domains of `inventory` that do not run `binary` (or, without one, their installed
    /// emulator): the stale ones.
    public static func staleTargets(_ inventory: [QEMUDomainStatus], binary: String?) -> [Target] {
        inventory.compactMap { d in
            if let binary { return QEMUInventory.runs(d.pid, binary: binary) ? nil : Target(domain: d.domain, newEmulator: binary) }
            return d.stale ? Target(domain: d.domain, newEmulator: d.emulator) : nil
        }
    }

    /// Runs the batch. `progress(outcome, done, total)` is called as each domain is skipped or its
    /// handoff ends (from the thread that ran it; adoption by libvirtd comes after all of them).
    public func run(progress: @escaping @Sendable (QEMUBatchOutcome, Int, Int) -> Void = { _, _, _ in }) throws -> QEMUBatchSummary {
        let began = Host.monotonicNanoseconds()
        signal(SIGPIPE, SIG_IGN)
        let held = QEMUHost.holdSignals(template.holdSignals)
        defer { QEMUHost.release(held) }
        try QEMUHost.makePrivateDirectory(template.runDirectory)
        let lock = try QEMUHost.hostLock(in: template.runDirectory)
        defer { close(lock) }

        var summary = QEMUBatchSummary(parallel: parallel)
        let results = OutcomeTable()
        // Preflight all with libvirtd up, one after another (libvirt probes binaries).
        var ready: [QEMUUpgrade] = []
        for target in targets {
            var options = template
            options.domain = target.domain
            options.newEmulator = target.newEmulator
            options.journalPath = nil  // one journal per domain, in the run directory
            let upgrade = QEMUUpgrade(options: options)
            upgrade.libvirtdHeldByBatch = true
            do {
                try upgrade.begin()
                ready.append(upgrade)
            } catch {
                let outcome = QEMUBatchOutcome(domain: target.domain, status: .skipped, reason: "\(error)")
                progress(outcome, results.add(outcome), targets.count)
            }
        }
        guard let first = ready.first else {
            summary.outcomes = results.sorted(by: targets)
            summary.wallMs = Double(Host.monotonicNanoseconds() - began) / 1e6
            return summary
        }
        let daemon = first.record.libvirtd
        let stopped = Host.monotonicNanoseconds()
        do { try daemon.stop() } catch {
            for u in ready { try? u.log(.rolledBack, note: "libvirtd did not stop: \(error)") }
            throw error
        }
        for u in ready { u.libvirtdStoppedAt = stopped }

        // The handoffs, `parallel` at a time: workers take the next domain until none is left.
        let queue = WorkQueue(count: ready.count)
        let handoffs = ready, total = targets.count
        let workers = (0..<min(parallel, ready.count)).map { _ in
            Thread {
                while let i = queue.next() {
                    let u = handoffs[i]
                    var outcome = QEMUBatchOutcome(domain: u.options.domain, status: .upgraded, journal: u.journal.path)
                    do { _ = try u.proceed() } catch QEMUUpgradeError.rollForwardIncomplete(let why) {
                        outcome.status = .incomplete
                        outcome.reason = why
                    } catch {
                        outcome.status = .rolledBack
                        outcome.reason = "\(error)"
                    }
                    outcome.report = u.report
                    progress(outcome, results.add(outcome), total)
                }
                queue.finished()
            }
        }
        workers.forEach { $0.start() }
        queue.waitForWorkers(workers.count)

        // One start of libvirtd adopts every new QEMU (and reconnects the rolled-back old ones).
        var startError: Error?
        do { try daemon.start(uri: template.uri) } catch { startError = error }
        let gap = Double(Host.monotonicNanoseconds() - stopped) / 1e6
        for u in ready {
            guard var outcome = results.outcome(of: u.options.domain) else { continue }
            if outcome.status == .upgraded {
                do {
                    if let startError { throw startError }
                    try u.completeAdoption()
                } catch {
                    outcome.status = .incomplete
                    outcome.reason = "\(error); run `baton recover --journal \(u.journal.path)`"
                }
            }
            var report = u.report
            report.managementGapMs = gap
            outcome.report = report
            results.add(outcome)
        }
        summary.outcomes = results.sorted(by: targets)
        summary.managementGapMs = gap
        summary.wallMs = Double(Host.monotonicNanoseconds() - began) / 1e6
        return summary
    }
}

/// The outcomes, filled in by the worker threads.
final class OutcomeTable: @unchecked Sendable {
    private let lock = NSLock()
    private var byDomain: [String: QEMUBatchOutcome] = [:]
    /// Records (or replaces) a domain's outcome; returns how many domains have one.
    @discardableResult
    func add(_ o: QEMUBatchOutcome) -> Int { lock.withLock { byDomain[o.domain] = o; return byDomain.count } }
    func outcome(of domain: String) -> QEMUBatchOutcome? { lock.withLock { byDomain[domain] } }
    func sorted(by targets: [QEMUBatchUpgrade.Target]) -> [QEMUBatchOutcome] { lock.withLock { targets.compactMap { byDomain[$0.domain] } } }
}

/// Hands out indices 0..<count to worker threads and counts the workers that are done.
final class WorkQueue: @unchecked Sendable {
    private let condition = NSCondition()
    private var nextIndex = 0
    private var done = 0
    let count: Int
    init(count: Int) { self.count = count }
    func next() -> Int? {
        condition.lock(); defer { condition.unlock() }
        guard nextIndex < count else { return nil }
        nextIndex += 1
        return nextIndex - 1
    }
    func finished() { condition.lock(); done += 1; condition.broadcast(); condition.unlock() }
    func waitForWorkers(_ n: Int) { condition.lock(); while done < n { condition.wait() }; condition.unlock() }
}
