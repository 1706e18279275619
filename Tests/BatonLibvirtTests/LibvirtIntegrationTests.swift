import BatonController
import BatonLibvirt
import BatonSystem
import BatonHarness
import Foundation
import Glibc
import Testing

/// A real libvirtd and QEMU, started as Scripts/libvirt-up.sh does (CI installs the packages).
/// Skips with the reason where that cannot run.
enum RealLibvirt {
    static let unavailableReason: String? = {
        if getuid() != 0 { return "needs root to start libvirtd" }
        for binary in ["/usr/sbin/libvirtd", "/usr/bin/virsh", "/usr/bin/qemu-system-x86_64"] where !FileManager.default.isExecutableFile(atPath: binary) {
            return "\(binary) is not installed (apt-get install libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients qemu-system-x86)"
        }
        return nil
    }()

    /// Runs a command with a clean signal mask (daemons it starts must get SIGTERM) and returns
    /// its status and combined output.
    static func run(_ argv: [String]) throws -> (status: Int32, out: String) {
        let r = try Spawn.run(argv[0], Array(argv.dropFirst()))
        return (r.status, r.output)
    }

    static let upScript = URL(fileURLWithPath: #filePath).deletingLastPathComponent().appendingPathComponent("../../Scripts/libvirt-up.sh").standardized.path

    /// (Re)starts libvirtd with a hook that runs this build's `baton hook` (the operator installs
    /// Config/libvirt/hooks/qemu; the test points the same call at this build), logging into a
    /// fresh state directory, which it returns. Cancels the test if libvirtd cannot start here.
    static func bringUp(_ tag: String) throws -> String {
        let state = try BatonProcess.makeRunDirectory(tag)
        let hook = state + "/qemu-hook"
        try "#!/bin/sh\nBATON_STATE_DIR=\(state) BATON_SOCKET=\(state)/serve.sock exec \(BatonProcess.executablePath) hook qemu \"$@\"\n"
            .write(toFile: hook, atomically: true, encoding: .utf8)
        chmod(hook, 0o755)
        let up = try run(["/bin/bash", upScript, hook])
        guard up.status == 0 else { try Test.cancel("libvirtd could not start here: \(up.out)") }
        return state
    }

    static func virsh(_ args: String...) throws -> String {
        try run(["/usr/bin/virsh", "-c", "qemu:///system"] + args).out.trimmingCharacters(in: .whitespacesAndNewlines)
    }
}

/// Every suite that restarts the host's one libvirtd nests here, so none runs while another
/// has libvirtd stopped for a QEMU handoff (.serialized covers nested suites).
@Suite("real libvirtd (serialized)", .serialized)
struct RealLibvirtHost {}

extension RealLibvirtHost {
@Suite("real libvirtd + QEMU", .serialized)
struct LibvirtIntegrationTests {
    @Test("libvirtd calls Baton's hook, the adapter pauses/resumes and keeps metadata, a stock QEMU domain is refused before pausing")
    func endToEnd() throws {
        if let why = RealLibvirt.unavailableReason { try Test.cancel("real libvirt unavailable: \(why)") }
        let state = try RealLibvirt.bringUp("libvirt-it")

        let name = "baton-it-\(getpid())"
        let type = FileManager.default.fileExists(atPath: "/dev/kvm") ? "kvm" : "qemu"
        let xml = """
        <domain type='\(type)'><name>\(name)</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>
          <os><type arch='x86_64' machine='pc'>hvm</type><boot dev='hd'/></os><clock offset='utc'/>
          <devices><emulator>/usr/bin/qemu-system-x86_64</emulator><serial type='pty'/><memballoon model='none'/></devices>
        </domain>
        """
        let connection = try LibvirtConnection(uri: "qemu:///system")
        let domain = try connection.defineAndStart(xml: xml)
        defer {
            try? domain.destroy()
            try? domain.undefine()
        }
        #expect(try RealLibvirt.virsh("domstate", name) == "running")

        // 1. libvirtd invoked the hook with the real arguments and XML, and it returned in time.
        let log = (try? String(contentsOfFile: state + "/hook.log", encoding: .utf8)) ?? ""
        for op in ["prepare begin", "start begin", "started begin"] {
            let line = log.split(separator: "\n").first { $0.contains("hook qemu \(name) \(op) -") }
            #expect(line != nil, "no '\(op)' hook call in: \(log)")
            if let line, let ms = line.split(separator: " ").dropLast().last.flatMap({ Double($0) }) {
                #expect(ms < 1000, "hook took \(ms) ms")
            }
        }
        #expect(log.contains("xml=") && !log.contains("xml=0 bytes"))

        // 2. A stock QEMU domain is refused before anything is paused.
        let refused = try RealLibvirt.run([BatonProcess.executablePath, "upgrade", "--domain", name, "--connect", "qemu:///system", "--binary", "/bin/true"])
        #expect(refused.status == 5, "\(refused.out)")
        #expect(refused.out.contains("private guest RAM") && refused.out.contains("baton enroll"), "\(refused.out)")
        #expect(try RealLibvirt.virsh("domstate", name) == "running", "never pause a domain you cannot finish")

        // 3. The adapter pauses and resumes (seen by virsh) and writes/reads Baton's metadata.
        try domain.suspend()
        #expect(try RealLibvirt.virsh("domstate", name) == "paused")
        try domain.resume()
        #expect(try RealLibvirt.virsh("domstate", name) == "running")
        let record = BatonMetadata(agent: "/run/batonvmm/\(name).sock", generation: 1, state: "prepared")
        try domain.setMetadata(record.element)
        let viaVirsh = try RealLibvirt.virsh("metadata", name, BatonMetadata.namespace)
        #expect(viaVirsh.contains("generation=\"1\"") && viaVirsh.contains("state=\"prepared\""), "\(viaVirsh)")
        #expect(try domain.metadata().flatMap(BatonMetadata.init(element:)) == record)

        // 4. Nothing is left running afterwards.
        try domain.destroy()
        try domain.undefine()
        usleep(200_000)
        let leftover = try RealLibvirt.run(["/usr/bin/pgrep", "-f", "guest=\(name)"])
        #expect(leftover.out.isEmpty, "QEMU for \(name) still running: \(leftover.out)")
    }
}
}
