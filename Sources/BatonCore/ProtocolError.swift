/// Everything that can be wrong with bytes or order on the agent socket.
/// Each case says what and where, in one line.
public enum ProtocolError: Error, Equatable, CustomStringConvertible, Sendable {
    case badMagic(UInt32)
    case unsupportedVersion(peer: UInt16, accepted: ClosedRange<UInt16>)
    case unknownCommand(UInt16)
    case oversizeMessage(command: UInt16, length: UInt32, limit: UInt32)
    case truncatedHeader(received: Int)
    case truncatedPayload(field: String, needed: Int, available: Int)
    case trailingBytes(command: String, count: Int)
    case unexpectedDescriptors(command: String, expected: Int, received: Int)
    case invalidField(command: String, field: String, value: String)
    case invalidMessage(state: String, message: String)
    case badRegionTable(RegionTableError)
    case peerFailed(code: UInt16, message: String)
    case peerAbandoned(reason: String)
    case peerClosed(state: String)

    public var description: String {
        switch self {
        case .badMagic(let m): return "not a Baton message: magic 0x\(String(m, radix: 16)) (expected 0x\(String(MessageHeader.magic, radix: 16)))"
        case .unsupportedVersion(let peer, let accepted): return "peer speaks protocol version \(peer); this side accepts \(accepted.lowerBound)...\(accepted.upperBound)"
        case .unknownCommand(let c): return "unknown command 0x\(String(c, radix: 16))"
        case .oversizeMessage(let c, let l, let limit): return "message \(Command(rawValue: c).map { "\($0)" } ?? "0x\(String(c, radix: 16))") claims \(l) payload bytes (limit \(limit))"
        case .truncatedHeader(let n): return "message header truncated: \(n) of \(MessageHeader.size) bytes"
        case .truncatedPayload(let field, let needed, let available): return "message truncated at '\(field)': needs \(needed) bytes, \(available) left"
        case .trailingBytes(let command, let count): return "\(command): \(count) unexpected trailing bytes"
        case .unexpectedDescriptors(let command, let expected, let received): return "\(command): expected \(expected) file descriptors, received \(received)"
        case .invalidField(let command, let field, let value): return "\(command): invalid \(field) \(value)"
        case .invalidMessage(let state, let message): return "\(message) is not valid while \(state)"
        case .badRegionTable(let e): return "bad region table: \(e)"
        case .peerFailed(let code, let message): return "peer failed (code \(code)): \(message)"
        case .peerAbandoned(let reason): return "peer abandoned the handoff: \(reason)"
        case .peerClosed(let state): return "peer closed the connection while \(state)"
        }
    }
}
