import BatonController
import BatonLibvirt
import BatonSystem
import Foundation
import Glibc

/// The two ways a QEMU handoff can end other than cleanly, used by the live sequence and by
/// `baton recover` alike: back to the old QEMU (only before the new one ran the guest) or
/// forward to the new one (after).
public enum QEMURecovery {
    /// Kill the new QEMU, give the old one its socket paths back, resume it if it is stopped,
    /// start libvirtd (unless a batch holds it stopped for other domains). Returns the old QEMU's
    /// run state as observed afterwards.
    @discardableResult
    public static func rollBack(record: QEMUHandoffRecord, oldMonitor: QMPConnection?, newMonitor: QMPConnection?, startLibvirtd: Bool = true) -> String {
        if let newPid = record.newPid, newPid != record.oldPid, isQEMU(newPid, of: record.domain) { killAndWait(newPid) }
        for (path, kept) in record.movedSockets where FileManager.default.fileExists(atPath: kept) {
            rename(kept, path)
        }
        var observed = "unreachable"
        if oldMonitor == nil, record.libvirtd.pid != nil, isQEMU(record.oldPid, of: record.domain) {
            // libvirtd runs, so it holds the old QEMU's monitor (it was never stopped, or was
            // started again): ask it, not QMP.
            if let d = try? LibvirtConnection.connect(uri: record.uri, answeringWithin: 10).domain(record.domain), let state = try? d.state().state {
                if state == .paused { try? d.resume() }
                observed = (try? d.state().state.rawValue) ?? "unreachable"
            }
        } else if Host.isAlive(record.oldPid), let monitor = oldMonitor ?? (try? QMPConnection(path: record.monitorPath, timeoutSeconds: 5, greetingTimeoutSeconds: 2)) {
            if let s = try? monitor.query("query-status", as: QEMURunState.self), !s.running {
                _ = try? monitor.execute("cont")
            }
            observed = (try? monitor.query("query-status", as: QEMURunState.self).status) ?? "unreachable"
        } else if !Host.isAlive(record.oldPid) {
            observed = "gone"
        }
        if startLibvirtd { _ = try? record.libvirtd.start(uri: record.uri) }
        return observed == "running" ? "runs the guest (observed: running)" : "observed: \(observed)"
    }

    /// Fence the old QEMU, make libvirt's status file describe the new one, start libvirtd
    /// (its reconnect adopts the new QEMU), and check that libvirt sees the domain running.
    public static func rollForward(record: QEMUHandoffRecord, newVCPUs: [Int: Int32]) throws {
        try fenceAndDescribe(record: record, newVCPUs: newVCPUs)
        try awaitAdoption(record: record)
    }

    /// The part of a roll forward that needs libvirtd down: the old QEMU is killed and the
    /// status file names the new one. A batch does this for each domain, then starts libvirtd once.
    public static func fenceAndDescribe(record: QEMUHandoffRecord, newVCPUs: [Int: Int32]) throws {
        guard let newPid = record.newPid, isQEMU(newPid, of: record.domain) else {
            throw QEMUUpgradeError.rollForwardIncomplete("the new QEMU (pid \(record.newPid ?? 0)) is not running")
        }
        let statusText: String
        do { statusText = try String(contentsOfFile: record.statusFile, encoding: .utf8) } catch {
            throw QEMUUpgradeError.rollForwardIncomplete("cannot read \(record.statusFile): \(error)")
        }
        let status = LibvirtStatusFile(xml: statusText)
        var vcpus = newVCPUs
        if vcpus.isEmpty, record.libvirtd.pid == nil, let m = try? QMPConnection(path: record.monitorPath, timeoutSeconds: 5, greetingTimeoutSeconds: 2) {
            vcpus = Dictionary(uniqueKeysWithValues: ((try? m.query("query-cpus-fast", as: [QEMUCPU].self)) ?? []).map { ($0.cpuIndex, $0.threadId) })
        }
        // vCPU threads into the cgroups libvirt made for them (read from the old threads while
        // they still exist; libvirt's pinning and quotas apply per vCPU cgroup).
        let oldThreads = status.vcpuThreads
        for (index, tid) in vcpus {
            if let oldTid = oldThreads[index], let membership = try? CgroupMembership.of(pid: record.oldPid, tid: oldTid) {
                try? membership.apply(to: tid, wholeProcess: false)
            }
        }
        // SIGKILL, never a clean exit: QEMU unlinks the paths of its listening sockets when it
        // exits cleanly, and those paths now belong to the new QEMU.
        if record.oldPid != newPid, isQEMU(record.oldPid, of: record.domain) { killAndWait(record.oldPid) }
        for kept in record.movedSockets.values { unlink(kept) }
        if status.pid != newPid {
            let rewritten = try status.rewritten(pid: newPid, vcpus: vcpus, emulator: record.newEmulator, flags: record.newCapabilityFlags)
            try writeAtomically(rewritten.xml, to: record.statusFile)
            try writeAtomically("\(newPid)", to: (record.statusFile as NSString).deletingPathExtension + ".pid")
        }
    }

    /// Starts libvirtd if it is down and waits until it reports the domain running on the new QEMU.
    public static func awaitAdoption(record: QEMUHandoffRecord) throws {
        let newPid = record.newPid ?? 0
        try record.libvirtd.start(uri: record.uri)
        let deadline = Date().addingTimeInterval(30)
        while true {
            if let c = try? LibvirtConnection.connect(uri: record.uri, answeringWithin: 10), let d = try? c.domain(record.domain), let s = try? d.state().state {
                if s == .running { return }
                if s == .shutoff || s == .crashed { throw QEMUUpgradeError.rollForwardIncomplete("libvirt reports \(record.domain) \(s.rawValue) after adopting pid \(newPid)") }
            }
            guard Date() < deadline else { throw QEMUUpgradeError.rollForwardIncomplete("libvirt did not report \(record.domain) running after adopting pid \(newPid)") }
            usleep(20_000)
        }
    }

    /// The new QEMU ran the guest and is gone: the old one's CPU and device state is from before,
    /// the RAM from after, so resuming it would corrupt the guest. It is stopped, never resumed;
    /// libvirtd is started (it sees the domain shut off). Returns the error that says so.
    static func lost(record: QEMUHandoffRecord, startLibvirtd: Bool = true) -> QEMUUpgradeError {
        if isQEMU(record.oldPid, of: record.domain) { killAndWait(record.oldPid) }
        for kept in record.movedSockets.values { unlink(kept) }
        if startLibvirtd { _ = try? record.libvirtd.start(uri: record.uri) }
        return .lost("the new QEMU (pid \(record.newPid ?? 0)) died after it ran \(record.domain): the guest is lost (the old QEMU's state was stale: it was stopped, never resumed)")
    }

    /// Points the persistent definition's `<emulator>` at the new binary (the next cold boot
    /// uses it). Returns whether the definition changed.
    public static func updateDefinition(record: QEMUHandoffRecord) -> Bool {
        guard let c = try? LibvirtConnection.connect(uri: record.uri, answeringWithin: 10), let d = try? c.domain(record.domain), d.isPersistent,
              let xml = try? d.inactiveXML() else { return false }
        let updated = xml.replacing(#/<emulator>[^<]*</emulator>/#, with: "<emulator>\(record.newEmulator)</emulator>")
        guard updated != xml else { return false }
        return (try? c.define(xml: updated)) != nil
    }

    /// `baton recover` for a QEMU journal: forward if `committing` was reached and the new QEMU
    /// lives, back otherwise. A batch leaves one journal per domain and libvirtd stopped for all
    /// of them, so every unfinished QEMU journal beside this one is recovered too, and libvirtd is
    /// started only after the last (started earlier, it would reconnect to a domain still
    /// half-way, whose monitor path already leads to its new QEMU).
    public static func recover(entries: [UpgradeJournal.Entry], journal: UpgradeJournal) throws -> String {
        guard let record = unfinishedRecord(entries) else {
            return QEMUHandoffRecord.decode(entries.last(where: { $0.context != nil })?.context ?? "") == nil
                ? "journal has no QEMU handoff record: nothing to do" : "upgrade already finished"
        }
        let directory = (journal.path as NSString).deletingLastPathComponent
        // Not while an upgrade runs here (its journals are unfinished because it is not done).
        let lock = try QEMUHost.hostLock(in: directory)
        defer { close(lock) }
        var journals = [(journal, entries, record)]
        for name in ((try? FileManager.default.contentsOfDirectory(atPath: directory)) ?? []).sorted()
        where name.hasPrefix("journal-qemu-") && name.hasSuffix(".jsonl") && "\(directory)/\(name)" != journal.path {
            let path = "\(directory)/\(name)"
            guard let e = try? UpgradeJournal.read(path: path), let r = unfinishedRecord(e), let j = try? UpgradeJournal(path: path) else { continue }
            journals.append((j, e, r))
        }
        var lines: [String] = [], failures: [String] = [], adopting: [(UpgradeJournal, QEMUHandoffRecord)] = []
        for (j, e, r) in journals {
            do {
                let (line, forward) = try recoverOne(entries: e, record: r, journal: j)
                lines.append(line)
                if forward { adopting.append((j, r)) }
            } catch { failures.append("\(r.domain): \(error)") }
        }
        // One start of libvirtd, after every domain is back on one QEMU.
        _ = try? record.libvirtd.start(uri: record.uri)
        for (j, r) in adopting {
            do {
                try awaitAdoption(record: r)
                try note(j, r, .done, "recovered forward")
            } catch { failures.append("\(r.domain): \(error)") }
        }
        if !failures.isEmpty { throw QEMUUpgradeError.rollForwardIncomplete((lines + failures).joined(separator: "; ")) }
        return lines.joined(separator: "; ")
    }

    static func unfinishedRecord(_ entries: [UpgradeJournal.Entry]) -> QEMUHandoffRecord? {
        guard let context = entries.last(where: { $0.context != nil })?.context, let record = QEMUHandoffRecord.decode(context) else { return nil }
        let phases = Set(entries.map(\.phase))
        return phases.contains(.done) || phases.contains(.rolledBack) ? nil : record
    }

    static func note(_ journal: UpgradeJournal, _ record: QEMUHandoffRecord, _ phase: UpgradeJournal.Phase, _ text: String) throws {
        try journal.record(.init(phase: phase, atMonotonicNs: Host.monotonicNanoseconds(), vm: record.domain, oldPid: record.oldPid, newPid: record.newPid,
                                 note: text, context: record.json))
    }

    /// One domain, with libvirtd left as it is. Returns what was done, and whether libvirtd must
    /// still adopt a new QEMU.
    static func recoverOne(entries: [UpgradeJournal.Entry], record: QEMUHandoffRecord, journal: UpgradeJournal) throws -> (String, Bool) {
        let phases = Set(entries.map(\.phase))
        if phases.contains(.committing), let newPid = record.newPid, isQEMU(newPid, of: record.domain) {
            // The new QEMU may have been stopped at the state load: run it, then finish. (Once
            // libvirtd runs again it holds the monitor, and it adopted the running QEMU.)
            if record.libvirtd.pid == nil, let m = try? QMPConnection(path: record.monitorPath, timeoutSeconds: 5, greetingTimeoutSeconds: 2),
               let s = try? m.query("query-status", as: QEMURunState.self), !s.running, s.status == "paused" {
                _ = try? m.execute("cont")
            }
            try fenceAndDescribe(record: record, newVCPUs: [:])
            return ("rolled forward: the new QEMU (pid \(newPid)) runs \(record.domain), libvirt adopted it", true)
        }
        if phases.contains(.committed) {
            try note(journal, record, .done, "lost: the new QEMU died after running the guest")
            throw lost(record: record, startLibvirtd: false)
        }
        let observed = rollBack(record: record, oldMonitor: nil, newMonitor: nil, startLibvirtd: false)
        try note(journal, record, .rolledBack, "recovered back")
        return ("rolled back: the old QEMU (pid \(record.oldPid)) of \(record.domain) \(observed)", false)
    }

    /// Whether `pid` is still a QEMU running `domain` (a journal's pid may have been reused by
    /// an unrelated process since; recovery must never kill that).
    /// Baton's launcher (`baton qemu-exec --stage-two ... -- qemu-system-x86_64 ...`) counts: it
    /// is about to exec that QEMU, and a recovery that spared it would leave two.
    static func isQEMU(_ pid: pid_t, of domain: String) -> Bool {
        guard Host.isAlive(pid), let argv = try? ProcessHandles.commandLine(of: pid) else { return false }
        let qemuOrLauncher = argv.first?.contains("qemu-system") == true || (argv.count > 1 && argv[1] == "qemu-exec")
        return qemuOrLauncher && argv.contains { $0.hasPrefix("guest=\(domain),") || $0 == "guest=\(domain)" }
    }

    static func killAndWait(_ pid: pid_t) {
        kill(pid, SIGKILL)
        let deadline = Date().addingTimeInterval(10)
        while Host.isAlive(pid) && Date() < deadline { usleep(2_000) }
    }

    static func writeAtomically(_ text: String, to path: String) throws {
        let tmp = path + ".baton-tmp"
        let fd = try checkedCall("open(\(tmp))") { open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600) }
        let bytes = Array(text.utf8)
        var done = 0
        while done < bytes.count {
            let n = bytes[done...].withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
            guard n > 0 else { close(fd); throw SyscallError("write(\(tmp))", errno: errno) }
            done += n
        }
        fsync(fd)
        close(fd)
        _ = try checkedCall("rename(\(tmp) → \(path))") { rename(tmp, path) }
    }
}
