import BatonController
import BatonSystem
import Foundation
import Glibc
import Testing

@Suite("VMMClient: answers read whole, a kept connection reused only when an answer is framed exactly")
struct VMMClientTests {
    /// Reads one request head (these requests have no body).
    static func readHead(_ socket: UnixSocket) throws {
        var head: [UInt8] = []
        while !head.suffix(4).elementsEqual(Array("\r\n\r\n".utf8)) {
            let b = try socket.receive(count: 1).bytes
            guard !b.isEmpty else { return }
            head += b
        }
    }

    @Test("an interim 100 answer is skipped; an answer without Content-Length ends the kept connection, so the next request opens a new one")
    func framing() throws {
        let path = NSTemporaryDirectory() + "baton-vmmclient-\(getpid()).sock"
        unlink(path)
        let listener = try UnixListener(path: path)
        defer { listener.remove() }
        final class Count: @unchecked Sendable {
            private let lock = NSLock()
            private var n = 0
            func add() { lock.lock(); n += 1; lock.unlock() }
            var value: Int { lock.lock(); defer { lock.unlock() }; return n }
        }
        let accepted = Count()
        let server = Thread {
            do {
                let first = try listener.accept(timeoutSeconds: 5)
                accepted.add()
                try Self.readHead(first)
                try first.send(Array("HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok".utf8))
                try Self.readHead(first)
                try first.send(Array("HTTP/1.1 200 OK\r\nConnection: keep-alive\r\n\r\n".utf8))
                let second = try listener.accept(timeoutSeconds: 5)
                accepted.add()
                try Self.readHead(second)
                try second.send(Array("HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n".utf8))
                try Self.readHead(second)
            } catch {}
        }
        server.start()
        let client = VMMClient(socketPath: path, timeoutSeconds: 3).keepingConnection()
        let a = try client.request("GET", "/a")
        #expect(a.status == 200 && a.text == "ok")
        let b = try client.request("GET", "/b")
        #expect(b.status == 200 && b.body.isEmpty)
        let c = try client.request("GET", "/c")
        #expect(c.status == 204)
        #expect(accepted.value == 2, "the unframed answer's connection was not reused")
        client.closeKeptConnection()
    }
}
