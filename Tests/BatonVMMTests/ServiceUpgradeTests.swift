import BatonController
import BatonHarness
import BatonSystem
import Foundation
import Glibc
import Testing

/// A `baton serve` on a socket and state directory of its own, listening before the test goes on.
struct ServiceUnderTest {
    let dir: String
    let socket: String
    let serve: BatonProcess

    init(_ name: String, arguments: [String] = [], environment: [String: String] = [:]) throws {
        dir = try BatonProcess.makeRunDirectory(name)
        socket = dir + "/serve.sock"
        serve = try BatonProcess(["serve", "--socket", socket, "--state", dir + "/state"] + arguments, environment: environment)
        #expect(BatonProcess.waitForPath(socket))
    }

    /// A copy of batonvmm in the service's directory, as an operator would install it.
    func nextBatonvmm() throws -> String { try newBinary(in: dir) }

    func stop(_ signal: Int32 = SIGTERM) {
        serve.kill(signal)
        _ = serve.finish()
        try? FileManager.default.removeItem(atPath: dir)
    }
}

/// The manager's end of systemd's notify socket: a datagram socket the service sends its
/// `READY=1` and `STOPPING=1` to.
final class NotifyListener {
    let path: String
    let fd: Int32

    init(in dir: String) throws {
        path = dir + "/notify.sock"
        fd = socket(AF_UNIX, Int32(SOCK_DGRAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &address.sun_path) { raw in for (i, b) in path.utf8.enumerated() { raw[i] = b } }
        let bound = withUnsafePointer(to: &address) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) } }
        guard fd >= 0, bound == 0 else { throw SyscallError("bind(\(path))", errno: errno) }
        var timeout = timeval(tv_sec: 20, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
    }

    /// The next datagram (nil after 20 s of silence).
    func next() -> String? {
        var buffer = [UInt8](repeating: 0, count: 4096)
        let n = recv(fd, &buffer, buffer.count, 0)
        return n > 0 ? String(decoding: buffer.prefix(n), as: UTF8.self) : nil
    }

    deinit { close(fd) }
}

@Suite("baton serve runs upgrades one per VM, different VMs concurrently")
struct ServiceUpgradeTests {
    @Test("same VM twice at once: one runs, one is refused; two VMs at once: both complete")
    func concurrency() throws {
        let service = try ServiceUnderTest("svc")
        defer { service.stop() }
        let socket = service.socket
        let a = try RunningVMM(ram: "256MiB", simulated: true)
        let b = try RunningVMM(ram: "64MiB", simulated: true)
        defer { a.stop(); b.stop() }
        let next = try service.nextBatonvmm()
        func submit(_ vm: RunningVMM) throws -> BatonProcess {
            try BatonProcess(["upgrade", "--service", socket, "--vm", vm.socket, "--binary", next, "--transport", "gift"])
        }
        // Same VM, twice at once.
        let first = try submit(a)
        // Submit the second only once the service reports the first in flight (no timing guess).
        var inFlight = false
        for _ in 0..<200 where !inFlight {
            inFlight = (try? BatonProcess(["status", "--socket", socket, "--json"]).finish().stdout.replacingOccurrences(of: "\\/", with: "/").contains(a.socket)) ?? false
            if !inFlight { usleep(5_000) }
        }
        #expect(inFlight, "the first upgrade never showed as in flight")
        let second = try submit(a)
        let r1 = first.finish(), r2 = second.finish()
        let outcomes = [r1, r2].map { $0.status == 0 ? "ran" : ($0.stderr.contains("refused: an upgrade of \(a.socket) is already running") ? "refused" : "other: \($0.stderr)") }
        #expect(outcomes.sorted() == ["ran", "refused"], "\(outcomes)")
        // Two different VMs at once.
        let ua = try submit(a), ub = try submit(b)
        let da = ua.finish(), db = ub.finish()
        #expect(da.status == 0, "\(da.stderr)")
        #expect(db.status == 0, "\(db.stderr)")
        #expect(da.stdout.contains("verified yes") && db.stdout.contains("verified yes"))
        let status = try BatonProcess(["status", "--socket", socket, "--json"]).finish()
        #expect(status.stdout.contains("\"completed\":3"), "\(status.stdout)")
        #expect(status.stdout.contains("\"refused\":1"))
    }

    @Test("an upgrade the last controller left half-way (guest paused) is rolled back before serve takes requests; a second serve on the same state is refused")
    func recoversAtStart() throws {
        let dir = try BatonProcess.makeRunDirectory("svc-recover")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let vm = try RunningVMM(ram: "64MiB", simulated: true)
        defer { vm.stop() }
        let before = try vm.beat()
        // What a controller killed inside the pause leaves: the guest paused, a journal up to `paused`.
        try vm.client.expectOK("PUT", "/api/v1/vm.pause")
        #expect(try vm.status().state == .paused)
        let state = dir + "/state"
        try FileManager.default.createDirectory(atPath: state, withIntermediateDirectories: true)
        let path = state + "/journal-interrupted.jsonl"
        let journal = try UpgradeJournal(path: path)
        for phase in [UpgradeJournal.Phase.started, .newInstanceReady, .prepared, .paused] {
            try journal.record(.init(phase: phase, atMonotonicNs: Host.monotonicNanoseconds(), vm: vm.socket, oldPid: vm.pid, newPid: nil))
        }
        let socket = dir + "/serve.sock"
        let serve = try BatonProcess(["serve", "--socket", socket, "--state", state])
        defer { serve.kill(SIGTERM); _ = serve.finish() }
        #expect(BatonProcess.waitForPath(socket))
        // The socket exists only after recovery: the guest runs again, and the journal says so.
        #expect(try vm.status().state == .running)
        #expect(try UpgradeJournal.read(path: path).last?.phase == .rolledBack)
        _ = try vm.beat(after: before.counter)
        let second = try BatonProcess(["serve", "--socket", dir + "/other.sock", "--state", state]).finish()
        #expect(second.status == 1 && second.stderr.contains("another baton serve (pid \(serve.pid)) uses state directory"), "\(second.stderr)")
        serve.kill(SIGTERM)
        let stopped = serve.finish()
        #expect(stopped.status == 0, "\(stopped.stderr)")
        #expect(stopped.stderr.contains("recovery") && stopped.stderr.contains("rolled back"), "\(stopped.stderr)")
    }

    @Test("the new instance a service upgrade started is reaped when it exits, never left a zombie")
    func reapsNewInstances() throws {
        let service = try ServiceUnderTest("svc-reap")
        defer { service.stop() }
        let (socket, serve) = (service.socket, service.serve)
        let vm = try RunningVMM(ram: "64MiB", simulated: true)
        defer { vm.stop() }
        let next = try service.nextBatonvmm()
        let upgrade = try BatonProcess(["upgrade", "--service", socket, "--vm", vm.socket, "--binary", next, "--transport", "memfd"]).finish()
        #expect(upgrade.status == 0, "\(upgrade.stderr)")
        let newPid = try vm.status().pid
        #expect(newPid != vm.pid)
        let stat = Host.readSmallFile("/proc/\(newPid)/stat") ?? ""
        let parent = stat.split(separator: ")").last?.split(separator: " ").dropFirst().first.flatMap { Int32($0) }
        #expect(parent == serve.pid, "the new instance is the service's child (\(stat))")
        kill(newPid, SIGKILL)
        var gone = false
        for _ in 0..<100 where !gone {
            gone = !FileManager.default.fileExists(atPath: "/proc/\(newPid)")
            if !gone { usleep(50_000) }
        }
        #expect(gone, "pid \(newPid) is still in /proc (\(Host.readSmallFile("/proc/\(newPid)/stat") ?? "")): a zombie nobody reaped")
    }

    @Test("SIGTERM while an upgrade holds its guest paused: the service stops accepting, lets the upgrade finish, then exits 0; systemd hears READY=1, then STOPPING=1 with the drain's time")
    func drainsOnSIGTERM() throws {
        // The upgrade stalls 2 s with the guest paused, so the signal lands inside the pause.
        let notifyDir = try BatonProcess.makeRunDirectory("svc-notify")
        defer { try? FileManager.default.removeItem(atPath: notifyDir) }
        let manager = try NotifyListener(in: notifyDir)
        let service = try ServiceUnderTest("svc-drain", arguments: ["--drain-seconds", "30"],
                                           environment: ["BATON_CONTROLLER_FAULT": "stall-after:paused", "NOTIFY_SOCKET": manager.path])
        defer { service.stop(SIGKILL) }
        let (socket, serve) = (service.socket, service.serve)
        let ready = manager.next() ?? ""
        #expect(ready.hasPrefix("READY=1\nMAINPID=\(serve.pid)\n") && ready.contains("STATUS=listening on \(socket)"), "\(ready)")
        let vm = try RunningVMM(ram: "64MiB", simulated: true)
        defer { vm.stop() }
        let next = try service.nextBatonvmm()
        let upgrade = try BatonProcess(["upgrade", "--service", socket, "--vm", vm.socket, "--binary", next, "--transport", "memfd"])
        var paused = false
        for _ in 0..<400 where !paused {
            paused = (try? vm.status().state) == .paused
            if !paused { usleep(5_000) }
        }
        #expect(paused, "the upgrade never paused the guest")
        serve.kill(SIGTERM)
        let stopping = manager.next() ?? ""
        #expect(stopping.hasPrefix("STOPPING=1\nEXTEND_TIMEOUT_USEC=40000000\n"), "\(stopping)")
        usleep(300_000)
        #expect(!FileManager.default.fileExists(atPath: socket), "still accepting after SIGTERM")
        let done = upgrade.finish()
        #expect(done.status == 0 && done.stdout.contains("verified yes"), "\(done.stdout) \(done.stderr)")
        let stopped = serve.finish()
        #expect(stopped.status == 0, "\(stopped.stderr)")
        #expect(stopped.stderr.contains("draining") && stopped.stderr.contains("stopped"), "\(stopped.stderr)")
        // One structured line per upgrade (swift-log).
        #expect(stopped.stderr.contains("outcome=upgraded") && stopped.stderr.contains("mode=memfd") && stopped.stderr.contains("newPid="), "\(stopped.stderr)")
        #expect(try vm.status().state == .running)
        // The instance the service started cannot speak for it to systemd.
        let environ = (try? Data(contentsOf: URL(fileURLWithPath: "/proc/\(try vm.status().pid)/environ"))).map { String(decoding: $0, as: UTF8.self) }
        #expect(environ != nil && !environ!.contains("NOTIFY_SOCKET="), "the new instance inherited NOTIFY_SOCKET")
    }

    @Test("log_level in the file silences the info lines, --log-level overrides it; a bad file is refused at start with its key and line (exit 78)")
    func configurationAtStart() throws {
        let dir = try BatonProcess.makeRunDirectory("svc-log")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let config = dir + "/baton.toml"
        try "[service]\nlog_level = \"warning\"\n".write(toFile: config, atomically: true, encoding: .utf8)
        for (arguments, listening) in [([String](), false), (["--log-level", "info"], true)] {
            let service = try ServiceUnderTest("svc-log-serve", arguments: ["--config", config] + arguments)
            service.serve.kill(SIGTERM)
            let stopped = service.serve.finish()
            service.stop()
            #expect(stopped.status == 0, "\(stopped.stderr)")
            #expect(stopped.stderr.contains("listening") == listening, "\(arguments): \(stopped.stderr)")
        }
        try "[service]\nsocket = \"/tmp/x.sock\"\n\n[upgrade]\nstall_timeout_seconds = \"soon\"\n".write(toFile: config, atomically: true, encoding: .utf8)
        let bad = try BatonProcess(["serve", "--config", config, "--socket", dir + "/s.sock", "--state", dir + "/state"]).finish()
        #expect(bad.status == 78, "\(bad.stderr)")
        #expect(bad.stderr.contains("\(config):5") && bad.stderr.contains("stall_timeout_seconds"), "\(bad.stderr)")
        #expect(!FileManager.default.fileExists(atPath: dir + "/s.sock"), "refused, yet it listened")
        let badLevel = try BatonProcess(["serve", "--log-level", "loud", "--socket", dir + "/s.sock", "--state", dir + "/state"]).finish()
        #expect(badLevel.status != 0 && badLevel.stderr.contains("--log-level"), "\(badLevel.stderr)")
    }

    @Test("[upgrade] in the service's configuration decides what a request leaves unsaid (transport, run directory); a flag still wins")
    func configurationDecidesDefaults() throws {
        let dir = try BatonProcess.makeRunDirectory("svc-cfg")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let config = dir + "/baton.toml"
        try "[upgrade]\ntransport = \"copy\"\nrun_directory = \"\(dir)/run-cfg\"\nstall_timeout_seconds = 5\n".write(toFile: config, atomically: true, encoding: .utf8)
        let service = try ServiceUnderTest("svc-cfg-serve", arguments: ["--config", config])
        defer { service.stop(SIGKILL) }
        let vm = try RunningVMM(ram: "64MiB", simulated: true)
        defer { vm.stop() }
        let first = try BatonProcess(["upgrade", "--service", service.socket, "--vm", vm.socket, "--binary", try service.nextBatonvmm()]).finish()
        #expect(first.status == 0 && first.stdout.contains("via process_vm_readv"), "\(first.stdout) \(first.stderr)")
        #expect(FileManager.default.fileExists(atPath: dir + "/run-cfg"), "run_directory from the file not used")
        let second = try BatonProcess(["upgrade", "--service", service.socket, "--vm", vm.socket, "--binary", try service.nextBatonvmm(), "--transport", "memfd"]).finish()
        #expect(second.status == 0 && second.stdout.contains("via memfd"), "\(second.stdout) \(second.stderr)")
    }

    @Test("after a successful upgrade, GET /metrics counts it (started, succeeded, downtime and phase histograms, bytes) in text promtool accepts")
    func metricsAfterSuccess() throws {
        guard FileManager.default.isExecutableFile(atPath: "/usr/bin/curl") else { try Test.cancel("curl is not installed") }
        let service = try ServiceUnderTest("svc-metrics", arguments: ["--metrics-listen", "127.0.0.1:0"])
        defer { service.stop(SIGKILL) }
        #expect(BatonProcess.waitForPath(service.dir + "/state/metrics.address"))
        let address = try String(contentsOfFile: service.dir + "/state/metrics.address", encoding: .utf8)
        let vm = try RunningVMM(ram: "64MiB", simulated: true)
        defer { vm.stop() }
        let upgrade = try BatonProcess(["upgrade", "--service", service.socket, "--vm", vm.socket, "--binary", try service.nextBatonvmm(), "--transport", "memfd"]).finish()
        #expect(upgrade.status == 0, "\(upgrade.stdout) \(upgrade.stderr)")
        let scrape = try Spawn.run("/usr/bin/curl", ["-sf", "http://\(address)/metrics"])
        #expect(scrape.status == 0)
        let text = scrape.output
        for line in ["baton_upgrades_started_total{hypervisor=\"batonvmm\"} 1",
                     "baton_upgrades_total{hypervisor=\"batonvmm\",outcome=\"succeeded\",mode=\"memfd\"} 1",
                     "baton_downtime_seconds_count{hypervisor=\"batonvmm\"} 1",
                     "baton_phase_seconds_count{hypervisor=\"batonvmm\",phase=\"ram\"} 1",
                     "baton_bytes_moved_total{hypervisor=\"batonvmm\"} \(64 << 20)",
                     "baton_upgrades_in_flight 0"] {
            #expect(text.contains(line), "missing \(line) in: \(text)")
        }
        let promtool = ProcessInfo.processInfo.environment["BATON_PROMTOOL"] ?? "/opt/baton/bin/promtool"
        if FileManager.default.isExecutableFile(atPath: promtool) {
            try text.write(toFile: service.dir + "/metrics.txt", atomically: true, encoding: .utf8)
            let lint = try Spawn.run("/bin/sh", ["-c", "\(promtool) check metrics < \(service.dir)/metrics.txt"])
            #expect(lint.status == 0, "promtool check metrics: \(lint.output)")
        } else {
            Issue.record("promtool is missing at \(promtool) (Scripts/install-promtool.sh): the exposition format was not linted")
        }
    }

    @Test("the old instance killed after the pause: the service's upgrade rolls forward, and it is counted and logged as rolled_forward, not succeeded")
    func countsRollForward() throws {
        let service = try ServiceUnderTest("svc-fwd", environment: ["BATON_CONTROLLER_FAULT": "kill-old-after:paused"])
        defer { service.stop(SIGKILL) }
        let vm = try RunningVMM(ram: "64MiB", simulated: true)
        defer { vm.stop() }
        let oldPid = try vm.status().pid
        let upgrade = try BatonProcess(["upgrade", "--service", service.socket, "--vm", vm.socket, "--binary", try service.nextBatonvmm(), "--transport", "memfd"]).finish()
        let after = try vm.status()
        #expect(after.state == .running && after.pid != oldPid, "\(upgrade.stdout) \(upgrade.stderr)")
        let metrics = try BatonProcess(["status", "--socket", service.socket, "--metrics"]).finish()
        #expect(metrics.stdout.contains("baton_upgrades_total{hypervisor=\"batonvmm\",outcome=\"rolled_forward\",mode=\"memfd\"} 1"), "\(metrics.stdout)")
        #expect(!metrics.stdout.contains("outcome=\"succeeded\""), "\(metrics.stdout)")
        service.serve.kill(SIGTERM)
        let stopped = service.serve.finish()
        #expect(stopped.stderr.contains("outcome=rolledForward"), "\(stopped.stderr)")
    }

    @Test("a request line without end gets one error and a close; ten thousand requests in one write each get their reply")
    func boundedRequestLines() throws {
        let service = try ServiceUnderTest("svc-lines")
        defer { service.stop() }
        let socket = service.socket
        func readAll(_ s: UnixSocket) throws -> String {
            var out: [UInt8] = []
            while true {
                let r = try s.receive(count: 1 << 16)
                out += r.bytes
                if r.bytes.count < 1 << 16 { break }
            }
            return String(decoding: out, as: UTF8.self)
        }
        let endless = try UnixSocket.connect(path: socket, timeoutSeconds: 5)
        try endless.setTimeout(seconds: 20)
        try? endless.sendAll([UInt8](repeating: UInt8(ascii: "x"), count: 2 << 20))
        let reply = try readAll(endless)
        #expect(reply == #"{"ok":false,"error":"request line longer than 1 MiB; closing"}"# + "\n", "\(reply.prefix(200))")
        let many = try UnixSocket.connect(path: socket, timeoutSeconds: 5)
        try many.setTimeout(seconds: 60)
        try many.sendAll(Array(String(repeating: #"{"op":"status"}"# + "\n", count: 10_000).utf8))
        many.shutdownWrite()
        let replies = try readAll(many).split(separator: "\n")
        #expect(replies.count == 10_000 && replies.allSatisfy { $0.contains(#""ok":true"#) }, "\(replies.count) replies")
    }

    @Test("--service carries --in-place (the pid stays) and refuses --journal, which the service keeps itself")
    func serviceInPlace() throws {
        let service = try ServiceUnderTest("svc-inplace")
        defer { service.stop() }
        let (dir, socket) = (service.dir, service.socket)
        let vm = try RunningVMM(ram: "64MiB", simulated: true)
        defer { vm.stop() }
        let next = try service.nextBatonvmm()
        let refused = try BatonProcess(["upgrade", "--service", socket, "--vm", vm.socket, "--binary", next, "--journal", dir + "/j.jsonl"]).finish()
        #expect(refused.status == 64 && refused.stderr.contains("drop --journal and --run-directory"), "\(refused.stderr)")
        let r = try BatonProcess(["upgrade", "--service", socket, "--vm", vm.socket, "--binary", next, "--in-place"]).finish()
        #expect(r.status == 0 && r.stdout.contains("via exec-in-place"), "\(r.stdout) \(r.stderr)")
        #expect(try vm.status().pid == vm.pid, "exec in place keeps the pid")
    }
}
