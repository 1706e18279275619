// BatonController sequences an upgrade: preflight → start the new instance → prepare →
// pause → transfer → verify → commit → resume, rolls back before commit, and keeps a
// crash-safe journal. It talks to hypervisors only through `HypervisorControl`.
import BatonCore
import BatonSystem
import Foundation
import Glibc

/// An HTTP/1.1 client for a VMM's control socket (one request per connection).
public struct VMMClient: Sendable {
    public let socketPath: String
    public var timeoutSeconds: Double = 30

    public init(socketPath: String, timeoutSeconds: Double = 30) {
        self.socketPath = socketPath
        self.timeoutSeconds = timeoutSeconds
    }

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
        let socket = try UnixSocket.connect(path: socketPath, timeoutSeconds: min(timeoutSeconds, 10))
        try socket.setTimeout(seconds: timeoutSeconds)
        var head = "\(method) \(path) HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nAccept: application/json\r\n"
        if !body.isEmpty { head += "Content-Type: application/json\r\n" }
        head += "Content-Length: \(body.count)\r\n\r\n"
        try socket.send(Array(head.utf8) + Array(body))
        var data: [UInt8] = []
        while true {
            let chunk = try socket.receive(count: 1)
            if chunk.bytes.isEmpty { break }
            data += chunk.bytes
            if let split = find(data, Array("\r\n\r\n".utf8)) {
                let header = String(decoding: data[..<split], as: UTF8.self)
                let length = header.split(separator: "\r\n").first { $0.lowercased().hasPrefix("content-length:") }
                    .flatMap { Int($0.split(separator: ":")[1].trimmingCharacters(in: .whitespaces)) } ?? 0
                let rest = try socket.receive(count: length - (data.count - split - 4))
                let bodyBytes = Array(data[(split + 4)...]) + rest.bytes
                let statusLine = header.split(separator: "\r\n")[0].split(separator: " ")
                guard statusLine.count >= 2, let status = Int(statusLine[1]) else {
                    throw Failure(description: "\(socketPath): malformed HTTP status line '\(header.prefix(60))'")
                }
                if status == 100 { data = Array(data[(split + 4)...]); continue }
                return Response(status: status, body: bodyBytes)
            }
        }
        throw Failure(description: "\(socketPath): connection closed before a response to \(method) \(path)")
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

    private func find(_ haystack: [UInt8], _ needle: [UInt8]) -> Int? {
        guard haystack.count >= needle.count else { return nil }
        for i in 0...(haystack.count - needle.count) where haystack[i] == needle[0] && Array(haystack[i..<i + needle.count]) == needle { return i }
        return nil
    }
}
