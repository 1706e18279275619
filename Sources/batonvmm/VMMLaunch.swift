import ArgumentParser
import BatonCore
import BatonSystem
import BatonVMM
import Foundation
import Glibc
import Logging

/// What one batonvmm process runs, from its parsed arguments, or, after an exec in place, from
/// the fixed arguments its previous image wrote (`init(execArguments:)`).
struct VMMLaunch {
    var ram: String?
    var vcpus = 1
    var sharedMemory = true
    var simulated = false
    var control: String?
    var apiSocket: String?
    var incoming: String?
    var resume: String?
    var execGeneration = 0
    var pausedAt: UInt64 = 0
    var expectVcpus: Int?
    var digestBeforeResume = false
    /// When main() began (after an exec in place; reported in the status).
    var imageStartedAt: UInt64?

    /// The arguments `execInPlace` (VMMService) passes, exactly: `--api-socket fd=N --resume
    /// ram=A,state=B --exec-generation G --paused-at T`. Read by hand, not by ArgumentParser:
    /// this runs inside the guest's pause, and ArgumentParser's reflection (Mirror, protocol
    /// conformance scans over the whole binary) cost ~3 ms of it. Anything else (a person
    /// typing these flags in another order) goes through ArgumentParser as usual.
    init?(execArguments a: [String]) {
        guard a.count == 9, a[1] == "--api-socket", a[2].hasPrefix("fd="), Int32(a[2].dropFirst(3)).map({ $0 >= 0 }) == true,
              a[3] == "--resume", a[4].hasPrefix("ram="), a[4].contains(",state="),
              a[5] == "--exec-generation", let generation = Int(a[6]), a[7] == "--paused-at", let paused = UInt64(a[8]) else { return nil }
        apiSocket = a[2]
        resume = a[4]
        execGeneration = generation
        pausedAt = paused
    }

    init(ram: String?, vcpus: Int, sharedMemory: Bool, simulated: Bool, control: String?, apiSocket: String?, incoming: String?,
         resume: String?, execGeneration: Int, pausedAt: UInt64, expectVcpus: Int?, digestBeforeResume: Bool) {
        (self.ram, self.vcpus, self.sharedMemory, self.simulated, self.control, self.apiSocket) = (ram, vcpus, sharedMemory, simulated, control, apiSocket)
        (self.incoming, self.resume, self.execGeneration, self.pausedAt) = (incoming, resume, execGeneration, pausedAt)
        (self.expectVcpus, self.digestBeforeResume) = (expectVcpus, digestBeforeResume)
    }

    func run() throws {
        signal(SIGPIPE, SIG_IGN)
        // An exec in place: the KVM VM is built on a second thread from here on (ExecResume),
        // and the first answer's JSON warmed after it.
        let execResume = try resume.map { resume in
            let parts = Dictionary(resume.split(separator: ",").map { p -> (String, Int32) in
                let kv = p.split(separator: "=", maxSplits: 1)
                return (kv.first.map(String.init) ?? "", kv.count > 1 ? Int32(kv[1]) ?? -1 : -1)
            }, uniquingKeysWith: { first, _ in first })
            return try ExecResume(ramFD: parts["ram"] ?? -1, stateFD: parts["state"] ?? -1) { _ = HTTPResponse.json(VMStatus.warmUpSample) }
        }
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
        service.incoming = incoming != nil
        let server = HTTPServer(listener: listenerFD, handler: service.handle)
        if let execResume {
            // Inside the guest's pause: the server's threads start while the VM is rebuilt; its
            // requests wait until the VM is back (RestoreGate).
            service.restoreGate.close()
            server.start()
            defer { service.restoreGate.open() }
            let vm = try execResume.finish()
            vm.lastPauseNanoseconds = pausedAt
            service.adopt(vm)
            (service.imageStartedAt, service.restoredAt) = (imageStartedAt, Host.monotonicNanoseconds())
        }
        if let ram {
            let config = VMConfig(ramBytes: ByteSize(parsing: ram)!.bytes, vcpus: vcpus, shared: sharedMemory, simulated: simulated)
            let vm = try VirtualMachine.create(config)
            try vm.boot()
            service.adopt(vm)
            log.notice("VM running, \(ByteSize(config.ramBytes)) RAM, \(vcpus) vCPU(s), \(vm.backendName) backend")
        }
        if resume == nil { server.start() }
        // After the API serves: the controller waits for this image's status to resume the guest.
        if resume != nil { log.notice("exec'd in place (generation \(execGeneration)), VM restored paused") }
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
