import Glibc

/// Named fault points inside a transfer, switched on by `BATON_FAULT` (comma-separated),
/// so the failure paths are exercised by real processes, not mocks:
///
/// - `corrupt-chunk:K`          receiver flips one byte of chunk K as it lands (integrity must catch it)
/// - `close-pipe-after-chunk:K` sender closes its pipe write ends after gifting chunk K
/// - `stall-after-chunk:K`      sender stops sending after chunk K (the receiver's stall timeout must fire)
/// - `kill-sender-after-chunk:K` / `kill-receiver-after-chunk:K`  SIGKILL that process after chunk K
/// - `truncate-message:COMMAND` / `oversize-message:COMMAND`  the agent mangles that message
/// - `stall-message:COMMAND`    the agent goes silent instead of sending that message
public struct FaultPlan: Sendable, Equatable {
    public static let environmentVariable = "BATON_FAULT"

    public var corruptChunk: Int?
    public var closePipeAfterChunk: Int?
    public var stallAfterChunk: Int?
    public var killSenderAfterChunk: Int?
    public var killReceiverAfterChunk: Int?
    public var truncateMessage: String?
    public var oversizeMessage: String?
    public var stallMessage: String?

    public init() {}

    public static let fromEnvironment: FaultPlan = {
        guard let raw = getenv(environmentVariable) else { return FaultPlan() }
        do { return try FaultPlan(parsing: String(cString: raw)) } catch {
            fatalError("\(environmentVariable): \(error)")
        }
    }()

    public struct ParseError: Error, CustomStringConvertible {
        public let description: String
    }

    public init(parsing spec: String) throws {
        for item in spec.split(separator: ",") {
            let parts = item.split(separator: ":", maxSplits: 1).map(String.init)
            let name = parts[0]
            let arg = parts.count > 1 ? parts[1] : ""
            func chunk() throws -> Int {
                guard let k = Int(arg), k >= 0 else { throw ParseError(description: "fault '\(item)': needs a chunk number") }
                return k
            }
            switch name {
            case "corrupt-chunk": corruptChunk = try chunk()
            case "close-pipe-after-chunk": closePipeAfterChunk = try chunk()
            case "stall-after-chunk": stallAfterChunk = try chunk()
            case "kill-sender-after-chunk": killSenderAfterChunk = try chunk()
            case "kill-receiver-after-chunk": killReceiverAfterChunk = try chunk()
            case "truncate-message": truncateMessage = arg
            case "oversize-message": oversizeMessage = arg
            case "stall-message": stallMessage = arg
            default: throw ParseError(description: "unknown fault point '\(name)'")
            }
        }
    }
}
