import BatonCore
import BatonController
import BatonHarness
import BatonLibvirt
import BatonSystem
import BatonVMM
import Foundation
import Glibc
import Synchronization
import Testing

/// libvirt's Cloud Hypervisor driver (built from Debian's source by Scripts/build-libvirt-ch.sh)
/// manages batonvmm; Baton upgrades the domain in place through libvirt.
enum LibvirtCh {
    static let directory = ProcessInfo.processInfo.environment["BATON_LIBVIRT_CH"] ?? "/var/tmp/baton-libvirt-ch"
    static var virsh: String { directory + "/build/tools/virsh" }
    static let unavailableReason: String? = {
        if getuid() != 0 { return "needs root for virtchd" }
        if !FileManager.default.isExecutableFile(atPath: directory + "/build/src/virtchd") {
            return "no ch-enabled libvirt in \(directory) (run Scripts/build-libvirt-ch.sh)"
        }
        return nil
    }()

    static func run(_ argv: [String], environment: [String: String] = [:]) throws -> (status: Int32, out: String) {
        let log = NSTemporaryDirectory() + "baton-ch-\(getpid())-\(UInt64.random(in: 0...UInt64.max)).log"
        defer { try? FileManager.default.removeItem(atPath: log) }
        let pid = try Spawn.detached(argv[0], Array(argv.dropFirst()), logPath: log, environment: environment)
        let status = Spawn.wait(pid)
        return (status, ((try? String(contentsOfFile: log, encoding: .utf8)) ?? "").trimmingCharacters(in: .whitespacesAndNewlines))
    }
}

/// Records libvirt's own view of the domain right after each pause and resume it performs.
final class ObservedControl: HypervisorControl, @unchecked Sendable {
    let inner: LibvirtControl
    let uri: String
    let seen = Mutex<[String]>([])
    init(_ inner: LibvirtControl, uri: String) { self.inner = inner; self.uri = uri }
    var identity: String { inner.identity }
    func pid() throws -> Int32 { try inner.pid() }
    func state() throws -> String { try inner.state() }
    func domstate() -> String { (try? LibvirtCh.run([LibvirtCh.virsh, "-c", uri, "domstate", inner.domain.name]).out) ?? "?" }
    func pause() throws { try inner.pause(); let s = domstate(); seen.withLock { $0.append(s) } }
    func resume() throws { try inner.resume(); let s = domstate(); seen.withLock { $0.append(s) } }
}

@Suite("libvirt's ch driver manages batonvmm", .serialized)
struct LibvirtChTests {
    @Test("virsh starts a batonvmm domain, Baton upgrades it in place through libvirt, virsh still drives it")
    func upgradeThroughLibvirt() throws {
        if let why = LibvirtCh.unavailableReason { try Test.cancel("libvirt ch driver unavailable: \(why)") }
        let script = URL(fileURLWithPath: #filePath).deletingLastPathComponent().appendingPathComponent("../../Scripts/virtchd-up.sh").standardized.path
        let up = try LibvirtCh.run(["/bin/bash", script, batonvmmPath, LibvirtCh.directory])
        guard up.status == 0, let uri = up.out.split(separator: "\n").last.map(String.init), uri.hasPrefix("ch:") else {
            try Test.cancel("virtchd could not start here: \(up.out)")
        }
        let dir = try BatonProcess.makeRunDirectory("ch")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let guest = dir + "/reference-guest.bin"
        FileManager.default.createFile(atPath: guest, contents: Data(ReferenceGuest.code))
        let binary = dir + "/batonvmm-next"
        try Executable.copy(from: batonvmmPath, to: binary)
        let name = "baton-ch-\(getpid())"
        let xml = """
        <domain type='kvm'><name>\(name)</name><memory unit='MiB'>256</memory><vcpu>1</vcpu>
          <os><type>hvm</type><kernel>\(guest)</kernel></os>
          <devices><emulator>\(batonvmmPath)</emulator><console type='pty'><target type='virtio'/></console></devices>
        </domain>
        """
        try xml.write(toFile: dir + "/domain.xml", atomically: true, encoding: .utf8)
        #expect(try LibvirtCh.run([LibvirtCh.virsh, "-c", uri, "define", dir + "/domain.xml"]).status == 0)
        #expect(try LibvirtCh.run([LibvirtCh.virsh, "-c", uri, "start", name]).status == 0)
        let connection = try LibvirtConnection(uri: uri)
        let domain = try connection.domain(named: name)
        defer { _ = try? LibvirtCh.run([LibvirtCh.virsh, "-c", uri, "destroy", name]) }
        let pid = try #require(domain.id)
        let socket = try #require(ListeningSocketPath.of(pid: pid).first, "batonvmm's API socket")
        let client = VMMClient(socketPath: socket)
        func beat(after counter: UInt64) throws -> GuestBeat {
            guard let b = client.nextBeat(after: counter, timeout: 10) else { throw VMMClient.Failure(description: "no heartbeat after \(counter)") }
            return b
        }
        var before = try beat(after: 0)
        expectMatchesModel(before, "the guest counts under libvirt")

        // 1. The operator's command: baton upgrade --domain, to a second copy of the binary.
        let cli = try LibvirtCh.run([BatonProcess.executablePath, "upgrade", "--domain", name, "--connect", uri, "--binary", binary, "--json"],
                                    environment: ["BATON_STATE_DIR": dir + "/state"])
        #expect(cli.status == 0, "\(cli.out)")
        let record = (try? String(contentsOfFile: dir + "/state/handoffs.jsonl", encoding: .utf8)) ?? ""
        #expect(record.contains("\"domain\":\"\(name)\"") && record.contains("state='committed'"), "the ch driver keeps no metadata, so Baton's state holds the record: \(record)")
        #expect(cli.out.contains("\"oldPid\":\(pid)") && cli.out.contains("\"newPid\":\(pid)") && cli.out.contains("\"verified\":true"), "\(cli.out)")
        #expect(try FileManager.default.destinationOfSymbolicLink(atPath: "/proc/\(pid)/exe") == binary)
        let afterCLI = try beat(after: before.counter)
        expectMatchesModel(afterCLI, "the guest continued exactly after baton upgrade --domain")
        before = afterCLI

        // 2. The same sequence in-process, watching libvirt's own view as it pauses and resumes.
        let control = ObservedControl(LibvirtControl(domain: domain, agentSocket: socket), uri: uri)
        var options = UpgradeOptions(vmSocket: socket, binary: binary)
        options.inPlace = true
        options.control = control
        let report = try UpgradeController(options: options).run()
        #expect(report.verified && !report.rolledBack)
        #expect(report.newPid == pid && domain.id == pid, "libvirt's pid is still the domain's hypervisor")
        #expect(control.seen.withLock { $0 } == ["paused", "running"], "virsh domstate during and after: \(control.seen.withLock { $0 })")
        #expect(try FileManager.default.destinationOfSymbolicLink(atPath: "/proc/\(pid)/exe") == binary)
        let after = try beat(after: before.counter)
        expectMatchesModel(after, "the guest continued exactly after the upgrade")

        // virsh still drives the upgraded VMM.
        #expect(try LibvirtCh.run([LibvirtCh.virsh, "-c", uri, "suspend", name]).status == 0)
        #expect(try LibvirtCh.run([LibvirtCh.virsh, "-c", uri, "domstate", name]).out == "paused")
        #expect(try client.status().state == .paused)
        #expect(try LibvirtCh.run([LibvirtCh.virsh, "-c", uri, "resume", name]).status == 0)
        #expect(try LibvirtCh.run([LibvirtCh.virsh, "-c", uri, "domstate", name]).out == "running")
        _ = try beat(after: after.counter)

        // destroy leaves no batonvmm behind.
        #expect(try LibvirtCh.run([LibvirtCh.virsh, "-c", uri, "destroy", name]).status == 0)
        usleep(200_000)
        #expect(!Host.isAlive(pid), "batonvmm \(pid) survived virsh destroy")
    }
}
