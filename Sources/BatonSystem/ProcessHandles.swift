import CBatonLinux
import Foundation
import Glibc

/// Another process's descriptors and namespaces, taken the way the kernel allows a peer with
/// ptrace rights to take them (pidfd_getfd, /proc/PID/ns).
public enum ProcessHandles {
    /// A duplicate (close-on-exec) of descriptor `fd` of process `pid`.
    public static func duplicate(fd: Int32, of pid: pid_t) throws -> FileDescriptor {
        let pidfd = try checkedCall("pidfd_open(\(pid))") { cbaton_pidfd_open(pid) }
        defer { close(pidfd) }
        let copy = try checkedCall("pidfd_getfd(\(pid), \(fd))") { cbaton_pidfd_getfd(pidfd, fd) }
        return FileDescriptor(owning: copy)
    }

    /// What `/proc/PID/fd/N` points at, for every open descriptor of `pid`.
    public static func descriptors(of pid: pid_t) -> [Int32: String] {
        let dir = "/proc/\(pid)/fd"
        var out: [Int32: String] = [:]
        for name in (try? FileManager.default.contentsOfDirectory(atPath: dir)) ?? [] {
            if let n = Int32(name), let target = try? FileManager.default.destinationOfSymbolicLink(atPath: "\(dir)/\(name)") {
                out[n] = target
            }
        }
        return out
    }

    /// The NUL-separated `/proc/PID/cmdline` as arguments.
    public static func commandLine(of pid: pid_t) throws -> [String] {
        guard let data = FileManager.default.contents(atPath: "/proc/\(pid)/cmdline"), !data.isEmpty else {
            throw SyscallError("read(/proc/\(pid)/cmdline)", errno: ESRCH)
        }
        var parts = data.split(separator: 0, omittingEmptySubsequences: false).map { String(decoding: $0, as: UTF8.self) }
        if parts.last == "" { parts.removeLast() }
        return parts
    }

    /// Thread ids of `pid`, ascending (none if it is gone).
    public static func threadIDs(of pid: pid_t) -> [pid_t] {
        ((try? FileManager.default.contentsOfDirectory(atPath: "/proc/\(pid)/task")) ?? []).compactMap { pid_t($0) }.sorted()
    }

    /// Thread ids of `pid` with their names (`comm`).
    public static func threads(of pid: pid_t) -> [(tid: pid_t, name: String)] {
        threadIDs(of: pid).map { tid in
            (tid, Host.readSmallFile("/proc/\(pid)/task/\(tid)/comm")?.trimmingCharacters(in: .whitespacesAndNewlines) ?? "")
        }
    }

    /// Joins the mount namespace of `pid`. The caller must be single-threaded (setns(2)).
    public static func joinMountNamespace(of pid: pid_t) throws {
        let fd = try checkedCall("open(/proc/\(pid)/ns/mnt)") { open("/proc/\(pid)/ns/mnt", O_RDONLY | O_CLOEXEC) }
        defer { close(fd) }
        _ = try checkedCall("setns(/proc/\(pid)/ns/mnt, CLONE_NEWNS)") { cbaton_setns_mount(fd) }
    }

    /// Whether `pid` is in the same mount namespace as `other`.
    public static func sameMountNamespace(_ pid: pid_t, _ other: pid_t) -> Bool {
        let a = try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/\(pid)/ns/mnt")
        let b = try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/\(other)/ns/mnt")
        return a != nil && a == b
    }
}

extension Spawn {
    /// Starts `path` in a new session with `descriptors[target] = source` placed at exactly
    /// those numbers (and nothing else above stdio); stdin is /dev/null, stdout and stderr go
    /// to `output`. Used to hand a process descriptors at the numbers its command line names.
    public static func withDescriptors(_ path: String, _ arguments: [String], output: Int32,
                                       descriptors: [Int32: Int32], environment: [String: String]? = nil) throws -> pid_t {
        // Sources are first moved above every target, so no dup2 clobbers a later source.
        let floor = (descriptors.keys.max() ?? 2) + 1
        var lifted: [(from: Int32, to: Int32)] = []
        defer { lifted.forEach { close($0.from) } }
        for (target, source) in descriptors.sorted(by: { $0.key < $1.key }) {
            let high = try checkedCall("fcntl(F_DUPFD_CLOEXEC)") { fcntl(source, F_DUPFD_CLOEXEC, max(floor, 64)) }
            lifted.append((high, target))
        }
        var argv: [UnsafeMutablePointer<CChar>?] = ([path] + arguments).map { strdup($0) } + [nil]
        defer { argv.forEach { free($0) } }
        var envp: [UnsafeMutablePointer<CChar>?] = (environment ?? ProcessInfo.processInfo.environment).map { strdup("\($0.key)=\($0.value)") } + [nil]
        defer { envp.forEach { free($0) } }
        let from = lifted.map(\.from), to = lifted.map(\.to)
        var pid: pid_t = 0
        let rc = cbaton_spawn_with_fds(&pid, path, &argv, &envp, output, from, to, Int32(lifted.count))
        guard rc == 0 else { throw SyscallError("posix_spawn(\(path))", errno: rc) }
        return pid
    }
}
