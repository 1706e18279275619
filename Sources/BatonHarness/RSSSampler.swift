import BatonSystem
import Foundation
import Glibc
import Synchronization

/// Samples the combined resident memory of this process and a peer while a transfer runs
/// (every `intervalMicroseconds`), because the sum of each process's own peak (VmHWM) is only
/// an upper bound: the sender's peak comes before the receiver's when pages are released.
/// Shared memfd pages are resident in both processes; with `sharedFrames` they count once.
public final class RSSSampler: @unchecked Sendable {
    private let peerPID: Int32
    private let sharedFrames: Bool
    private let interval: UInt32
    private let stop = Atomic<Bool>(false)
    private let peakBytes = Atomic<Int>(0)
    private var thread: Thread?
    private let done = DispatchSemaphore(value: 0)

    public init(peerPID: Int32, sharedFrames: Bool, intervalMicroseconds: UInt32 = 1000) {
        self.peerPID = peerPID
        self.sharedFrames = sharedFrames
        self.interval = intervalMicroseconds
    }

    public static func resident(_ pid: String) -> (anon: Int, shmem: Int, file: Int) {
        (Host.statusBytes("RssAnon", pid: pid) ?? 0, Host.statusBytes("RssShmem", pid: pid) ?? 0, Host.statusBytes("RssFile", pid: pid) ?? 0)
    }

    public func sampleOnce() {
        let me = Self.resident("self")
        let peer = Self.resident("\(peerPID)")
        let shmem = sharedFrames ? max(me.shmem, peer.shmem) : me.shmem + peer.shmem
        let total = me.anon + peer.anon + shmem + me.file + peer.file
        if total > peakBytes.load(ordering: .relaxed) { peakBytes.store(total, ordering: .relaxed) }
    }

    public func start() {
        let t = Thread { [self] in
            while !stop.load(ordering: .acquiring) {
                sampleOnce()
                usleep(interval)
            }
            done.signal()
        }
        thread = t
        t.start()
    }

    /// Stops sampling (after one last sample) and returns the peak combined bytes seen.
    public func finish() -> Int {
        sampleOnce()
        stop.store(true, ordering: .releasing)
        if thread != nil { done.wait() }
        return peakBytes.load(ordering: .relaxed)
    }
}
