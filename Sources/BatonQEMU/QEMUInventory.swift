import BatonLibvirt
import BatonSystem
import Foundation
import Glibc

/// One running QEMU domain, and whether its process still runs the binary installed at the
/// path libvirt started it from. After a package upgrade replaces that file (a new inode at
/// the same path) or removes it, the running process is "stale": it runs code that is no
/// longer installed until it is upgraded in place or cold-booted.
public struct QEMUDomainStatus: Codable, Sendable, Equatable {
    public var domain: String
    public var pid: Int32
    /// The `<emulator>` libvirt started the process from.
    public var emulator: String
    /// What `/proc/PID/exe` names (ends in " (deleted)" once the file was replaced or removed).
    public var runningBinary: String
    public var runningVersion: String?
    /// The version of the binary now at `emulator` (nil if there is none).
    public var installedVersion: String?
    public var stale: Bool
    /// Why it is stale, in words ("… was replaced by a different file"), or nil.
    public var staleReason: String?
    /// Guest RAM is shared memory (a handoff leaves it in place); otherwise `baton enroll` first.
    public var sharedRAM: Bool

    public init(domain: String, pid: Int32, emulator: String, runningBinary: String, runningVersion: String?, installedVersion: String?,
                stale: Bool, staleReason: String?, sharedRAM: Bool) {
        (self.domain, self.pid, self.emulator, self.runningBinary) = (domain, pid, emulator, runningBinary)
        (self.runningVersion, self.installedVersion, self.stale, self.staleReason, self.sharedRAM) = (runningVersion, installedVersion, stale, staleReason, sharedRAM)
    }
}

/// Finds every running QEMU domain of a libvirt connection and says which are stale.
public enum QEMUInventory {
    /// The running domains of `uri`, from libvirt's list and its status files (pid, emulator).
    /// A domain whose status file cannot be read is left out (it is not a local QEMU domain).
    public static func scan(uri: String, stateDirectory: String = "/run/libvirt/qemu", timeoutSeconds: Double = 10) throws -> [QEMUDomainStatus] {
        let names = try LibvirtConnection.connect(uri: uri, answeringWithin: timeoutSeconds).activeDomainNames().sorted()
        var versions: [String: String] = [:]  // "dev:ino" → version: one probe per distinct binary
        func version(_ path: String, identity: String?) -> String? {
            if let identity, let v = versions[identity] { return v }
            guard let out = try? Spawn.run(path, ["--version"]), out.status == 0,
                  let m = out.output.firstMatch(of: #/version (\d+\.\d+\.\d+)/#) else { return nil }
            if let identity { versions[identity] = String(m.1) }
            return String(m.1)
        }
        return names.compactMap { name -> QEMUDomainStatus? in
            guard let text = try? String(contentsOfFile: "\(stateDirectory)/\(name).xml", encoding: .utf8) else { return nil }
            let status = LibvirtStatusFile(xml: text)
            guard let pid = status.pid, Host.isAlive(pid), let emulator = status.emulator else { return nil }
            let exe = "/proc/\(pid)/exe"
            let running = (try? FileManager.default.destinationOfSymbolicLink(atPath: exe)) ?? "?"
            let runningID = fileIdentity(exe), installedID = fileIdentity(emulator)
            let reason = staleness(running: running, runningIdentity: runningID, emulator: emulator, installedIdentity: installedID)
            let shared = (try? QEMUCommandLine(ProcessHandles.commandLine(of: pid)).ramBackends).map { $0.count == 1 && $0[0].shared } ?? false
            return QEMUDomainStatus(domain: name, pid: pid, emulator: emulator, runningBinary: running,
                                    runningVersion: version(exe, identity: runningID), installedVersion: installedID == nil ? nil : version(emulator, identity: installedID),
                                    stale: reason != nil, staleReason: reason, sharedRAM: shared)
        }
    }

    /// Why a process running `running` (identity `runningIdentity`) is not running the file at
    /// `emulator` (identity `installedIdentity`), or nil if it is. Pure.
    public static func staleness(running: String, runningIdentity: String?, emulator: String, installedIdentity: String?) -> String? {
        guard let installedIdentity else { return "\(emulator) no longer exists" }
        guard let runningIdentity else { return nil }  // cannot tell: do not claim staleness
        if runningIdentity == installedIdentity { return nil }
        return "\(emulator) was replaced by a different file\(running.hasSuffix(" (deleted)") ? " (the running one is deleted)" : "")"
    }

    /// Device and inode of what `path` resolves to (for `/proc/PID/exe`, the running file even
    /// when deleted), or nil.
    static func fileIdentity(_ path: String) -> String? {
        var st = stat()
        guard stat(path, &st) == 0 else { return nil }
        return "\(st.st_dev):\(st.st_ino)"
    }

    /// Whether the process `pid` runs the very file at `binary`.
    public static func runs(_ pid: pid_t, binary: String) -> Bool {
        guard let a = fileIdentity("/proc/\(pid)/exe"), let b = fileIdentity(binary) else { return false }
        return a == b
    }
}

/// The QEMU binaries on this host (the system's, Baton's unpacked ones, those running domains
/// run), their versions, and the upgrade modes each ordered pair supports: what `baton check`
/// reports.
public struct QEMUInstallation: Codable, Sendable, Equatable {
    public var path: String
    public var version: String

    public struct Pair: Codable, Sendable, Equatable {
        public var from: String
        public var to: String
        /// "cpr-transfer" (both ≥ 10.0; the domain must already run with aux-ram-share=on, as
        /// after one Baton upgrade), "ignore-shared" (any pair; machine type and devices are
        /// checked per domain at preflight), "copy" (private RAM, with --allow-copy).
        public var modes: [String]
        public var note: String?
    }

    public static let searchPaths = ["/usr/bin/qemu-system-x86_64", "/usr/local/bin/qemu-system-x86_64"]

    /// Every distinct binary found: the search paths, `/opt/baton/*/usr/bin`, and running QEMUs.
    public static func find() -> [QEMUInstallation] {
        var paths = searchPaths
        for dir in ((try? FileManager.default.contentsOfDirectory(atPath: "/opt/baton")) ?? []).sorted() {
            paths.append("/opt/baton/\(dir)/usr/bin/qemu-system-x86_64")
        }
        for pid in ((try? FileManager.default.contentsOfDirectory(atPath: "/proc")) ?? []).compactMap({ pid_t($0) }) {
            if let exe = try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/\(pid)/exe"), exe.hasSuffix("/qemu-system-x86_64"), !exe.hasSuffix(" (deleted)") {
                paths.append(exe)
            }
        }
        var seen = Set<String>(), out: [QEMUInstallation] = []
        for p in paths where FileManager.default.isExecutableFile(atPath: p) {
            guard let id = QEMUInventory.fileIdentity(p), seen.insert(id).inserted,
                  let r = try? Spawn.run(p, ["--version"]), r.status == 0, let m = r.output.firstMatch(of: #/version (\d+\.\d+\.\d+)/#) else { continue }
            out.append(QEMUInstallation(path: p, version: String(m.1)))
        }
        return out
    }

    /// The modes from `a` to `b` (pure).
    public static func pair(_ a: QEMUInstallation, _ b: QEMUInstallation) -> Pair {
        let va = a.version.split(separator: ".").compactMap { Int($0) }, vb = b.version.split(separator: ".").compactMap { Int($0) }
        var modes = (va.first ?? 0) >= 10 && (vb.first ?? 0) >= 10 ? ["cpr-transfer"] : []
        modes += ["ignore-shared", "copy"]
        let note = vb.lexicographicallyPrecedes(va) ? "a downgrade: only for machine types and devices both have" : nil
        return Pair(from: a.path, to: b.path, modes: modes, note: note)
    }
}
