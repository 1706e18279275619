import BatonCore
import BatonSystem
import CBatonLinux
import Glibc

let MADV_POPULATE_WRITE_VALUE = CBATON_MADV_POPULATE_WRITE

/// The pipes of one gift/pipe-copy transfer: one per lane, each asked for `requestedCapacity`
/// and granted what the host allows (1 MiB unless root raised fs.pipe-max-size).
public struct PipeLanes: Sendable {
    public let pipes: [Pipe]
    /// The smallest capacity granted (lanes are scheduled alike).
    public let capacity: Int
    public let refusals: [SyscallError]

    public init(count: Int, requestedCapacity: Int) throws {
        var pipes: [Pipe] = []
        var granted = Int.max
        var refusals: [SyscallError] = []
        for _ in 0..<count {
            let pipe = try Pipe()
            let outcome = try pipe.resize(toAtMost: requestedCapacity)
            granted = min(granted, outcome.granted)
            refusals += outcome.refusals
            try pipe.readEnd.setNonBlocking(true)
            try pipe.writeEnd.setNonBlocking(true)
            pipes.append(pipe)
        }
        self.pipes = pipes
        self.capacity = granted
        self.refusals = refusals
    }
}

/// Pushes one lane's chunks into its pipe: checksum first (the VM is paused, the bytes
/// cannot change), then vmsplice(GIFT|MOVE) or write(), looping over short transfers.
public struct PipeLaneSender {
    public let lane: Int
    public let pipe: FileDescriptor
    public let gift: Bool
    public let control: TransferControl
    public let faults: FaultPlan
    /// Called with each chunk's checksum before its bytes enter the pipe (a releasing sender
    /// streams checksums so the receiver can confirm chunks one by one).
    public let beforeChunk: ((Chunk, UInt64) throws -> Void)?

    public init(lane: Int, pipe: FileDescriptor, gift: Bool, control: TransferControl, faults: FaultPlan = .fromEnvironment,
                beforeChunk: ((Chunk, UInt64) throws -> Void)? = nil) {
        self.lane = lane
        self.pipe = pipe
        self.gift = gift
        self.control = control
        self.faults = faults
        self.beforeChunk = beforeChunk
    }

    public func send(_ chunks: [Chunk], sources: [UInt32: SourceRegion], checksums: ChunkChecksums) throws {
        for chunk in chunks {
            guard let source = sources[chunk.regionID] else { throw TransferError.destinationMissing(lane: lane, regionID: chunk.regionID, offset: chunk.offset) }
            let start = source.base + Int(chunk.offset)
            let sum = chunk.checksum(regionBase: source.base)
            checksums[chunk.index] = sum
            try beforeChunk?(chunk, sum)
            var cursor = IOVecCursor(segments: [(start, Int(chunk.length))])
            while !cursor.isDone {
                if control.isCancelled { throw TransferError.cancelled(at: "lane \(lane) sending region \(chunk.regionID) offset 0x\(String(chunk.offset + UInt64(cursor.consumed), radix: 16))") }
                do {
                    _ = try cursor.advance { iov in
                        if gift {
                            return try Splice.vmsplice(pipe, iov, flags: [.gift, .move, .nonBlocking])
                        }
                        return try pipe.write(from: iov[0].iov_base!, count: iov[0].iov_len)
                    }
                } catch let e as SyscallError where e.errno == EAGAIN {
                    try control.waitReady(pipe, events: Int16(POLLOUT), what: "lane \(lane) pipe (sending chunk \(chunk.index))")
                } catch let e as SyscallError {
                    throw TransferError.syscall(e, lane: lane, regionID: chunk.regionID, offset: chunk.offset + UInt64(cursor.consumed))
                }
            }
            control.progress.add(chunk.length)
            try afterChunk(chunk.index)
        }
    }

    private func afterChunk(_ index: Int) throws {
        if faults.killSenderAfterChunk == index { kill(getpid(), SIGKILL) }
        if faults.closePipeAfterChunk == index {
            pipe.close()
            throw TransferError.injected("closed the pipe of lane \(lane) after chunk \(index)")
        }
        if faults.stallAfterChunk == index {
            // Go silent (pipe open, nothing written) until cancelled or our own stall timeout.
            var waited: Int32 = 0
            while !control.isCancelled && waited < control.stallTimeoutMilliseconds {
                usleep(10_000)
                waited += 10
            }
            throw TransferError.injected("stalled lane \(lane) after chunk \(index)")
        }
    }
}

/// Pulls one lane's chunks out of its pipe into the destination with vmsplice(MOVE) or
/// read(), then checksums what landed (while it is still in cache).
public struct PipeLaneReceiver {
    public let lane: Int
    public let pipe: FileDescriptor
    public let gift: Bool
    public let control: TransferControl
    public let faults: FaultPlan
    /// The destination was not pre-faulted (a releasing sender): populate each chunk just
    /// before it lands, so memory grows with the transfer and faults come in batches.
    public let populateAhead: Bool
    /// Called with each chunk's checksum as soon as it has landed.
    public let afterChunk: ((Chunk, UInt64) throws -> Void)?

    public init(lane: Int, pipe: FileDescriptor, gift: Bool, control: TransferControl, faults: FaultPlan = .fromEnvironment,
                populateAhead: Bool = false, afterChunk: ((Chunk, UInt64) throws -> Void)? = nil) {
        self.lane = lane
        self.pipe = pipe
        self.gift = gift
        self.control = control
        self.faults = faults
        self.populateAhead = populateAhead
        self.afterChunk = afterChunk
    }

    public func receive(_ chunks: [Chunk], destinations: [UInt32: DestinationRegion], checksums: ChunkChecksums) throws {
        for chunk in chunks {
            guard let dest = destinations[chunk.regionID] else { throw TransferError.destinationMissing(lane: lane, regionID: chunk.regionID, offset: chunk.offset) }
            let start = dest.base + Int(chunk.offset)
            if populateAhead {
                // One populate call per chunk instead of a page fault per 4 KiB page.
                madvise(start, Int(chunk.length), MADV_POPULATE_WRITE_VALUE)
            }
            var cursor = IOVecCursor(segments: [(start, Int(chunk.length))])
            while !cursor.isDone {
                if control.isCancelled { throw TransferError.cancelled(at: "lane \(lane) receiving region \(chunk.regionID) offset 0x\(String(chunk.offset + UInt64(cursor.consumed), radix: 16))") }
                do {
                    let n = try cursor.advance { iov in
                        if gift {
                            return try Splice.vmsplice(pipe, iov, flags: [.move, .nonBlocking])
                        }
                        return try pipe.read(into: iov[0].iov_base!, count: iov[0].iov_len)
                    }
                    if n == 0 {
                        throw TransferError.pipeClosedEarly(lane: lane, regionID: chunk.regionID, offset: chunk.offset,
                                                            received: UInt64(cursor.consumed), expected: chunk.length)
                    }
                } catch let e as SyscallError where e.errno == EAGAIN {
                    try control.waitReady(pipe, events: Int16(POLLIN), what: "lane \(lane) pipe (receiving chunk \(chunk.index))")
                } catch let e as SyscallError {
                    throw TransferError.syscall(e, lane: lane, regionID: chunk.regionID, offset: chunk.offset + UInt64(cursor.consumed))
                }
            }
            if faults.corruptChunk == chunk.index { start.storeBytes(of: start.load(as: UInt8.self) ^ 0x5A, as: UInt8.self) }
            let sum = chunk.checksum(regionBase: dest.base)
            checksums[chunk.index] = sum
            control.progress.add(chunk.length)
            try afterChunk?(chunk, sum)
            if faults.killReceiverAfterChunk == chunk.index { kill(getpid(), SIGKILL) }
        }
    }
}
