// BatonCLI implements the `baton` commands; the executable only calls `BatonCommand.main()`.
import BatonAgent
import BatonCore
import BatonQEMU
import BatonSystem
import BatonTransfer
import Foundation
import Glibc

/// One line of `baton check`: ok, or what is missing and how to fix it.
public struct CheckItem: Codable, Sendable {
    public let name: String
    public let ok: Bool
    public let detail: String
    public let fix: String?
}

/// What `baton check` found. The flat keys are the machine contract of `--json`.
public struct CheckReport: Codable, Sendable {
    public var vmspliceGift = false
    /// Set when the kernel refuses vmsplice(SPLICE_F_GIFT) (EOPNOTSUPP on kernels that dropped
    /// gifting): the error. `auto` then never chooses gift.
    public var vmspliceGiftRefused: String?
    public var vmspliceMovesPages = false
    public var pageFramesVisible = false
    public var pipeMaxSize = 0
    public var pipeUserPagesSoft = 0
    public var pipeCapacityGranted = 0
    public var memfd = false
    public var processVmReadv = false
    public var kvm = false
    public var libvirt = false
    public var transparentHugePages = ""
    public var onlineCPUs = Host.onlineCPUs
    public var pageSize = Host.pageSize
    /// GiB/s of a 64 MiB in-process probe of each streaming path, and which `auto` uses.
    public var giftProbeGiBps = 0.0
    public var processVmReadvProbeGiBps = 0.0
    public var autoStreamTransport = "gift"
    /// QEMU binaries found, with versions, and the upgrade modes of each ordered pair.
    public var qemuBinaries: [QEMUInstallation] = []
    public var qemuPairs: [QEMUInstallation.Pair] = []
    /// `libvirtd --version`, if installed.
    public var libvirtdVersion: String?
    public var items: [CheckItem] = []
}

public enum HostCheck {
    public static func run(throughputProbe: Bool = true) -> CheckReport {
        var r = CheckReport()
        probeVmsplice(&r)
        probePipeLimits(&r)
        probeMemfd(&r)
        probeProcessVmReadv(&r)
        probeKVM(&r)
        probeLibvirt(&r)
        probeQEMU(&r)
        let thp = Host.readSmallFile("/sys/kernel/mm/transparent_hugepage/enabled") ?? ""
        r.transparentHugePages = thp.split(separator: "[").dropFirst().first.map { String($0.prefix { $0 != "]" }) } ?? "unavailable"
        r.items.append(CheckItem(name: "transparent huge pages", ok: r.transparentHugePages != "never" && r.transparentHugePages != "unavailable",
                                 detail: "mode \(r.transparentHugePages) (Baton asks with MADV_HUGEPAGE)",
                                 fix: r.transparentHugePages == "never" ? "echo madvise > /sys/kernel/mm/transparent_hugepage/enabled" : nil))
        // A refused gift decides auto's stream path without a probe (never left at gift).
        if throughputProbe || r.vmspliceGiftRefused != nil { probeThroughput(&r) }
        return r
    }

    static func probeVmsplice(_ r: inout CheckReport) {
        let page = Host.pageSize
        if let refusal = Splice.giftRefusal() {
            r.vmspliceGiftRefused = "\(refusal)"
            r.items.append(CheckItem(name: "vmsplice GIFT|MOVE", ok: false,
                                     detail: "this kernel refuses SPLICE_F_GIFT (\(refusal.errnoName)): auto never chooses gift; --transport gift streams by pipe copy with a notice, or fails with --strict",
                                     fix: nil))
            return
        }
        do {
            let source = try MemoryMapping.anonymous(length: page)
            source.base.storeBytes(of: 0xB4704E, as: UInt64.self)
            let before = try PageMap.entries(for: [UnsafeRawPointer(source.base)], pageSize: page)[0]
            let pipe = try BatonSystem.Pipe()
            let n = try Splice.vmsplice(pipe.writeEnd, base: source.base, length: page, flags: [.gift, .move])
            r.vmspliceGift = n == page
            let dest = try MemoryMapping.anonymous(length: page)
            let m = try Splice.vmsplice(pipe.readEnd, base: dest.base, length: page, flags: [.move])
            let after = try PageMap.entries(for: [UnsafeRawPointer(dest.base), UnsafeRawPointer(source.base)], pageSize: page)
            let intact = m == page && dest.base.load(as: UInt64.self) == 0xB4704E
            r.pageFramesVisible = before.frame != 0
            r.vmspliceMovesPages = intact && before.frame != 0 && after[0].frame == before.frame && !after[1].present
            let how = !r.pageFramesVisible ? "frames hidden (needs CAP_SYS_ADMIN); source page \(after[1].present ? "still present: copied" : "gone")"
                : r.vmspliceMovesPages ? "the receiver got the sender's frame: pages move"
                : "receiver frame 0x\(String(after[0].frame, radix: 16)) != sender's 0x\(String(before.frame, radix: 16)): the kernel copies on the read side (mainline behaviour)"
            r.items.append(CheckItem(name: "vmsplice GIFT|MOVE", ok: r.vmspliceGift && intact,
                                     detail: "one-page experiment: gifted \(n) bytes, received \(m) intact=\(intact); \(how)", fix: nil))
        } catch {
            r.items.append(CheckItem(name: "vmsplice GIFT|MOVE", ok: false, detail: "\(error)", fix: "needs Linux vmsplice(2); gift falls back to copy"))
        }
    }

    static func probePipeLimits(_ r: inout CheckReport) {
        r.pipeMaxSize = HandoffOptions.hostPipeMaxSize
        r.pipeUserPagesSoft = Host.readSmallFile("/proc/sys/fs/pipe-user-pages-soft").flatMap { Int($0.filter(\.isNumber)) } ?? 0
        do {
            let pipe = try BatonSystem.Pipe()
            let outcome = try pipe.resize(toAtMost: 64 << 20)
            r.pipeCapacityGranted = outcome.granted
            let big = outcome.granted >= 16 << 20
            r.items.append(CheckItem(name: "pipe capacity", ok: true,
                                     detail: "pipe-max-size \(ByteSize(r.pipeMaxSize)), asked 64MiB, granted \(ByteSize(outcome.granted)); user budget \(r.pipeUserPagesSoft) pages (\(ByteSize(r.pipeUserPagesSoft * Host.pageSize)))",
                                     fix: big ? nil : "optional, faster gift: sysctl -w fs.pipe-max-size=67108864 (Baton never changes it itself)"))
        } catch {
            r.items.append(CheckItem(name: "pipe capacity", ok: false, detail: "\(error)", fix: nil))
        }
    }

    static func probeMemfd(_ r: inout CheckReport) {
        do {
            let m = try MemoryMapping.memfd(name: "baton-check", length: Host.pageSize)
            m.base.storeBytes(of: 1, as: UInt8.self)
            r.memfd = true
            r.items.append(CheckItem(name: "memfd", ok: true, detail: "memfd_create + ftruncate + mmap(MAP_SHARED) work", fix: nil))
        } catch {
            r.items.append(CheckItem(name: "memfd", ok: false, detail: "\(error)", fix: "memfd transport unavailable; kernel ≥ 3.17 needed"))
        }
    }

    /// Reads from a child with a bad remote address: EFAULT means permission was granted,
    /// EPERM/EACCES means ptrace access is refused (Yama or different credentials).
    static func probeProcessVmReadv(_ r: inout CheckReport) {
        let child = Process()
        child.executableURL = URL(fileURLWithPath: "/bin/sleep")
        child.arguments = ["5"]
        do {
            try child.run()
            defer { child.terminate(); child.waitUntilExit() }
            let byte = UnsafeMutableRawPointer.allocate(byteCount: 1, alignment: 1)
            defer { byte.deallocate() }
            do {
                _ = try ProcessMemory.read(from: child.processIdentifier, local: byte, remote: 0x10, length: 1)
                r.processVmReadv = true
            } catch let e as SyscallError where e.errno == EFAULT {
                r.processVmReadv = true
            }
            r.items.append(CheckItem(name: "process_vm_readv", ok: true, detail: "may read a same-uid child's memory", fix: nil))
        } catch {
            r.items.append(CheckItem(name: "process_vm_readv", ok: false, detail: "\(error)",
                                     fix: "allow ptrace reads between the instances (kernel.yama.ptrace_scope=0 or same uid); copy falls back to pipes"))
        }
    }

    static func probeKVM(_ r: inout CheckReport) {
        let fd = open("/dev/kvm", O_RDWR | O_CLOEXEC)
        guard fd >= 0 else {
            let why = String(cString: strerror(errno))
            r.items.append(CheckItem(name: "kvm", ok: false, detail: "cannot open /dev/kvm: \(why)",
                                     fix: "load kvm (modprobe kvm_intel/kvm_amd) and run as a user in group kvm; batonvmm falls back to a simulated vCPU"))
            return
        }
        defer { close(fd) }
        let api = ioctl(fd, 0xAE00)  // KVM_GET_API_VERSION
        let vm = ioctl(fd, 0xAE01, 0)  // KVM_CREATE_VM
        if vm >= 0 { close(vm) }
        r.kvm = api == 12 && vm >= 0
        let pvm = FileManager.default.fileExists(atPath: "/sys/module/kvm_pvm")
        r.items.append(CheckItem(name: "kvm", ok: r.kvm, detail: "API version \(api), KVM_CREATE_VM \(vm >= 0 ? "ok" : "failed")\(pvm ? "; paravirtual KVM (PVM): guests run 64-bit CPL 3" : "")",
                                 fix: r.kvm ? nil : "needs a usable /dev/kvm"))
    }

    /// QEMU binaries and what Baton can do between them; libvirtd's version.
    static func probeQEMU(_ r: inout CheckReport) {
        r.qemuBinaries = QEMUInstallation.find()
        // Every ordered pair, a binary with itself too (a rebuilt QEMU of the same version: cpr-transfer from 10.0).
        for a in r.qemuBinaries { for b in r.qemuBinaries { r.qemuPairs.append(QEMUInstallation.pair(a, b)) } }
        for q in r.qemuBinaries { r.items.append(CheckItem(name: "qemu", ok: true, detail: "\(q.path): QEMU \(q.version)", fix: nil)) }
        if r.qemuBinaries.isEmpty {
            r.items.append(CheckItem(name: "qemu", ok: false, detail: "no qemu-system-x86_64 found", fix: "apt-get install qemu-system-x86; Scripts/install-qemu.sh for QEMU 10.0 beside it"))
        }
        for p in r.qemuPairs {
            let from = r.qemuBinaries.first { $0.path == p.from }?.version ?? "?", to = r.qemuBinaries.first { $0.path == p.to }?.version ?? "?"
            r.items.append(CheckItem(name: "qemu upgrade \(from) → \(to)", ok: true, detail: "\(p.modes.joined(separator: ", "))\(p.note.map { " (\($0))" } ?? "")", fix: nil))
        }
        if let out = try? Spawn.run("/usr/sbin/libvirtd", ["--version"]), out.status == 0,
           let m = out.output.firstMatch(of: #/(\d+\.\d+\.\d+)/#) {
            r.libvirtdVersion = String(m.1)
            r.items.append(CheckItem(name: "libvirtd", ok: true, detail: "libvirtd \(m.1)", fix: nil))
        } else {
            // Optional for batonvmm alone; needed for QEMU domains and the ch driver.
            r.items.append(CheckItem(name: "libvirtd", ok: false, detail: "/usr/sbin/libvirtd is not installed (or does not answer --version)",
                                     fix: "apt-get install -y libvirt-daemon libvirt-daemon-driver-qemu, then Scripts/libvirt-up.sh (Docs/OPERATIONS.md)"))
        }
    }

    static func probeLibvirt(_ r: inout CheckReport) {
        let lib = dlopen("libvirt.so.0", RTLD_LAZY)
        if let lib { dlclose(lib) }
        r.libvirt = lib != nil
        let daemon = FileManager.default.fileExists(atPath: "/run/libvirt/libvirt-sock") || FileManager.default.fileExists(atPath: "/var/run/libvirt/libvirt-sock")
        r.items.append(CheckItem(name: "libvirt", ok: r.libvirt,
                                 detail: r.libvirt ? "libvirt.so.0 loads; libvirtd socket \(daemon ? "present" : "absent")" : "libvirt.so.0 not found",
                                 fix: r.libvirt ? (daemon ? nil : "start libvirtd to manage domains (see Docs/OPERATIONS.md)") : "apt-get install -y libvirt0 libvirt-dev"))
    }

    /// 64 MiB through each streaming path in this process, to pick what `auto` uses for
    /// memory that has no memfd. Small and quick; `baton bench` gives the real figures.
    static func probeThroughput(_ r: inout CheckReport) {
        let size = 64 << 20
        if r.vmspliceGiftRefused != nil {
            r.autoStreamTransport = r.processVmReadv ? "copy" : "pipe-copy"
            r.items.append(CheckItem(name: "stream throughput (64MiB probe)", ok: true,
                                     detail: "gift refused by the kernel: auto streams by \(r.autoStreamTransport)", fix: nil))
            return
        }
        do {
            let src = try MemoryMapping.anonymous(length: size)
            let dst = try MemoryMapping.anonymous(length: size)
            for m in [src, dst] { m.adviseHugePages(); m.prefault(pageSize: Host.pageSize) }
            memset(src.base, 0x5A, size)
            // gift: one pipe, writer and reader threads.
            let lanes = try PipeLanes(count: 1, requestedCapacity: HandoffOptions.hostPipeMaxSize)
            let region = GuestRegion(id: 0, guestAddress: 0, length: UInt64(size))
            let table = try RegionTable([region], pageSize: PageSize(Host.pageSize))
            let plan = try TransferPlan(table: table, transfers: [RegionTransfer(regionID: 0, transport: .gift)], lanes: 1, chunkSize: 1 << 20, fullVerification: false)
            let control = TransferControl()
            let sums = ChunkChecksums(count: plan.chunks.count)
            let start = Host.monotonicNanoseconds()
            try LaneThreads.run(lanes: 2, pin: false) { k in
                if k == 0 {
                    try PipeLaneSender(lane: 0, pipe: lanes.pipes[0].writeEnd, gift: true, control: control, faults: FaultPlan())
                        .send(plan.chunks, sources: [0: SourceRegion(region: region, base: src.base)], checksums: sums)
                } else {
                    try PipeLaneReceiver(lane: 0, pipe: lanes.pipes[0].readEnd, gift: true, control: control, faults: FaultPlan())
                        .receive(plan.chunks, destinations: [0: DestinationRegion(region: region, mapping: dst)], checksums: sums)
                }
            }
            r.giftProbeGiBps = Double(size) / Double(1 << 30) / (Double(Host.monotonicNanoseconds() - start) / 1e9)
            let t0 = Host.monotonicNanoseconds()
            _ = try ProcessMemory.read(from: getpid(), local: dst.base, remote: UInt(bitPattern: src.base), length: size)
            r.processVmReadvProbeGiBps = Double(size) / Double(1 << 30) / (Double(Host.monotonicNanoseconds() - t0) / 1e9)
            r.autoStreamTransport = r.processVmReadv && r.processVmReadvProbeGiBps > r.giftProbeGiBps ? "copy" : "gift"
            r.items.append(CheckItem(name: "stream throughput (64MiB probe)", ok: true,
                                     detail: String(format: "gift %.1f GiB/s (checksums included), process_vm_readv %.1f GiB/s: auto streams by %@",
                                                    r.giftProbeGiBps, r.processVmReadvProbeGiBps, r.autoStreamTransport), fix: nil))
        } catch {
            r.items.append(CheckItem(name: "stream throughput (64MiB probe)", ok: false, detail: "\(error)", fix: nil))
        }
    }
}
