import BatonCore
import BatonSystem
import CBatonKVM
import Glibc
import Synchronization

/// Heartbeats seen by the VMM, per vCPU, with the time they arrived.
public final class BeatLog: Sendable {
    struct State {
        var last: [GuestBeat?]
        var exits: UInt64 = 0
    }
    private let state: Mutex<State>

    public init(vcpus: Int) { state = Mutex(State(last: Array(repeating: nil, count: vcpus))) }

    func reset() { state.withLock { $0 = State(last: Array(repeating: nil, count: $0.last.count)) } }

    func record(_ beat: GuestBeat, vcpu: Int) {
        state.withLock { s in
            s.last[vcpu] = beat
            s.exits += 1
        }
    }

    public var last: [GuestBeat?] { state.withLock { $0.last } }
    public var exits: UInt64 { state.withLock { $0.exits } }
}

/// One vCPU thread. `start()` runs it; `stop()` makes it leave the guest and joins it, so
/// afterwards its state can be read. Pausing on KVM: immediate_exit first, then a signal
/// (a no-op handler without SA_RESTART turns it into EINTR out of KVM_RUN).
protocol VCPURunner: AnyObject {
    func start() throws
    func stop()
    var failure: String? { get }
}

/// The SIGUSR1 kick, installed once. A handler written in main.swift would be
/// MainActor-isolated and crash when called on a vCPU thread, so it lives here.
enum VCPUKick {
    static let installed: Bool = {
        var action = sigaction()
        action.__sigaction_handler.sa_handler = kickHandler
        sigemptyset(&action.sa_mask)
        action.sa_flags = 0  // no SA_RESTART: KVM_RUN must return EINTR
        sigaction(SIGUSR1, &action, nil)
        return true
    }()
}

private func kickHandler(_ signal: Int32) {}

/// A pthread running `body`, joinable, with its pthread_t known for kicks.
final class VCPUThread: @unchecked Sendable {
    private(set) var thread = pthread_t()
    let body: () -> Void

    init(_ body: @escaping () -> Void) { self.body = body }

    var name = "vcpu"

    func start() throws {
        let rc = pthread_create(&thread, nil, vcpuThreadMain, Unmanaged.passRetained(self).toOpaque())
        guard rc == 0 else { throw SyscallError("pthread_create(vCPU)", errno: rc) }
    }

    func kick() { pthread_kill(thread, SIGUSR1) }
    func join() { pthread_join(thread, nil) }
}

private func vcpuThreadMain(_ context: UnsafeMutableRawPointer?) -> UnsafeMutableRawPointer? {
    let t = Unmanaged<VCPUThread>.fromOpaque(context!).takeRetainedValue()
    // The kick must get through even if this thread's creator blocked SIGUSR1.
    var kick = sigset_t()
    sigemptyset(&kick)
    sigaddset(&kick, SIGUSR1)
    pthread_sigmask(SIG_UNBLOCK, &kick, nil)
    // libvirt's ch driver finds vCPU threads by their names (vcpu0, vcpu1, ...) to pin them.
    Host.nameCurrentThread(t.name)
    // Never the guest at the real-time policy a raised pause (PauseBoost) passes on: a busy guest
    // would take 95% of a CPU from everything else. A policy an operator chose stays.
    if PauseBoost.isRaisedByUs(0) { PauseBoost.makeNormal(0) }
    t.body()
    return nil
}

final class KVMRunner: VCPURunner, @unchecked Sendable {
    let vcpu: KVMVCPU
    let index: Int
    let ram: UnsafeMutableRawPointer
    let beats: BeatLog
    private let stopping = Atomic<Bool>(false)
    private var thread: VCPUThread?
    private(set) var failure: String?

    init(vcpu: KVMVCPU, index: Int, ram: UnsafeMutableRawPointer, beats: BeatLog) {
        _ = VCPUKick.installed
        self.vcpu = vcpu
        self.index = index
        self.ram = ram
        self.beats = beats
    }

    func start() throws {
        stopping.store(false, ordering: .releasing)
        vcpu.run.pointee.immediate_exit = 0
        let t = VCPUThread { [self] in loop() }
        t.name = "vcpu\(index)"
        thread = t
        try t.start()
    }

    private func loop() {
        let fd = vcpu.fd.raw
        while true {
            let r = ioctl(fd, CBATON_KVM_RUN)
            if r < 0 {
                let e = errno
                if e == EINTR { break }  // kicked: paused at an instruction boundary, IO completed
                if e == EAGAIN { continue }
                failure = "\(SyscallError("ioctl(KVM_RUN) on vCPU \(index)", errno: e))"
                break
            }
            switch Int32(vcpu.run.pointee.exit_reason) {
            case KVM_EXIT_IO:
                if vcpu.run.pointee.io.port == ReferenceGuest.heartbeatPort {
                    beats.record(GuestBeat.read(from: ram, vcpu: index), vcpu: index)
                }
            case KVM_EXIT_INTR:
                break
            default:
                failure = "vCPU \(index) stopped: KVM exit reason \(vcpu.run.pointee.exit_reason)"
                return
            }
            // Re-enter even when stopping: with immediate_exit set, KVM completes the pending
            // port IO (advancing RIP) and returns EINTR without running guest code.
            if stopping.load(ordering: .acquiring) { vcpu.run.pointee.immediate_exit = 1 }
        }
    }

    func stop() {
        guard let thread else { return }
        stopping.store(true, ordering: .releasing)
        vcpu.run.pointee.immediate_exit = 1  // first, so a kick landing between two KVM_RUNs is not lost
        thread.kick()
        // A raised pause (PauseBoost) must not wait for this thread's next turn on a busy CPU
        // (up to a CFS latency period: 7.7 ms measured under `--load 2`): it is raised too, now
        // that it is told to leave. It runs no guest code from here (immediate_exit and the
        // pending kick end KVM_RUN before any guest entry) and ends right after.
        // By its pthread handle, valid until the join (a kernel thread id could be reused).
        if PauseBoost.isRaisedByUs(0) { PauseBoost.raiseLeavingThread(thread.thread) }
        thread.join()
        self.thread = nil
        vcpu.run.pointee.immediate_exit = 0
    }
}

/// The reference guest's semantics executed in Swift on the same guest memory, for hosts
/// without /dev/kvm. Its only register state is r15; it stops between iterations.
final class SimulatedRunner: VCPURunner, @unchecked Sendable {
    let index: Int
    let ram: UnsafeMutableRawPointer
    let beats: BeatLog
    let heartbeatMask: UInt64
    var r15: UInt64
    private let stopping = Atomic<Bool>(false)
    private var thread: VCPUThread?
    var failure: String? { nil }

    init(index: Int, ram: UnsafeMutableRawPointer, beats: BeatLog, heartbeatMask: UInt64, r15: UInt64) {
        self.index = index
        self.ram = ram
        self.beats = beats
        self.heartbeatMask = heartbeatMask
        self.r15 = r15
    }

    func start() throws {
        stopping.store(false, ordering: .releasing)
        let t = VCPUThread { [self] in loop() }
        t.name = "vcpu\(index)"
        thread = t
        try t.start()
    }

    private func loop() {
        let data = ram + Int(GuestLayout.dataPage(vcpu: index))
        let block = (ram + Int(GuestLayout.block(vcpu: index))).assumingMemoryBound(to: UInt64.self)
        let mask = GuestLayout.blockWordMask
        while !stopping.load(ordering: .acquiring) {
            for _ in 0..<1024 {
                let c = data.load(as: UInt64.self) &+ 1
                data.storeBytes(of: c, as: UInt64.self)
                var h = data.load(fromByteOffset: 8, as: UInt64.self)
                block[Int((c &* ReferenceGuest.indexMultiplier) & mask)] = h ^ c
                h = (h ^ block[Int((c &* 3 &+ 3) & mask)] ^ c) &* ReferenceGuest.fnvPrime
                data.storeBytes(of: h, toByteOffset: 8, as: UInt64.self)
                r15 = r15 &+ h
                if c & heartbeatMask == 0 {
                    data.storeBytes(of: r15, toByteOffset: 0x10, as: UInt64.self)
                    data.storeBytes(of: data.load(fromByteOffset: 0x18, as: UInt64.self) &+ 1, toByteOffset: 0x18, as: UInt64.self)
                    beats.record(GuestBeat.read(from: ram, vcpu: index), vcpu: index)
                }
            }
            usleep(1000)  // about a million iterations a second at most, like the KVM guest's pace
        }
    }

    func stop() {
        guard let thread else { return }
        stopping.store(true, ordering: .releasing)
        thread.join()
        self.thread = nil
    }
}
