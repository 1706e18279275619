import BatonController
import BatonCore
import BatonLibvirt
import BatonSystem
import Foundation
import Glibc

/// What `baton upgrade --domain` reports for a QEMU domain (`--json`).
public struct QEMUUpgradeReport: Codable, Sendable {
    /// The guest pause, phase by phase, on QEMU's clock: from the old QEMU's STOP event to the
    /// new one's RESUME event, cut at instants the controller takes. The phases sum to `pauseMs`.
    public struct Breakdown: Codable, Sendable {
        /// STOP → the controller has the new QEMU's word that it holds the whole state (QEMU's
        /// own migration; cpr-transfer: the device sets are compared meanwhile, as soon as the new
        /// QEMU's monitor opens).
        public var loadMs = 0.0
        /// → `transferred` journaled and the RAM samples compared through both processes' mappings.
        public var verifyMs = 0.0
        /// → `committing` journaled (the point of no return).
        public var commitMs = 0.0
        /// `cont` sent → RESUME in the new QEMU.
        public var resumeMs = 0.0
        /// Not in the pause: `migrate` issued → STOP (the live part of the migration).
        public var liveMs = 0.0

        public init() {}

        public var phases: [(String, Double)] {
            [("load", loadMs), ("verify", verifyMs), ("commit", commitMs), ("resume", resumeMs)]
        }
        public var sumMs: Double { phases.reduce(0) { $0 + $1.1 } }
    }
    public var domain: String
    public var mode: String = ""
    public var oldPid: Int32 = 0
    public var newPid: Int32 = 0
    public var oldVersion: String = ""
    public var newVersion: String = ""
    public var newEmulator: String = ""
    /// Guest stopped in the old QEMU → running in the new one (QEMU's STOP and RESUME event
    /// timestamps; the guest's own view of the pause).
    public var pauseMs = 0.0
    public var breakdown = Breakdown()
    /// The same pause on the controller's monotonic clock (migrate issued → cont returned).
    public var controllerPauseMs = 0.0
    public var ramBytesMoved: Int64 = 0
    public var ramPages = "shared"
    public var verified = false
    public var rolledBack = false
    /// How long libvirtd was down for the adoption (the host's libvirt API, not the guest).
    public var managementGapMs = 0.0
    public var argvChanges: [String] = []
    public var definitionUpdated = false
    public var error: String?
    /// What was observed after a rollback (not assumed): the old QEMU's run state.
    public var observedAfterRollback: String?

    public init(domain: String) { self.domain = domain }

    public var line: String {
        if rolledBack { return "baton: upgrade of \(domain) ROLLED BACK (old QEMU pid \(oldPid) \(observedAfterRollback ?? "state unknown")): \(error ?? "")" }
        let phases = breakdown.phases.map { String(format: "%@ %.2f", $0.0, $0.1) }.joined(separator: ", ")
        return String(format: "baton: upgraded %@ QEMU %@ → %@ (pid %d → %d) via %@: pause %.2f ms (%@), %lld bytes of RAM moved, verified %@, libvirt gap %.0f ms",
                      domain, oldVersion, newVersion, oldPid, newPid, mode, pauseMs, phases,
                      ramBytesMoved, verified ? "yes" : "no", managementGapMs)
    }
}

public struct QEMUUpgradeOptions: Sendable {
    public var domain: String
    public var uri = "qemu:///system"
    public var newEmulator: String
    public var runDirectory = UpgradeOptions.defaultRunDirectory
    public var journalPath: String?
    public var libvirtStateDirectory = "/run/libvirt/qemu"
    public var libvirtdPidFile = "/run/libvirtd.pid"
    public var updateDefinition = false
    /// Private guest RAM goes through QEMU's migration stream instead of being refused.
    public var allowCopy = false
    /// The executable that places the new QEMU in the old one's cgroups and mount namespace
    /// (`baton qemu-exec`); default: this process's own binary.
    public var launcher = (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe")) ?? "baton"
    public var timeoutSeconds = 30.0
    /// Cancel the handoff (the domain stays on the old QEMU) if the guest has been paused this
    /// long when the new QEMU is ready to run it. nil: no limit.
    public var maxPauseMs: Double?
    /// Ignore SIGINT/SIGHUP/SIGTERM for the length of the sequence (a terminal's ^C must not stop
    /// it half-way). A service that blocks them and takes them with sigwait sets this false: an
    /// ignored signal is discarded, and its SIGTERM would be lost.
    public var holdSignals = true
    /// A controller fault point (tests and the harness): kill-new-after / kill-old-after /
    /// crash-controller-after a journaled phase.
    public var fault: ControllerFault?
    /// Told each phase as it is journaled (a progress line). Called inside the pause too: it
    /// must only store what it is given.
    public var onPhase: (@Sendable (UpgradeJournal.Phase) -> Void)?

    public init(domain: String, newEmulator: String) {
        self.domain = domain
        self.newEmulator = newEmulator
    }
}

/// Upgrades the QEMU under one running libvirt domain whose guest RAM is shared memory:
/// preflight, start the new QEMU beside the old one (its cgroups and mount namespace, libvirt's
/// command line translated), migrate with RAM left in place (cpr-transfer or x-ignore-shared),
/// verify, resume the new process, fence the old one, and have libvirt adopt the new process by
/// restarting libvirtd on a status file that describes it. Before the new QEMU runs the guest,
/// every failure rolls back; after it, the sequence only goes forward. One thread drives an
/// instance at a time (a batch hands each to one worker), hence the unchecked Sendable.
public final class QEMUUpgrade: @unchecked Sendable {
    public let options: QEMUUpgradeOptions
    public private(set) var report: QEMUUpgradeReport
    var record: QEMUHandoffRecord!
    var journal: UpgradeJournal!
    var oldCommandLine: QEMUCommandLine!
    var newVersion: QEMUVersion!
    var oldMonitor: QMPConnection?
    var newMonitor: QMPConnection?
    var ramFD: FileDescriptor?
    var ramFDNumber: Int32 = 0
    var logFD: FileDescriptor?
    var movedListeners: [String: UnixListener] = [:]
    var passedSockets: [Int32: FileDescriptor] = [:]
    var libvirtdStoppedAt: UInt64?
    /// `committing` is journaled: the new QEMU may run the guest from here on.
    var pastPointOfNoReturn = false
    /// When the pause began (migrate issued) and when verification ended.
    var handOverStart: UInt64 = 0
    var verifiedAt: UInt64 = 0
    /// The guest is paused: journal entries carry no context (recovery reads the last entry that
    /// has one; the record does not change in the pause, and encoding it costs pause time).
    var inPause = false
    /// The instants that cut the guest pause into the report's phases.
    var marks = PauseMarks(migrateIssued: 0)
    /// cpr-transfer: the old QEMU's device set, read before the pause.
    var oldDevices: QEMUVerification.DeviceSet?
    /// The RAM pages compared inside the pause, chosen and located before it.
    var ramSample: QEMUVerification.RAMSample?
    /// The new QEMU has loaded all of the guest's state (it could run the guest on its own).
    var stateLoaded = false
    /// A batch (QEMUBatchUpgrade) stops libvirtd once for all its domains and starts it once
    /// after: this upgrade then neither stops nor starts it.
    var libvirtdHeldByBatch = false
    /// `cont` returned: the new QEMU runs the guest.
    var committed = false
    /// `cont` was sent to a live new QEMU: from here it may have run the guest.
    var contSent = false
    /// The shared handoff sequence driving this upgrade.
    lazy var sequence = HandoffSequence(self)

    public init(options: QEMUUpgradeOptions) {
        self.options = options
        report = QEMUUpgradeReport(domain: options.domain)
    }

    // MARK: - Preflight: nothing is started or paused until all of this holds.

    func preflight() throws {
        let connection: LibvirtConnection
        let domain: LibvirtDomain
        do {
            connection = try LibvirtConnection.connect(uri: options.uri, answeringWithin: options.timeoutSeconds)
            domain = try connection.domain(options.domain)
        } catch { throw QEMUUpgradeError.refused("\(error)") }
        let state = try domain.state().state
        guard state == .running else { throw QEMUUpgradeError.refused("domain \(domain.name) is \(state.rawValue), not running") }
        let statusPath = "\(options.libvirtStateDirectory)/\(domain.name).xml"
        guard let statusText = try? String(contentsOfFile: statusPath, encoding: .utf8) else {
            throw QEMUUpgradeError.refused("libvirt's status file \(statusPath) cannot be read (is \(options.uri) a local QEMU driver?)")
        }
        let status = LibvirtStatusFile(xml: statusText)
        guard let oldPid = status.pid, Host.isAlive(oldPid), let monitorPath = status.monitorPath else {
            throw QEMUUpgradeError.refused("libvirt's status file \(statusPath) names no live QEMU pid and monitor")
        }
        report.oldPid = oldPid
        let cmd = QEMUCommandLine(try ProcessHandles.commandLine(of: oldPid))
        oldCommandLine = cmd
        // Guest RAM must be shared memory the new process can map (or, with --allow-copy,
        // private memory QEMU copies, for which the host must hold a second copy).
        let backends = cmd.ramBackends
        guard backends.count <= 1 else { throw QEMUUpgradeError.unsupported("domain \(domain.name) has \(backends.count) memory backends (NUMA); one is supported") }
        var copy = false
        switch backends.first {
        case .memfd(_, true)?:
            let memfds = ProcessHandles.descriptors(of: oldPid).filter { $0.value.hasPrefix("/memfd:memory-backend-memfd") }
            guard memfds.count == 1, let n = memfds.keys.first else {
                throw QEMUUpgradeError.unsupported("found \(memfds.count) guest RAM memfds in QEMU pid \(oldPid), expected 1")
            }
            ramFDNumber = n
        case .inheritedFile(_, let fd, true)?: ramFDNumber = fd
        default:
            guard options.allowCopy else {
                throw QEMUUpgradeError.unsupported("domain \(domain.name) has private guest RAM (not <memoryBacking><source type='memfd'/><access mode='shared'/>): run `baton enroll \(domain.name)` and cold-boot it, or pass --allow-copy to copy it through QEMU's migration stream")
            }
            copy = true
            try Self.checkMemoryForSecondCopy(bytes: cmd.ramBytes ?? 0, pid: oldPid)
        }
        guard cmd.monitorSocket != nil else { throw QEMUUpgradeError.unsupported("QEMU pid \(oldPid) has no monitor socket passed by libvirt") }
        // The old and the new binary: versions, the machine type, every device.
        let oldVersion = try Self.version(of: "/proc/\(oldPid)/exe")
        report.oldVersion = oldVersion.description
        report.newEmulator = options.newEmulator
        guard access(options.newEmulator, X_OK) == 0 else {
            throw QEMUUpgradeError.refused("new QEMU \(options.newEmulator) is \(access(options.newEmulator, F_OK) == 0 ? "not executable" : "missing")")
        }
        let probe = try QEMUProbe.run(options.newEmulator, runDirectory: options.runDirectory, timeoutSeconds: options.timeoutSeconds)
        newVersion = probe.version
        report.newVersion = probe.version.description
        if let machine = cmd.machineType, !probe.machines.contains(machine) {
            throw QEMUUpgradeError.refused("new QEMU \(probe.version) does not support machine type \(machine)")
        }
        let missing = Set(cmd.deviceDrivers).subtracting(probe.deviceTypes)
        guard missing.isEmpty else { throw QEMUUpgradeError.refused("new QEMU \(probe.version) lacks device(s) \(missing.sorted().joined(separator: ", "))") }
        let virtType = cmd.values(of: "-accel").first == "kvm" ? "kvm" : "qemu"
        do { _ = try connection.domainCapabilities(emulator: options.newEmulator, machine: cmd.machineType, virtType: virtType) } catch {
            throw QEMUUpgradeError.refused("libvirt cannot drive \(options.newEmulator): \(error)")
        }
        guard let flags = LibvirtCapabilityCache.flags(for: options.newEmulator) else {
            throw QEMUUpgradeError.refused("libvirt has no cached capabilities for \(options.newEmulator) (it must probe the binary before it can adopt it)")
        }
        let auxShared = (cmd.values(of: "-machine").first ?? "").contains("aux-ram-share=on")
        let mode: QEMUHandoffMode = copy ? .copy : oldVersion.qemu.major >= 10 && probe.version.qemu.major >= 10 && auxShared ? .cprTransfer : .ignoreShared
        report.mode = mode.rawValue
        let daemon = try LibvirtDaemon.running(pidFile: options.libvirtdPidFile)
        record = QEMUHandoffRecord(domain: domain.name, uri: options.uri, statusFile: statusPath, monitorPath: monitorPath, oldPid: oldPid,
                                   oldEmulator: cmd.emulator, newEmulator: options.newEmulator, mode: mode, libvirtd: daemon,
                                   newCapabilityFlags: flags, updateDefinition: options.updateDefinition)
    }

    /// A copy holds guest RAM twice until the old QEMU is gone: refuse before the pause when
    /// neither the host nor the domain's memory cgroup has room, naming both figures.
    static func checkMemoryForSecondCopy(bytes: Int, pid: pid_t) throws {
        let available = (Host.readSmallFile("/proc/meminfo") ?? "").split(separator: "\n")
            .first { $0.hasPrefix("MemAvailable:") }.flatMap { Int($0.split(separator: " ", omittingEmptySubsequences: true)[1]) }.map { $0 << 10 } ?? 0
        guard available > bytes + (256 << 20) else {
            throw QEMUUpgradeError.refused("copying \(bytes >> 20) MiB of guest RAM needs a second copy, and the host has \(available >> 20) MiB available")
        }
        if let cg = try? CgroupMembership.of(pid: pid), let memory = cg.entries.first(where: { $0.controllers.split(separator: ",").contains("memory") }) {
            let dir = "/sys/fs/cgroup/memory\(memory.path)"
            if let limit = Host.readSmallFile(dir + "/memory.limit_in_bytes").flatMap({ Int($0.trimmingCharacters(in: .whitespacesAndNewlines)) }),
               let usage = Host.readSmallFile(dir + "/memory.usage_in_bytes").flatMap({ Int($0.trimmingCharacters(in: .whitespacesAndNewlines)) }),
               limit < Int.max / 2, usage + bytes > limit {
                throw QEMUUpgradeError.refused("copying \(bytes >> 20) MiB of guest RAM would exceed the domain's memory cgroup (\(usage >> 20) MiB used of \(limit >> 20) MiB)")
            }
        }
    }

    static func version(of binary: String) throws -> QEMUVersion {
        let out = try Self.capture(binary, ["--version"])
        guard let m = out.firstMatch(of: #/version (\d+)\.(\d+)\.(\d+)/#), let a = Int(m.1), let b = Int(m.2), let c = Int(m.3) else {
            throw QEMUUpgradeError.refused("\(binary) --version printed no QEMU version: \(out.split(separator: "\n").first ?? "")")
        }
        return QEMUVersion(major: a, minor: b, micro: c)
    }

    static func capture(_ binary: String, _ args: [String]) throws -> String {
        let (status, text) = try Spawn.run(binary, args)
        guard status == 0 else { throw QEMUUpgradeError.refused("\(binary) \(args.joined(separator: " ")) exited with status \(status): \(text.split(separator: "\n").last ?? "")") }
        return text
    }

    // MARK: - The sequence

    func log(_ phase: UpgradeJournal.Phase, note: String? = nil, durable: Bool? = nil) throws {
        func record(_ note: String?, durable: Bool?) throws {
            try journal.record(.init(phase: phase, atMonotonicNs: Host.monotonicNanoseconds(), vm: options.domain, oldPid: report.oldPid,
                                     newPid: report.newPid == 0 ? nil : report.newPid, note: note, context: inPause ? nil : self.record.json), durable: durable)
        }
        try record(note, durable: durable)
        options.onPhase?(phase)
        if let fault = options.fault {
            let libvirtd = self.record.libvirtd.pid ?? 0
            if fault.phase == phase, fault.action != .crash, fault.action != .sigkillController {
                // Evidence for the harness that the fault really fired, and on which process.
                let target = fault.action == .killNew ? report.newPid : fault.action == .killOld ? report.oldPid : libvirtd
                try record("injected \(fault) on pid \(target)", durable: false)
            }
            try fault.fire(at: phase, newPid: report.newPid, oldPid: report.oldPid, libvirtdPid: libvirtd, journalPath: journal.path)
        }
    }

    public func run() throws -> QEMUUpgradeReport {
        try QEMUHost.holdingHost(runDirectory: options.runDirectory, holdSignals: options.holdSignals) {
            try begin()
            return try proceed()
        }
    }

    /// Preflight, then the journal (one per upgrade) and its first entry. Nothing is paused.
    func begin() throws {
        try preflight()
        do {
            journal = try UpgradeJournal.forNewUpgrade(path: options.journalPath ?? "\(options.runDirectory)/journal-qemu-\(record.domain)-\(getpid())-\(Host.monotonicNanoseconds()).jsonl")
        } catch let e as UpgradeJournal.UnfinishedJournal {
            throw QEMUUpgradeError.refused("\(e)")
        }
        try log(.started)
    }

    /// What follows preflight, in the shared sequence's three steps: start the new QEMU (guest
    /// runs), the pause (migrate, verify, `cont`), finish (fence, libvirt's record). A single
    /// upgrade runs them back to back; a batch starts a wave of domains in parallel, then takes
    /// their pauses one at a time, so no pause shares the CPUs with another domain's QEMU starting.
    typealias Step = HandoffSequence.Step

    /// Everything after preflight: start, hand over, finish; or roll back / forward.
    func proceed() throws -> QEMUUpgradeReport {
        try sequence.run()
        return report
    }

    /// Runs one step (nothing once the sequence has finished, e.g. by an early roll forward); on a
    /// failure the sequence rolls back or forward, as what is left allows, and throws what happened.
    func perform(_ step: Step) throws { try sequence.perform(step) }

    /// Before the pause: libvirtd steps aside, the new QEMU starts with the old one's sockets,
    /// RAM and log, and is ready to receive.
    func startNewQEMU() throws {
        let oldPid = record.oldPid
        // Descriptors the new QEMU needs at the numbers its command line names.
        if record.mode != .copy { ramFD = try ProcessHandles.duplicate(fd: ramFDNumber, of: oldPid) }
        logFD = try ProcessHandles.duplicate(fd: 2, of: oldPid)  // the virtlogd pipe
        for socket in oldCommandLine.passedSockets {
            passedSockets[socket.fd] = try ProcessHandles.duplicate(fd: socket.fd, of: oldPid)
        }
        // libvirtd holds the old QEMU's monitor; it must let go before Baton can drive QMP,
        // and it must not see the old QEMU die. It adopts the new one when it starts again.
        if !libvirtdHeldByBatch {
            libvirtdStoppedAt = Host.monotonicNanoseconds()
            try record.libvirtd.stop()
        }
        try log(.prepared, note: "libvirtd stopped")
        oldMonitor = try QMPConnection(path: record.monitorPath, timeoutSeconds: 10)
        // Each listening socket the old QEMU got from libvirt gets a fresh twin at the same
        // path (atomic rename): clients connected to the old QEMU stay there, every new client
        // (libvirtd's monitor connection above all) reaches the new one. The old inode is kept
        // under a second name for a rollback. (Sharing one listening socket would let either
        // process accept libvirtd.)
        var descriptors: [Int32: Int32] = [:]
        for (number, fd) in passedSockets {
            if let path = UnixSocket.boundPath(of: fd.raw), FileManager.default.fileExists(atPath: path) {
                let kept = path + ".baton-old"
                unlink(kept)
                _ = try checkedCall("link(\(path) → \(kept))") { link(path, kept) }
                record.movedSockets[path] = kept
                try log(.prepared, note: "moving \(path)")
                var st = stat()
                let mode = lstat(kept, &st) == 0 ? st.st_mode & 0o7777 : 0o600
                let listener = try UnixListener(path: path)
                chmod(path, mode)  // as libvirt made it (a serial console may be shared with a group)
                movedListeners[path] = listener
                descriptors[number] = listener.fd.raw
            } else {
                descriptors[number] = fd.raw
            }
        }
        if case .memfd = oldCommandLine.ramBackends.first {
            ramFDNumber = (oldCommandLine.passedSockets.map(\.fd).max() ?? 2) + 1
        }
        if let ramFD { descriptors[ramFDNumber] = ramFD.raw }
        let incoming: QEMUCommandLine.Incoming
        let cprMain = "\(options.runDirectory)/\(record.domain)-main.sock", cprChannel = "\(options.runDirectory)/\(record.domain)-cpr.sock"
        switch record.mode {
        case .cprTransfer:
            unlink(cprMain); unlink(cprChannel)
            incoming = .cprTransfer(mainPath: cprMain, cprPath: cprChannel)
        case .ignoreShared, .copy: incoming = .deferred
        }
        let (newCommandLine, changes) = try oldCommandLine.translated(newEmulator: options.newEmulator, newVersion: newVersion,
                                                                      ramFD: ramFD == nil ? nil : ramFDNumber, incoming: incoming)
        report.argvChanges = changes
        let newPid = try QEMULauncher.launch(newCommandLine.arguments, descriptors: descriptors, output: logFD!.raw,
                                             intoCgroupsAndNamespaceOf: oldPid, launcher: options.launcher, runDirectory: options.runDirectory)
        report.newPid = newPid
        record.newPid = newPid
        try log(.newInstanceReady)
        switch record.mode {
        case .ignoreShared, .copy:
            newMonitor = try waitForMonitor(of: newPid)
            let caps = MigrationCapabilities(capabilities: [.init(capability: "x-ignore-shared", state: record.mode == .ignoreShared), .init(capability: "events", state: true)])
            try oldMonitor!.execute("migrate-set-capabilities", arguments: caps)
            try newMonitor!.execute("migrate-set-capabilities", arguments: caps)
            if record.mode == .copy {
                // QEMU's default bandwidth cap (128 MiB/s on 7.2) would make a same-host copy crawl.
                try oldMonitor!.execute("migrate-set-parameters", arguments: ["max-bandwidth": 100 << 30])
                // QEMU stops the guest for the final copy once it expects that to fit this limit.
                if let limit = options.maxPauseMs { try oldMonitor!.execute("migrate-set-parameters", arguments: ["downtime-limit": max(1, Int(limit.rounded(.up)))]) }
            }
            try newMonitor!.execute("migrate-incoming", arguments: ["uri": "unix:\(options.runDirectory)/\(record.domain)-migrate.sock"])
            try QEMUVerification.compareDevices(old: QEMUVerification.devices(of: oldMonitor!), new: newMonitor!)
        case .cprTransfer:
            // The new QEMU reads the CPR state before it opens its monitor; wait until it
            // listens on the cpr channel (a probing connect would be taken as the channel).
            let deadline = Date().addingTimeInterval(options.timeoutSeconds)
            while !UnixSocket.isListening(path: cprChannel) {
                guard Host.isAlive(newPid) else { throw QEMUUpgradeError.rolledBack("the new QEMU (pid \(newPid)) exited at start: \(QEMUHost.logTail(domain: record.domain))") }
                guard Date() < deadline else { throw QEMUUpgradeError.rolledBack("the new QEMU did not listen on its cpr channel within \(options.timeoutSeconds) s") }
                usleep(1_000)
            }
            // The destination's capabilities cannot be set before its monitor exists, so the
            // source's must match defaults: an earlier ignore-shared upgrade left x-ignore-shared
            // on in this process (cpr-transfer skips shared RAM by itself).
            try oldMonitor!.execute("migrate-set-capabilities", arguments: MigrationCapabilities(capabilities: [
                .init(capability: "x-ignore-shared", state: false), .init(capability: "events", state: true)]))
            try oldMonitor!.execute("migrate-set-parameters", arguments: ["mode": "cpr-transfer"])
            // Nothing hotplugs while libvirtd is stopped: the old device set holds until the pause.
            oldDevices = try QEMUVerification.devices(of: oldMonitor!)
        }
        if let ramFD {
            ramSample = try QEMUVerification.RAMSample(ram: ramFD, oldPid: oldPid, newPid: record.mode == .cprTransfer ? nil : newPid)
            if record.mode != .cprTransfer { try ramSample!.locateAndWarm(newPid: newPid) }
        }
    }

    struct MigrationCapabilities: Encodable {
        struct Capability: Encodable { let capability: String; let state: Bool }
        let capabilities: [Capability]
    }

    struct MigrateChannels: Encodable {
        struct Address: Encodable { let transport = "socket"; let type = "unix"; let path: String }
        struct Channel: Encodable {
            let channelType: String
            let addr: Address
            enum CodingKeys: String, CodingKey { case channelType = "channel-type", addr }
        }
        let channels: [Channel]
    }

    func waitForMonitor(of pid: pid_t) throws -> QMPConnection {
        // The old QEMU's monitor is held by this controller, so a connection to the path can
        // only be the new QEMU's (its twin listener).
        let deadline = Date().addingTimeInterval(options.timeoutSeconds)
        while true {
            guard Host.isAlive(pid) else { throw QEMUUpgradeError.rolledBack("the new QEMU (pid \(pid)) exited: \(QEMUHost.logTail(domain: record.domain))") }
            // A short greeting wait: if the new QEMU died, the connection lands in the backlog of
            // the twin listener this process still holds, and no greeting ever comes.
            if let m = try? QMPConnection(path: record.monitorPath, timeoutSeconds: 0.5, commandTimeoutSeconds: options.timeoutSeconds, greetingTimeoutSeconds: 2) { return m }
            guard Date() < deadline else { throw QEMUUpgradeError.rolledBack("the new QEMU's monitor did not answer within \(options.timeoutSeconds) s") }
        }
    }

    /// The pause: migrate (live: the guest stops only for the final device-state copy) and
    /// verify. The old QEMU could still take the guest back when it returns.
    func handOver() throws {
        let old = oldMonitor!
        let start = Host.monotonicNanoseconds()
        handOverStart = start
        inPause = true
        marks = PauseMarks(migrateIssued: Host.realtimeSeconds())
        try log(.paused, note: "migrate")
        switch record.mode {
        case .ignoreShared, .copy:
            try old.execute("migrate", arguments: ["uri": "unix:\(options.runDirectory)/\(record.domain)-migrate.sock"])
        case .cprTransfer:
            let main = MigrateChannels.Channel(channelType: "main", addr: .init(path: "\(options.runDirectory)/\(record.domain)-main.sock"))
            let cpr = MigrateChannels.Channel(channelType: "cpr", addr: .init(path: "\(options.runDirectory)/\(record.domain)-cpr.sock"))
            try old.execute("migrate", arguments: MigrateChannels(channels: [main, cpr]))
        }
        let deadline = Date().addingTimeInterval(options.timeoutSeconds)
        if let new = newMonitor {
            // The destination says when it has loaded everything (MIGRATION events): waiting for
            // that costs no round trips, and its word is the one that counts (precopy can complete
            // on the source while the destination still fails to load). The source's own figures
            // are read after the resume.
            let end = try new.waitForEvent("MIGRATION") { ["completed", "failed", "cancelled"].contains($0?["status"]?.string ?? "") }
            guard end.data?["status"]?.string == "completed" else {
                let info = (try? old.query("query-migrate", as: QEMUMigrationInfo.self)) ?? QEMUMigrationInfo(status: "failed", ram: nil, downtime: nil, errorDesc: nil)
                throw QEMUUpgradeError.rolledBack("the new QEMU could not load the migration (\(end.data?["status"]?.string ?? "?")): \(info.errorDesc ?? QEMUHost.logTail(domain: record.domain))")
            }
        } else {
            try awaitCPRDestination(old: old, deadline: deadline)
        }
        let new = newMonitor!
        stateLoaded = true
        marks.loaded = Host.realtimeSeconds()
        try log(.transferred)
        if let ramSample { try ramSample.compare(newPid: report.newPid) }
        report.ramPages = record.mode == .copy ? "copied" : "shared"
        report.verified = true
        let verified = Host.monotonicNanoseconds()
        verifiedAt = verified
        marks.verified = Host.realtimeSeconds()
        if let limit = options.maxPauseMs {
            // The guest stopped at the old QEMU's STOP event (wall-clock stamped by QEMU); past the
            // limit, cancel while the old QEMU can still take the guest back.
            let stoppedAt = old.events.last { $0.name == "STOP" }?.seconds
            let pausedMs = stoppedAt.map { (Host.realtimeSeconds() - $0) * 1000 } ?? Double(verified - start) / 1e6
            if pausedMs > limit {
                throw QEMUUpgradeError.rolledBack(String(format: "the guest had been paused %.2f ms when the new QEMU was ready, over --max-pause-ms %g: handoff cancelled, the domain stays on QEMU %@", pausedMs, limit, report.oldVersion))
            }
        }
    }

    /// cpr-transfer: the new QEMU opens its monitor once it has read the CPR state, and is
    /// paused (`-S`) once it has loaded the device state. Its status is polled (its migration
    /// events cannot be switched on before its monitor exists); the source is asked now and then
    /// whether the migration failed on its side.
    func awaitCPRDestination(old: QMPConnection, deadline: Date) throws {
        var polls = 0
        while true {
            if newMonitor == nil, Host.isAlive(report.newPid) {
                newMonitor = try? QMPConnection(path: record.monitorPath, timeoutSeconds: 0.05, commandTimeoutSeconds: options.timeoutSeconds)
                if let new = newMonitor {
                    // Its monitor opens after its devices exist and its RAM is mapped, while the
                    // device state still loads: check what can be checked meanwhile.
                    try QEMUVerification.compareDevices(old: oldDevices, new: new)
                    try ramSample?.locateAndWarm(newPid: report.newPid)
                }
            }
            if let new = newMonitor {
                let s = try new.query("query-status", as: QEMURunState.self)
                if s.status == "paused" || s.status == "running" { return }
            }
            guard Host.isAlive(report.newPid) else { throw QEMUUpgradeError.rolledBack("the new QEMU exited while loading the state: \(QEMUHost.logTail(domain: record.domain))") }
            if newMonitor == nil || polls % 10 == 9 {
                let info = try old.query("query-migrate", as: QEMUMigrationInfo.self)
                if ["failed", "cancelled"].contains(info.status ?? "") { throw QEMUUpgradeError.rolledBack("migration \(info.status ?? "?"): \(info.errorDesc ?? "no reason given")") }
            }
            guard Date() < deadline else { throw QEMUUpgradeError.rolledBack("the new QEMU did not load the state within \(options.timeoutSeconds) s") }
            polls += 1
            usleep(100)
        }
    }

    /// After `committing` (the point of no return: once the new QEMU runs the guest, the shared
    /// RAM moves on and the old process must never run again): `cont` on the new QEMU.
    func runNewQEMU() throws {
        pastPointOfNoReturn = true
        let old = oldMonitor!, new = newMonitor!
        let start = handOverStart
        // A new QEMU already dead was never told to run the guest: back is still safe. Once `cont`
        // is sent, a new QEMU that dies may have run it (a reply lost), and back is not.
        guard QEMURecovery.isQEMU(report.newPid, of: record.domain) else {
            throw QEMUUpgradeError.rolledBack("the new QEMU (pid \(report.newPid)) died before it was told to run the guest")
        }
        marks.committed = Host.realtimeSeconds()
        contSent = true
        try new.execute("cont")  // returns once the vCPUs run (QEMU emits RESUME first)
        let running = Host.monotonicNanoseconds()
        report.controllerPauseMs = Double(running - start) / 1e6
        inPause = false
        // The source's figures, read now that the guest runs (reading them also collects its
        // STOP event, which the pause did not wait to read).
        report.ramBytesMoved = (try? old.query("query-migrate", as: QEMUMigrationInfo.self))?.ram?.transferred ?? 0
        let stop = (try? old.waitForEvent("STOP"))?.seconds
        let resume = try? new.waitForEvent("RESUME").seconds
        if let stop, let resume, resume >= stop {
            report.pauseMs = (resume - stop) * 1000
            report.breakdown = marks.breakdown(stop: stop, resume: resume)
        } else { report.pauseMs = report.controllerPauseMs }
        try log(.committed)
        committed = true
    }

    /// After the new QEMU runs the guest: fence the old one, make libvirt's record true, and
    /// start libvirtd so it adopts the new process.
    func finishForward() throws {
        let vcpus = (try? newMonitor?.query("query-cpus-fast", as: [QEMUCPU].self)) ?? []
        releaseHandles()  // libvirtd must find the new QEMU's monitor free; the new QEMU holds its own sockets

        try QEMURecovery.fenceAndDescribe(record: record, newVCPUs: Dictionary(uniqueKeysWithValues: vcpus.map { ($0.cpuIndex, $0.threadId) }))
        if !libvirtdHeldByBatch { try completeAdoption() }
    }

    /// Closes everything this controller holds of either QEMU: monitors, twin listeners, passed
    /// sockets, the RAM and log descriptors.
    func releaseHandles() {
        oldMonitor = nil
        newMonitor = nil
        movedListeners.removeAll()
        passedSockets.removeAll()
        ramSample = nil
        ramFD = nil
        logFD = nil
    }

    /// libvirtd (started by this upgrade, or by the batch once for all) reports the domain
    /// running on the new QEMU; the persistent definition follows if asked.
    func completeAdoption() throws {
        try QEMURecovery.awaitAdoption(record: record)
        report.managementGapMs = libvirtdStoppedAt.map { Double(Host.monotonicNanoseconds() - $0) / 1e6 } ?? 0
        try log(.adopted)
        if options.updateDefinition { report.definitionUpdated = QEMURecovery.updateDefinition(record: record) }
        try log(.done)
    }
}

/// Instants (wall clock, QEMU's event clock) taken during the pause.
struct PauseMarks {
    var migrateIssued: Double
    var loaded = 0.0, verified = 0.0, committed = 0.0

    /// The phases between the old QEMU's STOP and the new one's RESUME: consecutive differences
    /// of the same clock, so they sum to the pause.
    func breakdown(stop: Double, resume: Double) -> QEMUUpgradeReport.Breakdown {
        // An instant can fall before STOP only if the clock stepped; clamp into the pause.
        let cuts = [loaded, verified, committed].map { min(max($0, stop), resume) }
        var b = QEMUUpgradeReport.Breakdown()
        b.loadMs = (cuts[0] - stop) * 1000
        b.verifyMs = (cuts[1] - cuts[0]) * 1000
        b.commitMs = (cuts[2] - cuts[1]) * 1000
        b.resumeMs = (resume - cuts[2]) * 1000
        b.liveMs = max(0, stop - migrateIssued) * 1000
        return b
    }
}

/// QEMU under libvirt as the shared sequence's hypervisor.
extension QEMUUpgrade: HandoffHypervisor {
    public func journal(_ phase: UpgradeJournal.Phase) throws { try log(phase) }

    public func startNewInstance() throws {
        try startNewQEMU()
        try log(.newInstanceReady)
    }

    public func pauseAndTransfer() throws { try handOver() }

    public func runNewInstance() throws { try runNewQEMU() }

    public func finish() throws { try finishForward() }

    public func situation(after error: Error, pastPointOfNoReturn: Bool) -> HandoffSituation {
        inPause = false  // every failure is asked about first: entries from here on carry the record again
        let oldAlive = QEMURecovery.isQEMU(report.oldPid, of: record.domain)
        let newAlive = report.newPid != 0 && QEMURecovery.isQEMU(report.newPid, of: record.domain)
        // A migrated-away old QEMU can still `cont`; a new one that loaded the whole state can run
        // the guest on its own; once `cont` was sent to it, it may have.
        return HandoffSituation(pastPointOfNoReturn: pastPointOfNoReturn, newMayHaveRunGuest: committed || contSent,
                                oldCanResume: oldAlive, newCanRun: newAlive && (stateLoaded || committed))
    }

    public func rollBack(after error: Error) -> Error {
        let observed = QEMURecovery.rollBack(record: record, oldMonitor: oldMonitor, newMonitor: newMonitor, startLibvirtd: false)
        // libvirtd must find the old QEMU's monitor free when it reconnects: let go of every
        // handle first (a held monitor accepts libvirtd's connection and stays silent).
        releaseHandles()
        if !libvirtdHeldByBatch { _ = try? record.libvirtd.start(uri: record.uri) }
        report.observedAfterRollback = observed
        report.rolledBack = true
        report.error = "\(error)"
        report.managementGapMs = libvirtdStoppedAt.map { Double(Host.monotonicNanoseconds() - $0) / 1e6 } ?? 0
        try? log(.rolledBack, note: "\(error); old QEMU \(observed)")
        // Say what was observed, not what should be true.
        switch error {
        case QEMUUpgradeError.integrity(let why): return QEMUUpgradeError.integrity("\(why) (old QEMU \(observed))")
        case QEMUUpgradeError.rolledBack(let why): return QEMUUpgradeError.rolledBack("\(why) (old QEMU \(observed))")
        default: return QEMUUpgradeError.rolledBack("\(error) (old QEMU \(observed))")
        }
    }

    public func rollForward(after error: Error) throws {
        report.error = "\(error)"
        if !pastPointOfNoReturn {
            // The old QEMU died after the new one had loaded the whole state: the new one holds
            // the only copy of the guest (the old side can no longer be compared).
            report.verified = false
            report.error = "the old QEMU died after the migration (\(error)): the new QEMU runs the guest, RAM samples not compared"
            try? log(.committing, note: "old QEMU gone after the migration: forward")
            pastPointOfNoReturn = true
        }
        guard !committed else {
            throw QEMUUpgradeError.rollForwardIncomplete("\(error); run `baton recover --journal \(journal.path)`")
        }
        // `cont` again (a lost reply, or never sent), then what a clean run does after it.
        contSent = true
        _ = try? newMonitor?.execute("cont")
        do { try finishForward() } catch {
            throw QEMUUpgradeError.rollForwardIncomplete("\(error); run `baton recover --journal \(journal.path)`")
        }
    }

    public func lost(after error: Error, situation: HandoffSituation) -> Error {
        report.error = "\(error)"
        if situation.newMayHaveRunGuest {
            let lost = QEMURecovery.lost(record: record, startLibvirtd: !libvirtdHeldByBatch)
            try? log(.done, note: "lost: the new QEMU died after running the guest")
            return lost
        }
        // The old QEMU died before the new one had the guest's whole state: put the host back as
        // it was (no new QEMU, the old sockets at their paths) and say so.
        _ = QEMURecovery.rollBack(record: record, oldMonitor: oldMonitor, newMonitor: newMonitor, startLibvirtd: false)
        releaseHandles()
        if !libvirtdHeldByBatch { _ = try? record.libvirtd.start(uri: record.uri) }
        let why = "the old QEMU (pid \(report.oldPid)) died (\(error)) before the new one had loaded the guest's state: the guest is lost"
        try? log(.rolledBack, note: "lost: \(why)")
        return QEMUUpgradeError.lost(why)
    }
}
