import CBatonLinux
import Foundation
import Glibc

/// Facts about this host and this process that transfers and reports need.
public enum Host {
    public static let pageSize = Int(sysconf(Int32(_SC_PAGESIZE)))
    public static let onlineCPUs = max(1, Int(sysconf(Int32(_SC_NPROCESSORS_ONLN))))

    /// Pins the calling thread to one CPU (pthread_setaffinity_np); false if refused.
    @discardableResult
    public static func pinCurrentThread(to cpu: Int) -> Bool {
        cbaton_pin_current_thread(Int32(cpu % onlineCPUs)) == 0
    }

    /// Names the calling thread (what /proc/PID/task/TID/comm shows; at most 15 bytes).
    public static func nameCurrentThread(_ name: String) {
        _ = cbaton_name_current_thread(String(name.prefix(15)))
    }

    /// Appends `line` to a log-like file (created 0600, its directory 0700), atomically with
    /// respect to other appenders (O_APPEND). Best effort: a log line never fails its caller.
    public static func appendLine(_ line: String, to path: String) {
        try? PrivateDirectory.make((path as NSString).deletingLastPathComponent)
        let fd = open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC | O_NOFOLLOW, 0o600)
        guard fd >= 0 else { return }
        _ = line.withCString { write(fd, $0, strlen($0)) }
        close(fd)
    }

    /// Reads a whole small file such as one under /proc or /sys; nil if it cannot be read.
    public static func readSmallFile(_ path: String) -> String? {
        readSmallFileBytes(path).map { String(decoding: $0, as: UTF8.self) }
    }

    public static func readSmallFileBytes(_ path: String) -> [UInt8]? {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return nil }
        defer { close(fd) }
        var out: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 65536)
        while true {
            let n = read(fd, &buffer, buffer.count)
            if n < 0 && errno == EINTR { continue }
            if n <= 0 { break }
            out += buffer.prefix(n)
        }
        return out
    }

    /// A `Key:   N kB` field of /proc/PID/status (VmRSS, VmHWM, ...), in bytes.
    public static func statusBytes(_ key: String, pid: String = "self") -> Int? {
        guard let text = readSmallFile("/proc/\(pid)/status") else { return nil }
        for line in text.split(separator: "\n") where line.hasPrefix(key + ":") {
            let digits = line.dropFirst(key.count + 1).filter { $0.isNumber }
            return Int(digits).map { $0 * 1024 }
        }
        return nil
    }

    /// Resets this process's peak RSS (VmHWM) so the next reading covers only what follows.
    public static func resetPeakRSS() {
        let fd = open("/proc/self/clear_refs", O_WRONLY | O_CLOEXEC)
        guard fd >= 0 else { return }
        _ = write(fd, "5", 1)
        close(fd)
    }

    /// Whether process `pid` exists and is not a zombie (a dead child nobody reaped yet).
    public static func isAlive(_ pid: Int32) -> Bool {
        guard pid > 0, kill(pid, 0) == 0 else { return false }
        return !(readSmallFile("/proc/\(pid)/stat") ?? "").contains(") Z ")
    }

    /// Wall-clock seconds: the clock QEMU stamps its QMP events with, so a pause measured from
    /// QEMU's STOP to its RESUME can be split at instants this process takes.
    public static func realtimeSeconds() -> Double {
        var ts = timespec()
        clock_gettime(CLOCK_REALTIME, &ts)
        return Double(ts.tv_sec) + Double(ts.tv_nsec) / 1e9
    }

    public static func monotonicNanoseconds() -> UInt64 {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return UInt64(ts.tv_sec) * 1_000_000_000 + UInt64(ts.tv_nsec)
    }
}

public enum Executable {
    /// The program `name` in the directory this process's executable lives in (how `baton`
    /// finds the `batonvmm` built beside it).
    public static func besideThisProcess(_ name: String) -> String {
        let me = (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe")) ?? CommandLine.arguments[0]
        return URL(fileURLWithPath: me).deletingLastPathComponent().appendingPathComponent(name).path
    }

    /// Copies a program file, mode 0755, through a close-on-exec descriptor: a plain copy leaves
    /// its write descriptor open across any fork another thread makes meanwhile, and exec'ing
    /// the copy then fails with ETXTBSY for as long as such a child lives.
    public static func copy(from source: String, to destination: String) throws {
        let input = try checkedCall("open(\(source))") { open(source, O_RDONLY | O_CLOEXEC) }
        defer { close(input) }
        unlink(destination)
        let output = try checkedCall("open(\(destination))") { open(destination, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0o755) }
        defer { close(output) }
        var buffer = [UInt8](repeating: 0, count: 1 << 20)
        while true {
            let n = try buffer.withUnsafeMutableBytes { b in try checkedCall("read(\(source))") { read(input, b.baseAddress, b.count) } }
            if n == 0 { break }
            var done = 0
            while done < n {
                done += try buffer.withUnsafeBytes { b in try checkedCall("write(\(destination))") { write(output, b.baseAddress! + done, n - done) } }
            }
        }
        _ = fchmod(output, 0o755)
    }
}

public enum Spawn {
    /// Starts `path` with `arguments` in a new session (it outlives its parent and the
    /// parent's terminal signals), stdout and stderr appended to `logPath`. Returns the pid.
    public static func detached(_ path: String, _ arguments: [String], logPath: String, environment: [String: String] = [:]) throws -> pid_t {
        let log = try checkedCall("open(\(logPath))") { open(logPath, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0o600) }
        defer { close(log) }
        var argv: [UnsafeMutablePointer<CChar>?] = ([path] + arguments).map { strdup($0) } + [nil]
        defer { argv.forEach { free($0) } }
        // The parent's environment with `environment` overriding (fault switches for one child).
        var merged: [String: String] = [:]
        var e = environ
        while let entry = e.pointee {
            let text = String(cString: entry)
            if let eq = text.firstIndex(of: "=") { merged[String(text[..<eq])] = String(text[text.index(after: eq)...]) }
            e += 1
        }
        for (k, v) in environment { merged[k] = v }
        var envp: [UnsafeMutablePointer<CChar>?] = merged.map { strdup("\($0.key)=\($0.value)") } + [nil]
        defer { envp.forEach { free($0) } }
        var pid: Int32 = 0
        var rc = cbaton_spawn_session(&pid, path, &argv, &envp, log)
        // ETXTBSY: another thread's fork briefly inherited a write descriptor to this freshly
        // written binary (the classic copy-then-exec race); it clears within milliseconds.
        var attempts = 0
        while rc == ETXTBSY && attempts < 50 {
            usleep(10_000)
            attempts += 1
            rc = cbaton_spawn_session(&pid, path, &argv, &envp, log)
        }
        guard rc == 0 else { throw SyscallError("posix_spawn(\(path))", errno: rc) }
        return pid
    }

    /// Runs `path` to completion (a new session, stdout and stderr into one temporary log) and
    /// returns its exit status and combined output. With `timeoutSeconds`, a child still running
    /// then is SIGKILLed and reported as 128 + 9.
    public static func run(_ path: String, _ arguments: [String], environment: [String: String] = [:], timeoutSeconds: Double? = nil) throws -> (status: Int32, output: String) {
        let log = NSTemporaryDirectory() + "baton-run-\(getpid())-\(UInt64.random(in: 0...UInt64.max)).log"
        defer { unlink(log) }
        let pid = try detached(path, arguments, logPath: log, environment: environment)
        var status: Int32
        if let timeoutSeconds {
            let deadline = Host.monotonicNanoseconds() + UInt64(max(0, min(timeoutSeconds, 86_400)) * 1e9)
            while true {
                if let s = exitStatus(pid) { status = s; break }
                if Host.monotonicNanoseconds() > deadline { kill(pid, SIGKILL); status = wait(pid); break }
                usleep(5_000)
            }
        } else {
            status = wait(pid)
        }
        return (status, (try? String(contentsOfFile: log, encoding: .utf8)) ?? "")
    }

    /// Waits for `pid` to exit and returns its status (128 + signal if killed).
    public static func wait(_ pid: pid_t) -> Int32 {
        var status: Int32 = 0
        while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
        return (status & 0x7f) == 0 ? (status >> 8) & 0xff : 128 + (status & 0x7f)
    }

    /// Non-blocking reap: the exit status if `pid` has exited, nil while it runs.
    public static func exitStatus(_ pid: pid_t) -> Int32? {
        var status: Int32 = 0
        let r = waitpid(pid, &status, WNOHANG)
        guard r == pid else { return nil }
        return (status & 0x7f) == 0 ? (status >> 8) & 0xff : 128 + (status & 0x7f)
    }
}
