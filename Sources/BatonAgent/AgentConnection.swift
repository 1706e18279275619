// BatonAgent holds the two agents that speak Baton's protocol: the old instance's sender
// and the new instance's receiver. It orders messages and drives BatonTransfer; it does
// not pause VMs or talk to libvirt (that is the controller's job).
import BatonCore
import BatonSystem
import BatonTransfer
import Glibc
import Synchronization

/// Why a handoff failed, as the agents see it. One line each, naming what and where.
public enum AgentError: Error, CustomStringConvertible {
    case protocolViolation(ProtocolError)
    case transfer(TransferError)
    case system(SyscallError)
    case wrongPeer(uid: UInt32, pid: Int32, expectedUID: UInt32)
    case integrity(Mismatch)
    case noTransport(regionID: UInt32, wanted: String, reason: String)
    case abandoned(String)
    /// The receiver sent `failure` (its `FailureCode` in `code`) before this side's own error.
    case peerFailed(String, after: String, code: UInt16 = FailureCode.failed)
    case rollbackLost(chunks: [Int], cause: String)

    public var description: String {
        switch self {
        case .protocolViolation(let e): "protocol: \(e)"
        case .transfer(let e): "transfer: \(e)"
        case .system(let e): "\(e)"
        case let .wrongPeer(uid, pid, expected): "refused peer pid \(pid): uid \(uid) is not the expected uid \(expected) (SO_PEERCRED)"
        case .integrity(let m): "integrity check failed: \(m)"
        case let .noTransport(id, wanted, reason): "region \(id) cannot travel by \(wanted): \(reason)"
        case .abandoned(let reason): "handoff abandoned: \(reason)"
        case let .peerFailed(reason, after, _): "new instance failed: \(reason) (here: \(after))"
        case let .rollbackLost(chunks, cause): "LOST: rollback could not restore chunks \(chunks) after: \(cause)"
        }
    }

    /// The shared classification of this failure.
    public var code: HandoffErrorCode {
        switch self {
        case .integrity, .protocolViolation(.peerFailed(code: FailureCode.integrity, _)), .peerFailed(_, _, code: FailureCode.integrity): .integrity
        case .wrongPeer, .protocolViolation(.badMagic), .protocolViolation(.unsupportedVersion): .peerRefused
        default: .failed
        }
    }

    public static func wrap(_ error: Error) -> AgentError {
        switch error {
        case let e as AgentError: e
        case let e as ProtocolError: .protocolViolation(e)
        case let e as TransferError: .transfer(e)
        case let e as SyscallError: .system(e)
        default: .abandoned("\(error)")
        }
    }
}

/// Framed messages on a Unix stream socket: a 16-byte header, the payload, and any
/// descriptors riding on the header's first byte (SCM_RIGHTS).
public final class AgentConnection: @unchecked Sendable {
    public let socket: UnixSocket
    /// Set after hello: every later message must carry this version.
    public var sessionVersion: UInt16?
    public var maximumPayload: UInt32 = MessageHeader.maximumPayload
    /// Bound on every blocking send/receive; a silent peer then fails as `stalled`.
    public private(set) var timeoutSeconds: Double?
    let faults: FaultPlan
    /// Lanes may send (streamed checksums, confirmations) while the agent thread does too.
    private let sendLock = Mutex(())

    public init(socket: UnixSocket, faults: FaultPlan = .fromEnvironment) {
        self.socket = socket
        self.faults = faults
    }

    public func setTimeout(seconds: Double) throws {
        try socket.setTimeout(seconds: seconds)
        timeoutSeconds = seconds
    }

    /// Refuses a peer whose uid differs from `expectedUID` (default: ours). Descriptors are
    /// only ever passed after this check.
    public func authenticate(expectedUID: UInt32 = getuid()) throws {
        let peer = try socket.peerCredentials()
        guard peer.uid == expectedUID else {
            throw AgentError.wrongPeer(uid: peer.uid, pid: peer.pid, expectedUID: expectedUID)
        }
    }

    public func send(_ message: Message, descriptors: [FileDescriptor] = []) throws {
        precondition(descriptors.count == message.descriptorCount, "\(message.command) needs \(message.descriptorCount) descriptors")
        var bytes = message.encoded(version: sessionVersion ?? ProtocolVersion.current)
        let name = "\(message.command)"
        if faults.oversizeMessage == name {
            // Claim a payload beyond the limit: the peer must refuse it from the header alone.
            var header = try MessageHeader.decode(bytes)
            header.payloadLength = MessageHeader.maximumPayload + 1
            bytes = header.encoded() + bytes.dropFirst(MessageHeader.size)
        }
        if faults.stallMessage == name {
            // Silent, connection open: the peer's stall timeout must end the handoff.
            let limit = (timeoutSeconds ?? 10) * 3
            var slept = 0.0
            while slept < limit {
                if (try? socket.fd.wait(for: Int16(POLLIN), timeoutMilliseconds: 100)) == true { break }  // the peer gave up
                slept += 0.1
            }
            throw TransferError.injected("stalled instead of sending \(name)")
        }
        if faults.truncateMessage == name {
            try socket.send(Array(bytes.prefix(max(MessageHeader.size, bytes.count - 4))), descriptors: descriptors.map(\.raw))
            socket.shutdownWrite()
            throw TransferError.injected("sent a truncated \(name)")
        }
        try sendLock.withLock { _ in try socket.send(bytes, descriptors: descriptors.map(\.raw)) }
    }

    /// Sends raw bytes (tests use this to speak a wrong dialect).
    public func sendRaw(_ bytes: [UInt8]) throws { try socket.send(bytes) }

    /// The next message and its descriptors. A closed stream between messages is `peerClosed`;
    /// inside one it is `truncated*`.
    public func receive(whileIn state: @autoclosure () -> String) throws -> (Message, [FileDescriptor]) {
        do {
            return try receiveMessage(state())
        } catch let e as SyscallError where e.errno == EAGAIN && timeoutSeconds != nil {
            throw TransferError.stalled(what: "the agent socket while \(state())", seconds: timeoutSeconds!)
        }
    }

    private func receiveMessage(_ state: String) throws -> (Message, [FileDescriptor]) {
        let head = try socket.receive(count: MessageHeader.size)
        if head.bytes.isEmpty { throw ProtocolError.peerClosed(state: state) }
        let header = try MessageHeader.decode(head.bytes, maximumPayload: maximumPayload)
        if let v = sessionVersion, header.version != v {
            throw ProtocolError.unsupportedVersion(peer: header.version, accepted: v...v)
        }
        let body = try socket.receive(count: Int(header.payloadLength))
        guard body.bytes.count == Int(header.payloadLength) else {
            throw ProtocolError.truncatedPayload(field: "payload of \(Command(rawValue: header.command)!)",
                                                 needed: Int(header.payloadLength), available: body.bytes.count)
        }
        let descriptors = head.descriptors + body.descriptors
        guard descriptors.count == Int(header.descriptorCount) else {
            throw ProtocolError.unexpectedDescriptors(command: "\(Command(rawValue: header.command)!)",
                                                      expected: Int(header.descriptorCount), received: descriptors.count)
        }
        let message = try Message.decode(header: header, payload: body.bytes)
        if case let .failure(code, text) = message { throw ProtocolError.peerFailed(code: code, message: text) }
        // hello's header carries the version it offers; welcome's the version chosen.
        switch message {
        case let .hello(version, _, _, _) where header.version != version,
             let .welcome(version, _) where header.version != version:
            throw ProtocolError.invalidField(command: "\(message.command)", field: "header version", value: "\(header.version) (the payload says \(version))")
        default: break
        }
        return (message, descriptors)
    }
}
