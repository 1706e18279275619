import ArgumentParser
import BatonController
import BatonCore
import BatonSystem
import BatonHarness
import Foundation
import Glibc

/// `baton bench upgrade`: downtime of real in-place upgrades of a running reference VM,
/// repeated per transport, min/median/max, with memcpy of the same RAM size in the same run.
struct UpgradeBench: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "upgrade", abstract: "Downtime of in-place upgrades of a running batonvmm.")

    @Option(help: "Guest RAM.")
    var ram: String = "1GiB"

    @Option(help: "Upgrades per transport.")
    var runs: Int = 5

    @Option(help: "Comma-separated transports.")
    var transports: String = "memfd,gift,copy"

    @Flag(help: "One JSON object.")
    var json = false

    struct Row: Codable {
        let transport: String
        let ramBytes: Int
        let runs: Int
        let downtimeMs: Spread
        let pauseMs: Spread
        let stateMs: Spread
        let ramMs: Spread
        let verifyMs: Spread
        let resumeMs: Spread
        let memcpyMs: Spread
        let allVerified: Bool
    }

    func run() throws {
        let bytes = try parseSize(ram, option: "--ram")
        let vmm = Executable.besideThisProcess("batonvmm")
        let dir = try BatonProcess.makeRunDirectory("bench-upgrade")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let next = dir + "/batonvmm-next"
        try Executable.copy(from: vmm, to: next)
        let memcpyTimes = try TransferBenchmark(sizes: [bytes], runs: runs, transports: [], options: .init(), progress: { _ in })
            .measureMemcpy(size: bytes).map { $0 * 1000 }
        var rows: [Row] = []
        for transport in transports.split(separator: ",").map(String.init) {
            let socket = dir + "/vm-\(transport).sock"
            let pid = try Spawn.detached(vmm, ["--ram", "\(bytes)", "--control", socket], logPath: dir + "/vmm.log")
            let client = VMMClient(socketPath: socket)
            defer { _ = try? client.request("PUT", "/api/v1/vmm.shutdown"); kill(pid, SIGKILL); _ = Spawn.exitStatus(pid) }
            guard BatonProcess.waitForPath(socket, timeoutSeconds: 60) else { throw fail("batonvmm did not start", .failure) }
            var reports: [UpgradeReport] = []
            for i in 0..<runs {
                if !json { FileHandle.standardError.write(Data("bench: upgrade \(transport) \(ByteSize(bytes)) run \(i + 1)/\(runs)\n".utf8)) }
                var options = UpgradeOptions(vmSocket: socket, binary: next)
                options.transport = transport
                options.runDirectory = dir + "/run"
                reports.append(try UpgradeController(options: options).run())
                usleep(200_000)  // let the guest run between upgrades
            }
            rows.append(Row(transport: reports.last?.transport ?? transport, ramBytes: bytes, runs: runs,
                            downtimeMs: Spread(reports.map(\.downtimeMs)), pauseMs: Spread(reports.map(\.pauseMs)),
                            stateMs: Spread(reports.map(\.stateMs)), ramMs: Spread(reports.map(\.ramMs)),
                            verifyMs: Spread(reports.map(\.verifyMs)), resumeMs: Spread(reports.map(\.resumeMs)),
                            memcpyMs: Spread(memcpyTimes), allVerified: reports.allSatisfy(\.verified)))
        }
        if json { printJSON(["results": rows]); return }
        print("transport          RAM     downtime ms (min/median/max)   pause   state   ram      verify  resume  memcpy ms (median)")
        for r in rows {
            print(r.transport.padding(toLength: 18, withPad: " ", startingAt: 0)
                  + "\(ByteSize(r.ramBytes))".padding(toLength: 8, withPad: " ", startingAt: 0)
                  + String(format: "%7.2f / %7.2f / %7.2f      %6.2f  %6.2f  %7.2f  %6.2f  %6.2f  %7.2f",
                           r.downtimeMs.min, r.downtimeMs.median, r.downtimeMs.max, r.pauseMs.median, r.stateMs.median,
                           r.ramMs.median, r.verifyMs.median, r.resumeMs.median, r.memcpyMs.median)
                  + (r.allVerified ? "" : "  NOT VERIFIED"))
        }
    }
}
