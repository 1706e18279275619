import ArgumentParser
import BatonAgent
import BatonController
import BatonCore
import BatonHarness
import BatonSystem
import BatonVMM
import Foundation
import Glibc

/// The README's first command: check the host, start the reference VM, upgrade it in place
/// to a second copy of the binary (gift, then memfd), and show with the independent model
/// that the guest kept counting exactly. Then one raw two-process handoff per transport.
struct DemoCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "demo",
        abstract: "Check the host, then upgrade a running reference VM in place and show the guest continued.")

    @Option(help: "Guest RAM.")
    var ram: String = "256MiB"

    func run() throws {
        print("== baton check")
        let check = HostCheck.run(throughputProbe: false)
        for item in check.items {
            print("\(item.ok ? "ok     " : "MISSING") \(item.name): \(item.detail)")
            if let fix = item.fix { print("        fix: \(fix)") }
        }
        let bytes = try parseSize(ram, option: "--ram")
        let vmm = Executable.besideThisProcess("batonvmm")
        guard FileManager.default.isExecutableFile(atPath: vmm) else { throw fail("batonvmm not found at \(vmm)", .failure) }
        let run = try BatonProcess.makeRunDirectory("demo")
        defer { try? FileManager.default.removeItem(atPath: run) }
        let next = run + "/batonvmm-next"
        try Executable.copy(from: vmm, to: next)
        let socket = run + "/vm.sock"
        print("\n== start the reference VM: batonvmm --ram \(ByteSize(bytes)) --control \(socket)")
        let first = try Spawn.detached(vmm, ["--ram", "\(bytes)", "--control", socket], logPath: run + "/vmm.log")
        let client = VMMClient(socketPath: socket)
        defer {
            _ = try? client.request("PUT", "/api/v1/vmm.shutdown")
            kill(first, SIGKILL)
            _ = Spawn.exitStatus(first)
        }
        guard BatonProcess.waitForPath(socket) else { throw fail("batonvmm did not start", .failure) }
        var beat = try waitBeat(client, after: 0)
        print("guest running: \(describe(beat))")
        for transport in ["gift", "memfd"] {
            var options = UpgradeOptions(vmSocket: socket, binary: next)
            options.transport = transport
            options.runDirectory = run + "/run"
            print("\n== baton upgrade --vm \(socket) --binary \(next) --transport \(transport)")
            let report = try UpgradeController(options: options).run()
            print(report.line)
            let after = try waitBeat(client, after: beat.counter)
            var model = GuestModel(heartbeatMask: 0xFFFF)
            model.step(to: after.counter)
            print("guest after: \(describe(after)); independent model at \(after.counter): \(model.beat == after ? "identical (counter, hash chain, r15, beats)" : "DIFFERS")")
            guard model.beat == after, after.counter > beat.counter else { throw fail("guest state did not continue exactly", .failure) }
            beat = after
        }
        print("\n== raw two-process handoffs of \(ByteSize(bytes)) (transfer engine)")
        let bench = TransferBenchmark(sizes: [bytes], runs: 1,
                                      transports: [.init(.gift), .init(.gift, releaseSource: true), .init(.memfd), .init(.copy)],
                                      options: HandoffOptions())
        for r in try bench.run().results where r.transport != "memcpy" {
            let name = r.transport.padding(toLength: 13, withPad: " ", startingAt: 0)
            print(name + String(format: "%7.1f ms  %6.2f GiB/s  ", r.seconds.median * 1000, r.gibPerSecond)
                  + "pages \(r.pageDisposition), every byte checked by the receiver: \(r.verified ? "yes" : "NO")")
        }
    }

    func waitBeat(_ client: VMMClient, after counter: UInt64) throws -> GuestBeat {
        guard let b = client.nextBeat(after: counter, timeout: 10) else { throw fail("no heartbeat from the guest", .failure) }
        return b
    }

    func describe(_ b: GuestBeat) -> String {
        "counter \(b.counter), hash 0x\(String(b.hash, radix: 16)), heartbeats \(b.beats)"
    }
}
