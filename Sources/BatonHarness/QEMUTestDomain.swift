import BatonLibvirt
import BatonSystem
import Foundation
import Glibc

/// A libvirt domain running the test guest (Scripts/build-guest.sh: Debian's kernel and a
/// busybox initramfs that fills RAM with random data and answers on its serial port) under TCG,
/// with shared-memory guest RAM. Used by `baton harness --hypervisor qemu` and `baton bench qemu`.
public struct QEMUTestDomain {
    public let name: String
    public let console: GuestConsole
    public let uri: String

    /// Defines and starts the domain, and waits until the guest answers.
    public static func boot(name: String, uri: String = "qemu:///system", emulator: String, machine: String = "pc-i440fx-7.2",
                            ramMiB: Int, fillMiB: Int, guest: String, directory: String, shared: Bool = true,
                            bootTimeoutSeconds: Double = 600) throws -> QEMUTestDomain {
        let serial = "\(directory)/\(name).ser"
        let xml = """
        <domain type='qemu'><name>\(name)</name><memory unit='MiB'>\(ramMiB)</memory><vcpu>1</vcpu>
          \(shared ? "<memoryBacking><source type='memfd'/><access mode='shared'/></memoryBacking>" : "")
          <os><type arch='x86_64' machine='\(machine)'>hvm</type><kernel>\(guest)/vmlinuz</kernel><initrd>\(guest)/initrd.gz</initrd>
          <cmdline>console=ttyS0 quiet panic=-1 fill=\(fillMiB)</cmdline></os><features><acpi/></features><clock offset='utc'/>
          <on_poweroff>destroy</on_poweroff><on_reboot>restart</on_reboot><on_crash>destroy</on_crash>
          <devices><emulator>\(emulator)</emulator><controller type='usb' model='none'/>
          <serial type='unix'><source mode='bind' path='\(serial)'/></serial><memballoon model='none'/></devices></domain>
        """
        let connection = try LibvirtConnection(uri: uri)
        if let old = try? connection.domain(named: name) { try? old.destroy(); try? old.undefine() }
        _ = try connection.defineAndStart(xml: xml)
        let domain = QEMUTestDomain(name: name, console: GuestConsole(path: serial), uri: uri)
        _ = try domain.console.ask("ping", timeoutSeconds: bootTimeoutSeconds)
        return domain
    }

    /// Destroys and undefines it, through a fresh connection (upgrades restart libvirtd).
    public func remove() {
        guard let c = try? LibvirtConnection(uri: uri), let d = try? c.domain(named: name) else { return }
        try? d.destroy()
        try? d.undefine()
    }

    /// Every live QEMU process running this domain (by its `-name guest=NAME` argument).
    public var processes: [pid_t] {
        ((try? FileManager.default.contentsOfDirectory(atPath: "/proc")) ?? []).compactMap { pid_t($0) }.filter { pid in
            guard Host.isAlive(pid), let argv = try? ProcessHandles.commandLine(of: pid) else { return false }
            return argv.first?.contains("qemu-system") == true && argv.contains("guest=\(name),debug-threads=on")
        }
    }
}
