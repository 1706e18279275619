import ArgumentParser
import BatonCore
import BatonSystem
import BatonVMM
import Foundation
import Glibc

/// `batonvmm`: the reference hypervisor. Thin: parses arguments, builds the service, runs.
struct BatonVMMCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "batonvmm",
        abstract: "Baton's reference VMM on KVM (simulated vCPU without /dev/kvm), Cloud Hypervisor API dialect.",
        version: VMMService.version)

    @Option(help: "Start a VM with this much RAM at once (same as vm.create + vm.boot).")
    var ram: String?

    @Option(help: "vCPUs for --ram.")
    var vcpus: Int = 1

    @Option(help: "Guest RAM backing for --ram: shared (memfd) or private (anonymous).")
    var memory: String = "shared"

    @Flag(help: "Use the simulated vCPU even where /dev/kvm works.")
    var simulated = false

    @Option(help: "Control socket path (created 0600 once it accepts requests).")
    var control: String?

    @Option(name: .customLong("api-socket"), help: "Cloud Hypervisor style: path=P or fd=N (an inherited listening socket).")
    var apiSocket: String?

    @Option(help: "Start as a new instance that waits for a handoff on this agent socket.")
    var incoming: String?

    @Option(help: "After an exec-in-place upgrade: ram=FD,state=FD inherited from the previous image (set by batonvmm itself).")
    var resume: String?

    @Option(help: "Exec-in-place generation (set by batonvmm itself).")
    var execGeneration: Int = 0

    @Option(help: "CLOCK_MONOTONIC of the pause before the exec (set by batonvmm itself).")
    var pausedAt: UInt64 = 0

    @Option(help: "With --incoming: create this many KVM vCPUs before the handoff (a hint; ignored if the state differs).")
    var expectVcpus: Int?

    @Flag(help: "With --incoming: digest all guest RAM after the handoff, before the guest resumes (costs downtime).")
    var digestBeforeResume = false

    func validate() throws {
        guard control != nil || apiSocket != nil else { throw ValidationError("give --control PATH or --api-socket path=P|fd=N") }
        if let apiSocket, !(apiSocket.hasPrefix("path=") || apiSocket.hasPrefix("fd=")) {
            throw ValidationError("--api-socket: expected path=P or fd=N, got '\(apiSocket)'")
        }
        if let ram, ByteSize(parsing: ram) == nil { throw ValidationError("--ram: '\(ram)' is not a size (e.g. 256MiB)") }
        guard memory == "shared" || memory == "private" else { throw ValidationError("--memory: shared or private, got '\(memory)'") }
        if incoming != nil && ram != nil { throw ValidationError("--incoming takes its VM from the handoff; drop --ram") }
        if let resume, !(resume.hasPrefix("ram=") && resume.contains(",state=")) { throw ValidationError("--resume: expected ram=FD,state=FD") }
    }

    func run() throws {
        try VMMLaunch(ram: ram, vcpus: vcpus, sharedMemory: memory == "shared", simulated: simulated, control: control, apiSocket: apiSocket,
                      incoming: incoming, resume: resume, execGeneration: execGeneration, pausedAt: pausedAt, expectVcpus: expectVcpus,
                      digestBeforeResume: digestBeforeResume).run()
    }
}
