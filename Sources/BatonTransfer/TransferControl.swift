import BatonSystem
import Glibc
import Synchronization

/// Bytes handed over so far in one transfer, read by a progress line while lanes add to it
/// (one relaxed add per chunk: nothing the pause would notice).
public final class TransferProgress: Sendable {
    private let bytes = Atomic<Int>(0)
    public init() {}
    public var bytesMoved: Int { bytes.load(ordering: .relaxed) }
    public func add(_ n: UInt64) { bytes.add(Int(n), ordering: .relaxed) }
}

/// Shared by the lanes of one transfer: a cancel flag any lane or the agent can raise,
/// and the stall timeout after which a silent peer is an error instead of a hang.
public final class TransferControl: @unchecked Sendable {
    private let cancelled = Atomic<Bool>(false)
    public let stallTimeoutMilliseconds: Int32
    /// The agent socket: if the peer writes (a failure) or hangs up while a lane waits, the
    /// lane stops at once instead of waiting out the stall timeout.
    let peerSocket: FileDescriptor?
    /// What the lanes have moved (pipes: each chunk once through; memfd: each chunk checked).
    public let progress: TransferProgress

    public init(stallTimeoutSeconds: Double = 10, peerSocket: FileDescriptor? = nil, progress: TransferProgress = TransferProgress()) {
        stallTimeoutMilliseconds = Int32(stallTimeoutSeconds * 1000)
        self.peerSocket = peerSocket
        self.progress = progress
    }

    public var isCancelled: Bool { cancelled.load(ordering: .acquiring) }
    public func cancel() { cancelled.store(true, ordering: .releasing) }

    /// Waits (in slices, so cancellation is seen) until `fd` is ready or the stall timeout passes.
    func waitReady(_ fd: FileDescriptor, events: Int16, what: @autoclosure () -> String) throws {
        var waited: Int32 = 0
        let slice: Int32 = 100
        while true {
            if isCancelled { throw TransferError.cancelled(at: what()) }
            if try fd.wait(for: events, timeoutMilliseconds: slice) { return }
            if let peerSocket, try peerSocket.wait(for: Int16(POLLIN), timeoutMilliseconds: 0) {
                throw TransferError.peerStopped(while: what())
            }
            waited += slice
            if waited >= stallTimeoutMilliseconds {
                throw TransferError.stalled(what: what(), seconds: Double(stallTimeoutMilliseconds) / 1000)
            }
        }
    }
}

public enum TransferError: Error, CustomStringConvertible, Equatable {
    /// This lane stopped because another lane (or the agent) failed first; `at` says where
    /// this lane was. Never the reason a transfer failed: LaneJob reports the first other error.
    case cancelled(at: String)
    case stalled(what: String, seconds: Double)
    case pipeClosedEarly(lane: Int, regionID: UInt32, offset: UInt64, received: UInt64, expected: UInt64)
    /// `lane` nil: not a pipe lane (process_vm_readv's own split).
    case syscall(SyscallError, lane: Int?, regionID: UInt32, offset: UInt64)
    case destinationMissing(lane: Int?, regionID: UInt32, offset: UInt64)
    case descriptorMissing(regionID: UInt32, index: Int32)
    case descriptorMismatch(regionID: UInt32, index: Int32)
    case memfdTooSmall(regionID: UInt32, size: Int, needed: Int)
    case injected(String)
    case peerStopped(while: String)

    public var description: String {
        switch self {
        case .cancelled(let at): "stopped after another lane failed (this one was at \(at))"
        case .stalled(let what, let s): "peer stalled: no progress on \(what) for \(s) s"
        case let .pipeClosedEarly(lane, region, offset, received, expected):
            "pipe of lane \(lane) closed early: region \(region) offset 0x\(String(offset, radix: 16)) got \(received) of \(expected) bytes"
        case let .syscall(e, lane, region, offset): "\(e) (\(lane.map { "lane \($0), " } ?? "")region \(region) offset 0x\(String(offset, radix: 16)))"
        case let .destinationMissing(lane, id, offset):
            "\(lane.map { "lane \($0): " } ?? "")a chunk at region \(id) offset 0x\(String(offset, radix: 16)) names a region with no mapping on this side"
        case let .descriptorMissing(id, index): "memfd region \(id) refers to descriptor \(index), which did not arrive"
        case let .descriptorMismatch(id, index):
            "memfd region \(id): descriptor \(index) on transferBegin is not the memfd announced with the region table (another file, or an offset)"
        case let .memfdTooSmall(id, size, needed): "memfd of region \(id) holds \(size) bytes, region needs \(needed)"
        case .injected(let what): "injected fault: \(what)"
        case .peerStopped(let what): "the peer stopped (wrote or hung up on the agent socket) while waiting on \(what)"
        }
    }
}
