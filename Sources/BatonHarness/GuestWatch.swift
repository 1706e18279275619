import BatonCore
import BatonController
import BatonVMM
import Foundation
import Glibc

extension VMMClient {
    /// vCPU 0's first heartbeat past `counter`, polled from the VMM's status, or nil if none
    /// comes within `timeout` seconds (the VMM may be unreachable meanwhile: that is waited out).
    public func nextBeat(after counter: UInt64, timeout: Double) -> GuestBeat? {
        let deadline = Date().addingTimeInterval(timeout)
        while Date() < deadline {
            if let b = (try? status())?.beats.first ?? nil, b.counter > counter { return b }
            usleep(20_000)
        }
        return nil
    }
}
