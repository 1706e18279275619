import ArgumentParser
import BatonAgent
import BatonCore
import BatonSystem
import BatonTestSupport
import Foundation

/// The README's first command: check the host, then hand a 256 MiB region between two real
/// processes with every transport and show what happened.
struct DemoCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "demo",
        abstract: "Check this host, then run a real two-process handoff with each transport.")

    @Option(help: "Region size.")
    var size: String = "256MiB"

    func run() throws {
        print("== baton check")
        let check = HostCheck.run(throughputProbe: false)
        for item in check.items {
            print("\(item.ok ? "ok     " : "MISSING") \(item.name): \(item.detail)")
            if let fix = item.fix { print("        fix: \(fix)") }
        }
        let bytes = try parseSize(size, option: "--size")
        print("\n== handoff of \(ByteSize(bytes)) from this process to a new `baton agent receive` process")
        var options = HandoffOptions()
        options.lanes = Host.onlineCPUs
        let bench = TransferBenchmark(sizes: [bytes], runs: 1, transports: [.init(.gift), .init(.gift, releaseSource: true), .init(.memfd), .init(.copy)], options: options, progress: { _ in })
        for r in try bench.run().results where r.transport != "memcpy" {
            let name = r.transport.padding(toLength: 13, withPad: " ", startingAt: 0)
            print(name + String(format: "%7.1f ms  %6.2f GiB/s  ", r.seconds.median * 1000, r.gibPerSecond)
                  + "pages \(r.pageDisposition), every byte checked by the receiver: \(r.verified ? "yes" : "NO")")
        }
    }
}
