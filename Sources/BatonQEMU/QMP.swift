import BatonSystem
import Foundation
import Glibc

/// Any JSON value, for QMP arguments and for the parts of replies Baton only passes through.
public enum JSONValue: Codable, Equatable, Sendable {
    case null, bool(Bool), number(Double), string(String), array([JSONValue]), object([String: JSONValue])

    public init(from decoder: Decoder) throws {
        let c = try decoder.singleValueContainer()
        if c.decodeNil() { self = .null } else if let b = try? c.decode(Bool.self) { self = .bool(b) }
        else if let n = try? c.decode(Double.self) { self = .number(n) } else if let s = try? c.decode(String.self) { self = .string(s) }
        else if let a = try? c.decode([JSONValue].self) { self = .array(a) } else { self = .object(try c.decode([String: JSONValue].self)) }
    }

    public func encode(to encoder: Encoder) throws {
        var c = encoder.singleValueContainer()
        switch self {
        case .null: try c.encodeNil()
        case .bool(let b): try c.encode(b)
        case .number(let n): if n == n.rounded(), abs(n) < 9e15 { try c.encode(Int64(n)) } else { try c.encode(n) }
        case .string(let s): try c.encode(s)
        case .array(let a): try c.encode(a)
        case .object(let o): try c.encode(o)
        }
    }

    public subscript(key: String) -> JSONValue? { if case .object(let o) = self { o[key] } else { nil } }
    public var string: String? { if case .string(let s) = self { s } else { nil } }
}

/// A QMP failure: the command and QEMU's error class and text, or a transport problem.
public struct QMPError: Error, CustomStringConvertible, Sendable {
    public enum Kind: Sendable { case command(errorClass: String), transport, protocolViolation }
    public let kind: Kind
    public let command: String
    public let message: String
    public var description: String {
        switch kind {
        case .command(let c): "QMP \(command) failed (\(c)): \(message)"
        case .transport: "QMP \(command): \(message)"
        case .protocolViolation: "QMP \(command): unexpected reply: \(message)"
        }
    }
}

/// One QMP connection over a Unix socket: greeting, `qmp_capabilities`, then commands, each
/// with a deadline. Events that arrive between replies are kept for `events`.
public final class QMPConnection {
    public let path: String
    let socket: UnixSocket
    var buffer: [UInt8] = []
    public private(set) var events: [(name: String, seconds: Double, data: JSONValue?)] = []

    /// Connects, retrying until `timeoutSeconds` (a QEMU that is starting binds late), and
    /// negotiates capabilities. Every later read is bounded by `commandTimeoutSeconds`.
    /// `greetingTimeoutSeconds` (default: the longer of the two) bounds the wait for the
    /// greeting: a monitor that already serves another client (libvirtd) accepts and stays silent.
    public init(path: String, timeoutSeconds: Double = 10, commandTimeoutSeconds: Double = 30, greetingTimeoutSeconds: Double? = nil) throws {
        self.path = path
        let deadline = Date().addingTimeInterval(timeoutSeconds)
        var last: Error?
        var connected: UnixSocket?
        while connected == nil {
            do { connected = try UnixSocket.connect(path: path) } catch {
                last = error
                if Date() > deadline { throw QMPError(kind: .transport, command: "connect", message: "cannot connect to \(path) within \(timeoutSeconds) s: \(last.map { "\($0)" } ?? "")") }
                usleep(2_000)
            }
        }
        socket = connected!
        try socket.setTimeout(seconds: greetingTimeoutSeconds ?? max(timeoutSeconds, commandTimeoutSeconds))
        let greeting = try readMessage(for: "greeting")
        guard greeting["QMP"] != nil else { throw QMPError(kind: .protocolViolation, command: "greeting", message: "no QMP greeting from \(path)") }
        try socket.setTimeout(seconds: commandTimeoutSeconds)
        _ = try execute("qmp_capabilities")
    }

    struct Request<A: Encodable>: Encodable {
        let execute: String
        let arguments: A?
    }

    struct NoArguments: Encodable {}

    /// Runs one command and returns its `return` value.
    @discardableResult
    public func execute(_ command: String) throws -> JSONValue {
        try execute(command, arguments: Optional<NoArguments>.none)
    }

    @discardableResult
    public func execute<A: Encodable>(_ command: String, arguments: A?) throws -> JSONValue {
        var line = try JSONEncoder().encode(Request(execute: command, arguments: arguments))
        line.append(UInt8(ascii: "\n"))
        do { try socket.sendAll(Array(line)) } catch {
            throw QMPError(kind: .transport, command: command, message: "write to \(path): \(error)")
        }
        while true {
            let reply = try readMessage(for: command)
            if keepIfEvent(reply) { continue }
            if let error = reply["error"] {
                throw QMPError(kind: .command(errorClass: error["class"]?.string ?? "?"), command: command, message: error["desc"]?.string ?? "")
            }
            guard let value = reply["return"] else { throw QMPError(kind: .protocolViolation, command: command, message: "\(reply)") }
            return value
        }
    }

    /// Several commands in one write, their replies read in order (QMP runs a monitor's
    /// commands one after another): one round trip instead of one per command. The first
    /// command that fails throws, after every reply has been read.
    public func executePipelined(_ commands: [(String, JSONValue)]) throws -> [JSONValue] {
        var lines: [UInt8] = []
        for (command, arguments) in commands {
            lines += try JSONEncoder().encode(Request(execute: command, arguments: arguments))
            lines.append(UInt8(ascii: "\n"))
        }
        let name = commands.map(\.0).joined(separator: "+")
        do { try socket.sendAll(lines) } catch {
            throw QMPError(kind: .transport, command: name, message: "write to \(path): \(error)")
        }
        var values: [JSONValue] = [], failure: QMPError?
        for (command, _) in commands {
            var reply = try readMessage(for: command)
            while keepIfEvent(reply) { reply = try readMessage(for: command) }
            if let error = reply["error"] {
                failure = failure ?? QMPError(kind: .command(errorClass: error["class"]?.string ?? "?"), command: command, message: error["desc"]?.string ?? "")
                values.append(.null)
            } else if let value = reply["return"] {
                values.append(value)
            } else {
                throw QMPError(kind: .protocolViolation, command: command, message: "\(reply)")
            }
        }
        if let failure { throw failure }
        return values
    }

    func keepIfEvent(_ message: JSONValue) -> Bool {
        guard let event = message["event"]?.string else { return false }
        var seconds = 0.0
        if case .number(let s)? = message["timestamp"]?["seconds"], case .number(let us)? = message["timestamp"]?["microseconds"] { seconds = s + us / 1e6 }
        events.append((event, seconds, message["data"]))
        return true
    }

    /// Waits for an event `name` whose data satisfies `matching`, reading only what QEMU sends:
    /// no polling round trips, which cost the guest pause milliseconds. Bounded by the
    /// connection's command timeout (a silent QEMU is a transport error).
    @discardableResult
    public func waitForEvent(_ name: String, matching: (JSONValue?) -> Bool = { _ in true }) throws -> (seconds: Double, data: JSONValue?) {
        if let e = events.first(where: { $0.name == name && matching($0.data) }) { return (e.seconds, e.data) }
        while true {
            let message = try readMessage(for: "wait for \(name)")
            if keepIfEvent(message), let e = events.last, e.name == name, matching(e.data) { return (e.seconds, e.data) }
        }
    }

    /// Decodes a command's reply into `R`.
    public func query<R: Decodable>(_ command: String, as: R.Type) throws -> R {
        let value = try execute(command)
        do { return try JSONDecoder().decode(R.self, from: JSONEncoder().encode(value)) } catch {
            throw QMPError(kind: .protocolViolation, command: command, message: "cannot decode \(R.self): \(error)")
        }
    }

    func readMessage(for command: String) throws -> JSONValue {
        while true {
            if let nl = buffer.firstIndex(of: UInt8(ascii: "\n")) {
                let line = Array(buffer[..<nl])
                buffer.removeSubrange(...nl)
                if line.allSatisfy({ $0 == 32 || $0 == 13 }) { continue }
                do { return try JSONDecoder().decode(JSONValue.self, from: Data(line)) } catch {
                    throw QMPError(kind: .protocolViolation, command: command, message: String(decoding: line.prefix(200), as: UTF8.self))
                }
            }
            guard buffer.count < 16 << 20 else { throw QMPError(kind: .protocolViolation, command: command, message: "a reply over 16 MiB") }
            var chunk = [UInt8](repeating: 0, count: 65536)
            let n: Int
            do { n = try chunk.withUnsafeMutableBytes { try socket.fd.read(into: $0.baseAddress!, count: $0.count) } } catch {
                throw QMPError(kind: .transport, command: command, message: "read from \(path): \(error)")
            }
            guard n > 0 else { throw QMPError(kind: .transport, command: command, message: "\(path) closed the connection") }
            buffer += chunk[..<n]
        }
    }
}

/// Typed replies Baton reads.
public struct QEMUVersion: Decodable, Sendable, Comparable, CustomStringConvertible {
    public struct Triple: Decodable, Sendable { public let major: Int; public let minor: Int; public let micro: Int }
    public let qemu: Triple
    public let package: String
    public init(major: Int, minor: Int, micro: Int) { qemu = Triple(major: major, minor: minor, micro: micro); package = "" }
    public var description: String { "\(qemu.major).\(qemu.minor).\(qemu.micro)" }
    public static func < (a: QEMUVersion, b: QEMUVersion) -> Bool {
        (a.qemu.major, a.qemu.minor, a.qemu.micro) < (b.qemu.major, b.qemu.minor, b.qemu.micro)
    }
    public static func == (a: QEMUVersion, b: QEMUVersion) -> Bool { a.description == b.description }
}

public struct QEMURunState: Decodable, Sendable { public let status: String; public let running: Bool }

public struct QEMUMigrationInfo: Decodable, Sendable {
    public struct RAM: Decodable, Sendable { public let transferred: Int64? }
    public let status: String?
    public let ram: RAM?
    public let downtime: Int64?
    public let errorDesc: String?
    enum CodingKeys: String, CodingKey { case status, ram, downtime, errorDesc = "error-desc" }
}

public struct QEMUCPU: Decodable, Sendable {
    public let cpuIndex: Int
    public let threadId: Int32
    enum CodingKeys: String, CodingKey { case cpuIndex = "cpu-index", threadId = "thread-id" }
}

public struct QEMUMachine: Decodable, Sendable {
    public let name: String
    public let alias: String?
}

public struct QOMProperty: Decodable, Sendable {
    public let name: String
    public let type: String
}
