import BatonCore
import BatonSystem
import Foundation
import Glibc

/// What `baton upgrade` reports: one stable log line, and this object with `--json`.
public struct UpgradeReport: Codable, Sendable {
    public var vm: String
    public var transport: String
    public var downtimeMs: Double = 0
    public var pauseMs: Double = 0
    public var stateMs: Double = 0
    /// Exec in place: `stateMs` split at the new image's main() and its restored VM: state
    /// save + exec + loading the new image; decoding the state and rebuilding the KVM VM; until
    /// the controller saw the image ready. Nil for a two-process upgrade.
    public var execPhasesMs: ExecPhases?
    public struct ExecPhases: Codable, Sendable {
        public var execMs: Double
        public var restoreMs: Double
        public var readyMs: Double
    }
    public var ramMs: Double = 0
    public var verifyMs: Double = 0
    public var resumeMs: Double = 0
    /// The journal records written inside the pause (`paused`, `transferred`, `committing`; in
    /// place `paused` and `committing`; none is fsync'd).
    public var journalMs: Double = 0
    /// The transfer request around the agents' own timing (`ram`, `verify`): HTTP and JSON both
    /// ways, and the page-frame samples that say what the kernel did.
    public var controlMs: Double = 0
    public var ramBytes: UInt64 = 0
    public var pagesMoved = false
    public var pageDisposition = ""
    public var verified = false
    public var oldPid: Int32 = 0
    public var newPid: Int32 = 0
    public var rolledBack = false
    /// The handoff failed after the point of no return and the new instance runs the guest
    /// (adopted, or committed before the old one died): not a clean upgrade (`error` says why).
    public var rolledForward = false
    public var ramDigestAtPause: String?
    public var ramDigestBeforeResume: String?
    public var error: String?
    /// What the old instance decided differently from what was asked (gift refused by the
    /// kernel, streamed by pipe copy), one line each; the CLI prints them as notices.
    public var notices: [String] = []
    /// A journal write that failed after the point of no return (the upgrade went on).
    public var journalError: String?

    /// The downtime's named phases, in order (the service exports each; `baton bench` prints them).
    public var phasesMs: [(String, Double)] {
        [("pause", pauseMs), ("state", stateMs), ("ram", ramMs), ("verify", verifyMs), ("control", controlMs), ("journal", journalMs), ("resume", resumeMs)]
    }

    /// The downtime that none of `phasesMs` covers.
    public var unaccountedMs: Double { downtimeMs - phasesMs.reduce(0) { $0 + $1.1 } }

    /// The stable one-line summary.
    public var line: String {
        if rolledBack { return "baton: upgrade of \(vm) ROLLED BACK (old pid \(oldPid) kept the guest): \(error ?? "")" }
        return String(format: "baton: upgraded %@ pid %d → %d via %@: downtime %.2f ms (pause %.2f, state %.2f, ram %.2f, verify %.2f, resume %.2f), %@ RAM, pages %@, verified %@",
                      vm, oldPid, newPid, transport, downtimeMs, pauseMs, stateMs, ramMs, verifyMs, resumeMs,
                      "\(ramBytes >> 20)MiB", pageDisposition, verified ? "yes" : "no")
    }
}

public struct UpgradeOptions: Sendable {
    public var vmSocket: String
    public var binary: String
    public var transport = "auto"
    public var releaseSource = false
    /// An explicit gift on a kernel that refuses SPLICE_F_GIFT rolls back instead of copying.
    public var strict = false
    public var runDirectory: String = UpgradeOptions.defaultRunDirectory
    public var journalPath: String?
    public var readyTimeoutSeconds = 30.0
    public var stallTimeoutSeconds = 10.0
    /// Whole-RAM digest at pause and in the new instance before it resumes (costs downtime).
    public var digest = false
    /// Environment for the new instance (fault switches: BATON_FAULT, BATON_SYSCALL_FAULTS).
    public var newInstanceEnvironment: [String: String] = [:]
    /// A controller-side fault point (the harness's fault matrix).
    public var fault: ControllerFault?
    /// Told each phase as it is journaled (a progress line). Called inside the pause too: it
    /// must only store what it is given.
    public var onPhase: (@Sendable (UpgradeJournal.Phase) -> Void)?
    /// Who pauses and resumes the guest: the VMM's own socket (default) or libvirt. The
    /// sequence does not know which.
    public var control: (any HypervisorControl)?
    /// Keep the hypervisor's pid: the paused process exec's the new binary, which inherits
    /// guest RAM (memfd), the state (memfd) and the API socket. What libvirt's ch driver needs,
    /// since it knows a domain only by its VMM's pid.
    public var inPlace = false
    /// Told each notice (gift refused by the kernel, ...) as soon as the old instance decides
    /// it, before the pause: an operator learns of a fallback even if the upgrade then fails.
    public var onNotice: (@Sendable (String) -> Void)?
    /// The controller's and both instances' threads under SCHED_RR from just before the pause
    /// until the guest runs in the new instance (PauseBoost; `--no-pause-priority` turns it
    /// off). On by default: with two CPU-bound processes on this 2-CPU host it took the memfd
    /// downtime from 17.2 to 4.9 ms median (Docs/BENCHMARKS.md). Without root nothing changes.
    public var pausePriority = true

    public init(vmSocket: String, binary: String) {
        self.vmSocket = vmSocket
        self.binary = binary
    }

    public static var defaultRunDirectory: String {
        getuid() == 0 ? "/run/baton" : (ProcessInfo.processInfo.environment["XDG_RUNTIME_DIR"].map { $0 + "/baton" } ?? "/tmp/baton-\(getuid())")
    }
}

/// Faults the controller itself can inject at a phase boundary, by name:
/// `kill-new-after:PHASE` (SIGKILL the new instance), `kill-old-after:PHASE`,
/// `crash-controller-after:PHASE` (stop dead, as if SIGKILLed: no rollback; `baton recover` must finish),
/// `stall-after:PHASE` (2 s). The CLI and `baton serve` read it from BATON_CONTROLLER_FAULT.
public struct ControllerFault: Sendable, Equatable, CustomStringConvertible {
    public enum Action: String, Sendable {
        case killNew = "kill-new-after", killOld = "kill-old-after", crash = "crash-controller-after"
        /// QEMU upgrades: SIGKILL the host's libvirtd.
        case killLibvirtd = "kill-libvirtd-after"
        /// SIGKILL this process (the controller) itself: nothing after the phase runs, not even
        /// the error path that `crash-controller-after` still takes.
        case sigkillController = "sigkill-controller-after"
        /// Hold the sequence for 2 s after the phase (a slow step: what a drain must wait out).
        case stall = "stall-after"
    }
    public let action: Action
    public let phase: UpgradeJournal.Phase

    public init(action: Action, phase: UpgradeJournal.Phase) {
        self.action = action
        self.phase = phase
    }

    public init?(parsing text: String) {
        let parts = text.split(separator: ":").map(String.init)
        guard parts.count == 2, let a = Action(rawValue: parts[0]), let p = UpgradeJournal.Phase(rawValue: parts[1]) else { return nil }
        self.init(action: a, phase: p)
    }

    public var description: String { "\(action.rawValue):\(phase.rawValue)" }

    /// SIGKILL, then wait (bounded) until it is gone: "killed after PHASE" means dead by the
    /// time the sequence goes on, not dying while it does.
    static func killAndWait(_ pid: Int32) {
        guard pid > 0 else { return }
        kill(pid, SIGKILL)
        for _ in 0..<2000 where Host.isAlive(pid) { usleep(1_000) }
    }

    /// Fires if `phase` is this fault's phase: SIGKILL the new or old instance or libvirtd
    /// (pid 0: none), or stop dead as a crashed controller would.
    public func fire(at phase: UpgradeJournal.Phase, newPid: Int32, oldPid: Int32, libvirtdPid: Int32 = 0, journalPath: String) throws {
        guard phase == self.phase else { return }
        switch action {
        case .killNew: Self.killAndWait(newPid)
        case .killOld: Self.killAndWait(oldPid)
        case .killLibvirtd: Self.killAndWait(libvirtdPid)
        case .sigkillController: kill(getpid(), SIGKILL); pause()
        case .crash: throw ControllerCrashed(phase: phase, journalPath: journalPath)
        case .stall: usleep(2_000_000)
        }
    }
}

/// Thrown when `crash-controller-after` fires: everything after it is left as a crash leaves it.
public struct ControllerCrashed: Error, CustomStringConvertible {
    public let phase: UpgradeJournal.Phase
    public let journalPath: String
    public init(phase: UpgradeJournal.Phase, journalPath: String) {
        self.phase = phase
        self.journalPath = journalPath
    }
    public var description: String { "controller crashed (injected) after \(phase.rawValue); journal \(journalPath)" }
}

public struct UpgradeFailure: Error, CustomStringConvertible {
    public let description: String
    public let report: UpgradeReport
    /// Nothing was started or changed (preflight, or another upgrade of the same VM holds it).
    public var refused = false
    /// Rolled back because a checksum, digest or RAM sample differed (the VMM's typed code).
    public var integrity = false

    public enum Kind: String, Sendable { case refused, rolledBack, integrity, incomplete }
    /// What happened, for exit codes and metrics: never read from the description.
    public var kind: Kind {
        if refused { return .refused }
        if report.rolledBack { return integrity ? .integrity : .rolledBack }
        return .incomplete
    }
}

/// The in-place upgrade of one reference-VMM guest. Before `committing` is journaled, every
/// failure rolls back: the new instance is killed and the old one resumes, memory intact.
public final class UpgradeController {
    public let options: UpgradeOptions
    /// The old instance's agent socket: handoff endpoints and the instance's own status.
    let old: VMMSocketControl
    /// Pause and resume (the VMM socket, or libvirt for a libvirt domain).
    let control: any HypervisorControl
    /// The old instance's socket over one kept connection, opened before the pause: the
    /// requests inside it (pause, transfer, commit, exec) pay no connect and no new VMM thread.
    let pauseClient: VMMClient
    /// Pauses through `pauseClient` unless libvirt pauses.
    let pauseControl: any HypervisorControl
    var report: UpgradeReport
    var journal: UpgradeJournal?
    var childPid: pid_t?
    // The two-process handoff's progress (HandoffHypervisor below).
    var agentSocket = ""
    var expectVCPUs: Int?
    var prepared = false
    var paused = false
    var pauseStart: UInt64 = 0
    /// When the transfer's answer arrived (the journal's next records are timed from here).
    var transferEnd: UInt64 = 0
    /// The new instance answered `handoff.commit`: it owns the guest from here.
    var commitAcknowledged = false
    /// The pause-length priority raise (restored after the resume and on every way out).
    let pauseBoost = PauseBoost()

    public init(options: UpgradeOptions) {
        var options = options
        // The socket's real path: a new instance must listen where the VM's socket really is,
        // not replace a symlink that names it.
        if let real = realpath(options.vmSocket, nil) {
            options.vmSocket = String(cString: real)
            free(real)
        }
        self.options = options
        old = VMMSocketControl(socketPath: options.vmSocket)
        control = options.control ?? old
        pauseClient = old.client.keepingConnection()
        pauseControl = options.control ?? VMMSocketControl(client: pauseClient)
        report = UpgradeReport(vm: options.control?.identity ?? options.vmSocket, transport: options.transport)
    }

    /// Journals `phase`. Up to and including `committing` a failed write throws, so the upgrade
    /// rolls back before the point of no return (recovery could not know otherwise). After it
    /// the upgrade must go on: the failure is kept in the report and the journal's last
    /// word stays `committing`, which recovery finishes forward.
    func log(_ phase: UpgradeJournal.Phase, note: String? = nil, inPlaceGeneration: Int? = nil) throws {
        let beforeNoReturn = ![.committed, .resumed, .done, .adopted].contains(phase)
        do {
            try journal?.record(.init(phase: phase, atMonotonicNs: Host.monotonicNanoseconds(), vm: options.vmSocket,
                                      oldPid: report.oldPid, newPid: report.newPid == 0 ? nil : report.newPid, note: note,
                                      inPlaceGeneration: inPlaceGeneration))
        } catch where !beforeNoReturn {
            report.journalError = "journal \(journal?.path ?? ""): \(phase.rawValue) not recorded: \(error)"
        }
        options.onPhase?(phase)
        try options.fault?.fire(at: phase, newPid: report.newPid, oldPid: report.oldPid, journalPath: journal?.path ?? "")
    }

    public func run() throws -> UpgradeReport {
        // One upgrade per VM (its socket's real identity), whoever runs it: CLI or service.
        let lock: Int32
        do { lock = try VMLock.acquire(vmSocket: options.vmSocket) } catch let held as VMLock.Held {
            throw UpgradeFailure(description: "refused: \(held)", report: report, refused: true)
        } catch {
            throw UpgradeFailure(description: "cannot reach the VM at \(options.vmSocket): \(error)", report: report)
        }
        defer { close(lock) }
        defer { pauseBoost.restore() }  // every path out: rolled back, forward, or failed
        if options.inPlace { return try runInPlace() }
        do { try PrivateDirectory.make(options.runDirectory) } catch {
            throw UpgradeFailure(description: "run directory \(error); nothing was changed", report: report, refused: true)
        }
        // One journal per upgrade: a fresh file by default (pids are reused), and a given one
        // only if it holds no unfinished upgrade.
        do {
            journal = try UpgradeJournal.forNewUpgrade(path: options.journalPath ?? "\(options.runDirectory)/journal-\(getpid())-\(Host.monotonicNanoseconds()).jsonl")
        } catch {
            throw UpgradeFailure(description: "\(error)", report: report, refused: true)
        }
        // Preflight: nothing is started or paused until these hold.
        guard access(options.binary, X_OK) == 0 else {
            throw UpgradeFailure(description: "new binary \(options.binary) is \(access(options.binary, F_OK) == 0 ? "not executable" : "missing"); nothing was changed", report: report, refused: true)
        }
        let before: VMStatus
        do {
            before = try old.client.status()
        } catch {
            throw UpgradeFailure(description: "cannot reach the VM at \(options.vmSocket): \(error)", report: report)
        }
        guard before.state == .running else {
            throw UpgradeFailure(description: "the VM at \(options.vmSocket) is \(before.state.rawValue), not Running; nothing was changed", report: report, refused: true)
        }
        report.oldPid = before.pid
        report.ramBytes = UInt64(before.ramBytes)
        try checkMemory(ramBytes: before.ramBytes, ramShared: before.ramShared)
        try log(.started)

        agentSocket = "\(options.runDirectory)/agent-\(before.pid)-\(getpid()).sock"
        expectVCPUs = before.backend == "kvm" ? before.vcpus : nil
        try HandoffSequence(self).run()
        return report
    }
    /// Whether the old instance is dead, not just slow: a SIGKILLed process stays visible for
    /// a moment while the kernel tears it down, and rolling back then would kill the new
    /// instance — the only one left holding the guest. So while the old instance neither
    /// answers nor has vanished, wait (bounded) for one or the other.
    func oldInstanceGone() -> Bool {
        let deadline = Date().addingTimeInterval(5)
        while Date() < deadline {
            if !Host.isAlive(report.oldPid) { return true }
            if (try? VMMClient(socketPath: options.vmSocket, timeoutSeconds: 0.5).expectOK("GET", BatonVMMAPI.ping)) != nil { return false }
            usleep(20_000)
        }
        return !Host.isAlive(report.oldPid)
    }

    /// The old instance died after the pause. With memfd-backed RAM the new instance already
    /// holds guest RAM and the state saved at the pause: tell it to adopt them. Otherwise the
    /// pages that had not left the old process died with it, and the VM is lost.
    func rollForwardAfterOldDeath(cause: Error) throws {
        try? log(.committing, note: "old instance died after the pause: rolling forward")
        let staging = VMMClient(socketPath: options.vmSocket + ".incoming-\(report.newPid)", timeoutSeconds: 20)
        do {
            // The new instance notices the death on its own clock: ask until it holds the orphan
            // (bounded), or until it is plainly gone.
            var attempt = 0
            while true {
                do {
                    try staging.expectOK("PUT", BatonVMMAPI.adopt)
                    break
                } catch {
                    // It committed meanwhile (the commit reached it before the old instance died).
                    if newInstanceServes() { break }
                    attempt += 1
                    if attempt >= 300 || !Host.isAlive(report.newPid) { throw error }
                    usleep(20_000)
                }
            }
            let after = try waitForNewInstance()
            report.downtimeMs = 0  // not a clean handoff: no downtime figure
            report.verified = false
            report.error = "the old instance died after the pause (\(cause)); the new instance adopted the guest from its memfds"
            report.rolledForward = true
            report.ramDigestBeforeResume = after.ramDigestBeforeResume
            try? log(.committed, note: "rolled forward by adoption")
            try? log(.done)
            releaseNewInstance()
        } catch {
            throw declareLost("the old instance died after the pause and its guest RAM was not held elsewhere (\(cause)); adoption: \(error)")
        }
    }

    /// Neither instance holds the guest: the new one is stopped, the loss journaled and reported.
    func declareLost(_ why: String) -> UpgradeFailure {
        if let childPid { kill(childPid, SIGKILL); var st: Int32 = 0; waitpid(childPid, &st, 0) }
        self.childPid = nil
        report.error = "LOST: \(why)"
        try? log(.rolledBack, note: report.error)
        return UpgradeFailure(description: report.error!, report: report)
    }

    /// The exec-in-place upgrade: pause (through the given control), exec, resume.
    func runInPlace() throws -> UpgradeReport {
        report.transport = "exec-in-place"
        guard access(options.binary, X_OK) == 0 else {
            throw UpgradeFailure(description: "new binary \(options.binary) is \(access(options.binary, F_OK) == 0 ? "not executable" : "missing"); nothing was changed", report: report, refused: true)
        }
        let before: VMStatus
        do { before = try old.client.status() } catch {
            throw UpgradeFailure(description: "cannot reach the VM at \(options.vmSocket): \(error)", report: report)
        }
        guard before.state == .running else {
            throw UpgradeFailure(description: "the VM at \(options.vmSocket) is \(before.state.rawValue), not Running; nothing was changed", report: report, refused: true)
        }
        report.oldPid = before.pid
        report.ramBytes = UInt64(before.ramBytes)
        // After the exec there is no going back, so the new binary runs once first, outside the
        // pause: a build that cannot even start never replaces the running one.
        let (probeStatus, probeText) = try Spawn.run(options.binary, ["--version"], timeoutSeconds: min(options.readyTimeoutSeconds, 10))
        guard probeStatus == 0, probeText.contains("batonvmm") else {
            throw UpgradeFailure(description: "new binary \(options.binary) failed its --version probe (status \(probeStatus)): \(probeText.split(separator: "\n").first ?? ""); nothing was changed", report: report, refused: true)
        }
        // A journal like the two-process path's: a controller killed from here on leaves one
        // that `baton recover` finishes (resume whichever image holds the VM).
        do {
            try PrivateDirectory.make(options.runDirectory)
            journal = try UpgradeJournal.forNewUpgrade(path: options.journalPath ?? "\(options.runDirectory)/journal-inplace-\(getpid())-\(Host.monotonicNanoseconds()).jsonl")
        } catch {
            throw UpgradeFailure(description: "\(error); nothing was changed", report: report, refused: true)
        }
        try log(.started, inPlaceGeneration: before.execGeneration)
        // Outside the pause: the old image's page tables for guest RAM, which the exec would
        // otherwise tear down inside it. Best effort: an image without the call only costs time.
        _ = try? old.client.expectOK("PUT", BatonVMMAPI.execPrepare)
        // The scheduling policy survives the exec: the new image starts under it too.
        if options.pausePriority { raisePausePriority([before.pid]) }
        try openPauseConnection()
        let pauseStart = Host.monotonicNanoseconds()
        try pauseControl.pause()
        report.pauseMs = Double(Host.monotonicNanoseconds() - pauseStart) / 1e6
        do {
            let journalStart = Host.monotonicNanoseconds()
            try log(.paused)
            // The exec is the point of no return: from here the new image may hold the VM.
            try log(.committing)
            let execStart = Host.monotonicNanoseconds()
            report.journalMs = Double(execStart - journalStart) / 1e6
            defer { pauseClient.closeKeptConnection() }  // the exec closes the old image's end; a refusal leaves it idle
            try pauseClient.expectOK("PUT", BatonVMMAPI.exec, body: ExecRequest(binary: options.binary))
            // Same socket, same pid, new image: wait until it has restored the VM (paused). A status
            // request sent while the image is loading waits in the inherited listener's backlog
            // and is answered the moment the new image serves, so only an answer from the old
            // image (still exec'ing) or a failed request waits before asking again.
            var after: VMStatus?
            let deadline = Date().addingTimeInterval(options.readyTimeoutSeconds)
            while Date() < deadline {
                if let s = try? old.client.status() {
                    if s.execGeneration > before.execGeneration && s.state == .paused { after = s; break }
                    if let why = s.lastExecError, s.execGeneration == before.execGeneration { throw VMMClient.Failure(description: why) }
                } else if !Host.isAlive(before.pid) {
                    throw VMMClient.Failure(description: "the VMM process (pid \(before.pid)) exited after the exec")
                }
                usleep(200)
            }
            guard let after else { throw VMMClient.Failure(description: "the new image did not come up within \(options.readyTimeoutSeconds) s") }
            guard after.pid == before.pid else { throw VMMClient.Failure(description: "pid changed from \(before.pid) to \(after.pid)") }
            let readyAt = Host.monotonicNanoseconds()
            report.stateMs = Double(readyAt - execStart) / 1e6  // state save + exec + restore
            if let started = after.imageStartedAtMonotonicNs, let restored = after.restoredAtMonotonicNs, execStart <= started, started <= restored, restored <= readyAt {
                report.execPhasesMs = .init(execMs: Double(started - execStart) / 1e6, restoreMs: Double(restored - started) / 1e6,
                                            readyMs: Double(readyAt - restored) / 1e6)
            }
            let resumeStart = Host.monotonicNanoseconds()
            try control.resume()
            let end = Host.monotonicNanoseconds()
            report.resumeMs = Double(end - resumeStart) / 1e6
            report.downtimeMs = Double(end - pauseStart) / 1e6
            pauseBoost.restore()
            report.newPid = after.pid
            report.verified = true  // the state region's checksum held and the restore succeeded; RAM never moved
            report.pageDisposition = "shared"
            // Journaled (fsync'd) after the resume, as in the two-process path: a controller that
            // dies before it leaves `committing`, from which recovery resumes whichever image
            // holds the VM, so the fsync need not sit inside the pause.
            try log(.committed)
            try log(.resumed)
            try log(.done)
            return report
        } catch let crash as ControllerCrashed {
            throw crash
        } catch {
            // Say what is true now, observed, not what should be: the old image (exec refused or
            // never sent), the new one (it came up, a later step failed), or nobody.
            switch Self.observeInPlace(old, generationBefore: before.execGeneration, pid: before.pid) {
            case .image(let generation, let paused):
                if paused { try? control.resume() }
                let which = generation > before.execGeneration ? "the new image" : "the old image"
                report.rolledBack = generation == before.execGeneration
                report.error = "\(error)"
                try? log(report.rolledBack ? .rolledBack : .done, note: "\(error); \(which) runs the VM")
                throw UpgradeFailure(description: "\(error); \(report.rolledBack ? "rolled back" : "rolled forward"): the VM runs in \(which) (pid \(report.oldPid), observed)", report: report)
            case .gone:
                report.error = "LOST: \(error); the VMM process (pid \(before.pid)) is gone: the new image died after the exec"
                try? log(.rolledBack, note: report.error)
                throw UpgradeFailure(description: report.error!, report: report)
            }
        }
    }

    enum InPlaceObservation { case image(generation: Int, paused: Bool), gone }

    /// Who holds an exec-in-place VM now: the process's image generation and whether it is
    /// paused (waiting up to 10 s for an exec under way to finish), or gone.
    static func observeInPlace(_ control: VMMSocketControl, generationBefore: Int, pid: Int32) -> InPlaceObservation {
        for _ in 0..<1000 {
            if let s = try? control.client.status(), s.state == .paused || s.state == .running {
                return .image(generation: s.execGeneration, paused: s.state == .paused)
            }
            if !Host.isAlive(pid) { return .gone }
            usleep(10_000)
        }
        return Host.isAlive(pid) ? .image(generation: generationBefore, paused: false) : .gone
    }

    /// A transport that copies guest RAM holds it twice until commit (the new instance's copy,
    /// pre-faulted before the pause, beside the old one's). Refused before anything starts when
    /// the new instance's cgroup or the host cannot hold that copy; memfd shares the pages and
    /// --release-source frees them as they go, so neither needs the room.
    func checkMemory(ramBytes: Int, ramShared: Bool) throws {
        let copies = !options.releaseSource && (options.transport == "gift" || options.transport == "copy" || (options.transport == "auto" && !ramShared))
        guard copies else { return }
        let headroom = MemoryHeadroom.of(pid: getpid())  // the new instance starts in this process's cgroups
        let needed = ramBytes + (64 << 20)  // its RAM, plus room for the process itself
        guard headroom.availableBytes >= needed else {
            throw UpgradeFailure(description: "refused: transport \(options.transport) needs a second copy of the guest's RAM (\(ramBytes >> 20) MiB + 64 MiB for the new instance), but \(headroom); use --transport memfd (shared RAM) or --release-source; nothing was changed",
                                 report: report, refused: true)
        }
    }

    /// PauseBoost for the pause; a process the kernel would not raise (a VMM under libvirt's ch
    /// driver, whose cgroup grants no real-time runtime) is told as a notice, before the pause.
    func raisePausePriority(_ pids: [pid_t]) {
        pauseBoost.raise(pids)
        for refusal in pauseBoost.refusals {
            let notice = "pause priority not raised for \(refusal)"
            report.notices.append(notice)
            options.onNotice?(notice)
        }
    }

    /// Opens the kept connection with a ping, outside the pause: the VMM's thread for it is then
    /// running when the pause request arrives.
    func openPauseConnection() throws {
        try pauseClient.expectOK("GET", BatonVMMAPI.ping)
    }

    /// The new instance runs the guest now and outlives this upgrade: nobody waits for it here,
    /// so a long-running parent (`baton serve`) reaps it when it exits.
    func releaseNewInstance() {
        if let childPid { ChildReaper.release(childPid) }
        childPid = nil
    }

    func rollBack(prepared: Bool, paused: Bool) {
        if prepared { _ = try? old.client.request("PUT", BatonVMMAPI.abandon) }
        if let childPid {
            kill(childPid, SIGKILL)
            var status: Int32 = 0
            waitpid(childPid, &status, 0)
        }
        if paused { try? control.resume() }
    }

    /// Starts the new binary as a new instance and waits until its agent socket accepts,
    /// or fails with the reason (missing, crashing, exiting at once, too slow).
    func spawnNewInstance() throws {
        let logPath = "\(options.runDirectory)/batonvmm-new-\(getpid()).log"
        var args = ["--incoming", agentSocket, "--api-socket", "path=\(options.vmSocket)"]
        if let expectVCPUs { args += ["--expect-vcpus", "\(expectVCPUs)"] }
        if options.digest { args.append("--digest-before-resume") }
        let pid = try Spawn.detached(options.binary, args, logPath: logPath, environment: options.newInstanceEnvironment)
        childPid = pid
        report.newPid = pid
        let deadline = Date().addingTimeInterval(options.readyTimeoutSeconds)
        while !FileManager.default.fileExists(atPath: agentSocket) {
            if let status = Spawn.exitStatus(pid) {
                childPid = nil
                let tail = (try? String(contentsOfFile: logPath, encoding: .utf8))?.split(separator: "\n").last.map(String.init) ?? ""
                throw VMMClient.Failure(description: "new binary \(options.binary) exited with status \(status) before it was ready\(tail.isEmpty ? "" : ": \(tail)")")
            }
            if Date() > deadline { throw VMMClient.Failure(description: "new binary \(options.binary) was not ready within \(options.readyTimeoutSeconds) s") }
            usleep(2_000)
        }
    }

    /// Whether the new instance answers on the VM's socket (it renames its API onto it only once
    /// it committed and its vCPUs run).
    func newInstanceServes() -> Bool {
        (try? VMMClient(socketPath: options.vmSocket, timeoutSeconds: 0.5).status())?.pid == report.newPid
    }

    /// After commit: the VM socket path is taken over by the new instance once its vCPUs run.
    func waitForNewInstance() throws -> VMStatus {
        let deadline = Date().addingTimeInterval(options.readyTimeoutSeconds)
        while Date() < deadline {
            if let s = try? old.client.status(), s.pid == report.newPid, s.state == .running {
                return s
            }
            usleep(500)
        }
        throw VMMClient.Failure(description: "the new instance (pid \(report.newPid)) did not take over \(options.vmSocket)")
    }
}

/// batonvmm's two-process handoff as the shared sequence's hypervisor: a new batonvmm process,
/// the agents (driven through the old instance's API), the VM socket taken over by the new one.
extension UpgradeController: HandoffHypervisor {
    public func journal(_ phase: UpgradeJournal.Phase) throws { try log(phase) }

    public func startNewInstance() throws {
        try spawnNewInstance()
        try log(.newInstanceReady)
        let prepareReply = try old.client.expectOK("PUT", BatonVMMAPI.prepare, body: HandoffPrepareRequest(
            agentSocket: agentSocket, transport: options.transport, releaseSource: options.releaseSource,
            stallTimeoutSeconds: options.stallTimeoutSeconds, strict: options.strict))
        report.notices = try prepareReply.decode(HandoffPrepared.self).notices
        for notice in report.notices { options.onNotice?(notice) }
        prepared = true
        // The transfer's answer is decoded inside the pause: warm its JSON path now (warmUpSample).
        _ = try? JSONDecoder().decode(HandoffTransferred.self, from: JSONEncoder().encode(HandoffTransferred.warmUpSample))
        try log(.prepared)
    }

    public func pauseAndTransfer() throws {
        if options.pausePriority { raisePausePriority([report.oldPid, report.newPid]) }
        try openPauseConnection()
        pauseStart = Host.monotonicNanoseconds()
        try pauseControl.pause()
        paused = true
        let pausedAt = Host.monotonicNanoseconds()
        report.pauseMs = Double(pausedAt - pauseStart) / 1e6
        try log(.paused)
        let transferStart = Host.monotonicNanoseconds()
        report.journalMs = Double(transferStart - pausedAt) / 1e6
        let outcome = try pauseClient.expectOK("PUT", BatonVMMAPI.transfer + (options.digest ? "?digest=1" : "")).decode(HandoffTransferred.self)
        transferEnd = Host.monotonicNanoseconds()
        report.stateMs = outcome.stateMs
        // The state save is counted once, as `state`: taken out of the request that did it (the
        // pause, or else this transfer, whose remainder is `control`).
        let savedAtPause = outcome.stateSavedAtPause == true
        if savedAtPause { report.pauseMs = max(0, report.pauseMs - outcome.stateMs) }
        report.controlMs = max(0, Double(transferEnd - transferStart) / 1e6 - outcome.report.transferAndVerifySeconds * 1000
                                  - (savedAtPause ? 0 : outcome.stateMs))
        report.ramMs = outcome.report.sendSeconds * 1000
        report.verifyMs = (outcome.report.transferAndVerifySeconds - outcome.report.sendSeconds) * 1000
        report.verified = outcome.report.verified
        let ram = outcome.report.regions.first { $0.id == 0 }
        report.transport = ram?.transport ?? options.transport
        report.pageDisposition = ram?.pages.rawValue ?? ""
        report.pagesMoved = ram?.pages == .moved
        report.ramDigestAtPause = outcome.ramDigestAtPause
        try log(.transferred)
    }

    public func runNewInstance() throws {
        let commitStart = Host.monotonicNanoseconds()
        report.journalMs += Double(commitStart - transferEnd) / 1e6  // `transferred` and `committing`
        try pauseClient.expectOK("PUT", BatonVMMAPI.commit)
        pauseClient.closeKeptConnection()  // the old instance exits now
        commitAcknowledged = true
        try log(.committed)
        let after = try waitForNewInstance()
        report.resumeMs = Double(after.startedAtMonotonicNs &- commitStart) / 1e6
        report.downtimeMs = Double(after.startedAtMonotonicNs &- pauseStart) / 1e6
        report.ramDigestBeforeResume = after.ramDigestBeforeResume
        pauseBoost.restore()
        try log(.resumed)
    }

    public func finish() throws {
        try log(.done)
        releaseNewInstance()
    }

    public func situation(after error: Error, pastPointOfNoReturn: Bool) -> HandoffSituation {
        // A paused old instance that does not answer may be dying: wait for one or the other.
        let oldGone = paused ? oldInstanceGone() : !Host.isAlive(report.oldPid)
        let newAlive = childPid != nil && Host.isAlive(report.newPid)
        // The new instance may serve the VM's socket already: it committed, whatever the old one
        // managed to answer.
        let newServes = newAlive && !commitAcknowledged && pastPointOfNoReturn && newInstanceServes()
        // Without the old instance's commit the new one runs the guest only by adopting what an
        // old instance that died left in memfds (it answers whether it holds that).
        return HandoffSituation(pastPointOfNoReturn: pastPointOfNoReturn, newMayHaveRunGuest: commitAcknowledged || newServes,
                                oldCanResume: !oldGone && !newServes, newCanRun: newAlive && (commitAcknowledged || newServes || (paused && oldGone)))
    }

    public func rollBack(after error: Error) -> Error {
        rollBack(prepared: prepared, paused: paused)
        report.error = "\(error)"
        // Said only when seen: the old instance answers and runs the guest.
        let observed = (try? old.pid()) == report.oldPid ? ((try? old.state()) ?? "unreachable") : "gone"
        report.rolledBack = observed == "Running"
        try? log(.rolledBack, note: "\(error); old instance observed \(observed)")
        if !report.rolledBack {
            return UpgradeFailure(description: "\(error); rollback attempted, but the old instance (pid \(report.oldPid)) is observed \(observed)", report: report)
        }
        return UpgradeFailure(description: "\(error); rolled back, the old instance (pid \(report.oldPid)) keeps running the guest (observed)", report: report,
                              integrity: (error as? VMMClient.Failure)?.code == .integrity)
    }

    public func rollForward(after error: Error) throws {
        if !commitAcknowledged, newInstanceServes() {
            // The old instance died inside the commit, after the new one committed: its answer
            // was lost with it, but the new instance runs the guest.
            let after = try waitForNewInstance()
            report.error = "the old instance died during the commit (\(error)); the new instance had committed and runs the guest"
            report.rolledForward = true
            report.ramDigestBeforeResume = after.ramDigestBeforeResume
            try? log(.committed, note: "the new instance serves the VM: committed before the old instance died")
            try? log(.resumed)
            try? log(.done)
            releaseNewInstance()
            return
        }
        if commitAcknowledged {
            // Past commit the new instance owns the guest: never resume the old one.
            releaseNewInstance()
            throw UpgradeFailure(description: "committed, but the new instance did not report running: \(error); run `baton recover --journal \(journal!.path)`", report: report)
        }
        try rollForwardAfterOldDeath(cause: error)
    }

    public func lost(after error: Error, situation: HandoffSituation) -> Error {
        if situation.newMayHaveRunGuest {
            return declareLost("the new instance (pid \(report.newPid)) died after it was committed (\(error)); the old one had handed the guest over")
        }
        return declareLost("the old instance (pid \(report.oldPid)) is gone (\(error)) and the new one does not hold the guest")
    }
}
