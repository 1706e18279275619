import BatonCore
import BatonSystem

/// Observes what happened to a region's pages (PageDisposition), rather than assuming it.
public enum MoveDetection {
    /// Physical frames at the plan's sample offsets of `base` (0 where hidden or not resident).
    public static func frames(base: UnsafeRawPointer, regionLength: UInt64, pageSize: PageSize) throws -> [UInt64] {
        let offsets = TransferPlan.frameSampleOffsets(regionLength: regionLength, pageSize: pageSize)
        // Read each sampled page once so a lazily mapped page (memfd) has a frame to report.
        var sink: UInt8 = 0
        for o in offsets { sink ^= base.load(fromByteOffset: Int(o), as: UInt8.self) }
        withExtendedLifetime(sink) {}
        return try PageMap.entries(for: offsets.map { base + Int($0) }, pageSize: pageSize.bytes).map { $0.present ? $0.frame : 0 }
    }

    /// Decides from the sender's frames before the transfer, the receiver's frames after it,
    /// and whether the sender still has the pages resident.
    public static func disposition(before: [UInt64], after: [UInt64], sourceStillResident: Bool) -> PageDisposition {
        let comparable = zip(before, after).filter { $0.0 != 0 && $0.1 != 0 }
        if comparable.isEmpty { return sourceStillResident ? .copied : .unknown }
        let same = comparable.allSatisfy { $0.0 == $0.1 }
        if !same { return .copied }
        return sourceStillResident ? .shared : .moved
    }
}
