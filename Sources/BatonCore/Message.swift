/// Wire version rule: `hello` offers the sender's range (current and oldest); the receiver
/// answers with the highest version both speak (it speaks its current and the one before it)
/// or refuses; every later header carries that version. `hello`, `welcome` and `failure` never
/// change layout. Bump `current` when another message's layout changes.
public enum ProtocolVersion {
    public static let current: UInt16 = 1
    public static let oldestAccepted: UInt16 = max(1, current - 1)
    public static var accepted: ClosedRange<UInt16> { oldestAccepted...current }

    /// The session version for a peer that speaks `peerOldest...peerCurrent`: the highest
    /// version both sides speak, or nil if the ranges do not meet.
    public static func negotiate(peerCurrent: UInt16, peerOldest: UInt16) -> UInt16? {
        guard peerOldest <= peerCurrent else { return nil }
        let version = min(peerCurrent, current)
        return version >= max(peerOldest, oldestAccepted) ? version : nil
    }
}

/// Command codes (u16 on the wire). Never renumber; add new ones at the end.
public enum Command: UInt16, Sendable, CaseIterable, CustomStringConvertible {
    case hello = 0x01
    case welcome = 0x02
    case regionTable = 0x03
    case regionsReady = 0x04
    case transferBegin = 0x05
    case chunkChecksums = 0x06
    case transferEnd = 0x07
    case verify = 0x08
    case verifyResult = 0x09
    case commit = 0x0A
    case committed = 0x0B
    case abandon = 0x0C
    case failure = 0x0D
    case chunksVerified = 0x0E

    public var description: String {
        switch self {
        case .hello: "hello"
        case .welcome: "welcome"
        case .regionTable: "regionTable"
        case .regionsReady: "regionsReady"
        case .transferBegin: "transferBegin"
        case .chunkChecksums: "chunkChecksums"
        case .transferEnd: "transferEnd"
        case .verify: "verify"
        case .verifyResult: "verifyResult"
        case .commit: "commit"
        case .committed: "committed"
        case .abandon: "abandon"
        case .failure: "failure"
        case .chunksVerified: "chunksVerified"
        }
    }
}

/// Capability bits exchanged in `hello`/`welcome`; the session uses their intersection.
public struct Capabilities: OptionSet, Hashable, Sendable {
    public let rawValue: UInt64
    public init(rawValue: UInt64) { self.rawValue = rawValue }
    public static let gift = Capabilities(rawValue: 1 << 0)
    public static let memfd = Capabilities(rawValue: 1 << 1)
    public static let processVmReadv = Capabilities(rawValue: 1 << 2)
    public static let pipeCopy = Capabilities(rawValue: 1 << 3)
    public static let all: Capabilities = [.gift, .memfd, .processVmReadv, .pipeCopy]
}

/// How a region's bytes travel. Raw values are on the wire.
public enum TransportKind: UInt8, Sendable, CaseIterable, CustomStringConvertible {
    /// vmsplice(GIFT|MOVE) into pipes, vmsplice(MOVE) out of them.
    case gift = 1
    /// The region's memfd travels with SCM_RIGHTS; the receiver maps it.
    case memfd = 2
    /// The receiver copies straight out of the sender with process_vm_readv.
    case processVmReadv = 3
    /// write() into pipes, read() out of them: the fallback when nothing else is allowed.
    case pipeCopy = 4

    public var description: String {
        switch self {
        case .gift: "gift"
        case .memfd: "memfd"
        case .processVmReadv: "process_vm_readv"
        case .pipeCopy: "pipe-copy"
        }
    }

    public var capability: Capabilities {
        switch self {
        case .gift: .gift
        case .memfd: .memfd
        case .processVmReadv: .processVmReadv
        case .pipeCopy: .pipeCopy
        }
    }
}

/// The fixed 16-byte little-endian header in front of every message:
/// magic u32 · version u16 · command u16 · descriptor count u8 · flags u8 · reserved u16 · payload length u32.
public struct MessageHeader: Equatable, Sendable {
    public static let size = 16
    public static let magic: UInt32 = 0x4E54_4142  // "BATN" in memory order
    /// Control messages are small; page contents never travel in the message stream.
    public static let maximumPayload: UInt32 = 1 << 20

    public var version: UInt16
    public var command: UInt16
    public var descriptorCount: UInt8
    public var flags: UInt8
    public var payloadLength: UInt32

    public init(version: UInt16, command: UInt16, descriptorCount: UInt8, flags: UInt8 = 0, payloadLength: UInt32) {
        self.version = version
        self.command = command
        self.descriptorCount = descriptorCount
        self.flags = flags
        self.payloadLength = payloadLength
    }

    public func encoded() -> [UInt8] {
        var w = WireWriter()
        w.u32(MessageHeader.magic)
        w.u16(version)
        w.u16(command)
        w.u8(descriptorCount)
        w.u8(flags)
        w.u16(0)
        w.u32(payloadLength)
        return w.bytes
    }

    /// Decodes and checks a header: magic, known command, bounded length. The version is
    /// checked by whoever knows the session (hello accepts a range, later messages one value).
    public static func decode(_ bytes: [UInt8], maximumPayload: UInt32 = MessageHeader.maximumPayload) throws(ProtocolError) -> MessageHeader {
        guard bytes.count >= size else { throw .truncatedHeader(received: bytes.count) }
        var r = WireReader(Array(bytes.prefix(size)))
        let magic = try r.u32("magic")
        guard magic == MessageHeader.magic else { throw .badMagic(magic) }
        let version = try r.u16("version")
        let command = try r.u16("command")
        let descriptors = try r.u8("descriptor count")
        let flags = try r.u8("flags")
        guard flags == 0 else { throw .invalidField(command: "header", field: "flags", value: "\(flags) (must be 0)") }
        try r.reserved(2, "header reserved")
        let length = try r.u32("payload length")
        guard Command(rawValue: command) != nil else { throw .unknownCommand(command) }
        guard length <= maximumPayload else {
            throw .oversizeMessage(command: command, length: length, limit: maximumPayload)
        }
        return MessageHeader(version: version, command: command, descriptorCount: descriptors, flags: flags, payloadLength: length)
    }
}
