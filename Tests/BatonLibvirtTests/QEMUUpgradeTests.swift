import BatonLibvirt
import BatonSystem
import BatonHarness
import Foundation
import Glibc
import Testing

/// Both QEMUs (Scripts/install-qemu.sh), the test guest (Scripts/build-guest.sh) and a real
/// libvirtd. Guests run under TCG: this host's KVM is nested PVM, where an ordinary guest OS
/// cannot run.
enum RealQEMU {
    static let newQEMU = ProcessInfo.processInfo.environment["BATON_QEMU10"] ?? "/opt/baton/qemu-10.0/usr/bin/qemu-system-x86_64"
    static let guest = ProcessInfo.processInfo.environment["BATON_GUEST_DIR"] ?? "/var/lib/baton/guest"

    static let unavailableReason: String? = {
        if let why = RealLibvirt.unavailableReason { return why }
        if !FileManager.default.isExecutableFile(atPath: newQEMU) { return "\(newQEMU) is missing (run Scripts/install-qemu.sh)" }
        for f in ["vmlinuz", "initrd.gz"] where !FileManager.default.fileExists(atPath: "\(guest)/\(f)") {
            return "\(guest)/\(f) is missing (run Scripts/build-guest.sh)"
        }
        return nil
    }()

    static func domainXML(name: String, memoryMiB: Int, fillMiB: Int, machine: String = "pc-i440fx-7.2", serial: String, shared: Bool = true,
                          emulator: String = "/usr/bin/qemu-system-x86_64") -> String {
        """
        <domain type='qemu'>
          <name>\(name)</name>
          <memory unit='MiB'>\(memoryMiB)</memory>
          <vcpu>1</vcpu>
          \(shared ? "<memoryBacking><source type='memfd'/><access mode='shared'/></memoryBacking>" : "")
          <os>
            <type arch='x86_64' machine='\(machine)'>hvm</type>
            <kernel>\(guest)/vmlinuz</kernel>
            <initrd>\(guest)/initrd.gz</initrd>
            <cmdline>console=ttyS0 quiet panic=-1 fill=\(fillMiB)</cmdline>
          </os>
          <features><acpi/></features>
          <clock offset='utc'/>
          <on_poweroff>destroy</on_poweroff><on_reboot>restart</on_reboot><on_crash>destroy</on_crash>
          <devices>
            <emulator>\(emulator)</emulator>
            <controller type='usb' model='none'/>
            <serial type='unix'><source mode='bind' path='\(serial)'/></serial>
            <memballoon model='none'/>
          </devices>
        </domain>
        """
    }

    /// Every live QEMU process running domain `name` (by its `-name guest=NAME` argument).
    static func processes(of name: String) -> [pid_t] {
        ((try? FileManager.default.contentsOfDirectory(atPath: "/proc")) ?? []).compactMap { pid_t($0) }.filter { pid in
            guard Host.isAlive(pid), let argv = try? ProcessHandles.commandLine(of: pid) else { return false }
            return argv.first?.contains("qemu-system") == true && argv.contains("guest=\(name),debug-threads=on")
        }
    }
}

struct BatonTestFailure: Error, CustomStringConvertible {
    let description: String
    init(_ d: String) { description = d }
}

extension RealLibvirtHost {
@Suite("real QEMU upgrades under libvirt", .serialized)
struct QEMUUpgradeTests {
    static func boot(_ name: String, memoryMiB: Int, fillMiB: Int, machine: String = "pc-i440fx-7.2", shared: Bool = true, state: String,
                     emulator: String = "/usr/bin/qemu-system-x86_64") throws -> (LibvirtDomain, GuestConsole) {
        let serial = "\(state)/\(name).ser"
        let connection = try LibvirtConnection(uri: "qemu:///system")
        if let old = try? connection.domain(named: name) { try? old.destroy(); try? old.undefine() }
        let domain = try connection.defineAndStart(xml: RealQEMU.domainXML(name: name, memoryMiB: memoryMiB, fillMiB: fillMiB, machine: machine, serial: serial,
                                                                           shared: shared, emulator: emulator))
        return (domain, GuestConsole(path: serial))
    }

    /// Runs `baton ARGS` with Spawn (plain waitpid: Foundation's Process lost the exit of a
    /// child that had restarted libvirtd) and returns its status, its JSON report and all output.
    static func baton(_ args: [String], environment: [String: String] = [:]) throws -> (status: Int32, report: [String: Any], out: String) {
        let (status, out) = try Spawn.run(BatonProcess.executablePath, args, environment: environment)
        let line = out.split(separator: "\n").last { $0.hasPrefix("{") }.map(String.init) ?? "{}"
        let report = (try? JSONSerialization.jsonObject(with: Data(line.utf8))) as? [String: Any] ?? [:]
        return (status, report, out)
    }

    static func upgrade(_ name: String, to binary: String, extra: [String] = [], environment: [String: String] = [:]) throws -> (status: Int32, report: [String: Any], out: String) {
        try baton(["upgrade", "--domain", name, "--connect", "qemu:///system", "--binary", binary, "--json"] + extra, environment: environment)
    }

    /// Destroys and undefines `name` through a fresh connection (libvirtd restarts under a test).
    static func remove(_ name: String) {
        guard let c = try? LibvirtConnection(uri: "qemu:///system"), let d = try? c.domain(named: name) else { return }
        try? d.destroy()
        try? d.undefine()
    }

    /// The guest continued in exactly one QEMU, which is `binary` and the one libvirt manages.
    static func expectContinued(_ name: String, console: GuestConsole, before: GuestConsole.Check, binary: String, pid: Int32?) throws -> GuestConsole.Check {
        let after = try console.ask("check")
        #expect(after.md5 == before.md5, "guest memory changed")
        #expect(after.boot == before.boot, "the guest rebooted")
        #expect(after.uptime > before.uptime && after.beats > before.beats, "uptime/heartbeat did not continue: \(before) → \(after)")
        let running = RealQEMU.processes(of: name)
        #expect(running.count == 1, "QEMU processes running \(name): \(running)")
        if let only = running.first {
            #expect((try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/\(only)/exe")) == binary)
            if let pid { #expect(only == pid) }
            #expect(Host.readSmallFile("/run/libvirt/qemu/\(name).pid")?.trimmingCharacters(in: .whitespacesAndNewlines) == "\(only)")
        }
        return after
    }

    static func expectManaged(_ name: String, version: String) throws {
        #expect(try RealLibvirt.virsh("domstate", name) == "running")
        _ = try RealLibvirt.virsh("suspend", name)
        #expect(try RealLibvirt.virsh("domstate", name) == "paused")
        _ = try RealLibvirt.virsh("resume", name)
        #expect(try RealLibvirt.virsh("domstate", name) == "running")
        let v = try RealLibvirt.virsh("qemu-monitor-command", name, #"{"execute":"query-version"}"#)
        #expect(v.contains(version), "monitor reports \(v)")
        #expect(try RealLibvirt.virsh("vcpuinfo", name).contains("running"))
        #expect(try RealLibvirt.virsh("dumpxml", name).contains("<name>\(name)</name>"))
    }

    @Test("7.2 → 10.0 by x-ignore-shared, then 10.0 → 10.0 by cpr-transfer: the guest continues, libvirt manages the new QEMU, a libvirtd restart reconnects")
    func upgradeTwice() throws {
        if let why = RealQEMU.unavailableReason { try Test.cancel("real QEMU upgrade unavailable: \(why)") }
        let state = try RealLibvirt.bringUp("qemu-it")
        let name = "baton-qemu-\(getpid())"
        let (_, console) = try Self.boot(name, memoryMiB: 1024, fillMiB: 768, state: state)
        defer { Self.remove(name) }
        var before = try console.ask("check", timeoutSeconds: 600)
        #expect(before.md5.count == 32)

        for (step, mode) in [(1, "ignore-shared"), (2, "cpr-transfer")] {
            let r = try Self.upgrade(name, to: RealQEMU.newQEMU, extra: step == 2 ? ["--update-definition"] : [])
            #expect(r.status == 0, "upgrade \(step): \(r.out)")
            #expect(r.report["mode"] as? String == mode)
            #expect(r.report["verified"] as? Bool == true && r.report["rolledBack"] as? Bool == false)
            #expect(r.report["newVersion"] as? String == "10.0.2")
            #expect(r.report["oldVersion"] as? String == (step == 1 ? nil : "10.0.2") || step == 1)
            #expect((r.report["ramBytesMoved"] as? Int ?? Int.max) < 16 << 20, "guest RAM must stay in place")
            before = try Self.expectContinued(name, console: console, before: before, binary: RealQEMU.newQEMU, pid: (r.report["newPid"] as? Int).map(Int32.init))
            try Self.expectManaged(name, version: "\"major\":10")
        }
        #expect(try LibvirtConnection(uri: "qemu:///system").domain(named: name).inactiveXML().contains("<emulator>\(RealQEMU.newQEMU)</emulator>"), "--update-definition")

        // libvirtd restarts and reconnects to the adopted QEMU; its reconnect hook fires.
        let up = try RealLibvirt.run(["/bin/bash", RealLibvirt.upScript, state + "/qemu-hook"])
        #expect(up.status == 0, "\(up.out)")
        #expect(try RealLibvirt.virsh("domstate", name) == "running")
        let hookLog = (try? String(contentsOfFile: state + "/hook.log", encoding: .utf8)) ?? ""
        #expect(hookLog.contains("hook qemu \(name) reconnect begin"), "no reconnect hook call for \(name)")
        before = try Self.expectContinued(name, console: console, before: before, binary: RealQEMU.newQEMU, pid: nil)
        _ = try RealLibvirt.virsh("destroy", name)
        usleep(300_000)
        #expect(RealQEMU.processes(of: name).isEmpty, "virsh destroy left a QEMU running")
    }

    @Test("failures before the new QEMU runs leave the old one running the guest, managed by libvirt")
    func failuresRollBack() throws {
        if let why = RealQEMU.unavailableReason { try Test.cancel("real QEMU upgrade unavailable: \(why)") }
        let state = try RealLibvirt.bringUp("qemu-it")
        let name = "baton-qemu-fail-\(getpid())"
        let (_, console) = try Self.boot(name, memoryMiB: 256, fillMiB: 32, state: state)
        defer { Self.remove(name) }
        var before = try console.ask("check", timeoutSeconds: 300)
        let oldPid = RealQEMU.processes(of: name).first

        // A binary that passes the probe but exits when started for real (after libvirtd stopped).
        let dies = state + "/qemu-dies"
        try "#!/bin/sh\ncase \"$*\" in *'-machine none'*) exec \(RealQEMU.newQEMU) \"$@\";; esac\necho 'qemu-dies: exiting at start' >&2\nexit 1\n".write(toFile: dies, atomically: true, encoding: .utf8)
        chmod(dies, 0o755)
        let cases: [(what: String, binary: String, env: [String: String], status: Int32, says: String)] = [
            ("missing binary", state + "/no-such-qemu", [:], 5, "missing"),
            ("exits at once", "/bin/false", [:], 5, "refused"),
            ("exits when started", dies, [:], 3, "rolled back"),
            ("killed mid-migration", RealQEMU.newQEMU, ["BATON_CONTROLLER_FAULT": "kill-new-after:paused"], 3, "rolled back"),
        ]
        for c in cases {
            let r = try Self.upgrade(name, to: c.binary, environment: c.env)
            #expect(r.status == c.status, "\(c.what): \(r.out)")
            #expect(r.out.contains(c.says), "\(c.what): \(r.out)")
            before = try Self.expectContinued(name, console: console, before: before, binary: "/usr/bin/qemu-system-x86_64", pid: oldPid)
            #expect(try RealLibvirt.virsh("domstate", name) == "running", "\(c.what)")
        }
        try Self.expectManaged(name, version: "\"major\":7")

        // The controller dies before the point of no return: `baton recover` rolls back.
        let journal = state + "/crash.jsonl"
        let crashed = try Self.upgrade(name, to: RealQEMU.newQEMU, extra: ["--journal", journal], environment: ["BATON_CONTROLLER_FAULT": "crash-controller-after:transferred"])
        #expect(crashed.status == 1, "\(crashed.out)")
        let back = try Self.baton(["recover", "--journal", journal])
        #expect(back.status == 0 && back.out.contains("rolled back"), "\(back.out)")
        before = try Self.expectContinued(name, console: console, before: before, binary: "/usr/bin/qemu-system-x86_64", pid: oldPid)
        #expect(try RealLibvirt.virsh("domstate", name) == "running")

        // ... and after it: `baton recover` rolls forward, libvirt adopts the new QEMU.
        let journal2 = state + "/crash2.jsonl"
        let crashed2 = try Self.upgrade(name, to: RealQEMU.newQEMU, extra: ["--journal", journal2], environment: ["BATON_CONTROLLER_FAULT": "crash-controller-after:committed"])
        #expect(crashed2.status == 1, "\(crashed2.out)")
        let forward = try Self.baton(["recover", "--journal", journal2])
        #expect(forward.status == 0 && forward.out.contains("rolled forward"), "\(forward.out)")
        _ = try Self.expectContinued(name, console: console, before: before, binary: RealQEMU.newQEMU, pid: nil)
        try Self.expectManaged(name, version: "\"major\":10")
    }

    @Test("a new QEMU without the domain's machine type is refused before anything is paused")
    func machineTypeRefused() throws {
        if let why = RealQEMU.unavailableReason { try Test.cancel("real QEMU upgrade unavailable: \(why)") }
        let state = try RealLibvirt.bringUp("qemu-it")
        let name = "baton-qemu-old-machine-\(getpid())"
        // pc-i440fx-2.0 exists in QEMU 7.2 and was removed before 10.0.
        let (_, console) = try Self.boot(name, memoryMiB: 128, fillMiB: 8, machine: "pc-i440fx-2.0", state: state)
        defer { Self.remove(name) }
        let before = try console.ask("check", timeoutSeconds: 300)
        let oldPid = RealQEMU.processes(of: name).first
        let r = try Self.upgrade(name, to: RealQEMU.newQEMU)
        #expect(r.status == 5, "\(r.out)")
        #expect(r.out.contains("does not support machine type pc-i440fx-2.0"), "\(r.out)")
        _ = try Self.expectContinued(name, console: console, before: before, binary: "/usr/bin/qemu-system-x86_64", pid: oldPid)
        #expect(try RealLibvirt.virsh("domstate", name) == "running")
    }

    @Test("private RAM: refused with the way to enroll; --allow-copy copies it through QEMU's stream; enroll makes the definition shared")
    func privateRAM() throws {
        if let why = RealQEMU.unavailableReason { try Test.cancel("real QEMU upgrade unavailable: \(why)") }
        let state = try RealLibvirt.bringUp("qemu-it")
        let name = "baton-qemu-private-\(getpid())"
        let (_, console) = try Self.boot(name, memoryMiB: 256, fillMiB: 32, shared: false, state: state)
        defer { Self.remove(name) }
        var before = try console.ask("check", timeoutSeconds: 300)
        let refused = try Self.upgrade(name, to: RealQEMU.newQEMU)
        #expect(refused.status == 5 && refused.out.contains("private guest RAM") && refused.out.contains("baton enroll"), "\(refused.out)")
        before = try Self.expectContinued(name, console: console, before: before, binary: "/usr/bin/qemu-system-x86_64", pid: nil)

        let copied = try Self.upgrade(name, to: RealQEMU.newQEMU, extra: ["--allow-copy"])
        #expect(copied.status == 0, "\(copied.out)")
        #expect(copied.report["mode"] as? String == "copy" && copied.report["ramPages"] as? String == "copied")
        #expect((copied.report["ramBytesMoved"] as? Int ?? 0) > 32 << 20, "the guest's data went through the stream")
        _ = try Self.expectContinued(name, console: console, before: before, binary: RealQEMU.newQEMU, pid: nil)
        try Self.expectManaged(name, version: "\"major\":10")

        let enrolled = try Self.baton(["enroll", name])
        #expect(enrolled.status == 0 && enrolled.out.contains("next cold boot"), "\(enrolled.out)")
        let definition = try LibvirtConnection(uri: "qemu:///system").domain(named: name).inactiveXML()
        #expect(definition.contains("<source type='memfd'/>") && definition.contains("<access mode='shared'/>"), "\(definition)")
        #expect(try RealLibvirt.virsh("metadata", name, "https://baton.dev/xmlns/handoff/1", "--config").contains("state=\"enrolled\""))
    }
}
}
