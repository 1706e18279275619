import BatonSystem
import Glibc

/// Walks a list of byte segments as iovec batches of at most IOV_MAX entries, advancing
/// past whatever a short vmsplice/readv/process_vm_readv call consumed.
public struct IOVecCursor {
    private var segments: [iovec]
    private var index = 0
    public private(set) var consumed = 0
    public let total: Int

    public init(segments: [(UnsafeMutableRawPointer, Int)]) {
        self.segments = segments.filter { $0.1 > 0 }.map { iovec(iov_base: $0.0, iov_len: $0.1) }
        total = self.segments.reduce(0) { $0 + $1.iov_len }
    }

    public var isDone: Bool { index >= segments.count }

    /// Calls `body` with the next batch (≤ IOV_MAX iovecs, ≤ 2 GiB − 4 KiB) and advances by its result.
    public mutating func advance(_ body: (UnsafeBufferPointer<iovec>) throws -> Int) rethrows -> Int {
        var batch: [iovec] = []
        var batchBytes = 0
        var i = index
        while i < segments.count && batch.count < maxIOVecs && batchBytes < maxBytesPerCall {
            let take = min(segments[i].iov_len, maxBytesPerCall - batchBytes)
            batch.append(iovec(iov_base: segments[i].iov_base, iov_len: take))
            batchBytes += take
            i += 1
        }
        let n = try batch.withUnsafeBufferPointer { try body($0) }
        precondition(n >= 0 && n <= batchBytes, "a call reported \(n) bytes for a \(batchBytes)-byte batch")
        skip(n)
        return n
    }

    private mutating func skip(_ bytes: Int) {
        var left = bytes
        consumed += bytes
        while left > 0 && index < segments.count {
            let seg = segments[index]
            if left >= seg.iov_len {
                left -= seg.iov_len
                index += 1
            } else {
                segments[index] = iovec(iov_base: seg.iov_base! + left, iov_len: seg.iov_len - left)
                left = 0
            }
        }
    }
}
