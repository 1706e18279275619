import BatonController
import BatonLibvirt
import BatonSystem
import BatonHarness
import Foundation
import Glibc
import Testing

let domainXML = """
<domain type='kvm'>
  <name>web1</name>
  <uuid>c7a5fdbd-cdaf-9455-926a-d65c16db1809</uuid>
  <memory unit='MiB'>64</memory>
  <os><type arch='x86_64'>hvm</type></os>
</domain>
"""

let optedInXML = """
<domain type='kvm'>
  <name>web2</name>
  <metadata><baton:handoff xmlns:baton="https://baton.dev/xmlns/handoff/1" agent="/run/batonvmm/web2.sock"/></metadata>
  <os><type arch='x86_64'>hvm</type></os>
</domain>
"""

@Suite("libvirt hook")
struct HookTests {
    func hook(_ args: [String], xml: String, env: [String: String] = [:]) throws -> (status: Int32, stderr: String, seconds: Double) {
        let state = try BatonProcess.makeRunDirectory("hook")
        var environment = ["BATON_STATE_DIR": state, "BATON_SOCKET": state + "/no-serve.sock"]
        for (k, v) in env { environment[k] = v }
        let started = Date()
        let p = try BatonProcess(["hook"] + args, environment: environment, stdin: Data(xml.utf8))
        let done = p.finish()
        return (done.status, done.stderr, Date().timeIntervalSince(started))
    }

    @Test("a well-formed domain that did not opt in: exit 0 at once (Baton never blocks a start)")
    func notOptedIn() throws {
        let r = try hook(["qemu", "web1", "prepare", "begin", "-"], xml: domainXML)
        #expect(r.status == 0, "\(r.stderr)")
        #expect(r.stderr.isEmpty)
        #expect(r.seconds < 1.0, "within the 1 s budget")
    }

    @Test("an opted-in domain with baton serve down: queued, exit 0 within the budget")
    func optedInServiceDown() throws {
        let state = try BatonProcess.makeRunDirectory("hookq")
        let p = try BatonProcess(["hook", "qemu", "web2", "started", "begin", "-"],
                                 environment: ["BATON_STATE_DIR": state, "BATON_SOCKET": state + "/down.sock"], stdin: Data(optedInXML.utf8))
        let done = p.finish()
        #expect(done.status == 0, "\(done.stderr)")
        let queued = try String(contentsOfFile: state + "/hook-queue.jsonl", encoding: .utf8)
        #expect(queued.contains("\"agent\":\"\\/run\\/batonvmm\\/web2.sock\"") || queued.contains("\"agent\":\"/run/batonvmm/web2.sock\""), "\(queued)")
        #expect(try String(contentsOfFile: state + "/hook.log", encoding: .utf8).contains("web2 started begin"))
    }

    @Test("garbage gets a one-line error and the documented exit code", arguments: [
        (["qemu", "web1"], domainXML, Int32(2), "got 2 arguments"),
        (["lxc", "web1", "start", "begin", "-"], domainXML, Int32(2), "object 'lxc'"),
        (["qemu", "web1", "start", "begin", "-"], "", Int32(3), "is empty"),
        (["qemu", "web1", "start", "begin", "-"], "<domain><name>web1</name>", Int32(3), "malformed"),
        (["qemu", "web1", "start", "begin", "-"], "<network><name>web1</name></network>", Int32(3), "not a <domain>"),
        (["qemu", "other", "start", "begin", "-"], domainXML, Int32(4), "differs from the XML's <name>web1</name>"),
        // Bounded input: answered at once whatever arrives (a slow hook stalls libvirtd).
        (["qemu", "web1", "start", "begin", "-"], String(repeating: "<!-- padding -->", count: 70_000), Int32(3), "larger than 1024 KiB"),
        (["qemu", "web1", "start", "begin", "-"], "<domain><name " + (0..<200_000).map { "a\($0)=\"\"" }.joined(separator: " ").prefix(900_000) + ">web1</name></domain>",
         Int32(3), "more than 20000 attributes"),
    ])
    func garbage(_ args: [String], _ xml: String, _ code: Int32, _ message: String) throws {
        let r = try hook(args, xml: xml)
        #expect(r.status == code, "\(r.stderr)")
        #expect(r.stderr.contains(message), "\(r.stderr)")
        #expect(r.stderr.split(separator: "\n").count == 1, "one line: \(r.stderr)")
        #expect(r.seconds < 1.0)
    }

    @Test("an operation from a newer libvirt is let through (exit 0) with a note")
    func unknownOperation() throws {
        let r = try hook(["qemu", "web1", "teleport", "begin", "-"], xml: domainXML)
        #expect(r.status == 0)
        #expect(r.stderr.contains("ignoring operation 'teleport'"))
    }
}

@Suite("baton config check")
struct ConfigCheckTests {
    @Test("prints the effective configuration: values from --config or $BATON_CONFIG, defaults for the rest; a bad key is refused with exit 78, file, line and key")
    func effectiveConfiguration() throws {
        let dir = try BatonProcess.makeRunDirectory("config-check")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let file = dir + "/baton.toml"
        try "[service]\ndrain_seconds = 7\n\n[upgrade]\ntransport = \"copy\"\n".write(toFile: file, atomically: true, encoding: .utf8)
        let byFlag = try BatonProcess(["config", "check", "--config", file]).finish()
        #expect(byFlag.status == 0, "\(byFlag.stderr)")
        let lines = byFlag.stdout.split(separator: "\n").map(String.init)
        #expect(lines.first == "# effective configuration (from \(file); flags override it)", "\(byFlag.stdout)")
        for line in ["drain_seconds = 7", "transport = \"copy\"", "socket = \"/run/baton/serve.sock\"", "stall_timeout_seconds = 10"] {
            #expect(lines.contains(line), "missing '\(line)' in \(byFlag.stdout)")
        }
        let byEnvironment = try BatonProcess(["config", "check"], environment: ["BATON_CONFIG": file]).finish()
        #expect(byEnvironment.status == 0 && byEnvironment.stdout == byFlag.stdout, "\(byEnvironment.stdout) \(byEnvironment.stderr)")
        try "[upgrade]\ntransport = \"copy\"\nlanes = 4\n".write(toFile: file, atomically: true, encoding: .utf8)
        let refused = try BatonProcess(["config", "check", "--config", file]).finish()
        #expect(refused.status == 78, "\(refused.stderr)")
        #expect(refused.stderr.contains("\(file):3") && refused.stderr.contains("lanes"), "\(refused.stderr)")
        #expect(refused.stdout.isEmpty)
    }
}

@Suite("baton serve")
struct ServiceTests {
    static let promtool = ProcessInfo.processInfo.environment["BATON_PROMTOOL"] ?? "/opt/baton/bin/promtool"

    @Test("metrics over HTTP: Prometheus text that promtool accepts, counters that move; other paths 404; a bad address is refused")
    func metricsEndpoint() throws {
        let dir = try BatonProcess.makeRunDirectory("serve-metrics")
        let socket = dir + "/serve.sock"
        let serve = try BatonProcess(["serve", "--socket", socket, "--state", dir + "/state", "--metrics-listen", "127.0.0.1:0"])
        defer { serve.kill(SIGTERM); _ = serve.finish() }
        #expect(BatonProcess.waitForPath(dir + "/state/metrics.address"))
        let address = try String(contentsOfFile: dir + "/state/metrics.address", encoding: .utf8)
        func get(_ path: String) throws -> (status: Int32, body: String) {
            let r = try Spawn.run("/usr/bin/curl", ["-s", "-o", "-", "-w", "\n%{http_code}", "http://\(address)\(path)"])
            let lines = r.output.split(separator: "\n", omittingEmptySubsequences: false)
            return (Int32(lines.last ?? "") ?? 0, lines.dropLast().joined(separator: "\n"))
        }
        guard FileManager.default.isExecutableFile(atPath: "/usr/bin/curl") else { try Test.cancel("curl is not installed") }
        let before = try get("/metrics")
        #expect(before.status == 200)
        #expect(before.body.contains("baton_upgrades_started_total{hypervisor=\"batonvmm\"} 0"), "\(before.body)")
        #expect(try get("/other").status == 404)
        // One upgrade request that fails (no such VM) moves the counters.
        let bad = try BatonProcess(["upgrade", "--service", socket, "--vm", dir + "/nope.sock", "--binary", "/bin/false"]).finish()
        #expect(bad.status != 0)
        let after = try get("/metrics").body
        #expect(after.contains("baton_upgrades_started_total{hypervisor=\"batonvmm\"} 1"), "\(after)")
        #expect(after.contains("baton_upgrades_total{hypervisor=\"batonvmm\",outcome=\"failed\",mode=\"auto\"} 1"), "\(after)")
        if FileManager.default.isExecutableFile(atPath: Self.promtool) {
            let file = dir + "/metrics.txt"
            try after.write(toFile: file, atomically: true, encoding: .utf8)
            let lint = try Spawn.run("/bin/sh", ["-c", "\(Self.promtool) check metrics < \(file)"])
            #expect(lint.status == 0, "promtool check metrics: \(lint.output)")
        } else {
            Issue.record("promtool is missing at \(Self.promtool) (Scripts/install-promtool.sh): the exposition format was not linted")
        }
        let refused = try BatonProcess(["serve", "--socket", dir + "/b.sock", "--state", dir + "/b", "--metrics-listen", "127.0.0.1:99999"]).finish()
        #expect(refused.status == 64 && refused.stderr.contains("--metrics-listen"), "\(refused.stderr)")
    }

    @Test("serve answers status and metrics, takes hook events, refuses bad requests, and stops cleanly on SIGTERM")
    func lifecycle() throws {
        let dir = try BatonProcess.makeRunDirectory("serve")
        let socket = dir + "/serve.sock"
        let serve = try BatonProcess(["serve", "--socket", socket, "--state", dir + "/state"])
        #expect(BatonProcess.waitForPath(socket))
        let status = try BatonProcess(["status", "--socket", socket, "--json"]).finish()
        #expect(status.status == 0)
        #expect(status.stdout.contains("\"inFlight\":[]"), "\(status.stdout)")
        let hook = try BatonProcess(["hook", "qemu", "web2", "started", "begin", "-"],
                                    environment: ["BATON_STATE_DIR": dir + "/state", "BATON_SOCKET": socket], stdin: Data(optedInXML.utf8)).finish()
        #expect(hook.status == 0)
        usleep(100_000)
        let after = try BatonProcess(["status", "--socket", socket, "--json"]).finish()
        #expect(after.stdout.contains("web2"), "the hook event reached the service: \(after.stdout)")
        let metrics = try BatonProcess(["status", "--socket", socket, "--metrics"]).finish()
        #expect(metrics.stdout.contains("# TYPE baton_upgrades_started_total counter"), "\(metrics.stdout)")
        #expect(metrics.stdout.contains("baton_upgrades_in_flight 0"), "\(metrics.stdout)")
        let bad = try BatonProcess(["upgrade", "--service", socket, "--vm", dir + "/nope.sock", "--binary", "/bin/false"]).finish()
        #expect(bad.status != 0)
        #expect(bad.stderr.contains("cannot reach the VM"), "\(bad.stderr)")
        serve.kill(SIGTERM)
        let done = serve.finish()
        #expect(done.status == 0, "\(done.stderr)")
        #expect(done.stderr.contains("stopped"))
        #expect(!FileManager.default.fileExists(atPath: socket))
    }
}

@Suite("baton upgrade --domain (libvirt test driver)")
struct DomainUpgradeTests {
    @Test("a domain without Baton's metadata is refused in preflight and stays running")
    func refusesStockDomain() throws {
        let path = NSTemporaryDirectory() + "baton-domain-\(getpid()).xml"
        try "<node>\(domainXML.replacingOccurrences(of: "type='kvm'", with: "type='test'"))</node>".write(toFile: path, atomically: true, encoding: .utf8)
        let r = try BatonProcess(["upgrade", "--domain", "web1", "--connect", "test://\(path)", "--binary", "/bin/true"]).finish()
        #expect(r.status == 5, "\(r.stderr)")
        #expect(r.stderr.contains("domain web1 does not embed Baton's agent"), "\(r.stderr)")
        #expect(r.stderr.contains("nothing was paused"))
        #expect(r.stderr.split(separator: "\n").count == 1)
    }
}
