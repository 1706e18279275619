import Foundation
import Glibc

/// The cgroups one thread is in, as `/proc/PID/task/TID/cgroup` lists them, and moving another
/// process or thread into the same ones. Handles cgroup v1 hierarchies and the v2 hierarchy
/// (mounted at /sys/fs/cgroup or, on hybrid hosts, /sys/fs/cgroup/unified), including v2
/// threaded subtrees such as libvirt's `.../emulator` and `.../vcpuN`.
public struct CgroupMembership: Equatable, Sendable {
    /// (controllers, path) pairs; controllers is "" for v2.
    public let entries: [(controllers: String, path: String)]

    public static func == (a: CgroupMembership, b: CgroupMembership) -> Bool {
        a.entries.map { "\($0.controllers):\($0.path)" } == b.entries.map { "\($0.controllers):\($0.path)" }
    }

    public init(entries: [(controllers: String, path: String)]) { self.entries = entries }

    public static func of(pid: pid_t, tid: pid_t? = nil) throws -> CgroupMembership {
        let file = "/proc/\(pid)/task/\(tid ?? pid)/cgroup"
        guard let text = Host.readSmallFile(file) else { throw SyscallError("read(\(file))", errno: ESRCH) }
        return parse(text)
    }

    public static func parse(_ text: String) -> CgroupMembership {
        CgroupMembership(entries: text.split(separator: "\n").compactMap { line in
            let parts = line.split(separator: ":", maxSplits: 2, omittingEmptySubsequences: false)
            guard parts.count == 3 else { return nil }
            return (String(parts[1]), String(parts[2]))
        })
    }

    /// The directory of one entry under /sys/fs/cgroup.
    static func directory(controllers: String, path: String) -> String {
        if controllers.isEmpty {
            let unified = FileManager.default.fileExists(atPath: "/sys/fs/cgroup/unified/cgroup.procs") ? "/sys/fs/cgroup/unified" : "/sys/fs/cgroup"
            return unified + path
        }
        let name = controllers.hasPrefix("name=") ? String(controllers.dropFirst(5)) : String(controllers.split(separator: ",")[0])
        return "/sys/fs/cgroup/\(name)\(path)"
    }

    /// Moves `tid` (with `wholeProcess`, its whole thread group) into these cgroups. Root
    /// entries ("/") are left alone.
    public func apply(to tid: pid_t, wholeProcess: Bool) throws {
        for (controllers, path) in entries where path != "/" {
            let dir = Self.directory(controllers: controllers, path: path)
            guard FileManager.default.fileExists(atPath: dir) else { continue }
            if controllers.isEmpty {
                // v2: a process goes into its threaded subtree's domain; threads into their own cgroup.
                var domain = dir
                while Host.readSmallFile(domain + "/cgroup.type")?.hasPrefix("threaded") == true {
                    domain = (domain as NSString).deletingLastPathComponent
                }
                if wholeProcess { try Self.write("\(tid)", to: domain + "/cgroup.procs") }
                if domain != dir || !wholeProcess { try Self.write("\(tid)", to: dir + "/cgroup.threads") }
            } else {
                try Self.write("\(tid)", to: dir + (wholeProcess ? "/cgroup.procs" : "/tasks"))
            }
        }
    }

    static func write(_ text: String, to path: String) throws {
        let fd = try checkedCall("open(\(path))") { open(path, O_WRONLY | O_CLOEXEC) }
        defer { close(fd) }
        let bytes = Array(text.utf8)
        _ = try checkedCall("write(\(path))") { Glibc.write(fd, bytes, bytes.count) }
    }
}

/// How much more memory a process may use: the host's MemAvailable and the tightest memory
/// cgroup limit on the way from the process's cgroup to the root (v2 `memory.max` /
/// `memory.current`, v1 `memory.limit_in_bytes` / `memory.usage_in_bytes`). Checked before a
/// transfer that holds a second copy of guest RAM, so a short host refuses instead of having the
/// OOM killer pick a hypervisor.
public struct MemoryHeadroom: Sendable, CustomStringConvertible {
    public struct Limit: Sendable {
        public let directory: String
        public let limitBytes: Int
        public let usageBytes: Int
        public var freeBytes: Int { max(0, limitBytes - usageBytes) }
    }

    public let hostAvailableBytes: Int
    /// The cgroup with the least room left, if any level has a limit.
    public let cgroup: Limit?

    public var availableBytes: Int { min(hostAvailableBytes, cgroup?.freeBytes ?? Int.max) }

    public var description: String {
        func mib(_ b: Int) -> String { "\(b >> 20) MiB" }
        let host = "the host has \(mib(hostAvailableBytes)) available"
        guard let c = cgroup else { return host }
        return "cgroup \(c.directory) allows \(mib(c.freeBytes)) more (limit \(mib(c.limitBytes)), in use \(mib(c.usageBytes))), \(host)"
    }

    public static func of(pid: pid_t) -> MemoryHeadroom {
        let meminfo = Host.readSmallFile("/proc/meminfo") ?? ""
        let available = meminfo.split(separator: "\n").first { $0.hasPrefix("MemAvailable:") }
            .flatMap { Int($0.split(separator: " ").dropFirst().first ?? "") }.map { $0 * 1024 } ?? Int.max
        var tightest: Limit?
        let membership = (try? CgroupMembership.of(pid: pid)) ?? CgroupMembership(entries: [])
        for (controllers, path) in membership.entries where controllers.isEmpty || controllers.split(separator: ",").contains("memory") {
            var dir = CgroupMembership.directory(controllers: controllers, path: path)
            let (limitFile, usageFile) = controllers.isEmpty ? ("memory.max", "memory.current") : ("memory.limit_in_bytes", "memory.usage_in_bytes")
            while dir.hasPrefix("/sys/fs/cgroup") {
                func read(_ name: String) -> Int? { Host.readSmallFile("\(dir)/\(name)").flatMap { Int($0.trimmingCharacters(in: .whitespacesAndNewlines)) } }
                // "max" (v2) or a value near Int64.max (v1) is no limit.
                if let limit = read(limitFile), limit < (1 << 60), let usage = read(usageFile) {
                    let level = Limit(directory: dir, limitBytes: limit, usageBytes: usage)
                    if tightest == nil || level.freeBytes < tightest!.freeBytes { tightest = level }
                }
                let parent = (dir as NSString).deletingLastPathComponent
                if parent == dir { break }
                dir = parent
            }
        }
        return MemoryHeadroom(hostAvailableBytes: available, cgroup: tightest)
    }
}
