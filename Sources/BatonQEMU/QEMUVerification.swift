import BatonCore
import BatonSystem
import Foundation
import Glibc

/// Checks that decide whether the new QEMU may run the guest: both processes have the same
/// devices (QEMU completes a migration to a target with an extra device), and both map the
/// same guest RAM (a sample of pages read from the shared memory, from the old process and
/// from the new one, equal). What can be read before the pause is read before it.
enum QEMUVerification {
    static let samplePages = 64

    /// A QEMU's devices: `name:type` of every child under the two peripheral containers.
    typealias DeviceSet = [String: Set<String>]
    static let devicePaths = ["/machine/peripheral", "/machine/peripheral-anon"]

    /// Both `qom-list`s in one write (QMP answers in order): one round trip, not two.
    static func devices(of qmp: QMPConnection) throws -> DeviceSet {
        let replies = try qmp.executePipelined(devicePaths.map { ("qom-list", JSONValue.object(["path": .string($0)])) })
        var set: DeviceSet = [:]
        for (path, reply) in zip(devicePaths, replies) {
            let props = try JSONDecoder().decode([QOMProperty].self, from: JSONEncoder().encode(reply))
            set[path] = Set(props.filter { $0.type.hasPrefix("child<") }.map { "\($0.name):\($0.type.dropFirst(6).dropLast())" })
        }
        return set
    }

    /// The new QEMU has exactly the old one's devices. Nothing can hotplug while libvirtd is
    /// stopped, so the old set read before the pause still holds in it.
    static func compareDevices(old: DeviceSet?, new: QMPConnection) throws {
        guard let old else { throw QEMUUpgradeError.integrity("the old QEMU's device set was not read before the pause") }
        let newSet = try devices(of: new)
        for path in devicePaths {
            let a = old[path] ?? [], b = newSet[path] ?? []
            guard a == b else {
                let extra = b.subtracting(a).sorted(), missing = a.subtracting(b).sorted()
                throw QEMUUpgradeError.integrity("device sets differ under \(path): new QEMU has extra [\(extra.joined(separator: ", "))], lacks [\(missing.joined(separator: ", "))]")
            }
        }
    }

    /// Pages of guest RAM compared inside the pause (the RAM is frozen there): the memfd's own
    /// bytes (through a read-only mapping of it here) against the same pages read through the
    /// old and the new QEMU's mappings, one `process_vm_readv` per process. The pages and the
    /// mappings are found before the pause; a cpr-transfer destination maps the RAM only once
    /// it has the CPR state, so its mapping is found in the pause.
    final class RAMSample {
        static let page = 4096
        let inode: UInt64
        let size: Int
        let offsets: [Int]
        let memory: MemoryMapping
        let oldPid: pid_t
        let oldBase: UInt
        var newBase: UInt?
        var buffer: [UInt8]

        init(ram: FileDescriptor, oldPid: pid_t, newPid: pid_t?) throws {
            let st = try ram.status()
            size = Int(st.st_size)
            inode = UInt64(st.st_ino)
            guard size >= Self.page else { throw QEMUUpgradeError.integrity("guest RAM memfd is \(size) bytes") }
            let pages = size / Self.page
            offsets = (0..<samplePages).map { i in (pages - 1) * i / max(samplePages - 1, 1) * 4096 }
            memory = try MemoryMapping.shared(fd: ram, offset: 0, length: size, readOnly: true)
            self.oldPid = oldPid
            guard let base = QEMUVerification.mapping(of: oldPid, inode: inode, size: size) else {
                throw QEMUUpgradeError.integrity("the old QEMU (pid \(oldPid)) does not map the guest RAM memfd (inode \(inode))")
            }
            oldBase = base
            if let newPid { newBase = try Self.base(in: newPid, inode: inode, size: size) }
            buffer = [UInt8](repeating: 0, count: samplePages * Self.page)
            // The sampled pages enter this mapping's page table now: in the pause they are only
            // read (64 read faults there cost ~0.3 ms).
            for off in offsets { memory.populateForReading(offset: off, length: Self.page) }
        }

        static func base(in pid: pid_t, inode: UInt64, size: Int) throws -> UInt {
            guard let base = QEMUVerification.mapping(of: pid, inode: inode, size: size) else {
                throw QEMUUpgradeError.integrity("the new QEMU (pid \(pid)) does not map the guest RAM memfd (inode \(inode))")
            }
            return base
        }

        /// Finds the new QEMU's mapping (if not yet found) and reads the sampled pages through both
        /// processes once, so that the reads in the pause find them in both page tables.
        func locateAndWarm(newPid: pid_t) throws {
            if newBase == nil { newBase = try Self.base(in: newPid, inode: inode, size: size) }
            _ = try read(pid: oldPid, base: oldBase, who: "old")
            _ = try read(pid: newPid, base: newBase!, who: "new")
        }

        func compare(newPid: pid_t) throws {
            let newBase = try self.newBase ?? Self.base(in: newPid, inode: inode, size: size)
            self.newBase = newBase
            for (pid, base, who) in [(oldPid, oldBase, "old"), (newPid, newBase, "new")] {
                try read(pid: pid, base: base, who: who)
                for (i, off) in offsets.enumerated() {
                    let same = buffer.withUnsafeBytes { memcmp($0.baseAddress! + i * Self.page, memory.base + off, Self.page) == 0 }
                    guard same else { throw QEMUUpgradeError.integrity("guest RAM page at offset \(off) differs in the \(who) QEMU (pid \(pid))") }
                }
            }
        }

        /// The sampled pages of `pid` into `buffer`: one `process_vm_readv`.
        @discardableResult
        func read(pid: pid_t, base: UInt, who: String) throws -> Int {
                let copied = try buffer.withUnsafeMutableBytes { local in
                    var l = iovec(iov_base: local.baseAddress, iov_len: local.count)
                    var remote = offsets.map { iovec(iov_base: UnsafeMutableRawPointer(bitPattern: base + UInt($0)), iov_len: Self.page) }
                    return try withUnsafePointer(to: &l) { lp in
                        try remote.withUnsafeMutableBufferPointer {
                            try ProcessMemory.read(from: pid, local: UnsafeBufferPointer(start: lp, count: 1), remote: UnsafeBufferPointer($0))
                        }
                    }
                }
                guard copied == buffer.count else {
                    throw QEMUUpgradeError.integrity("reading \(samplePages) sampled guest RAM pages through the \(who) QEMU (pid \(pid)) returned \(copied) of \(buffer.count) bytes")
                }
                return copied
        }
    }

    /// Start address of the shared mapping of file `inode` at offset 0 covering `size` bytes.
    /// Parsed as bytes: a QEMU's maps runs to hundreds of lines, and this can run in the pause.
    static func mapping(of pid: pid_t, inode: UInt64, size: Int) -> UInt? {
        guard let maps = Host.readSmallFileBytes("/proc/\(pid)/maps") else { return nil }
        for line in maps.split(separator: UInt8(ascii: "\n")) {
            // range perms offset dev inode [path]
            let f = line.split(separator: UInt8(ascii: " "), maxSplits: 5, omittingEmptySubsequences: true)
            guard f.count >= 5, number(f[4], radix: 10) == UInt(inode), number(f[2], radix: 16) == 0, f[1].contains(UInt8(ascii: "s")) else { continue }
            let range = f[0].split(separator: UInt8(ascii: "-"))
            guard range.count == 2, let lo = number(range[0], radix: 16), let hi = number(range[1], radix: 16), hi > lo, Int(hi - lo) >= size else { continue }
            return lo
        }
        return nil
    }

    static func number(_ digits: ArraySlice<UInt8>, radix: UInt) -> UInt? {
        guard !digits.isEmpty, digits.count <= 16 else { return nil }
        var n: UInt = 0
        for c in digits {
            let d: UInt
            switch c {
            case UInt8(ascii: "0")...UInt8(ascii: "9"): d = UInt(c - UInt8(ascii: "0"))
            case UInt8(ascii: "a")...UInt8(ascii: "f"): d = UInt(c - UInt8(ascii: "a")) + 10
            default: return nil
            }
            guard d < radix else { return nil }
            n = n &* radix &+ d
        }
        return n
    }
}
