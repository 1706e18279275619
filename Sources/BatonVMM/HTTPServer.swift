import BatonCore
import BatonSystem
import Foundation
import Glibc

/// One HTTP/1.1 request as the control API sees it.
public struct HTTPRequest: Sendable {
    public var method: String
    public var path: String
    public var headers: [String: String]  // lower-cased names
    public var body: [UInt8]
}

public struct HTTPResponse: Sendable {
    public var status: Int
    public var body: [UInt8]
    public var contentType = "application/json"
    /// Runs after the response is written (e.g. the VMM exits after handing off).
    public var afterSend: (@Sendable () -> Void)?

    public init(status: Int, body: [UInt8] = [], afterSend: (@Sendable () -> Void)? = nil) {
        self.status = status
        self.body = body
        self.afterSend = afterSend
    }

    public static func json<T: Encodable>(_ value: T, status: Int = 200) -> HTTPResponse {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys]
        return HTTPResponse(status: status, body: Array((try? encoder.encode(value)) ?? Data("{}".utf8)))
    }

    /// An error body: the one-line message and its typed code (HandoffErrorCode), which the
    /// controller decides on. The code defaults from the status.
    public static func error(_ status: Int, _ message: String, code: HandoffErrorCode? = nil) -> HTTPResponse {
        let kind = code ?? (status == 409 ? .invalidState : (400..<500).contains(status) ? .badRequest : .failed)
        return json(APIErrorBody(error: message, code: kind), status: status)
    }

    static func reason(_ status: Int) -> String {
        switch status {
        case 100: "Continue"
        case 200: "OK"
        case 204: "No Content"
        case 400: "Bad Request"
        case 404: "Not Found"
        case 405: "Method Not Allowed"
        case 409: "Conflict"
        case 413: "Payload Too Large"
        case 500: "Internal Server Error"
        case 501: "Not Implemented"
        default: "Status"
        }
    }
}

/// A small HTTP/1.1 server on a Unix socket: keep-alive, Content-Length and chunked
/// bodies, `Expect: 100-continue`. One thread per connection; the handler is synchronous.
public final class HTTPServer: @unchecked Sendable {
    public typealias Handler = @Sendable (HTTPRequest) -> HTTPResponse
    let listener: FileDescriptor
    let handler: Handler
    static let maximumHeader = 64 << 10
    static let maximumBody = 1 << 20

    public init(listener: FileDescriptor, handler: @escaping Handler) {
        self.listener = listener
        self.handler = handler
    }

    /// Accepts connections forever on a background thread.
    public func start() {
        let t = Thread { [self] in
            while true {
                let fd = acceptCloseOnExec(listener.raw)
                if fd < 0 {
                    switch errno {
                    case EINTR, ECONNABORTED: continue
                    // Out of descriptors or memory: the listener is fine, so back off and keep
                    // accepting (returning here would leave a process that is up but deaf).
                    case EMFILE, ENFILE, ENOBUFS, ENOMEM: usleep(50_000); continue
                    default: return  // the listener itself is gone (EBADF, EINVAL)
                    }
                }
                let connection = FileDescriptor(owning: fd)
                // A client that connects and then says nothing must not hold a thread forever.
                var idle = timeval(tv_sec: 60, tv_usec: 0)
                setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &idle, socklen_t(MemoryLayout<timeval>.size))
                let worker = Thread { [self] in serve(connection) }
                worker.start()
            }
        }
        t.start()
    }

    func serve(_ fd: FileDescriptor) {
        var reader = BufferedReader(fd: fd)
        while true {
            guard let request = readRequest(&reader, fd) else { return }
            let response = handler(request)
            write(response, to: fd)
            response.afterSend?()
            if request.headers["connection"]?.lowercased() == "close" { return }
        }
    }

    func write(_ response: HTTPResponse, to fd: FileDescriptor) {
        var head = "HTTP/1.1 \(response.status) \(HTTPResponse.reason(response.status))\r\n"
        head += "Content-Length: \(response.body.count)\r\n"
        if !response.body.isEmpty { head += "Content-Type: \(response.contentType)\r\n" }
        head += "\r\n"
        try? fd.writeAll(Array(head.utf8) + response.body)
    }

    /// nil at end of stream or on a malformed request (after answering 400).
    func readRequest(_ reader: inout BufferedReader, _ fd: FileDescriptor) -> HTTPRequest? {
        guard let headText = reader.readUntil(Array("\r\n\r\n".utf8), limit: Self.maximumHeader) else { return nil }
        let lines = String(decoding: headText, as: UTF8.self).components(separatedBy: "\r\n")
        let requestLine = lines[0].split(separator: " ")
        guard requestLine.count == 3, requestLine[2].hasPrefix("HTTP/1.") else {
            write(.error(400, "malformed request line '\(lines[0].prefix(80))'"), to: fd)
            return nil
        }
        var headers: [String: String] = [:]
        for line in lines.dropFirst() where !line.isEmpty {
            guard let colon = line.firstIndex(of: ":") else {
                write(.error(400, "malformed header line '\(line.prefix(80))'"), to: fd)
                return nil
            }
            headers[line[..<colon].lowercased()] = line[line.index(after: colon)...].trimmingCharacters(in: .whitespaces)
        }
        if headers["expect"]?.lowercased() == "100-continue" {
            try? fd.writeAll(Array("HTTP/1.1 100 Continue\r\n\r\n".utf8))
        }
        var body: [UInt8] = []
        if headers["transfer-encoding"]?.lowercased().contains("chunked") == true {
            while true {
                guard let sizeLine = reader.readUntil(Array("\r\n".utf8), limit: 256),
                      let size = Int(String(decoding: sizeLine, as: UTF8.self).split(separator: ";").first.map(String.init)?.trimmingCharacters(in: .whitespaces) ?? "", radix: 16),
                      size >= 0 else {
                    write(.error(400, "malformed chunk size"), to: fd)
                    return nil
                }
                if size == 0 {
                    _ = reader.readUntil(Array("\r\n".utf8), limit: Self.maximumHeader)  // trailers end with an empty line
                    break
                }
                guard size <= Self.maximumBody - body.count, let chunk = reader.read(count: size), reader.read(count: 2) != nil else {
                    write(.error(413, "body larger than \(Self.maximumBody) bytes or truncated"), to: fd)
                    return nil
                }
                body += chunk
            }
        } else if let length = headers["content-length"].flatMap({ Int($0) }), length > 0 {
            guard length <= Self.maximumBody else {
                write(.error(413, "body of \(length) bytes exceeds \(Self.maximumBody)"), to: fd)
                return nil
            }
            guard let b = reader.read(count: length) else { return nil }
            body = b
        }
        return HTTPRequest(method: String(requestLine[0]), path: String(requestLine[1]), headers: headers, body: body)
    }
}

/// Reads a socket through a buffer, so header parsing does not cost a syscall per byte.
struct BufferedReader {
    let fd: FileDescriptor
    var buffer: [UInt8] = []

    init(fd: FileDescriptor) { self.fd = fd }

    mutating func fill() -> Bool {
        var chunk = [UInt8](repeating: 0, count: 16 << 10)
        let n = (try? chunk.withUnsafeMutableBytes { try fd.read(into: $0.baseAddress!, count: $0.count) }) ?? 0
        if n <= 0 { return false }
        buffer += chunk.prefix(n)
        return true
    }

    /// Bytes up to (not including) `delimiter`, which is consumed.
    mutating func readUntil(_ delimiter: [UInt8], limit: Int) -> [UInt8]? {
        var searchFrom = 0
        while true {
            if buffer.count >= delimiter.count {
                var i = searchFrom
                while i + delimiter.count <= buffer.count {
                    if buffer[i] == delimiter[0] && Array(buffer[i..<i + delimiter.count]) == delimiter {
                        let out = Array(buffer[..<i])
                        buffer.removeFirst(i + delimiter.count)
                        return out
                    }
                    i += 1
                }
                searchFrom = max(0, buffer.count - delimiter.count + 1)
            }
            if buffer.count > limit || !fill() { return nil }
        }
    }

    mutating func read(count: Int) -> [UInt8]? {
        guard count >= 0 else { return nil }
        while buffer.count < count { if !fill() { return nil } }
        let out = Array(buffer.prefix(count))
        buffer.removeFirst(count)
        return out
    }
}

/// Feeds raw bytes through the real request parser (over a socketpair) for fuzz tests:
/// returns the parsed request or nil, never crashes or hangs (the writer closes its end).
public enum HTTPFuzzProbe {
    public static func parse(_ bytes: [UInt8]) -> HTTPRequest? {
        guard let (a, b) = try? UnixSocket.pair() else { return nil }
        try? a.send(bytes)
        a.shutdownWrite()
        let server = HTTPServer(listener: b.fd) { _ in HTTPResponse(status: 204) }
        var reader = BufferedReader(fd: b.fd)
        return server.readRequest(&reader, b.fd)
    }
}
