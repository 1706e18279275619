import BatonSystem
import Foundation
import Glibc

/// `baton recover`: reads a journal and makes the world match it. Before `committing`, the
/// old instance owns the guest (kill the new one, resume the old). From `committing` on, the
/// new one does if it runs; the old one must then be gone.
public enum UpgradeRecovery {
    public static func recover(journalPath: String) throws -> String {
        let entries = try UpgradeJournal.read(path: journalPath)
        guard let first = entries.first, let last = entries.last else { return "journal \(journalPath) is empty: nothing to do" }
        let phases = Set(entries.map(\.phase))
        if phases.contains(.done) || phases.contains(.rolledBack) { return "upgrade of \(first.vm) already finished (\(last.phase.rawValue))" }
        let oldPid = entries.compactMap(\.oldPid).first
        let newPid = entries.compactMap(\.newPid).last
        let journal = try UpgradeJournal(path: journalPath)
        let control = VMMSocketControl(socketPath: first.vm)
        func alive(_ pid: Int32?) -> Bool { pid.map { kill($0, 0) == 0 } ?? false }
        if phases.contains(.committing) {
            if alive(newPid) {
                if alive(oldPid) { kill(oldPid!, SIGKILL) }  // never two instances
                try journal.record(.init(phase: .done, atMonotonicNs: Host.monotonicNanoseconds(), vm: first.vm, oldPid: oldPid, newPid: newPid, note: "recovered forward"))
                return "rolled forward: new instance pid \(newPid!) owns \(first.vm)"
            }
            if alive(oldPid) {
                // The new instance died before it ran the guest; the old one still holds it paused.
                _ = try? control.client.request("PUT", "/api/v1/baton/handoff.abandon")
                try control.resume()
                try journal.record(.init(phase: .rolledBack, atMonotonicNs: Host.monotonicNanoseconds(), vm: first.vm, oldPid: oldPid, newPid: newPid, note: "new instance gone after commit began"))
                return "rolled back: old instance pid \(oldPid!) resumed (the new one died before running the guest)"
            }
            return "LOST: neither instance of \(first.vm) is alive"
        }
        if alive(newPid) { kill(newPid!, SIGKILL) }
        if alive(oldPid) {
            _ = try? control.client.request("PUT", "/api/v1/baton/handoff.abandon")
            if (try? control.state()) == "Paused" { try control.resume() }
        }
        try journal.record(.init(phase: .rolledBack, atMonotonicNs: Host.monotonicNanoseconds(), vm: first.vm, oldPid: oldPid, newPid: newPid, note: "recovered back"))
        return "rolled back: old instance pid \(oldPid.map(String.init) ?? "?") keeps \(first.vm)"
    }
}
