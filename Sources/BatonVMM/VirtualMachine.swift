import BatonCore
import BatonSystem
import CBatonKVM
import Foundation
import Glibc
import Synchronization

/// A VM's lifecycle state, named as Cloud Hypervisor's vm.info names it.
/// One guest: its RAM, its vCPUs (KVM or simulated) and their lifecycle. Thread-safe: the
/// API serves requests concurrently, so every transition holds `lock`.
public final class VirtualMachine: @unchecked Sendable {
    public let config: VMConfig
    public let ram: MemoryMapping
    public let beats: BeatLog
    public let backend: VMState.Backend
    let kvm: KVMMachine?
    let kvmVCPUs: [KVMVCPU]
    var runners: [VCPURunner] = []
    public private(set) var state: VMRunState = .created
    /// CLOCK_MONOTONIC when the vCPUs last started: how a controller measures downtime.
    public private(set) var lastStartNanoseconds: UInt64 = 0
    /// CLOCK_MONOTONIC when the last pause began (carried across an exec-in-place upgrade).
    public var lastPauseNanoseconds: UInt64 = 0
    /// Set by a new instance asked to digest its RAM before resuming (tests, `--digest`).
    public var ramDigestBeforeResume: String?
    let lock = NSLock()

    /// Builds the VM around `ram` (fresh: the guest gets installed by `boot()`; handed over:
    /// state gets restored by `restore(_:)`).
    /// `backend`: known from saved state (a restore), so /dev/kvm is not probed first: the probe
    /// creates and destroys a KVM VM, ~0.5 ms inside the pause.
    init(config: VMConfig, ram: MemoryMapping, prebuilt: PrebuiltKVM? = nil, backend known: VMState.Backend? = nil) throws {
        try config.validate()
        self.config = config
        self.ram = ram
        beats = BeatLog(vcpus: config.vcpus)
        if known.map({ $0 == .kvm }) ?? (!config.simulated && KVMHost.unavailableReason == nil) {
            backend = .kvm
            // A prebuilt VM with no vCPUs yet (the exec'd image's) gets them here; one with the
            // wrong number is not used at all (its vCPU ids are taken).
            // A slot 0 set for another mapping or size cannot be changed in place: a fresh VM then.
            let reuse = prebuilt.flatMap { p -> PrebuiltKVM? in
                let vcpusFit = p.vcpus.count == config.vcpus || p.vcpus.isEmpty
                let slotFits = p.machine.slot0.map { $0.host == ram.base && $0.length == config.ramBytes } ?? true
                return vcpusFit && slotFits ? p : nil
            }
            let machine = try reuse?.machine ?? KVMMachine()
            // A new instance registered the handed-over RAM before the pause (PrebuiltKVM.register).
            if machine.slot0 == nil {
                try machine.setMemory(slot: 0, guestAddress: 0, host: ram.base, length: config.ramBytes)
            }
            kvm = machine
            let built = reuse?.vcpus.isEmpty == false ? reuse?.vcpus : nil
            kvmVCPUs = try built ?? (0..<config.vcpus).map { try KVMVCPU(machine: machine, index: $0) }
        } else {
            backend = .simulated
            kvm = nil
            kvmVCPUs = []
        }
    }

    /// A new VM with fresh RAM (memfd when `memory.shared`, else anonymous).
    public static func create(_ config: VMConfig) throws -> VirtualMachine {
        try config.validate()
        let ram = config.sharedMemory ? try MemoryMapping.memfd(name: "batonvmm-guest-ram", length: config.ramBytes)
                                      : try MemoryMapping.anonymous(length: config.ramBytes)
        ram.adviseHugePages()
        return try VirtualMachine(config: config, ram: ram)
    }

    public var backendName: String { backend == .kvm ? "kvm" : "simulated" }

    /// Installs the guest and starts the vCPUs.
    public func boot() throws {
        lock.lock(); defer { lock.unlock() }
        guard state == .created else { throw VMError.invalidState(action: "boot", state: state) }
        try installGuest()
        if backend == .kvm { try setUpKVMRegisters() }
        runners = makeRunners(r15: Array(repeating: 0, count: config.vcpus))
        try startRunners()
    }

    func installGuest() throws {
        // Everything above the guest's own structures carries a pattern, so a handoff moves real data.
        let reserved = Int(GuestLayout.reservedBytes(vcpus: config.vcpus))
        TestPattern.fill(ram.base + reserved, count: config.ramBytes - reserved, seed: 0xBA70_6E57, firstWord: UInt64(reserved / 8))
        GuestLayout.install(into: ram.base, ramBytes: config.ramBytes, vcpus: config.vcpus)
        if let kernel = config.kernelPath, kernel != "builtin:reference", !kernel.isEmpty {
            guard let code = FileManager.default.contents(atPath: kernel), !code.isEmpty, code.count <= 0x4000 else {
                throw VMError.badKernel(kernel)
            }
            code.withUnsafeBytes { memcpy(ram.base + Int(GuestLayout.code), $0.baseAddress!, code.count) }
        }
    }

    func setUpKVMRegisters() throws {
        guard let kvm else { return }
        let cpuid = try kvm.supportedCPUID()
        for (i, vcpu) in kvmVCPUs.enumerated() {
            try vcpu.setCPUID(cpuid)  // before SET_SREGS: long mode needs LM in guest CPUID
            var sregs = try vcpu.get(CBATON_KVM_GET_SREGS, "KVM_GET_SREGS", kvm_sregs())
            var code = kvm_segment()
            code.base = 0; code.limit = 0xFFFF_FFFF; code.selector = 0x33; code.type = 11
            code.present = 1; code.dpl = 3; code.s = 1; code.l = 1; code.g = 1
            var data = code
            data.selector = 0x2B; data.type = 3; data.l = 0; data.db = 1
            sregs.cs = code
            sregs.ds = data; sregs.es = data; sregs.fs = data; sregs.gs = data; sregs.ss = data
            sregs.cr3 = GuestLayout.pml4
            sregs.cr4 = 0x620          // PAE | OSFXSR | OSXMMEXCPT
            sregs.cr0 = 0x8005_0033    // PE | MP | ET | NE | WP | AM | PG
            sregs.efer = 0x501         // SCE | LME | LMA
            try vcpu.set(CBATON_KVM_SET_SREGS, "KVM_SET_SREGS", sregs)
            var regs = kvm_regs()
            regs.rip = GuestLayout.code
            regs.rflags = 0x3002       // IOPL 3: `out` is legal at CPL 3 on VMX/SVM
            regs.rsp = GuestLayout.dataPage(vcpu: i) + 0x800
            regs.rbp = GuestLayout.dataPage(vcpu: i)
            regs.r14 = GuestLayout.block(vcpu: i)
            regs.rdi = GuestLayout.blockWordMask
            regs.rsi = config.heartbeatMask
            regs.r12 = config.delaySpins
            regs.r15 = 0
            try vcpu.set(CBATON_KVM_SET_REGS, "KVM_SET_REGS", regs)
        }
    }

    func makeRunners(r15: [UInt64]) -> [VCPURunner] {
        if backend == .kvm {
            return kvmVCPUs.enumerated().map { KVMRunner(vcpu: $1, index: $0, ram: ram.base, beats: beats) }
        }
        return (0..<config.vcpus).map { SimulatedRunner(index: $0, ram: ram.base, beats: beats, heartbeatMask: config.heartbeatMask, r15: r15[$0]) }
    }

    func startRunners() throws {
        for r in runners { try r.start() }
        lastStartNanoseconds = Host.monotonicNanoseconds()
        state = .running
    }

    public func pause() throws {
        lock.lock(); defer { lock.unlock() }
        guard state == .running else { throw VMError.invalidState(action: "pause", state: state) }
        lastPauseNanoseconds = Host.monotonicNanoseconds()
        for r in runners { r.stop() }
        state = .paused
    }

    public func resume() throws {
        lock.lock(); defer { lock.unlock() }
        guard state == .paused else { throw VMError.invalidState(action: "resume", state: state) }
        try startRunners()
    }

    /// A reset: the guest starts over from its first instruction (vm.reboot).
    public func reboot() throws {
        lock.lock(); defer { lock.unlock() }
        guard state == .running || state == .paused else { throw VMError.invalidState(action: "reboot", state: state) }
        if state == .running { for r in runners { r.stop() } }
        try installGuest()
        if backend == .kvm { try setUpKVMRegisters() }
        beats.reset()
        runners = makeRunners(r15: Array(repeating: 0, count: config.vcpus))
        try startRunners()
    }

    public func shutdown() {
        lock.lock(); defer { lock.unlock() }
        if state == .running { for r in runners { r.stop() } }
        state = .shutdown
    }

    public var failures: [String] { runners.compactMap(\.failure) }

    /// Saves every vCPU's state (the VM must be paused).
    public func saveState() throws -> VMState {
        lock.lock(); defer { lock.unlock() }
        guard state == .paused else { throw VMError.invalidState(action: "save state", state: state) }
        var saved = VMState(backend: backend, config: config)
        if let kvm {
            saved.clock = bytes(of: try kvm.clock())
            let msrIndices = try kvm.msrIndexList()
            for vcpu in kvmVCPUs {
                saved.kvm.append(VMState.KVMVCPUState(
                    regs: bytes(of: try vcpu.get(CBATON_KVM_GET_REGS, "KVM_GET_REGS", kvm_regs())),
                    sregs: bytes(of: try vcpu.get(CBATON_KVM_GET_SREGS, "KVM_GET_SREGS", kvm_sregs())),
                    xsave: bytes(of: try vcpu.get(CBATON_KVM_GET_XSAVE, "KVM_GET_XSAVE", kvm_xsave())),
                    xcrs: bytes(of: try vcpu.get(CBATON_KVM_GET_XCRS, "KVM_GET_XCRS", kvm_xcrs())),
                    events: bytes(of: try vcpu.get(CBATON_KVM_GET_VCPU_EVENTS, "KVM_GET_VCPU_EVENTS", kvm_vcpu_events())),
                    debugregs: bytes(of: try vcpu.get(CBATON_KVM_GET_DEBUGREGS, "KVM_GET_DEBUGREGS", kvm_debugregs())),
                    msrs: try vcpu.msrs(msrIndices).map { VMState.MSR(index: $0.0, value: $0.1) },
                    cpuid: try vcpu.cpuid().flatMap { bytes(of: $0) }))
            }
        } else {
            saved.simulatedR15 = runners.compactMap { ($0 as? SimulatedRunner)?.r15 }
        }
        return saved
    }

    /// Builds a paused VM in this process around handed-over RAM and restores `saved` into it.
    public static func restore(_ saved: VMState, ram: MemoryMapping, prebuilt: PrebuiltKVM? = nil) throws -> VirtualMachine {
        var config = saved.config
        if saved.backend == .simulated { config.baton_guest = VMConfig.Guest(delay_spins: config.baton_guest?.delay_spins, heartbeat_mask: config.baton_guest?.heartbeat_mask, simulated: true) }
        let vm: VirtualMachine
        do {
            vm = try VirtualMachine(config: config, ram: ram, prebuilt: saved.backend == .kvm ? prebuilt : nil, backend: saved.backend)
        } catch where saved.backend == .kvm && KVMHost.unavailableReason != nil {
            throw VMError.backendMismatch(saved: .kvm, here: .simulated)
        }
        if let kvm = vm.kvm {
            for (vcpu, s) in zip(vm.kvmVCPUs, saved.kvm) {
                let entries = stride(from: 0, to: s.cpuid.count, by: MemoryLayout<kvm_cpuid_entry2>.stride).map {
                    value(kvm_cpuid_entry2.self, from: Array(s.cpuid[$0..<$0 + MemoryLayout<kvm_cpuid_entry2>.stride]), initial: kvm_cpuid_entry2())
                }
                try vcpu.setCPUID(entries)  // first: CPUID may not change after KVM_RUN
                try vcpu.set(CBATON_KVM_SET_SREGS, "KVM_SET_SREGS", value(kvm_sregs.self, from: s.sregs, initial: kvm_sregs()))
                try vcpu.set(CBATON_KVM_SET_REGS, "KVM_SET_REGS", value(kvm_regs.self, from: s.regs, initial: kvm_regs()))
                try vcpu.set(CBATON_KVM_SET_XSAVE, "KVM_SET_XSAVE", value(kvm_xsave.self, from: s.xsave, initial: kvm_xsave()))
                try vcpu.set(CBATON_KVM_SET_XCRS, "KVM_SET_XCRS", value(kvm_xcrs.self, from: s.xcrs, initial: kvm_xcrs()))
                // Without an in-kernel irqchip the PV-EOI MSR is refused; everything else must take.
                let refused = try vcpu.setMSRs(s.msrs.map { ($0.index, $0.value) })
                let unexpected = refused.filter { index in index != 0x4B56_4D06 || s.msrs.first { $0.index == index }?.value != 0 }
                guard unexpected.isEmpty else { throw VMError.msrRefused(unexpected) }
                var events = value(kvm_vcpu_events.self, from: s.events, initial: kvm_vcpu_events())
                events.flags |= CBATON_KVM_VCPUEVENT_VALID_NMI_PENDING
                try vcpu.set(CBATON_KVM_SET_VCPU_EVENTS, "KVM_SET_VCPU_EVENTS", events)
                try vcpu.set(CBATON_KVM_SET_DEBUGREGS, "KVM_SET_DEBUGREGS", value(kvm_debugregs.self, from: s.debugregs, initial: kvm_debugregs()))
            }
            try kvm.setClock(value(kvm_clock_data.self, from: saved.clock, initial: kvm_clock_data()))
        }
        vm.runners = vm.makeRunners(r15: saved.backend == .simulated ? saved.simulatedR15 : Array(repeating: 0, count: config.vcpus))
        vm.state = .paused
        return vm
    }

    /// A VM restored in this process after an exec-in-place upgrade: RAM from the inherited
    /// memfd, state from the inherited state memfd; left paused for its manager to resume.
    public static func resumeAfterExec(ramFD: Int32, stateFD: Int32) throws -> VirtualMachine {
        try ExecResume(ramFD: ramFD, stateFD: stateFD).finish()
    }

    /// Starts a restored VM (the new instance's resume).
    public func startRestored() throws {
        lock.lock(); defer { lock.unlock() }
        guard state == .paused else { throw VMError.invalidState(action: "resume", state: state) }
        try startRunners()
    }
}

/// A KVM VM and its vCPUs created by a new instance before the pause (creating them costs
/// ~1 ms that would otherwise fall inside the downtime); used if the saved state matches.
public struct PrebuiltKVM: @unchecked Sendable {
    public let machine: KVMMachine
    public let vcpus: [KVMVCPU]

    public init(vcpus count: Int) throws {
        let m = try KVMMachine()
        machine = m
        vcpus = try (0..<count).map { try KVMVCPU(machine: m, index: $0) }
    }

    init(machine: KVMMachine, vcpus: [KVMVCPU] = []) {
        self.machine = machine
        self.vcpus = vcpus
    }

    /// This VM with vCPUs up to `count` (ids from the ones it has on).
    func addingVCPUs(_ count: Int) throws -> PrebuiltKVM {
        PrebuiltKVM(machine: machine, vcpus: vcpus + (try (vcpus.count..<max(vcpus.count, count)).map { try KVMVCPU(machine: machine, index: $0) }))
    }

    /// Registers guest RAM as slot 0 ahead of the restore (KVM_SET_USER_MEMORY_REGION for 1 GiB
    /// takes ~0.5 ms here, measured): a new instance does it when its destination is mapped,
    /// before the pause; an exec'd image on its second thread (ExecResume).
    public func register(ram: MemoryMapping) throws {
        try machine.setMemory(slot: 0, guestAddress: 0, host: ram.base, length: ram.length)
    }
}

/// The restore of an image that just exec'd, all of it inside the guest's pause, which leaves a
/// CPU idle: started first thing in main, it builds the KVM VM, its memory slot and its vCPUs
/// (~1.5–2 ms here, measured) on a second thread while the image starts up and decodes the state;
/// `finish()` sets the state into them.
public final class ExecResume: @unchecked Sendable {
    let ram: MemoryMapping
    let state: MemoryMapping
    private var built: PrebuiltKVM?
    private let done = DispatchSemaphore(value: 0)

    /// Maps the inherited memfds (they become this object's) and starts the KVM build.
    /// `warmUp` runs on that thread afterwards (the first answer's JSON, say).
    public init(ramFD: Int32, stateFD: Int32, warmUp: @escaping @Sendable () -> Void = {}) throws {
        let ramFile = FileDescriptor(owning: ramFD)
        let stateFile = FileDescriptor(owning: stateFD)
        _ = fcntl(ramFD, F_SETFD, FD_CLOEXEC)
        ram = try MemoryMapping.shared(fd: ramFile, offset: 0, length: Int(try ramFile.status().st_size))
        state = try MemoryMapping.shared(fd: stateFile, offset: 0, length: Int(try stateFile.status().st_size))
        // The vCPU count from the state's header, unverified: only a hint for what to build (a
        // wrong one is not used, VirtualMachine.init).
        let vcpus = StateRegion.peekVCPUCount(from: state.base, capacity: state.length)
        let ram = self.ram
        Thread { [self] in
            built = try? {
                let p = PrebuiltKVM(machine: try KVMMachine())
                try p.register(ram: ram)
                return try p.addingVCPUs(vcpus ?? 0)
            }()
            done.signal()
            warmUp()
        }.start()
    }

    public func finish() throws -> VirtualMachine {
        let saved = try StateRegion.read(from: state.base, capacity: state.length)
        done.wait()
        return try VirtualMachine.restore(saved, ram: ram, prebuilt: saved.backend == .kvm ? built : nil)
    }
}

public enum VMError: Error, CustomStringConvertible {
    case invalidState(action: String, state: VMRunState)
    case badKernel(String)
    case backendMismatch(saved: VMState.Backend, here: VMState.Backend)
    case msrRefused([UInt32])
    case noVM

    public var description: String {
        switch self {
        case let .invalidState(action, state): "cannot \(action): the VM is \(state.rawValue)"
        case .badKernel(let path): "payload.kernel '\(path)': not a readable guest program of 1...16384 bytes"
        case let .backendMismatch(saved, here): "state was saved on a \(saved) vCPU but this host runs \(here)"
        case .msrRefused(let indices): "KVM_SET_MSRS refused \(indices.map { "0x" + String($0, radix: 16) })"
        case .noVM: "no VM has been created"
        }
    }
}
