import ArgumentParser
import BatonSystem

struct CheckCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "check",
        abstract: "Probe this host: vmsplice gift/move, pipe limits, memfd, process_vm_readv, KVM, libvirt.")

    @Flag(help: "Print one JSON object instead of lines.")
    var json = false

    @Flag(help: "Skip the 64 MiB throughput probe that picks auto's streaming path.")
    var noThroughput = false

    func run() throws {
        let report = HostCheck.run(throughputProbe: !noThroughput)
        if json {
            printJSON(report)
        } else {
            for item in report.items {
                print("\(item.ok ? "ok     " : "MISSING") \(item.name): \(item.detail)")
                if let fix = item.fix { print("        fix: \(fix)") }
            }
        }
        // Baton's own path needs vmsplice or process_vm_readv, and pipes; KVM and libvirt are optional here.
        if !(report.vmspliceGift || report.processVmReadv) || report.pipeCapacityGranted == 0 {
            throw BatonExit.checkFailed.code
        }
    }
}
