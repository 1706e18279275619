import BatonCore
import BatonSystem
import Glibc

/// The `copy` transport's receiver side: one lane's chunks read straight out of the
/// sender's address space with process_vm_readv (one copy, no pipe), then checksummed.
public struct RemoteLaneReader {
    public let sourcePID: pid_t
    public let control: TransferControl
    public let faults: FaultPlan

    public init(sourcePID: pid_t, control: TransferControl, faults: FaultPlan = .fromEnvironment) {
        self.sourcePID = sourcePID
        self.control = control
        self.faults = faults
    }

    public func receive(_ chunks: [Chunk], sourceAddresses: [UInt32: UInt64], destinations: [UInt32: DestinationRegion], checksums: ChunkChecksums) throws {
        for chunk in chunks {
            if control.isCancelled { throw TransferError.cancelled(at: "process_vm_readv of region \(chunk.regionID) offset 0x\(String(chunk.offset, radix: 16))") }
            guard let dest = destinations[chunk.regionID], let remoteBase = sourceAddresses[chunk.regionID] else {
                throw TransferError.destinationMissing(lane: chunk.lane, regionID: chunk.regionID, offset: chunk.offset)
            }
            let local = dest.base + Int(chunk.offset)
            var done = 0
            let length = Int(chunk.length)
            while done < length {
                let n: Int
                do {
                    n = try ProcessMemory.read(from: sourcePID, local: local + done, remote: UInt(remoteBase + chunk.offset) + UInt(done), length: length - done)
                } catch let e as SyscallError {
                    throw TransferError.syscall(e, lane: chunk.lane, regionID: chunk.regionID, offset: chunk.offset + UInt64(done))
                }
                if n == 0 {
                    throw TransferError.pipeClosedEarly(lane: chunk.lane ?? 0, regionID: chunk.regionID, offset: chunk.offset,
                                                        received: UInt64(done), expected: chunk.length)
                }
                done += n
            }
            if faults.corruptChunk == chunk.index { local.storeBytes(of: local.load(as: UInt8.self) ^ 0x5A, as: UInt8.self) }
            checksums[chunk.index] = chunk.checksum(regionBase: dest.base)
            control.progress.add(chunk.length)
            if faults.killReceiverAfterChunk == chunk.index { kill(getpid(), SIGKILL) }
        }
    }
}
