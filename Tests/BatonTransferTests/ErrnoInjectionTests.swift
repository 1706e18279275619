import BatonAgent
import BatonCore
import BatonSystem
import BatonHarness
import Foundation
import Testing

/// Errno injection runs in child processes (BATON_SYSCALL_FAULTS), so a fault never leaks
/// into another test, and the paths run exactly as they would in production.
@Suite("Errno injection: short transfers, EAGAIN, EINTR, refused pipe sizes")
struct ErrnoInjectionTests {
    struct Case: CustomTestStringConvertible, Sendable {
        let name: String
        let transport: String
        let senderFaults: String
        let receiverFaults: String
        let injectedOperation: String
        var testDescription: String { name }
    }

    static let cases: [Case] = [
        Case(name: "sender vmsplice moves at most 4 KiB a call", transport: "gift", senderFaults: "vmsplice=short:4096@*", receiverFaults: "", injectedOperation: "vmsplice"),
        Case(name: "receiver vmsplice moves at most 12 KiB a call", transport: "gift", senderFaults: "", receiverFaults: "vmsplice=short:12288@*", injectedOperation: "vmsplice"),
        Case(name: "sender vmsplice gets EAGAIN 40 times", transport: "gift", senderFaults: "vmsplice=EAGAIN@1-40", receiverFaults: "", injectedOperation: "vmsplice"),
        Case(name: "sender vmsplice gets EINTR on every other call", transport: "gift", senderFaults: "vmsplice=EINTR@1-200", receiverFaults: "", injectedOperation: "vmsplice"),
        Case(name: "receiver vmsplice gets EAGAIN and EINTR", transport: "gift", senderFaults: "", receiverFaults: "vmsplice=EAGAIN@1-20,vmsplice=EINTR@21-40", injectedOperation: "vmsplice"),
        Case(name: "receiver process_vm_readv copies at most 64 KiB a call", transport: "copy", senderFaults: "", receiverFaults: "process_vm_readv=short:65536@*", injectedOperation: "process_vm_readv"),
        Case(name: "receiver process_vm_readv gets EINTR", transport: "copy", senderFaults: "", receiverFaults: "process_vm_readv=EINTR@1-30", injectedOperation: "process_vm_readv"),
        Case(name: "sendmsg sends 5 bytes at a time", transport: "gift", senderFaults: "sendmsg=short:5@*", receiverFaults: "", injectedOperation: "sendmsg"),
        Case(name: "recvmsg receives 3 bytes at a time", transport: "gift", senderFaults: "recvmsg=short:3@*", receiverFaults: "", injectedOperation: "recvmsg"),
    ]

    @Test("the transfer completes intact", arguments: cases)
    func injected(_ c: Case) throws {
        let seed: UInt64 = 1  // `baton agent send` fills with seed 1
        let receiver = try ReceiverChild(seed: seed, environment: c.receiverFaults.isEmpty ? [:] : ["BATON_SYSCALL_FAULTS": c.receiverFaults])
        let sender = try BatonProcess(["agent", "send", "--socket", receiver.socket, "--size", "16MiB", "--transport", c.transport],
                                      environment: c.senderFaults.isEmpty ? [:] : ["BATON_SYSCALL_FAULTS": c.senderFaults])
        let sent = sender.finish()
        let received = receiver.finish()
        #expect(sent.status == 0, "sender: \(sent.stderr)")
        #expect(received.status == 0, "receiver: \(received.stderr)")
        let report = try #require(decodeReport(sent.stdout), "sender printed no report: \(sent.stdout) \(sent.stderr)")
        #expect(report.verified)
        let outcome = try #require(received.outcome)
        #expect(outcome.committed && outcome.patternChecked && outcome.patternMismatchOffset == nil)
        if !c.senderFaults.isEmpty {
            #expect((report.injectedFaults[c.injectedOperation] ?? 0) > 0, "the sender's fault never fired")
        }
    }

    @Test("a kernel that refuses SPLICE_F_GIFT: `baton check` says so, and the stream probe (what auto picks) is not gift")
    func checkReportsGiftRefusal() throws {
        let refused = try BatonProcess(["check", "--json", "--no-throughput"], environment: ["BATON_SYSCALL_FAULTS": "vmsplice=EOPNOTSUPP@*"]).finish()
        let report = try #require(try JSONSerialization.jsonObject(with: Data(refused.stdout.utf8)) as? [String: Any], "\(refused.stdout) \(refused.stderr)")
        #expect((report["vmspliceGiftRefused"] as? String ?? "").contains("EOPNOTSUPP") && report["vmspliceGift"] as? Bool == false, "\(refused.stdout)")
        #expect(report["autoStreamTransport"] as? String != "gift", "\(refused.stdout)")
        let items = report["items"] as? [[String: Any]] ?? []
        let gift = items.first { ($0["name"] as? String) == "vmsplice GIFT|MOVE" }
        #expect(gift?["ok"] as? Bool == false && (gift?["detail"] as? String ?? "").contains("EOPNOTSUPP"), "\(items)")
        // The same probe without the fault: gift works on this kernel, so the test above is the fault's doing.
        let plain = try BatonProcess(["check", "--json", "--no-throughput"]).finish()
        let normal = try #require(try JSONSerialization.jsonObject(with: Data(plain.stdout.utf8)) as? [String: Any])
        #expect(normal["vmspliceGiftRefused"] == nil && normal["vmspliceGift"] as? Bool == true, "\(plain.stdout)")
    }

    @Test("a kernel that refuses SPLICE_F_GIFT: --transport gift streams by pipe copy with a notice, intact; --strict refuses before anything moves; auto never picks gift")
    func giftRefused() throws {
        let refuse = ["BATON_SYSCALL_FAULTS": "vmsplice=EOPNOTSUPP@*"]
        let receiver = try ReceiverChild(seed: 1)
        let sent = try BatonProcess(["agent", "send", "--socket", receiver.socket, "--size", "16MiB", "--transport", "gift"], environment: refuse).finish()
        let received = receiver.finish()
        #expect(sent.status == 0, "\(sent.stderr)")
        #expect(sent.stderr.contains("baton: notice: gift: this kernel refuses vmsplice(SPLICE_F_GIFT) (EOPNOTSUPP); streaming by pipe copy instead"), "\(sent.stderr)")
        let report = try #require(decodeReport(sent.stdout), "\(sent.stdout)")
        #expect(report.regions.first?.transport == "pipe-copy")
        #expect(report.verified && report.notices.count == 1)
        let outcome = try #require(received.outcome)
        #expect(outcome.committed && outcome.patternChecked && outcome.patternMismatchOffset == nil)

        let strictReceiver = try ReceiverChild(seed: 1)
        let strict = try BatonProcess(["agent", "send", "--socket", strictReceiver.socket, "--size", "16MiB", "--transport", "gift", "--strict"], environment: refuse).finish()
        let abandoned = strictReceiver.finish()
        #expect(strict.status == 3, "exit 3: refused before the pause, the old side keeps its memory: \(strict.stderr)")
        #expect(strict.stderr.contains("region 0 cannot travel by gift: this kernel refuses vmsplice(SPLICE_F_GIFT)") && strict.stderr.contains("--strict"), "\(strict.stderr)")
        #expect(abandoned.status != 0 && abandoned.outcome?.committed != true, "the receiver must not commit: \(abandoned.stderr)")

        // auto, anonymous memory, a sender told gift is fastest: it still streams by pipe copy.
        var options = HandoffOptions()
        options.transport = .auto
        options.autoStreamTransport = .gift
        let region = try patternedRegion(bytes: 1 << 20, memfd: false, seed: 2)
        let refusal = SyscallError("vmsplice", errno: EOPNOTSUPP)
        let chosen = try OldInstanceAgent.chooseTransports([region], options: options, agreed: .all, giftRefusal: refusal)
        #expect(chosen.kinds[0] == .pipeCopy && chosen.notices.isEmpty)
        #expect(try OldInstanceAgent.chooseTransports([region], options: options, agreed: .all).kinds[0] == .gift)
    }

    @Test("refused pipe sizes fall back by halving and are reported")
    func pipeSizeRefused() throws {
        let receiver = try ReceiverChild(seed: 1)
        let sender = try BatonProcess(["agent", "send", "--socket", receiver.socket, "--size", "8MiB", "--transport", "gift"],
                                      environment: ["BATON_SYSCALL_FAULTS": "F_SETPIPE_SZ=EPERM@1-3"])
        let sent = sender.finish()
        let received = receiver.finish()
        #expect(sent.status == 0, "\(sent.stderr)")
        #expect(received.outcome?.patternMismatchOffset == nil && received.outcome?.committed == true)
        let report = try #require(decodeReport(sent.stdout))
        #expect(report.pipeSizeRefusals.count == 3)
        #expect(report.pipeSizeRefusals.allSatisfy { $0.contains("'F_SETPIPE_SZ' failed: (1) EPERM") })
        #expect(report.pipeCapacity == HandoffOptions.hostPipeMaxSize / 8, "first lane settles at 1/8 of the asked size")
    }

    @Test("fault specs are parsed strictly")
    func specParsing() throws {
        let rules = try SyscallFaults.parse("vmsplice=short:4096@*, F_SETPIPE_SZ=EPERM@1-3,read=EINTR@2+")
        #expect(rules == [
            .init(operation: "vmsplice", effect: .limit(4096), first: 1, last: Int.max),
            .init(operation: "F_SETPIPE_SZ", effect: .errno(EPERM), first: 1, last: 3),
            .init(operation: "read", effect: .errno(EINTR), first: 2, last: Int.max),
        ])
        #expect(throws: SyscallFaults.SpecError.self) { try SyscallFaults.parse("vmsplice=EWHAT@1") }
        #expect(throws: SyscallFaults.SpecError.self) { try SyscallFaults.parse("vmsplice=EAGAIN@0") }
        #expect(throws: SyscallFaults.SpecError.self) { try SyscallFaults.parse("vmsplice") }
    }
}

import Glibc
