import BatonSystem
import Foundation
import Glibc

/// The test guest's serial console (Config/guest/init): `check` and `ping` answer one line.
public final class GuestConsole {
    public struct Check: Equatable, Sendable { public let md5: String; public let uptime: Double; public let beats: Int; public let boot: String }
    public let path: String
    var socket: UnixSocket?
    var buffer: [UInt8] = []  // bytes: the console ends lines with "\r\n", one Character in a Swift String

    public init(path: String) { self.path = path }

    /// Sends `command TOKEN` until the answer carrying TOKEN arrives (the guest may not be
    /// reading its console yet, or a QEMU may be handing over); older answers are skipped.
    public func ask(_ command: String, timeoutSeconds: Double = 300) throws -> Check {
        // `check` hashes all of the guest's data (tens of seconds under TCG): repeat only the
        // cheap `ping` until the guest listens, then ask once.
        if command == "check" { _ = try ask("ping", timeoutSeconds: timeoutSeconds) }
        let deadline = Date().addingTimeInterval(timeoutSeconds)
        let token = "\(command)-\(UInt32.random(in: 0...UInt32.max))"
        let want = (command == "check" ? "CHECK" : "PONG") + " token=\(token) "
        var lastSent = Date.distantPast
        while Date() < deadline {
            if socket == nil { socket = try? UnixSocket.connect(path: path); try? socket?.setTimeout(seconds: 0.5); lastSent = .distantPast }
            guard let s = socket else { usleep(100_000); continue }
            if lastSent == .distantPast || (command == "ping" && Date().timeIntervalSince(lastSent) > 2) {
                if (try? s.sendAll(Array("\(command) \(token)\n".utf8))) == nil { socket = nil; continue }
                lastSent = Date()
            }
            var chunk = [UInt8](repeating: 0, count: 4096)
            let n = (try? chunk.withUnsafeMutableBytes { try s.fd.read(into: $0.baseAddress!, count: $0.count) }) ?? -1
            if n == 0 { socket = nil; continue }  // that QEMU went away: reconnect (the new one listens at the path)
            if n > 0 { buffer += chunk[..<n] }
            while let nl = buffer.firstIndex(of: UInt8(ascii: "\n")) {
                let line = String(decoding: buffer[..<nl], as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)
                buffer.removeSubrange(...nl)
                if line.hasPrefix(want), let c = Self.parse(line) { return c }
            }
        }
        throw GuestConsoleError(description: "the guest at \(path) did not answer '\(command)' within \(timeoutSeconds) s")
    }

    public func close() { socket = nil }

    static func parse(_ line: String) -> Check? {
        var kv: [String: String] = [:]
        for part in line.split(separator: " ") where part.contains("=") {
            let p = part.split(separator: "=", maxSplits: 1)
            kv[String(p[0])] = String(p[1])
        }
        guard let up = kv["uptime"].flatMap(Double.init), let beats = kv["beats"].flatMap(Int.init), let boot = kv["boot"] else { return nil }
        return Check(md5: kv["md5"] ?? "", uptime: up, beats: beats, boot: boot)
    }
}

public struct GuestConsoleError: Error, CustomStringConvertible { public let description: String }
