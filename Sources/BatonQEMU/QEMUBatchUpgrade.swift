import BatonController
import BatonLibvirt
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
        // Copying private RAM holds a second copy per domain; preflight checks room for one.
        self.parallel = template.allowCopy ? 1 : max(1, parallel)
    }

    /// The domains of `inventory` that do not run `binary` (or, without one, their installed
    /// emulator): the stale ones.
    public static func staleTargets(_ inventory: [QEMUDomainStatus], binary: String?) -> [Target] {
        inventory.compactMap { d in
            if let binary { return QEMUInventory.runs(d.pid, binary: binary) ? nil : Target(domain: d.domain, newEmulator: binary) }
            return d.stale ? Target(domain: d.domain, newEmulator: d.emulator) : nil
        }
    }

    /// Runs the batch. `progress(outcome, done, total)` is called on this thread as each domain is
    /// skipped or its handoff ends (adoption by libvirtd comes after all of them).
    public func run(progress: @escaping @Sendable (QEMUBatchOutcome, Int, Int) -> Void = { _, _, _ in }) throws -> QEMUBatchSummary {
        try QEMUHost.holdingHost(runDirectory: template.runDirectory, holdSignals: template.holdSignals) { try runHeld(progress: progress) }
    }

    func runHeld(progress: @escaping @Sendable (QEMUBatchOutcome, Int, Int) -> Void) throws -> QEMUBatchSummary {
        let began = Host.monotonicNanoseconds()

        var summary = QEMUBatchSummary(parallel: parallel)
        let results = OutcomeTable()
        // Preflight all with libvirtd up, one after another (libvirt probes binaries).
        var ready: [QEMUUpgrade] = []
        // One domain named twice (or by name and by UUID) would get two new QEMUs on one guest's RAM.
        var names = Set<String>()
        let lookup = try? LibvirtConnection.connect(uri: template.uri, answeringWithin: template.timeoutSeconds)
        for target in targets {
            let canonical = (try? lookup?.domain(target.domain).name) ?? target.domain
            guard names.insert(canonical).inserted else {
                let outcome = QEMUBatchOutcome(domain: target.domain, status: .skipped, reason: "domain \(canonical) is named more than once in this batch; upgraded once")
                progress(outcome, results.add(outcome), targets.count)
                continue
            }
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
            // Nothing was started or paused; libvirtd may still exit later (SIGTERM was sent), so
            // make sure it runs again.
            _ = try? daemon.start(uri: template.uri)
            for u in ready { try? u.log(.rolledBack, note: "libvirtd did not stop: \(error)") }
            throw error
        }
        for u in ready { u.libvirtdStoppedAt = stopped }

        // Waves of `parallel` domains: their new QEMUs start in parallel (the guests run), then
        // their pauses are taken one at a time (overlapping pauses, or a pause beside a QEMU
        // starting, share the CPUs and each grows: measured 2.5× a single pause at 4 on 2 cores),
        // then they finish in parallel. Each domain keeps its own journal, rollback and outcome.
        let total = targets.count
        var failed = Set<String>()
        func record(_ o: QEMUBatchOutcome?) {
            guard let o else { return }
            failed.insert(o.domain)
            progress(o, results.add(o), total)
        }
        for first in stride(from: 0, to: ready.count, by: parallel) {
            let wave = Array(ready[first..<min(first + parallel, ready.count)])
            for (_, o) in Self.concurrently(wave, .start) { record(o) }
            for u in wave where !failed.contains(u.options.domain) { record(Self.attempt(u, .pause)) }
            let finishing = wave.filter { !failed.contains($0.options.domain) }
            for (u, o) in Self.concurrently(finishing, .finish) {
                if let o { record(o); continue }
                let done = QEMUBatchOutcome(domain: u.options.domain, status: .upgraded, report: u.report, journal: u.journal.path)
                progress(done, results.add(done), total)
            }
        }

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

extension QEMUBatchUpgrade {
    /// One step of one domain's upgrade: nil if it went on, else how that domain ended.
    static func attempt(_ u: QEMUUpgrade, _ step: QEMUUpgrade.Step) -> QEMUBatchOutcome? {
        do { try u.perform(step); return nil } catch QEMUUpgradeError.rollForwardIncomplete(let why) {
            return QEMUBatchOutcome(domain: u.options.domain, status: .incomplete, reason: why, report: u.report, journal: u.journal.path)
        } catch let e as QEMUUpgradeError where e.kind == "lost" {
            return QEMUBatchOutcome(domain: u.options.domain, status: .incomplete, reason: "\(e)", report: u.report, journal: u.journal.path)
        } catch {
            return QEMUBatchOutcome(domain: u.options.domain, status: .rolledBack, reason: "\(error)", report: u.report, journal: u.journal.path)
        }
    }

    /// `step` for each upgrade on its own thread, joined; the results in the upgrades' order.
    static func concurrently(_ upgrades: [QEMUUpgrade], _ step: QEMUUpgrade.Step) -> [(QEMUUpgrade, QEMUBatchOutcome?)] {
        let slots = OutcomeSlots(upgrades.count)
        let group = DispatchGroup()
        for (i, u) in upgrades.enumerated() {
            group.enter()
            Thread {
                slots.set(i, attempt(u, step))
                group.leave()
            }.start()
        }
        group.wait()
        return upgrades.enumerated().map { ($1, slots.get($0)) }
    }
}

/// One result slot per thread of `concurrently`.
final class OutcomeSlots: @unchecked Sendable {
    private let lock = NSLock()
    private var values: [QEMUBatchOutcome?]
    init(_ n: Int) { values = Array(repeating: nil, count: n) }
    func set(_ i: Int, _ v: QEMUBatchOutcome?) { lock.withLock { values[i] = v } }
    func get(_ i: Int) -> QEMUBatchOutcome? { lock.withLock { values[i] } }
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
