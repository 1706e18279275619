import BatonCore
import BatonSystem
import Foundation
import Glibc

/// `baton recover`: reads a journal and makes the world match it. Before `committing`, the
/// old instance owns the guest (kill the new one, resume the old). From `committing` on, the
/// new one does if it runs; the old one must then be gone.
public enum UpgradeRecovery {
    /// What recovery did, as a type (callers decide on `result`, never on the text).
    public struct Outcome: CustomStringConvertible, Sendable {
        public enum Result: String, Sendable { case nothingToDo, rolledBack, rolledForward, lost }
        public let result: Result
        public let description: String
        init(_ result: Result, _ description: String) { self.result = result; self.description = description }
    }

    public static func recover(journalPath: String) throws -> Outcome {
        let entries = try UpgradeJournal.read(path: journalPath)
        guard let first = entries.first, let last = entries.last else { return Outcome(.nothingToDo, "journal \(journalPath) is empty: nothing to do") }
        let phases = Set(entries.map(\.phase))
        if phases.contains(.done) || phases.contains(.rolledBack) { return Outcome(.nothingToDo, "upgrade of \(first.vm) already finished (\(last.phase.rawValue))") }
        let oldPid = entries.compactMap(\.oldPid).first
        let newPid = entries.compactMap(\.newPid).last
        let journal = try UpgradeJournal(path: journalPath)
        let control = VMMSocketControl(socketPath: first.vm)
        if let generation = first.inPlaceGeneration {
            return try recoverInPlace(first: first, generationBefore: generation, journal: journal, control: control)
        }
        func alive(_ pid: Int32?) -> Bool { pid.map(Host.isAlive) ?? false }
        if phases.contains(.committing) {
            // The controller decided to commit. Finish that decision if the old instance still
            // holds the verified handoff; otherwise see who runs the guest.
            if alive(oldPid), (try? control.client.expectOK("PUT", BatonVMMAPI.commit)) != nil {
                try journal.record(.init(phase: .committed, atMonotonicNs: Host.monotonicNanoseconds(), vm: first.vm, oldPid: oldPid, newPid: newPid))
            }
            var owner: Int32?
            for _ in 0..<200 {
                if let pid = try? control.pid(), pid == newPid, (try? control.state()) == "Running" { owner = pid; break }
                usleep(10_000)
            }
            if let owner {
                if alive(oldPid) { kill(oldPid!, SIGKILL) }  // never two instances
                try journal.record(.init(phase: .done, atMonotonicNs: Host.monotonicNanoseconds(), vm: first.vm, oldPid: oldPid, newPid: newPid, note: "recovered forward"))
                return Outcome(.rolledForward, "rolled forward: new instance pid \(owner) owns \(first.vm)")
            }
            if alive(oldPid) {
                // The commit never reached the new instance: the old one still holds the guest.
                if alive(newPid) { kill(newPid!, SIGKILL) }
                _ = try? control.client.request("PUT", BatonVMMAPI.abandon)
                if (try? control.state()) == "Paused" { try control.resume() }
                try journal.record(.init(phase: .rolledBack, atMonotonicNs: Host.monotonicNanoseconds(), vm: first.vm, oldPid: oldPid, newPid: newPid, note: "commit never completed"))
                return Outcome(.rolledBack, "rolled back: old instance pid \(oldPid!) resumed (the commit never completed)")
            }
            return Outcome(.lost, "LOST: neither instance of \(first.vm) runs the guest")
        }
        if alive(newPid) { kill(newPid!, SIGKILL) }
        if alive(oldPid) {
            _ = try? control.client.request("PUT", BatonVMMAPI.abandon)
            if (try? control.state()) == "Paused" { try control.resume() }
        }
        try journal.record(.init(phase: .rolledBack, atMonotonicNs: Host.monotonicNanoseconds(), vm: first.vm, oldPid: oldPid, newPid: newPid, note: "recovered back"))
        return Outcome(.rolledBack, "rolled back: old instance pid \(oldPid.map(String.init) ?? "?") keeps \(first.vm)")
    }

    /// Exec in place: one process, so nothing is ever two instances; whichever image holds the VM
    /// now (the old one if the exec never ran, the new one if it did) is resumed if paused.
    static func recoverInPlace(first: UpgradeJournal.Entry, generationBefore: Int, journal: UpgradeJournal, control: VMMSocketControl) throws -> Outcome {
        let pid = first.oldPid ?? 0
        func note(_ phase: UpgradeJournal.Phase, _ text: String) throws {
            try journal.record(.init(phase: phase, atMonotonicNs: Host.monotonicNanoseconds(), vm: first.vm, oldPid: pid, newPid: pid, note: text))
        }
        switch UpgradeController.observeInPlace(control, generationBefore: generationBefore, pid: pid) {
        case .image(let generation, let paused):
            if paused { try control.resume() }
            if generation > generationBefore {
                try note(.done, "recovered forward: the new image runs the VM")
                return Outcome(.rolledForward, "rolled forward: the new image (pid \(pid), generation \(generation)) runs \(first.vm)\(paused ? ", resumed" : "")")
            }
            try note(.rolledBack, "recovered back: the old image runs the VM")
            return Outcome(.rolledBack, "rolled back: the old image (pid \(pid)) keeps \(first.vm)\(paused ? ", resumed" : "")")
        case .gone:
            try note(.rolledBack, "LOST: the VMM process is gone")
            return Outcome(.lost, "LOST: the VMM process of \(first.vm) (pid \(pid)) is gone")
        }
    }
}
