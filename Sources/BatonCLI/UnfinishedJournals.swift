import BatonController
import BatonQEMU
import Foundation

/// Every upgrade a dead controller left half-way, found by its journal: what `baton serve` finishes
/// before it takes requests, and what `baton recover --all` finishes by hand. A batonvmm journal
/// (`journal-*.jsonl`) is finished by UpgradeRecovery, a QEMU one (`journal-qemu-*.jsonl`, with its
/// handoff record) by QEMURecovery, which also takes every other unfinished QEMU journal beside it.
struct UnfinishedJournals {
    struct Outcome: Sendable {
        let journal: String
        let message: String
        let failed: Bool
    }

    let directories: [String]

    /// Unfinished journals, oldest name first (a finished one ends in `done` or `rolledBack`).
    func find() -> [(path: String, entries: [UpgradeJournal.Entry])] {
        var seen = Set<String>()
        var found: [(String, [UpgradeJournal.Entry])] = []
        for directory in directories {
            let names = ((try? FileManager.default.contentsOfDirectory(atPath: directory)) ?? []).sorted()
            for name in names where name.hasPrefix("journal-") && name.hasSuffix(".jsonl") {
                let path = (directory as NSString).appendingPathComponent(name)
                guard seen.insert((path as NSString).resolvingSymlinksInPath).inserted,
                      let entries = try? UpgradeJournal.read(path: path), !entries.isEmpty else { continue }
                let phases = Set(entries.map(\.phase))
                if phases.contains(.done) || phases.contains(.rolledBack) { continue }
                found.append((path, entries))
            }
        }
        return found
    }

    /// Recovers each one; never throws (a journal that cannot be finished is reported, and the
    /// rest still run).
    func recoverAll() -> [Outcome] {
        var outcomes: [Outcome] = []
        var qemuDone = Set<String>()
        for (path, entries) in find() {
            if entries.contains(where: { $0.context != nil }) {
                // One QEMURecovery per directory: it finishes every QEMU journal beside this one.
                let directory = (path as NSString).deletingLastPathComponent
                guard qemuDone.insert(directory).inserted else { continue }
                do {
                    outcomes.append(.init(journal: path, message: try QEMURecovery.recover(entries: entries, journal: UpgradeJournal(path: path)), failed: false))
                } catch {
                    outcomes.append(.init(journal: path, message: "\(error)", failed: true))
                }
                continue
            }
            do {
                let outcome = try UpgradeRecovery.recover(journalPath: path)
                outcomes.append(.init(journal: path, message: outcome.description, failed: outcome.result == .lost))
            } catch {
                outcomes.append(.init(journal: path, message: "\(error)", failed: true))
            }
        }
        return outcomes
    }
}
