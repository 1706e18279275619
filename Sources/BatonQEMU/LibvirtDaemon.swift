import BatonLibvirt
import BatonSystem
import Foundation
import Glibc

/// The libvirtd process on this host, without an init system to ask: found by its pid file,
/// stopped with SIGTERM (running domains survive a libvirtd restart by design) and started
/// again with the command line it had, so that its reconnect path adopts what Baton changed.
public struct LibvirtDaemon: Codable, Sendable {
    public var pidFile: String
    /// The daemon's own command line, as it was running (`libvirtd -d`, or a wrapper's).
    public var commandLine: [String]

    public init(pidFile: String = "/run/libvirtd.pid", commandLine: [String]) {
        self.pidFile = pidFile
        self.commandLine = commandLine
    }

    /// The live pid named in `pidFile`, or nil.
    static func livePid(in pidFile: String) -> pid_t? {
        guard let text = Host.readSmallFile(pidFile), let pid = pid_t(text.trimmingCharacters(in: .whitespacesAndNewlines)), Host.isAlive(pid) else { return nil }
        return pid
    }

    public static func running(pidFile: String = "/run/libvirtd.pid") throws -> LibvirtDaemon {
        guard let pid = livePid(in: pidFile) else {
            throw QEMUUpgradeError.refused("libvirtd is not running (no live pid in \(pidFile)); Baton restarts libvirtd to have it adopt the new QEMU")
        }
        var argv = try ProcessHandles.commandLine(of: pid)
        if let exe = try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/\(pid)/exe"), !exe.hasSuffix(" (deleted)"), argv.first?.hasPrefix("/") != true {
            argv[0] = exe
        }
        return LibvirtDaemon(pidFile: pidFile, commandLine: argv)
    }

    public var pid: pid_t? { Self.livePid(in: pidFile) }

    /// SIGTERM and wait (bounded) until the process is gone. Returns milliseconds taken.
    @discardableResult
    public func stop(timeoutSeconds: Double = 30) throws -> Double {
        let start = Host.monotonicNanoseconds()
        guard let pid else { return 0 }
        kill(pid, SIGTERM)
        let deadline = Date().addingTimeInterval(timeoutSeconds)
        while Host.isAlive(pid) {
            if Date() > deadline { throw QEMUUpgradeError.refused("libvirtd (pid \(pid)) did not stop within \(timeoutSeconds) s") }
            usleep(5_000)
        }
        return Double(Host.monotonicNanoseconds() - start) / 1e6
    }

    /// Starts the daemon (daemonized) and waits until `uri` answers. Returns milliseconds taken.
    @discardableResult
    public func start(uri: String, timeoutSeconds: Double = 60) throws -> Double {
        let start = Host.monotonicNanoseconds()
        if pid == nil {
            var argv = commandLine
            if !argv.contains("-d") && !argv.contains("--daemon") { argv.append("-d") }
            let log = "/var/log/libvirt/baton-libvirtd-start.log"
            let spawner = try Spawn.detached(argv[0], Array(argv.dropFirst()), logPath: FileManager.default.fileExists(atPath: "/var/log/libvirt") ? log : "/dev/null")
            let status = Spawn.wait(spawner)
            guard status == 0 else { throw QEMUUpgradeError.rollForwardIncomplete("libvirtd did not start (\(argv.joined(separator: " ")) exited \(status))") }
        }
        let deadline = Date().addingTimeInterval(timeoutSeconds)
        while (try? LibvirtConnection.connect(uri: uri, answeringWithin: 5)) == nil {
            if Date() > deadline { throw QEMUUpgradeError.rollForwardIncomplete("libvirtd did not answer on \(uri) within \(timeoutSeconds) s") }
            usleep(10_000)
        }
        return Double(Host.monotonicNanoseconds() - start) / 1e6
    }
}

/// libvirt's capability cache for one emulator (`/var/cache/libvirt/qemu/capabilities`): the
/// flags libvirt drives that binary with, which the status file must carry for the new QEMU.
public enum LibvirtCapabilityCache {
    public static func flags(for emulator: String, directory: String = "/var/cache/libvirt/qemu/capabilities") -> [String]? {
        for name in ((try? FileManager.default.contentsOfDirectory(atPath: directory)) ?? []).sorted() where name.hasSuffix(".xml") {
            guard let text = try? String(contentsOfFile: "\(directory)/\(name)", encoding: .utf8),
                  text.contains("<emulator>\(emulator)</emulator>") else { continue }
            let flags = LibvirtStatusFile.flags(in: text)
            return flags.isEmpty ? nil : flags
        }
        return nil
    }
}
