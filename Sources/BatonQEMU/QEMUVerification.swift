import BatonCore
import BatonSystem
import Foundation
import Glibc

/// Checks made inside the pause, after the migration completed and before the new QEMU runs:
/// both processes have the same devices (QEMU completes a migration to a target with an extra
/// device), and both map the same guest RAM (a sample of pages read from the shared memory,
/// from the old process and from the new one, digests equal).
enum QEMUVerification {
    static let samplePages = 64

    /// Both QEMUs have the same devices. Nothing can hotplug while libvirtd is stopped, so this
    /// holds from the moment both monitors answer; it runs before the pause where it can.
    static func compareDevices(old: QMPConnection, new: QMPConnection) throws {
        for path in ["/machine/peripheral", "/machine/peripheral-anon"] {
            let a = try devices(old, path), b = try devices(new, path)
            guard a == b else {
                let extra = b.subtracting(a).sorted(), missing = a.subtracting(b).sorted()
                throw QEMUUpgradeError.integrity("device sets differ under \(path): new QEMU has extra [\(extra.joined(separator: ", "))], lacks [\(missing.joined(separator: ", "))]")
            }
        }
    }

    /// Both QEMUs map the same guest RAM: sampled pages of the memfd equal the same pages read
    /// through each process's own mapping. Inside the pause (the RAM is frozen).
    static func compareRAM(oldPid: pid_t, newPid: pid_t, ram: FileDescriptor) throws {
        let st = try ram.status()
        let size = Int(st.st_size)
        let page = 4096
        guard size >= page else { throw QEMUUpgradeError.integrity("guest RAM memfd is \(size) bytes") }
        let offsets = (0..<samplePages).map { i in (size / page - 1) * i / max(samplePages - 1, 1) * page }
        var buffer = [UInt8](repeating: 0, count: page)
        var fromMemory: [UInt64] = []
        for off in offsets {
            let n = buffer.withUnsafeMutableBytes { pread(ram.raw, $0.baseAddress, page, off_t(off)) }
            guard n == page else { throw QEMUUpgradeError.integrity("reading guest RAM at offset \(off) returned \(n)") }
            fromMemory.append(XXH64.hash(buffer))
        }
        for (pid, who) in [(oldPid, "old"), (newPid, "new")] {
            guard let base = mapping(of: pid, inode: UInt64(st.st_ino), size: size) else {
                throw QEMUUpgradeError.integrity("the \(who) QEMU (pid \(pid)) does not map the guest RAM memfd (inode \(st.st_ino))")
            }
            for (i, off) in offsets.enumerated() {
                let n = try buffer.withUnsafeMutableBytes { try ProcessMemory.read(from: pid, local: $0.baseAddress!, remote: base + UInt(off), length: page) }
                guard n == page, XXH64.hash(buffer) == fromMemory[i] else {
                    throw QEMUUpgradeError.integrity("guest RAM page at offset \(off) differs in the \(who) QEMU (pid \(pid))")
                }
            }
        }
    }

    static func devices(_ qmp: QMPConnection, _ path: String) throws -> Set<String> {
        let props = try JSONDecoder().decode([QOMProperty].self, from: JSONEncoder().encode(qmp.execute("qom-list", arguments: ["path": path])))
        return Set(props.filter { $0.type.hasPrefix("child<") }.map { "\($0.name):\($0.type.dropFirst(6).dropLast())" })
    }

    /// Start address of the shared mapping of file `inode` at offset 0 covering `size` bytes.
    static func mapping(of pid: pid_t, inode: UInt64, size: Int) -> UInt? {
        guard let maps = try? String(contentsOfFile: "/proc/\(pid)/maps", encoding: .utf8) else { return nil }
        for line in maps.split(separator: "\n") {
            let f = line.split(separator: " ", omittingEmptySubsequences: true)
            guard f.count >= 5, UInt64(f[4]) == inode, UInt64(f[2], radix: 16) == 0, f[1].contains("s") else { continue }
            let range = f[0].split(separator: "-")
            guard range.count == 2, let lo = UInt(range[0], radix: 16), let hi = UInt(range[1], radix: 16), Int(hi - lo) >= size else { continue }
            return lo
        }
        return nil
    }
}
