import BatonController
import BatonCore
import BatonSystem
import BatonTestSupport
import BatonVMM
import Foundation
import Glibc
import Testing

@Suite("In-place upgrade of a running guest")
struct UpgradeTests {
    /// A second copy of the binary, as an operator would install it.
    func newBinary(in dir: String) throws -> String {
        let path = dir + "/batonvmm-next"
        try? FileManager.default.removeItem(atPath: path)
        try FileManager.default.copyItem(atPath: batonvmmPath, toPath: path)
        return path
    }

    func upgrade(_ vmm: RunningVMM, transport: String, binary: String) throws -> UpgradeReport {
        var options = UpgradeOptions(vmSocket: vmm.socket, binary: binary)
        options.transport = transport
        options.digest = true
        options.runDirectory = vmm.directory + "/run"
        return try UpgradeController(options: options).run()
    }

    @Test("256 MiB guest upgraded twice (gift, then memfd): state continues exactly", arguments: [false, true])
    func upgradeTwice(simulated: Bool) throws {
        if !simulated, let why = KVMHost.unavailableReason { try Test.cancel("KVM unavailable: \(why)") }
        let vmm = try RunningVMM(ram: "256MiB", simulated: simulated)
        defer { vmm.stop() }
        let binary = try newBinary(in: vmm.directory)
        var last = try vmm.beat()
        expectMatchesModel(last)
        var pids = [try vmm.status().pid]
        for transport in ["gift", "memfd"] {
            let report = try upgrade(vmm, transport: transport, binary: binary)
            #expect(report.verified)
            #expect(!report.rolledBack)
            #expect(report.newPid != report.oldPid)
            #expect(report.oldPid == pids.last)
            #expect(report.transport == (transport == "gift" ? "gift" : "memfd"))
            #expect(report.ramDigestAtPause != nil && report.ramDigestAtPause == report.ramDigestBeforeResume,
                    "guest RAM digest at pause \(report.ramDigestAtPause ?? "-") vs in the new instance \(report.ramDigestBeforeResume ?? "-")")
            #expect(report.downtimeMs > 0)
            let status = try vmm.status()
            #expect(status.pid == report.newPid, "the socket is served by the new instance")
            #expect(kill(report.oldPid, 0) != 0 || isZombie(report.oldPid), "the old instance exited")
            let next = try vmm.beat(after: last.counter)
            #expect(next.counter > last.counter, "no reset")
            #expect(next.beats > last.beats)
            expectMatchesModel(next, "after the \(transport) upgrade")
            last = next
            pids.append(report.newPid)
        }
    }

    @Test("a missing new binary is refused before anything is paused")
    func missingBinary() throws {
        let vmm = try RunningVMM(simulated: true)
        defer { vmm.stop() }
        let before = try vmm.beat()
        #expect {
            _ = try upgrade(vmm, transport: "auto", binary: vmm.directory + "/no-such-batonvmm")
        } throws: { error in
            "\(error)" == "new binary \(vmm.directory)/no-such-batonvmm is missing; nothing was changed"
        }
        #expect(try vmm.status().state == "Running")
        #expect(try vmm.beat(after: before.counter).counter > before.counter, "still counting")
    }

    @Test("a new binary that exits at once rolls back; the old VM keeps running and counting")
    func crashingBinary() throws {
        let vmm = try RunningVMM(simulated: true)
        defer { vmm.stop() }
        let oldPid = try vmm.status().pid
        let before = try vmm.beat()
        let script = vmm.directory + "/broken-batonvmm"
        FileManager.default.createFile(atPath: script, contents: Data("#!/bin/sh\necho 'broken build' >&2\nexit 7\n".utf8), attributes: [.posixPermissions: 0o755])
        #expect {
            _ = try upgrade(vmm, transport: "memfd", binary: script)
        } throws: { error in
            let text = "\(error)"
            return text.contains("exited with status 7 before it was ready: broken build") && text.contains("rolled back")
        }
        let status = try vmm.status()
        #expect(status.pid == oldPid)
        #expect(status.state == "Running")
        let after = try vmm.beat(after: before.counter)
        expectMatchesModel(after)
    }
}

func isZombie(_ pid: Int32) -> Bool {
    (Host.readSmallFile("/proc/\(pid)/stat") ?? "").contains(") Z ")
}
