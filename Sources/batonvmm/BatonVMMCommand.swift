import ArgumentParser
import BatonCore
import BatonSystem
import BatonVMM
import Foundation
import Glibc
import Logging

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
        signal(SIGPIPE, SIG_IGN)
        LoggingSystem.bootstrap { label in
            var handler = StreamLogHandler.standardError(label: label)
            handler.metadata = ["pid": "\(getpid())"]  // the process keeps its pid across an exec in place
            return handler
        }
        let log = Logger(label: "batonvmm")
        let service = VMMService()
        let apiPath = control ?? apiSocket.flatMap { $0.hasPrefix("path=") ? String($0.dropFirst(5)) : nil }
        let listenerFD: FileDescriptor
        var listener: UnixListener?
        if let apiSocket, apiSocket.hasPrefix("fd=") {
            guard let fd = Int32(apiSocket.dropFirst(3)), fd >= 0 else { throw ValidationError("--api-socket fd=N: bad descriptor") }
            listenerFD = FileDescriptor(owning: fd)
        } else {
            // A new instance listens under a staging name and takes over the real path only
            // once it runs the guest, so the path always reaches the instance that owns the VM.
            let path = incoming == nil ? apiPath! : apiPath! + ".incoming-\(getpid())"
            listener = try UnixListener(path: path)
            listenerFD = listener!.fd
        }
        service.apiListenerFD = listenerFD.raw
        service.execGeneration = execGeneration
        if let resume {
            let parts = Dictionary(uniqueKeysWithValues: resume.split(separator: ",").map { p -> (String, Int32) in
                let kv = p.split(separator: "=")
                return (String(kv[0]), Int32(kv[1]) ?? -1)
            })
            let vm = try VirtualMachine.resumeAfterExec(ramFD: parts["ram"] ?? -1, stateFD: parts["state"] ?? -1)
            vm.lastPauseNanoseconds = pausedAt
            service.adopt(vm)
            log.notice("exec'd in place (generation \(execGeneration)), VM restored paused")
        }
        if let ram {
            let config = VMConfig(ramBytes: ByteSize(parsing: ram)!.bytes, vcpus: vcpus, shared: memory == "shared", simulated: simulated)
            let vm = try VirtualMachine.create(config)
            try vm.boot()
            service.adopt(vm)
            log.notice("VM running, \(ByteSize(config.ramBytes)) RAM, \(vcpus) vCPU(s), \(vm.backendName) backend")
        }
        service.incoming = incoming != nil
        HTTPServer(listener: listenerFD, handler: service.handle).start()
        if let incoming {
            do {
                var handoff = IncomingHandoff(agentSocket: incoming)
                handoff.digestBeforeResume = digestBeforeResume
                handoff.expectedVCPUs = expectVcpus
                let staging = listener?.path
                service.takeOverSocketPath = { if let staging, let apiPath { _ = rename(staging, apiPath) } }
                switch try handoff.run() {
                case .running(let vm):
                    service.adopt(vm)
                    service.takeOverSocketPath()
                    log.notice("took over the guest (\(vm.backendName))")
                case let .orphaned(orphan, reason):
                    // Wait for the controller to confirm the old instance's death and say adopt.
                    service.orphan = orphan
                    log.notice("the old instance died (\(reason)); holding the guest for adoption")
                    var waited = 0
                    while service.orphan != nil && service.vm == nil && waited < 600 {
                        usleep(100_000)
                        waited += 1
                    }
                    guard service.vm != nil else {
                        log.error("nobody adopted the guest within 60 s")
                        throw ExitCode(3)
                    }
                    log.notice("adopted the guest")
                }
            } catch {
                log.error("handoff failed: \(error)")
                listener?.remove()
                throw ExitCode(3)
            }
        }
        var set = sigset_t()
        sigemptyset(&set)
        sigaddset(&set, SIGTERM)
        sigaddset(&set, SIGINT)
        pthread_sigmask(SIG_BLOCK, &set, nil)
        var received: Int32 = 0
        sigwait(&set, &received)
        service.vm?.shutdown()
    }
}
