import BatonAgent
import BatonCore
import BatonSystem
import BatonHarness
import Foundation
import Glibc
import Testing

/// Named fault points (BATON_FAULT) in real processes: each failure must be reported with
/// what and where, and nothing may be committed.
@Suite("Transfer faults fail cleanly")
struct FaultTests {
    func run(transport: String = "gift", sender: String = "", receiver: String = "", receiverTimeout: Double = 10, senderTimeout: Double = 10)
        throws -> (sent: (status: Int32, stdout: String, stderr: String), received: (status: Int32, outcome: ReceiverOutcome?, stderr: String))
    {
        let child = try ReceiverChild(seed: 1, timeout: receiverTimeout, environment: receiver.isEmpty ? [:] : ["BATON_FAULT": receiver])
        let s = try BatonProcess(["agent", "send", "--socket", child.socket, "--size", "16MiB", "--transport", transport, "--timeout", "\(senderTimeout)"],
                                 environment: sender.isEmpty ? [:] : ["BATON_FAULT": sender])
        return (s.finish(), child.finish())
    }

    @Test("a corrupted chunk is caught and names region and offset", arguments: ["gift", "copy"])
    func corruptChunk(_ transport: String) throws {
        let r = try run(transport: transport, receiver: "corrupt-chunk:3")
        #expect(r.sent.status == 4, "integrity failures exit 4")
        #expect(r.sent.stderr.contains("integrity check failed: region 0 offset 0x300000: chunk 3 checksum"), "\(r.sent.stderr)")
        #expect(r.sent.stderr.split(separator: "\n").count == 1, "one line: \(r.sent.stderr)")
        #expect(r.received.outcome?.committed == false)
    }

    @Test("release mode: a corrupted chunk is judged in its lane, both sides exit 4 naming it, nothing is lost")
    func corruptChunkReleasing() throws {
        let child = try ReceiverChild(seed: 1, environment: ["BATON_FAULT": "corrupt-chunk:3"])
        let sent = try BatonProcess(["agent", "send", "--socket", child.socket, "--size", "16MiB", "--transport", "gift", "--release-source"]).finish()
        let received = child.finish()
        #expect(sent.status == 4, "\(sent.stderr)")
        #expect(sent.stderr.contains("chunk 3 checksum"), "\(sent.stderr)")
        #expect(received.status == 4, "the receiver reports its own integrity failure, not the abandon that follows: \(received.stderr)")
        #expect(received.outcome?.committed == false && received.outcome?.error?.contains("chunk 3") == true, "\(received.outcome?.error ?? "")")
    }

    @Test("a pipe closed early fails the handoff on both sides")
    func pipeClosedEarly() throws {
        let r = try run(sender: "close-pipe-after-chunk:2")
        #expect(r.sent.status == 3)
        #expect(r.sent.stderr.contains("closed the pipe of lane"), "\(r.sent.stderr)")
        #expect(r.received.outcome?.committed == false)
        // The receiver names the lane (and region and offset when it saw the pipe end itself;
        // the sender's abandon, which can arrive first, names lane and chunk), never a bare
        // "cancelled".
        let error = r.received.outcome?.error ?? ""
        #expect(error.contains("closed early: region 0 offset 0x") || error.contains("closed the pipe of lane 0 after chunk 2"), "\(error)")
        #expect(!error.contains("stopped after another lane failed"), "\(error)")
    }

    @Test("a stalled sender trips the receiver's stall timeout instead of hanging")
    func stalledPeer() throws {
        let started = Date()
        let r = try run(sender: "stall-after-chunk:1", receiverTimeout: 1, senderTimeout: 3)
        #expect(r.received.outcome?.committed == false)
        #expect(r.received.outcome?.error?.contains("stalled") == true, "\(r.received.outcome?.error ?? "no error")")
        #expect(r.sent.status != 0)
        #expect(Date().timeIntervalSince(started) < 30, "a stall must end in a bounded time")
    }

    @Test("a receiver killed mid-transfer leaves the sender with a clear error")
    func receiverKilled() throws {
        let r = try run(receiver: "kill-receiver-after-chunk:4")
        #expect(r.received.status == 128 + SIGKILL || r.received.status == SIGKILL)
        #expect(r.sent.status == 3)
        #expect(r.sent.stderr.contains("EPIPE") || r.sent.stderr.contains("closed"), "\(r.sent.stderr)")
        // Where: the lane, region and offset the write failed at, not a bare errno.
        if r.sent.stderr.contains("EPIPE") {
            #expect(r.sent.stderr.contains("(lane ") && r.sent.stderr.contains("region 0 offset 0x"), "\(r.sent.stderr)")
        }
    }

    @Test("a truncated or oversize message is refused by the receiver", arguments: ["truncate-message:regionTable", "oversize-message:transferEnd"])
    func mangledMessages(_ fault: String) throws {
        let r = try run(sender: fault)
        #expect(r.sent.status != 0)
        let error = r.received.outcome?.error ?? ""
        if fault.hasPrefix("truncate") {
            #expect(error.contains("message truncated at 'payload of regionTable'"), "\(error)")
        } else {
            #expect(error.contains("message transferEnd claims 1048577 payload bytes (limit 1048576)"), "\(error)")
        }
    }

    @Test("fault specs are parsed strictly")
    func faultSpecs() throws {
        let plan = try FaultPlan(parsing: "corrupt-chunk:3,stall-after-chunk:1")
        #expect(plan.corruptChunk == 3 && plan.stallAfterChunk == 1)
        #expect(throws: FaultPlan.ParseError.self) { try FaultPlan(parsing: "explode:1") }
        #expect(throws: FaultPlan.ParseError.self) { try FaultPlan(parsing: "corrupt-chunk:x") }
    }
}

import BatonTransfer
