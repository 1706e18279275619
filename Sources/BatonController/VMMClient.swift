// BatonController sequences an upgrade: preflight → start the new instance → prepare →
// pause → transfer → verify → commit → resume, rolls back before commit, and keeps a
// crash-safe journal. It talks to hypervisors only through `HypervisorControl`.
import BatonCore
import BatonSystem
import Foundation
import Glibc

/// An HTTP/1.1 client for a VMM's control socket: one request per connection, or, from
/// `keepingConnection()`, one connection kept open across requests.
public struct VMMClient: Sendable {
    public let socketPath: String
    public var timeoutSeconds: Double = 30
    /// The kept connection (nil: a new connection per request).
    let kept: KeptConnection?

    public init(socketPath: String, timeoutSeconds: Double = 30) {
        self.socketPath = socketPath
        self.timeoutSeconds = timeoutSeconds
        kept = nil
    }

    init(socketPath: String, timeoutSeconds: Double, kept: KeptConnection?) {
        self.socketPath = socketPath
        self.timeoutSeconds = timeoutSeconds
        self.kept = kept
    }

    /// A client whose requests share one connection (opened at the first request, dropped
    /// after any failure, reopened by the next). Inside a guest pause each request then costs
    /// neither a connect nor a new server thread. Requests are never retried: a PUT that may
    /// have reached the VMM is not sent twice.
    public func keepingConnection() -> VMMClient {
        VMMClient(socketPath: socketPath, timeoutSeconds: timeoutSeconds, kept: KeptConnection())
    }

    /// Closes a kept connection (the VMM's thread for it ends); the next request opens a new one.
    public func closeKeptConnection() { kept?.drop() }

    public struct Failure: Error, CustomStringConvertible {
        public let description: String
        /// The typed code the VMM sent with the error (nil: a local failure, or an old VMM).
        public let code: HandoffErrorCode?
        public init(description: String, code: HandoffErrorCode? = nil) {
            self.description = description
            self.code = code
        }
    }

    public struct Response: Sendable {
        public let status: Int
        public let body: [UInt8]
        public var text: String { String(decoding: body, as: UTF8.self) }
        public func decode<T: Decodable>(_ type: T.Type) throws -> T { try JSONDecoder().decode(type, from: Data(body)) }
    }

    /// The request with a typed body (BatonVMMAPI's request types), or none.
    public func request(_ method: String, _ path: String, body: (some Encodable & Sendable)? = nil as ExecRequest?) throws -> Response {
        try request(method, path, bytes: try body.map { try JSONEncoder().encode($0) } ?? Data())
    }

    func request(_ method: String, _ path: String, bytes body: Data) throws -> Response {
        guard let kept else { return try exchange(on: try open(), method, path, body, keepAlive: false).response }
        return try kept.withSocket(connect: open) { socket in try exchange(on: socket, method, path, body, keepAlive: true) }
    }

    /// A new connection to the VMM, its sends and receives bounded by `timeoutSeconds`.
    func open() throws -> UnixSocket {
        let socket = try UnixSocket.connect(path: socketPath, timeoutSeconds: min(timeoutSeconds, 10))
        try socket.setTimeout(seconds: timeoutSeconds)
        return socket
    }

    /// The largest response accepted: the API's answers are a few KiB of JSON.
    static let maximumResponse = 16 << 20

    /// Sends one request and reads its response through a buffer (one read per arrival, not per
    /// byte). `reusable` is false when the server said it closes the connection.
    func exchange(on socket: UnixSocket, _ method: String, _ path: String, _ body: Data, keepAlive: Bool) throws -> (response: Response, reusable: Bool) {
        var head = "\(method) \(path) HTTP/1.1\r\nHost: localhost\r\nConnection: \(keepAlive ? "keep-alive" : "close")\r\nAccept: application/json\r\n"
        if !body.isEmpty { head += "Content-Type: application/json\r\n" }
        head += "Content-Length: \(body.count)\r\n\r\n"
        try socket.send(Array(head.utf8) + Array(body))
        var data: [UInt8] = []
        data.reserveCapacity(4096)
        var searchFrom = 0
        func fill() throws -> Bool {
            var chunk = [UInt8](repeating: 0, count: 16 << 10)
            let n = try chunk.withUnsafeMutableBytes { try socket.fd.read(into: $0.baseAddress!, count: $0.count) }
            if n == 0 { return false }
            data += chunk.prefix(n)
            return true
        }
        while true {
            guard let split = Self.find(data, from: searchFrom) else {
                searchFrom = max(0, data.count - 3)
                guard data.count <= Self.maximumResponse, try fill() else {
                    throw Failure(description: "\(socketPath): connection closed before a response to \(method) \(path)")
                }
                continue
            }
            let header = String(decoding: data[..<split], as: UTF8.self)
            let lines = header.split(separator: "\r\n")
            let statusLine = lines.first?.split(separator: " ") ?? []
            guard statusLine.count >= 2, let status = Int(statusLine[1]) else {
                throw Failure(description: "\(socketPath): malformed HTTP status line '\(header.prefix(60))'")
            }
            if (100..<200).contains(status) {  // interim answers (100 Continue): the real one follows
                data.removeFirst(split + 4)
                searchFrom = 0
                continue
            }
            func field(_ name: String) -> String? {
                lines.dropFirst().first { $0.lowercased().hasPrefix(name + ":") }
                    .map { $0.split(separator: ":", maxSplits: 1).dropFirst().first.map { $0.trimmingCharacters(in: .whitespaces) } ?? "" }
            }
            let length = field("content-length").map { Int($0) } ?? 0
            guard let length, length >= 0, length <= Self.maximumResponse else {
                throw Failure(description: "\(socketPath): bad Content-Length '\(field("content-length") ?? "")' in the response to \(method) \(path)")
            }
            while data.count - split - 4 < length {
                guard try fill() else { throw Failure(description: "\(socketPath): response to \(method) \(path) truncated (\(data.count - split - 4) of \(length) body bytes)") }
            }
            let response = Response(status: status, body: Array(data[(split + 4)..<(split + 4 + length)]))
            // Reused only when the answer was framed exactly: a missing Content-Length or bytes
            // beyond the body would put the next answer on this stream out of step.
            let framed = field("content-length") != nil && data.count == split + 4 + length
            return (response, framed && field("connection")?.lowercased() != "close")
        }
    }

    /// The request, which must answer 2xx; otherwise the VMM's own error text.
    @discardableResult
    public func expectOK(_ method: String, _ path: String, body: (some Encodable & Sendable)? = nil as ExecRequest?) throws -> Response {
        let r = try request(method, path, body: body)
        guard (200..<300).contains(r.status) else {
            // The API's typed error; an answer that is not one (another server) is quoted.
            let error = try? JSONDecoder().decode(APIErrorBody.self, from: Data(r.body))
            throw Failure(description: "\(method) \(path) → \(r.status): \(error?.error ?? r.text)", code: error?.code)
        }
        return r
    }

    /// `GET /api/v1/baton/status`.
    public func status() throws -> VMStatus { try expectOK("GET", BatonVMMAPI.status).decode(VMStatus.self) }

    /// Where "\r\n\r\n" starts in `haystack`, looking from `from` on.
    static func find(_ haystack: [UInt8], from: Int) -> Int? {
        guard haystack.count >= 4 else { return nil }
        var i = max(0, from)
        while i + 4 <= haystack.count {
            if haystack[i] == 13 && haystack[i + 1] == 10 && haystack[i + 2] == 13 && haystack[i + 3] == 10 { return i }
            i += 1
        }
        return nil
    }
}

/// The socket a keep-alive `VMMClient` reuses; one request at a time.
final class KeptConnection: @unchecked Sendable {
    private let lock = NSLock()
    private var socket: UnixSocket?

    func withSocket<T>(connect: () throws -> UnixSocket, _ body: (UnixSocket) throws -> (response: T, reusable: Bool)) throws -> T {
        lock.lock(); defer { lock.unlock() }
        let socket = try self.socket ?? connect()
        self.socket = socket
        do {
            let (response, reusable) = try body(socket)
            if !reusable { self.socket = nil }
            return response
        } catch {
            self.socket = nil  // a half-read response leaves the stream out of step: never reuse it
            throw error
        }
    }

    func drop() {
        lock.lock(); defer { lock.unlock() }
        socket = nil
    }
}
