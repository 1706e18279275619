import BatonAgent
import BatonCore
import BatonSystem
import BatonHarness
import BatonTransfer
import Foundation
import Glibc
import Testing

/// A receiver child process listening on a fresh socket in a 0700 directory.
struct ReceiverChild {
    let process: BatonProcess
    let socket: String
    let directory: String

    init(seed: UInt64? = nil, timeout: Double = 10, environment: [String: String] = [:], acceptUnchecked: Bool = false) throws {
        directory = try BatonProcess.makeRunDirectory("test")
        socket = directory + "/agent.sock"
        var args = ["agent", "receive", "--socket", socket, "--timeout", "\(timeout)"]
        if let seed { args += ["--seed", "\(seed)"] }
        if acceptUnchecked { args.append("--accept-unchecked") }
        process = try BatonProcess(args, environment: environment)
        guard BatonProcess.waitForPath(socket) else {
            process.kill()
            throw TestFailure("receiver never listened: \(process.finish().stderr)")
        }
    }

    func finish() -> (status: Int32, outcome: ReceiverOutcome?, stderr: String) {
        let done = process.finish()
        try? FileManager.default.removeItem(atPath: directory)
        return (done.status, ReceiverOutcome.parse(done.stdout), done.stderr)
    }
}

struct TestFailure: Error, CustomStringConvertible {
    let description: String
    init(_ d: String) { description = d }
}

/// Guest-like memory filled with the test pattern (anonymous or memfd).
func patternedRegion(bytes: Int, memfd: Bool, seed: UInt64) throws -> SourceRegion {
    let mapping = memfd ? try MemoryMapping.memfd(name: "baton-test", length: bytes) : try MemoryMapping.anonymous(length: bytes)
    TestPattern.fill(mapping.base, count: bytes, seed: seed)
    return SourceRegion(id: 0, guestAddress: 0, mapping: mapping)
}

func decodeReport(_ stdout: String) -> TransferReport? {
    guard let line = stdout.split(separator: "\n").last else { return nil }
    return try? JSONDecoder().decode(TransferReport.self, from: Data(line.utf8))
}
