import BatonSystem
import Foundation
import Glibc

/// A `baton` child process (a real second process for two-process transfers), with its
/// stdout and stderr captured.
public final class BatonProcess: @unchecked Sendable {
    public let process = Process()
    private let stdout = Foundation.Pipe()
    private let stderr = Foundation.Pipe()

    /// The `baton` executable: $BATON_BIN, else this process if it is baton, else a `baton`
    /// beside this executable (SwiftPM puts test bundles and products in one directory).
    public static var executablePath: String {
        if let env = ProcessInfo.processInfo.environment["BATON_BIN"] { return env }
        let me = (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe")) ?? CommandLine.arguments[0]
        if (me as NSString).lastPathComponent == "baton" { return me }
        var dir = URL(fileURLWithPath: me).deletingLastPathComponent()
        for _ in 0..<4 {
            let candidate = dir.appendingPathComponent("baton").path
            if FileManager.default.isExecutableFile(atPath: candidate) { return candidate }
            dir = dir.deletingLastPathComponent()
        }
        return "baton"
    }

    /// Starts `baton ARGS` (optionally through a wrapper such as `setpriv ...`).
    public init(_ arguments: [String], environment: [String: String] = [:], wrapper: [String] = [], stdin: Data? = nil) throws {
        let argv = wrapper + [BatonProcess.executablePath] + arguments
        process.executableURL = URL(fileURLWithPath: argv[0].hasPrefix("/") ? argv[0] : "/usr/bin/env")
        process.arguments = argv[0].hasPrefix("/") ? Array(argv.dropFirst()) : argv
        var env = ProcessInfo.processInfo.environment
        for (k, v) in environment { env[k] = v }
        process.environment = env
        process.standardOutput = stdout
        process.standardError = stderr
        let input = Foundation.Pipe()
        process.standardInput = input
        try process.run()
        if let stdin { input.fileHandleForWriting.write(stdin) }
        try? input.fileHandleForWriting.close()
    }

    public var pid: Int32 { process.processIdentifier }

    /// Waits for exit and returns (status, stdout, stderr).
    public func finish() -> (status: Int32, stdout: String, stderr: String) {
        // Both pipes at once: a child that fills one while we wait for the other's end would
        // block forever (a sanitizer's reports easily pass a pipe's 64 KiB).
        final class Drained: @unchecked Sendable { var data = Data() }
        let err = Drained(), done = DispatchSemaphore(value: 0)
        let errHandle = stderr.fileHandleForReading
        Thread { err.data = errHandle.readDataToEndOfFile(); done.signal() }.start()
        let out = stdout.fileHandleForReading.readDataToEndOfFile()
        done.wait()
        process.waitUntilExit()
        return (process.terminationStatus, String(decoding: out, as: UTF8.self), String(decoding: err.data, as: UTF8.self))
    }

    public func kill(_ signal: Int32 = SIGKILL) { Glibc.kill(process.processIdentifier, signal) }

    /// Waits until `path` exists (a socket the child creates once it listens).
    public static func waitForPath(_ path: String, timeoutSeconds: Double = 10) -> Bool {
        let deadline = Date().addingTimeInterval(timeoutSeconds)
        while Date() < deadline {
            if FileManager.default.fileExists(atPath: path) { return true }
            usleep(2_000)
        }
        return false
    }

    /// A fresh 0700 directory for sockets.
    public static func makeRunDirectory(_ tag: String) throws -> String {
        let dir = NSTemporaryDirectory() + "baton-\(tag)-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o700])
        return dir
    }
}

/// What `baton agent receive` prints as its one JSON line when it ends.
public struct ReceiverOutcome: Codable, Sendable {
    public var committed = false
    public var bytes: UInt64 = 0
    public var patternChecked = false
    public var patternMismatchOffset: Int?
    public var peakRssBytes = 0
    public var error: String?

    public init() {}

    /// Parses the last line of a receiver's stdout.
    public static func parse(_ stdout: String) -> ReceiverOutcome? {
        guard let line = stdout.split(separator: "\n").last else { return nil }
        return try? JSONDecoder().decode(ReceiverOutcome.self, from: Data(line.utf8))
    }
}
