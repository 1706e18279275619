import BatonAgent
import BatonCore
import BatonSystem
import BatonTransfer
import Foundation
import Glibc

/// The control API of one batonvmm process, in Cloud Hypervisor's REST dialect plus Baton's
/// handoff endpoints under /api/v1/baton/. It owns the VM and, on the old side of an
/// upgrade, the prepared/pending handoff.
public final class VMMService: @unchecked Sendable {
    /// libvirt's ch driver probes `cloud-hypervisor --version` and wants `cloud-hypervisor vX.Y.Z`
    /// with X ≥ 15 first; the rest says what it really is.
    public static let version = "cloud-hypervisor v30.0.0 (batonvmm 0.1.0, Cloud Hypervisor API v1 subset)"
    let lock = NSLock()
    public private(set) var vm: VirtualMachine?
    var prepared: PreparedHandoff?
    var pending: PendingHandoff?
    var stateRegion: MemoryMapping?
    var stateSaved = false
    var stateSaveMs = 0.0
    /// Set on a new instance until its handoff commits.
    public var incoming = false
    /// A new instance whose old instance died mid-handoff, holding guest RAM and state memfds.
    public var orphan: IncomingHandoff.Orphan?
    /// Makes the VM's socket path reach this instance (a new instance renames its staging socket).
    public var takeOverSocketPath: @Sendable () -> Void = {}
    /// The API's listening descriptor (kept across an exec-in-place upgrade).
    public var apiListenerFD: Int32 = -1
    /// How many times this process has exec'd itself into a new binary.
    public var execGeneration = 0
    /// After an exec in place: this image's main() and the VM's restore (CLOCK_MONOTONIC).
    public var imageStartedAt: UInt64?
    public var restoredAt: UInt64?
    /// The prepared handoff passes guest RAM as its memfd (nothing of it is freed by our exit).
    var guestRAMLeavesAsMemfd = false
    /// Why the last exec-in-place failed, if it did (the VM stayed here, paused).
    public var lastExecError: String?
    public var onExit: @Sendable (Int32) -> Void = { code in exit(code) }

    /// Closed while an exec'd image restores its VM (see RestoreGate).
    public let restoreGate = RestoreGate()

    public init() {}

    public func adopt(_ vm: VirtualMachine) {
        lock.lock(); defer { lock.unlock() }
        self.vm = vm
        incoming = false
    }

    struct Info: Encodable {
        let config: VMConfig?
        let state: String
        let memory_actual_size: Int
    }

    public func handle(_ request: HTTPRequest) -> HTTPResponse {
        restoreGate.pass()
        let route = request.path.prefix { $0 != "?" }  // a bare "?" is an empty route, not a crash
        do {
            switch (request.method, route) {
            case ("GET", "/api/v1/vmm.ping"):
                return .json(["build_version": Self.version, "version": "15.0-batonvmm", "pid": "\(getpid())"])
            case ("PUT", "/api/v1/vm.create"):
                let config = try JSONDecoder().decode(VMConfig.self, from: Data(request.body))
                lock.lock(); defer { lock.unlock() }
                guard vm == nil, !incoming else { return .error(409, "a VM already exists in this batonvmm") }
                vm = try VirtualMachine.create(config)
                return HTTPResponse(status: 204)
            case ("PUT", "/api/v1/vm.boot"):
                try requireVM().boot()
                return HTTPResponse(status: 204)
            case ("PUT", "/api/v1/vm.pause"):
                try requireVM().pause()
                try saveStateForHandoff()
                return HTTPResponse(status: 204)
            case ("PUT", "/api/v1/vm.resume"):
                try requireVM().resume()
                stateSaved = false  // the guest runs again: a later pause saves afresh
                return HTTPResponse(status: 204)
            case ("PUT", "/api/v1/vm.reboot"):
                try requireVM().reboot()
                return HTTPResponse(status: 204)
            case ("PUT", "/api/v1/vm.shutdown"):
                try requireVM().shutdown()
                return HTTPResponse(status: 204)
            case ("PUT", "/api/v1/vmm.shutdown"):
                vm?.shutdown()
                return HTTPResponse(status: 204, afterSend: { [onExit] in onExit(0) })
            case ("GET", "/api/v1/vm.info"):
                let vm = self.vm
                return .json(Info(config: vm?.config, state: incoming ? VMRunState.incoming.rawValue : (vm?.state.rawValue ?? "NotCreated"),
                                  memory_actual_size: vm?.config.ramBytes ?? 0))
            case ("GET", "/api/v1/baton/status"):
                let vm = self.vm
                var status = VMStatus(pid: getpid(), state: incoming ? .incoming : (vm?.state ?? .notCreated), backend: vm?.backendName,
                                      ramBytes: vm?.config.ramBytes ?? 0, ramShared: vm?.ram.backing != nil, vcpus: vm?.config.vcpus ?? 0, beats: vm?.beats.last ?? [],
                                      heartbeatExits: vm?.beats.exits ?? 0, startedAtMonotonicNs: vm?.lastStartNanoseconds ?? 0,
                                      failures: vm?.failures ?? [], ramDigestBeforeResume: vm?.ramDigestBeforeResume,
                                      execGeneration: execGeneration, lastExecError: lastExecError, version: Self.version)
                (status.imageStartedAtMonotonicNs, status.restoredAtMonotonicNs) = (imageStartedAt, restoredAt)
                return .json(status)
            case ("PUT", "/api/v1/baton/handoff.prepare"):
                return try prepareHandoff(JSONDecoder().decode(HandoffPrepareRequest.self, from: Data(request.body)))
            case ("PUT", "/api/v1/baton/handoff.transfer"):
                return try transferHandoff(digest: request.path.contains("digest=1"))
            case ("PUT", "/api/v1/baton/handoff.commit"):
                return try commitHandoff()
            case ("PUT", "/api/v1/baton/exec"):
                guard let body = try? JSONDecoder().decode(ExecRequest.self, from: Data(request.body)) else { return .error(400, "exec needs {\"binary\": PATH}") }
                return try execInPlace(body.binary)
            case ("PUT", BatonVMMAPI.execPrepare):
                return try prepareExec()
            case ("PUT", "/api/v1/baton/adopt"):
                return try adopt()
            case ("PUT", "/api/v1/baton/handoff.abandon"):
                lock.lock(); defer { lock.unlock() }
                prepared?.abandon(reason: "controller abandoned the handoff")
                pending?.abandon(reason: "controller abandoned the handoff")
                prepared = nil
                pending = nil
                return HTTPResponse(status: 204)
            case (_, let path) where path.hasPrefix("/api/v1/"):
                return .error(404, "unknown endpoint \(request.method) \(path)")
            default:
                return .error(404, "not found: \(request.path)")
            }
        } catch let e as DecodingError {
            return .error(400, "bad JSON body: \(e)")
        } catch let e as VMError {
            if case .invalidState = e { return .error(409, "\(e)") }
            return .error(400, "\(e)")
        } catch let e as VMConfig.Invalid {
            return .error(400, "\(e)")
        } catch {
            // Agent failures (and anything else): the shared classification travels with the text.
            let isAgent = error is AgentError || error is ProtocolError || error is TransferError
            return .error(500, "\(error)", code: isAgent ? AgentError.wrap(error).code : .failed)
        }
    }

    func requireVM() throws -> VirtualMachine {
        guard let vm else { throw VMError.noVM }
        return vm
    }

    /// The pseudo guest address of the region that carries the vCPU state blob.
    static let stateRegionAddress: UInt64 = 1 << 48
    static let stateRegionID: UInt32 = 1

    func prepareHandoff(_ request: HandoffPrepareRequest) throws -> HTTPResponse {
        let stall = request.stallTimeoutSeconds ?? 10
        guard stall.isFinite, stall > 0, stall <= 3600 else {
            return .error(400, "stall_timeout_seconds must be a number of seconds in (0, 3600], got \(stall)")
        }
        lock.lock(); defer { lock.unlock() }
        let vm = try requireVM()
        guard prepared == nil, pending == nil else { return .error(409, "a handoff is already in progress") }
        guard vm.state == .running || vm.state == .paused else { throw VMError.invalidState(action: "hand off", state: vm.state) }
        var options = HandoffOptions()
        if let t = request.transport {
            guard let choice = TransportChoice(rawValue: t) else { return .error(400, "transport '\(t)' is not gift, memfd, copy or auto") }
            options.transport = choice
        }
        options.releaseSource = request.releaseSource ?? false
        options.strict = request.strict ?? false
        options.stallTimeoutSeconds = stall
        let stateBytes = Host.pageSize * ((64 << 10) / Host.pageSize + vm.config.vcpus * 8)
        let state = try MemoryMapping.memfd(name: "batonvmm-vcpu-state", length: stateBytes)
        stateRegion = state
        stateSaved = false
        let sources = [
            SourceRegion(id: 0, guestAddress: 0, mapping: vm.ram),
            SourceRegion(id: Self.stateRegionID, guestAddress: Self.stateRegionAddress, mapping: state),
        ]
        let connection = AgentConnection(socket: try UnixSocket.connect(path: request.agentSocket))
        prepared = try OldInstanceAgent(connection: connection, options: options).prepare(sources)
        // Guest RAM leaves as its memfd: this process's page tables for it are then only what
        // its exit after the commit tears down, on the CPUs the new instance is starting on
        // (every page of a guest filled at boot). Dropped now, with the guest running on, the
        // exit has only what the guest touches until the pause.
        guestRAMLeavesAsMemfd = prepared!.transports[0] == "memfd"
        if guestRAMLeavesAsMemfd { vm.ram.dropPageTables() }
        prepared!.populateCheckedPages()
        _ = HTTPResponse.json(HandoffTransferred.warmUpSample)  // the transfer's answer, warm (warmUpSample)
        return .json(HandoffPrepared(transports: prepared!.transports.mapKeys { "\($0)" }, notices: prepared!.notices))
    }

    /// While a handoff is prepared, the vCPU state leaves this process at the pause itself:
    /// written into the state memfd the new instance already holds, so the guest survives
    /// this process dying from here on (the new instance can adopt it).
    func saveStateForHandoff() throws {
        lock.lock(); defer { lock.unlock() }
        guard prepared != nil, let stateRegion, let vm else { return }
        let t0 = Host.monotonicNanoseconds()
        try StateRegion.write(try vm.saveState().encoded(), into: stateRegion.base, capacity: stateRegion.length)
        stateSaveMs = Double(Host.monotonicNanoseconds() - t0) / 1e6
        stateSaved = true
    }

    func transferHandoff(digest: Bool) throws -> HTTPResponse {
        lock.lock(); defer { lock.unlock() }
        guard let prepared, let stateRegion else { return .error(409, "no prepared handoff (call handoff.prepare first)") }
        let vm = try requireVM()
        guard vm.state == .paused else { throw VMError.invalidState(action: "transfer", state: vm.state) }
        let savedAtPause = stateSaved
        if !stateSaved {
            let t0 = Host.monotonicNanoseconds()
            try StateRegion.write(try vm.saveState().encoded(), into: stateRegion.base, capacity: stateRegion.length)
            stateSaveMs = Double(Host.monotonicNanoseconds() - t0) / 1e6
        }
        let stateBytes = Int(UInt32(littleEndian: stateRegion.base.load(as: UInt32.self)))
        let ramDigest = digest ? String(RAMDigest.of(vm.ram.base, count: vm.config.ramBytes), radix: 16) : nil
        self.prepared = nil
        let pending = try prepared.transfer()
        self.pending = pending
        return .json(HandoffTransferred(report: pending.report, stateMs: stateSaveMs, stateBytes: stateBytes,
                                     transferMs: pending.report.transferAndVerifySeconds * 1000, ramDigestAtPause: ramDigest,
                                     stateSavedAtPause: savedAtPause))
    }

    /// Roll forward after the old instance died: run the guest from the RAM and state memfds
    /// this instance already holds. Refused while the old instance lives (never two).
    func adopt() throws -> HTTPResponse {
        lock.lock(); defer { lock.unlock() }
        guard let orphan else { return .error(409, "nothing to adopt: this instance holds no orphaned guest") }
        if let pid = orphan.oldPID, Host.isAlive(pid) {
            return .error(409, "the old instance (pid \(pid)) is still alive: refusing to run the guest twice")
        }
        let vm = try orphan.adopt()
        self.vm = vm
        self.orphan = nil
        incoming = false
        takeOverSocketPath()
        return HTTPResponse(status: 204)
    }

    /// Before the pause of an exec in place, with the guest running: drops this process's page
    /// tables for guest RAM. The exec tears down every page-table entry the process holds, and
    /// for a guest whose RAM was filled at boot that is every 4 KiB page (1 GiB: ~40 ms inside
    /// the pause, measured); after this only the pages the guest touches meanwhile are mapped.
    func prepareExec() throws -> HTTPResponse {
        lock.lock(); defer { lock.unlock() }
        let vm = try requireVM()
        guard vm.ram.backing != nil else { return .error(409, "exec in place needs memfd guest RAM (memory.shared)") }
        guard vm.ram.dropPageTables() else { return .error(500, "madvise(MADV_DONTNEED) on guest RAM failed: \(String(cString: strerror(errno)))") }
        return HTTPResponse(status: 204)
    }

    /// Upgrade in place, keeping this pid (what libvirt's ch driver knows the domain by):
    /// the paused VM's state goes into a memfd, guest RAM is already one, and the process
    /// exec's the new binary, which inherits both and the API's listening socket and restores
    /// the VM paused. The controller has run the new binary once (`--version`) before the
    /// pause; if the exec itself fails, this image carries on with the VM paused and says why
    /// in its status.
    func execInPlace(_ binary: String) throws -> HTTPResponse {
        lock.lock(); defer { lock.unlock() }
        let vm = try requireVM()
        guard vm.state == .paused else { throw VMError.invalidState(action: "exec in place", state: vm.state) }
        guard let ram = vm.ram.backing else { return .error(409, "exec in place needs memfd guest RAM (memory.shared): anonymous RAM dies with the exec") }
        guard apiListenerFD >= 0 else { return .error(409, "no API listener to hand across the exec") }
        guard access(binary, X_OK) == 0 else { return .error(400, "new binary \(binary) is missing or not executable; nothing was changed") }
        let blob = try vm.saveState().encoded()
        let state = try MemoryMapping.memfd(name: "batonvmm-exec-state", length: Host.pageSize * ((blob.count + StateRegion.headerBytes) / Host.pageSize + 1))
        try StateRegion.write(blob, into: state.base, capacity: state.length)
        let stateFD = state.backing!
        let generation = execGeneration + 1
        let listener = apiListenerFD
        let pausedAt = vm.lastPauseNanoseconds
        return HTTPResponse(status: 202, body: Array("{\"exec\":\"\(binary)\",\"pid\":\(getpid())}".utf8), afterSend: { [self] in
            let fds = [ram.raw, stateFD.raw, listener]
            for fd in fds { _ = fcntl(fd, F_SETFD, 0) }
            let args = [binary, "--api-socket", "fd=\(listener)", "--resume", "ram=\(ram.raw),state=\(stateFD.raw)",
                        "--exec-generation", "\(generation)", "--paused-at", "\(pausedAt)"]
            var argv: [UnsafeMutablePointer<CChar>?] = args.map { strdup($0) } + [nil]
            execv(binary, &argv)
            // Still here: the exec failed. Nothing changed; the VM stays paused in this image.
            let why = String(cString: strerror(errno))
            for fd in fds { _ = fcntl(fd, F_SETFD, FD_CLOEXEC) }
            argv.forEach { free($0) }
            lock.lock()
            lastExecError = "execv(\(binary)) failed: \(why)"
            lock.unlock()
            withExtendedLifetime(state) {}
        })
    }

    func commitHandoff() throws -> HTTPResponse {
        lock.lock(); defer { lock.unlock() }
        guard let pending else { return .error(409, "no verified handoff to commit") }
        try pending.commit()
        self.pending = nil
        // The new instance owns the guest now: this process must never run it again.
        vm?.shutdown()
        // Only when guest RAM stays in the memfd: a copying transport's exit frees a second copy
        // of guest RAM, which must not wait behind everything else on a busy host.
        let quietly = guestRAMLeavesAsMemfd
        return HTTPResponse(status: 204, afterSend: { [onExit] in if quietly { Self.exitBehindTheNewInstance() }; onExit(0) })
    }

    /// After the commit, this process's exit (page tables, the KVM VM) is work nobody waits for,
    /// while the new instance is starting the guest on the same CPUs: every thread goes to
    /// SCHED_IDLE first, so the teardown runs only on a CPU nothing else wants.
    static func exitBehindTheNewInstance() {
        let schedIdle: Int32 = 5  // SCHED_IDLE (<linux/sched.h>); Glibc's module hides it behind _GNU_SOURCE
        var param = sched_param(sched_priority: 0)
        for tid in ProcessHandles.threadIDs(of: getpid()) { _ = sched_setscheduler(tid, schedIdle, &param) }
    }
}

/// A whole-RAM digest for tests and `?digest=1`: the chunk checksum over 1 MiB pieces, folded.
public enum RAMDigest {
    public static func of(_ base: UnsafeRawPointer, count: Int) -> UInt64 {
        var sums: [UInt64] = []
        var offset = 0
        while offset < count {
            let n = min(1 << 20, count - offset)
            sums.append(ChunkChecksum.compute(base: base + offset, count: n, seed: UInt64(offset)))
            offset += n
        }
        return XXH64.digest(ofChunkChecksums: sums)
    }
}

extension Dictionary {
    func mapKeys<K: Hashable>(_ f: (Key) -> K) -> [K: Value] { Dictionary<K, Value>(uniqueKeysWithValues: map { (f($0.key), $0.value) }) }
}

/// Holds the API's requests while an image that just exec'd restores its VM: the server and its
/// threads start first, alongside the restore (all of it inside the guest's pause), and each
/// request waits here until the VM is back, as it waited in the listener's backlog before.
public final class RestoreGate: @unchecked Sendable {
    private let condition = NSCondition()
    private var closed = false

    public init() {}

    public func close() { condition.lock(); closed = true; condition.unlock() }
    public func open() { condition.lock(); closed = false; condition.broadcast(); condition.unlock() }
    func pass() {
        condition.lock()
        while closed { condition.wait() }
        condition.unlock()
    }
}
