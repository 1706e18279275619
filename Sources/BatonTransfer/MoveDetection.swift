import BatonCore
import BatonSystem

/// What happened to a region's pages, observed rather than assumed.
public enum PageDisposition: String, Sendable, Codable {
    /// The receiver holds the sender's very frames and the sender's pages are gone.
    case moved
    /// The receiver holds different frames: the kernel copied (mainline vmsplice MOVE does).
    case copied
    /// Both processes map the same frames (memfd handed over as a descriptor).
    case shared
    /// Frame numbers are hidden from this process (no CAP_SYS_ADMIN) and the source kept its pages.
    case unknown
}

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
