import BatonQEMU
import Foundation
import Testing

/// The command line libvirt 9.0 wrote for a QEMU 7.2 domain (read from /proc on this host),
/// and what Baton makes of it. Pure: always runs.
@Suite("QEMU command line and libvirt status file")
struct QEMUCommandLineTests {
    static let libvirtArgv = [
        "/usr/bin/qemu-system-x86_64", "-name", "guest=bt1,debug-threads=on", "-S",
        "-machine", "pc-i440fx-7.2,usb=off,dump-guest-core=off,memory-backend=pc.ram", "-accel", "tcg", "-m", "256",
        "-object", #"{"qom-type":"memory-backend-memfd","id":"pc.ram","share":true,"x-use-canonical-path-for-ramblock-id":false,"size":268435456}"#,
        "-no-acpi", "-no-hpet",
        "-chardev", "socket,id=charmonitor,fd=30,server=on,wait=off", "-mon", "chardev=charmonitor,id=monitor,mode=control",
        "-chardev", "socket,id=charserial0,fd=27,server=on,wait=off",
        "-device", #"{"driver":"isa-serial","chardev":"charserial0","id":"serial0","index":0}"#, "-device", "virtio-rng-pci,id=rng0",
    ]

    @Test("reads machine type, devices, passed sockets and the RAM backend")
    func parses() {
        let cmd = QEMUCommandLine(Self.libvirtArgv)
        #expect(cmd.machineType == "pc-i440fx-7.2")
        #expect(cmd.deviceDrivers == ["isa-serial", "virtio-rng-pci"])
        #expect(cmd.passedSockets == [.init(id: "charmonitor", fd: 30), .init(id: "charserial0", fd: 27)])
        #expect(cmd.monitorSocket?.fd == 30)
        #expect(cmd.ramBackends == [.memfd(id: "pc.ram", shared: true)])
    }

    @Test("translates for QEMU 10: file backend on the inherited memfd, removed options, aux-ram-share, -incoming")
    func translates() throws {
        let cmd = QEMUCommandLine(Self.libvirtArgv)
        let (new, changes) = try cmd.translated(newEmulator: "/opt/q10/qemu", newVersion: QEMUVersion(major: 10, minor: 0, micro: 2), ramFD: 31, incoming: .deferred)
        #expect(new.emulator == "/opt/q10/qemu")
        #expect(!new.arguments.contains("-no-acpi") && !new.arguments.contains("-no-hpet"))
        #expect(new.values(of: "-machine") == ["pc-i440fx-7.2,usb=off,dump-guest-core=off,memory-backend=pc.ram,acpi=off,hpet=off,aux-ram-share=on"])
        #expect(new.ramBackends == [.inheritedFile(id: "pc.ram", fd: 31, shared: true)])
        #expect(new.values(of: "-object").first?.contains(#""size":268435456"#) == true)
        #expect(Array(new.arguments.suffix(2)) == ["-incoming", "defer"])
        #expect(changes.count == 4, "\(changes)")
        // A second upgrade of the translated process: its own -incoming goes, the fd stays, cpr channels come.
        let (again, more) = try new.translated(newEmulator: "/opt/q10/qemu", newVersion: QEMUVersion(major: 10, minor: 0, micro: 2), ramFD: 31,
                                               incoming: .cprTransfer(mainPath: "/run/m.sock", cprPath: "/run/c.sock"))
        #expect(more.isEmpty, "\(more)")
        #expect(again.values(of: "-incoming").count == 2)
        #expect(again.values(of: "-incoming").last?.contains(#""channel-type":"cpr""#) == true)
        #expect(again.values(of: "-machine") == new.values(of: "-machine"))
        // QEMU 7.2 as the target keeps the old options (they still exist there) and gets no aux-ram-share.
        let (old, _) = try cmd.translated(newEmulator: "/usr/bin/qemu", newVersion: QEMUVersion(major: 7, minor: 2, micro: 0), ramFD: 31, incoming: .deferred)
        #expect(old.arguments.contains("-no-acpi") && !(old.values(of: "-machine").first ?? "").contains("aux-ram-share"))
    }

    @Test("private RAM is refused with the reason")
    func privateRAM() {
        var argv = Self.libvirtArgv
        argv[argv.firstIndex { $0.contains("memory-backend-memfd") }!] = #"{"qom-type":"memory-backend-memfd","id":"pc.ram","share":false,"size":1}"#
        #expect(throws: QEMUUpgradeError.self) {
            _ = try QEMUCommandLine(argv).translated(newEmulator: "/q", newVersion: QEMUVersion(major: 10, minor: 0, micro: 0), ramFD: 3, incoming: .deferred)
        }
    }

    static let status = """
    <domstatus state='running' reason='booted' pid='3487'>
      <monitor path='/var/lib/libvirt/qemu/domain-1-bt1/monitor.sock' type='unix'/>
      <vcpus>
        <vcpu id='0' pid='3493'/>
        <vcpu id='1' pid='3494'/>
      </vcpus>
      <qemuCaps>
        <flag name='kvm'/>
        <flag name='no-hpet'/>
      </qemuCaps>
      <domain type='qemu' id='1'>
        <devices>
          <emulator>/usr/bin/qemu-system-x86_64</emulator>
        </devices>
      </domain>
    </domstatus>
    """

    @Test("the status file is rewritten for the new process and nothing else changes")
    func statusFile() throws {
        let file = LibvirtStatusFile(xml: Self.status)
        #expect(file.pid == 3487 && file.vcpuThreads == [0: 3493, 1: 3494] && file.emulator == "/usr/bin/qemu-system-x86_64")
        #expect(file.monitorPath == "/var/lib/libvirt/qemu/domain-1-bt1/monitor.sock")
        let new = try file.rewritten(pid: 5740, vcpus: [0: 5745, 1: 5746], emulator: "/opt/q10/qemu", flags: ["kvm", "cpr-transfer"])
        #expect(new.pid == 5740 && new.vcpuThreads == [0: 5745, 1: 5746] && new.emulator == "/opt/q10/qemu")
        #expect(new.capabilityFlags == ["kvm", "cpr-transfer"])
        #expect(new.monitorPath == file.monitorPath)
        #expect(new.xml.contains("<domstatus state='running' reason='booted' pid='5740'>"))
        #expect(try file.rewritten(pid: 5740, vcpus: [:], emulator: "/x", flags: nil).capabilityFlags == ["kvm", "no-hpet"])
    }

    @Test("enroll gives a definition shared memfd RAM, keeps the rest of memoryBacking, and is idempotent")
    func enrollment() {
        let plain = "<domain><name>d</name><memory unit='KiB'>1048576</memory><currentMemory unit='KiB'>1048576</currentMemory><vcpu>1</vcpu></domain>"
        let (a, changedA) = QEMUEnrollment.withSharedMemory(plain)
        #expect(changedA && a.contains("</currentMemory>\n  <memoryBacking><source type='memfd'/><access mode='shared'/></memoryBacking>"))
        #expect(QEMUEnrollment.withSharedMemory(a).changed == false)
        let hugepages = "<domain><memory>1</memory><memoryBacking><hugepages/><access mode='private'/></memoryBacking></domain>"
        let (b, changedB) = QEMUEnrollment.withSharedMemory(hugepages)
        #expect(changedB && b == "<domain><memory>1</memory><memoryBacking><source type='memfd'/><access mode='shared'/><hugepages/></memoryBacking></domain>")
        let (c, _) = QEMUEnrollment.withSharedMemory("<domain><memory>1</memory><memoryBacking/></domain>")
        #expect(c == "<domain><memory>1</memory><memoryBacking><source type='memfd'/><access mode='shared'/></memoryBacking></domain>")
        #expect(QEMUCommandLine(QEMUCommandLineTests.libvirtArgv).ramBytes == 268435456)
    }

    @Test("staleness: same file is current; a replaced or removed emulator is stale, with the reason; unknown is never called stale")
    func staleness() {
        #expect(QEMUInventory.staleness(running: "/usr/bin/q", runningIdentity: "1:2", emulator: "/usr/bin/q", installedIdentity: "1:2") == nil)
        let replaced = QEMUInventory.staleness(running: "/usr/bin/q (deleted)", runningIdentity: "1:2", emulator: "/usr/bin/q", installedIdentity: "1:3")
        #expect(replaced == "/usr/bin/q was replaced by a different file (the running one is deleted)")
        #expect(QEMUInventory.staleness(running: "/usr/bin/q (deleted)", runningIdentity: "1:2", emulator: "/usr/bin/q", installedIdentity: nil) == "/usr/bin/q no longer exists")
        #expect(QEMUInventory.staleness(running: "?", runningIdentity: nil, emulator: "/usr/bin/q", installedIdentity: "1:3") == nil)
        let d = QEMUDomainStatus(domain: "a", pid: 1, emulator: "/usr/bin/q", runningBinary: "/usr/bin/q (deleted)", runningVersion: "7.2.19",
                                 installedVersion: "10.0.2", stale: true, staleReason: replaced, sharedRAM: true)
        var current = d
        current.domain = "b"
        current.stale = false
        let targets = QEMUBatchUpgrade.staleTargets([d, current], binary: nil)
        #expect(targets.map(\.domain) == ["a"] && targets.first?.newEmulator == "/usr/bin/q", "only stale domains, onto their installed emulator")
    }
}
