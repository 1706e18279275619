import BatonLibvirt
import BatonSystem
import Foundation
import Glibc

/// What a QEMU binary can run, asked of the binary itself before anything is paused: it is
/// started once with no machine, answers QMP with its version, machine types and device types,
/// and quits.
public struct QEMUProbe: Sendable {
    public let version: QEMUVersion
    public let machines: Set<String>
    public let deviceTypes: Set<String>

    struct TypeInfo: Decodable { let name: String }
    struct ListTypes: Encodable { let implements = "device"; let abstract = false }

    public static func run(_ binary: String, runDirectory: String, timeoutSeconds: Double) throws -> QEMUProbe {
        let socket = "\(runDirectory)/probe-\(getpid())-\(UInt32.random(in: 0...UInt32.max)).qmp"
        let log = socket + ".log"
        defer { unlink(socket); unlink(log) }
        let pid = try Spawn.detached(binary, ["-machine", "none", "-nodefaults", "-display", "none", "-S", "-no-user-config",
                                              "-qmp", "unix:\(socket),server=on,wait=off"], logPath: log)
        defer { kill(pid, SIGKILL); _ = Spawn.wait(pid) }
        let deadline = Date().addingTimeInterval(timeoutSeconds)
        while !FileManager.default.fileExists(atPath: socket) {
            if let status = Spawn.exitStatus(pid) {
                let why = (try? String(contentsOfFile: log, encoding: .utf8))?.split(separator: "\n").last.map(String.init) ?? ""
                throw QEMUUpgradeError.refused("new QEMU \(binary) exited with status \(status) at start\(why.isEmpty ? "" : ": \(why)")")
            }
            guard Date() < deadline else { throw QEMUUpgradeError.refused("new QEMU \(binary) did not open its monitor within \(timeoutSeconds) s") }
            usleep(2_000)
        }
        do {
            let qmp = try QMPConnection(path: socket, timeoutSeconds: timeoutSeconds)
            let version = try qmp.query("query-version", as: QEMUVersion.self)
            let machines = try qmp.query("query-machines", as: [QEMUMachine].self)
            let types = try JSONDecoder().decode([TypeInfo].self, from: JSONEncoder().encode(qmp.execute("qom-list-types", arguments: ListTypes())))
            return QEMUProbe(version: version, machines: Set(machines.flatMap { [$0.name] + ($0.alias.map { [$0] } ?? []) }),
                             deviceTypes: Set(types.map(\.name)))
        } catch let e as QEMUUpgradeError { throw e } catch {
            throw QEMUUpgradeError.refused("new QEMU \(binary) did not answer its probe: \(error)")
        }
    }
}

enum QEMUHost {
    /// The run directory, made or checked by PrivateDirectory; a refusal is a preflight refusal.
    static func makePrivateDirectory(_ path: String) throws {
        do { try PrivateDirectory.make(path) } catch let e as PrivateDirectory.Refused {
            throw QEMUUpgradeError.refused("run directory \(e)")
        }
    }

    /// An exclusive lock on `dir/qemu-upgrade.lock`, or a refusal naming who holds it.
    static func hostLock(in dir: String) throws -> Int32 {
        let path = dir + "/qemu-upgrade.lock"
        let fd = try checkedCall("open(\(path))") { open(path, O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0o600) }
        guard flock(fd, LOCK_EX | LOCK_NB) == 0 else {
            let holder = Host.readSmallFile(path)?.trimmingCharacters(in: .whitespacesAndNewlines) ?? "?"
            close(fd)
            throw QEMUUpgradeError.refused("another QEMU upgrade (pid \(holder)) is running on this host; they stop and start the same libvirtd, so they run one at a time")
        }
        ftruncate(fd, 0)
        let me = Array("\(getpid())\n".utf8)
        _ = pwrite(fd, me, me.count, 0)
        return fd
    }

    /// What every QEMU upgrade (one domain or a batch) holds for its whole length. While libvirtd
    /// is down and two QEMUs share a guest, the process must not be stopped half-way by a
    /// terminal or a vanished peer: SIGPIPE is ignored (writes fail with EPIPE), and so are
    /// SIGINT/SIGHUP/SIGTERM when `holdSignals` (SIGKILL still stops it; `baton recover` finishes
    /// the journal). The run directory is private, and the host lock is held: each upgrade stops
    /// and starts the host's one libvirtd, and a second one restarting it mid-handoff would hand
    /// libvirtd the old QEMU.
    static func holdingHost<T>(runDirectory: String, holdSignals: Bool, _ body: () throws -> T) throws -> T {
        signal(SIGPIPE, SIG_IGN)
        let held = holdSignals ? [SIGINT, SIGHUP, SIGTERM].map { ($0, signal($0, SIG_IGN)) } : []
        defer { for (sig, handler) in held { signal(sig, handler) } }
        try makePrivateDirectory(runDirectory)
        let lock = try hostLock(in: runDirectory)
        defer { close(lock) }
        return try body()
    }

    /// The last line QEMU wrote to the domain's log (through virtlogd), for error messages.
    static func logTail(domain: String) -> String {
        let text = (try? String(contentsOfFile: "/var/log/libvirt/qemu/\(domain).log", encoding: .utf8)) ?? ""
        return text.split(separator: "\n").last.map(String.init) ?? "(no log)"
    }
}

/// Starts the new QEMU the way libvirt starts one: nobody's child (a zombie child keeps
/// `virsh destroy` waiting), already in the old QEMU's cgroups and mount namespace when it
/// execs, with the descriptors its command line names. Two small stages of `baton qemu-exec`
/// do it: the first spawns the second and exits (so init adopts the QEMU); the second joins the
/// cgroups and the namespace and execs QEMU.
public enum QEMULauncher {
    public static func launch(_ argv: [String], descriptors: [Int32: Int32], output: Int32, intoCgroupsAndNamespaceOf oldPid: pid_t,
                              launcher: String, runDirectory: String) throws -> pid_t {
        let pidFile = "\(runDirectory)/qemu-launch-\(getpid())-\(UInt32.random(in: 0...UInt32.max)).pid"
        defer { unlink(pidFile) }
        let keep = descriptors.keys.sorted().map(String.init).joined(separator: ",")
        let stage1 = try Spawn.withDescriptors(launcher, ["qemu-exec", "--cgroups-of", "\(oldPid)", "--pid-file", pidFile, "--keep-fds", keep, "--"] + argv,
                                               output: output, descriptors: descriptors)
        let status = Spawn.wait(stage1)
        guard status == 0, let text = Host.readSmallFile(pidFile), let pid = pid_t(text.trimmingCharacters(in: .whitespacesAndNewlines)) else {
            throw QEMUUpgradeError.rolledBack("could not start the new QEMU (launcher exited \(status))")
        }
        return pid
    }

    /// Stage one: spawn stage two with the same descriptors, record its pid, exit.
    public static func stageOne(cgroupsOf oldPid: pid_t, pidFile: String, keep: [Int32], argv: [String]) throws {
        let me = try FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe")
        let map = Dictionary(uniqueKeysWithValues: keep.map { ($0, $0) })
        let pid = try Spawn.withDescriptors(me, ["qemu-exec", "--stage-two", "--cgroups-of", "\(oldPid)", "--"] + argv, output: 2, descriptors: map)
        let fd = try checkedCall("open(\(pidFile))") { open(pidFile, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600) }
        defer { close(fd) }
        let bytes = Array("\(pid)\n".utf8)
        _ = try checkedCall("write(\(pidFile))") { write(fd, bytes, bytes.count) }
    }

    /// Stage two: join the old QEMU's cgroups (its main thread's) and mount namespace, exec.
    public static func stageTwo(cgroupsOf oldPid: pid_t, argv: [String]) throws -> Never {
        try CgroupMembership.of(pid: oldPid).apply(to: getpid(), wholeProcess: true)
        if !ProcessHandles.sameMountNamespace(getpid(), oldPid) { try ProcessHandles.joinMountNamespace(of: oldPid) }
        var cargs: [UnsafeMutablePointer<CChar>?] = argv.map { strdup($0) } + [nil]
        execv(argv[0], &cargs)
        throw SyscallError("execv(\(argv[0]))", errno: errno)
    }
}
