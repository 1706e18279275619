import ArgumentParser
import BatonConfiguration
import BatonController
import BatonLibvirt
import BatonQEMU
import BatonSystem
import Foundation
import Glibc

struct UpgradeCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "upgrade",
        abstract: "Upgrade a running batonvmm in place to a new binary, rolling back on any failure before commit.")

    @Option(help: "The VM's control socket (batonvmm --control / --api-socket path=).")
    var vm: String?

    @Option(name: .customLong("domain"), help: "A libvirt domain (name or UUID) instead of --vm: a QEMU domain, or one carrying Baton's <baton:handoff agent=...> metadata. Repeat it to upgrade several QEMU domains as one batch.")
    var domains: [String] = []

    @Flag(help: "Every stale QEMU domain of --connect (its process runs a binary no longer at its emulator path; with --binary: every domain not running that binary), as one batch.")
    var all = false

    @Option(name: .customLong("parallel"), help: "Batches: at most this many handoffs at a time (each its own pause). Default: [upgrade] parallel.")
    var parallelOption: Int?

    @Option(name: .customLong("max-pause-ms"), help: "QEMU domains: cancel a handoff whose pause would exceed this many milliseconds (the domain stays on the old QEMU); 0: no limit. Default: [upgrade] max_pause_ms.")
    var maxPauseOption: Double?

    @OptionGroup var config: ConfigFileOption

    @Option(name: .customLong("connect"), help: "libvirt connection URI for --domain and --all. Default: [upgrade] libvirt_uri.")
    var connectOption: String?

    @Option(help: "The new hypervisor binary: batonvmm, or for a QEMU domain the new qemu-system-x86_64 (default for QEMU: the binary now installed at the domain's emulator path).")
    var binary: String?

    @Flag(name: .customLong("update-definition"), inversion: .prefixedNo, help: "QEMU domains: also point the persistent definition's <emulator> at --binary (the next cold boot uses it). Default: [upgrade] update_definition.")
    var updateDefinitionFlag: Bool?

    @Flag(help: "QEMU domains with private RAM: copy it through QEMU's migration stream (a pause of seconds, two copies of RAM for a while) instead of refusing.")
    var allowCopy = false

    @Option(name: .customLong("timeout"), help: "Give up waiting for any one step (new instance ready, QEMU start, migration, libvirtd) after this many seconds. Default: [upgrade] timeout_seconds.")
    var timeoutOption: Double?

    @Option(name: .customLong("transport"), help: "gift | memfd | copy | auto. Default: [upgrade] transport.")
    var transportOption: String?

    @Flag(name: .customLong("release-source"), inversion: .prefixedNo, help: "Free the old instance's RAM chunk by chunk as the new one confirms it (gift): RAM + window instead of 2× RAM. Default: [upgrade] release_source.")
    var releaseSourceFlag: Bool?

    @Flag(help: "With --transport gift on a kernel that refuses vmsplice(SPLICE_F_GIFT): roll back before the pause instead of streaming by pipe copy.")
    var strict = false

    @Flag(help: "Keep the hypervisor's pid: exec the new binary in the paused process (needed under libvirt's ch driver).")
    var inPlace = false

    @Flag(name: .customLong("digest"), inversion: .prefixedNo, help: "Digest all guest RAM at pause and in the new instance before it resumes (adds downtime). Default: [upgrade] digest.")
    var digestFlag: Bool?

    @Flag(inversion: .prefixedNo, help: "batonvmm (two processes or in place): put the controller's thread and both instances' threads under SCHED_RR from just before the pause until the guest runs again, so CPU-bound work on the host does not stretch the pause (needs root, else nothing changes; vCPU threads never run the guest real-time; a controller killed inside the pause leaves the instances' service threads real-time).")
    var pausePriority = true

    @Option(help: "Crash-safe journal path (default: in the run directory).")
    var journal: String?

    @Option(name: .customLong("run-directory"), help: "Run directory for agent sockets, logs and journals (0700). Default: [upgrade] run_directory.")
    var runDirectoryOption: String?

    @Flag(help: "Print the report as one JSON object.")
    var json = false

    @Option(help: "Submit to `baton serve` at this socket instead of running here (one upgrade per VM at a time).")
    var service: String?

    // Effective settings: the flag, else the configuration file, else the default.
    var file: BatonConfiguration { CLIConfiguration.current }
    var connect: String { connectOption ?? file.libvirtURI }
    var parallel: Int { parallelOption ?? file.parallel }
    var maxPauseMs: Double? { maxPauseOption.map { $0 == 0 ? nil : $0 } ?? file.maxPauseMs }
    var updateDefinition: Bool { updateDefinitionFlag ?? file.updateDefinition }
    var timeout: Double { timeoutOption ?? file.timeoutSeconds }
    var transport: String { transportOption ?? file.transport }
    var releaseSource: Bool { releaseSourceFlag ?? file.releaseSource }
    var digest: Bool { digestFlag ?? file.digest }
    var runDirectory: String { runDirectoryOption ?? file.runDirectory }

    /// The one domain of a single (non-batch) upgrade.
    var domain: String? { !all && domains.count == 1 ? domains[0] : nil }

    func validate() throws {
        guard [vm != nil, !domains.isEmpty, all].filter({ $0 }).count == 1 else {
            throw ValidationError("give exactly one of --vm SOCKET, --domain NAME (repeatable) or --all")
        }
        guard vm == nil || binary != nil else { throw ValidationError("--vm needs --binary (the new batonvmm)") }
        if let p = parallelOption, !(1...64).contains(p) { throw ValidationError("--parallel: \(p) is not between 1 and 64") }
        if let m = maxPauseOption, !(m >= 0 && m.isFinite) { throw ValidationError("--max-pause-ms: \(m) is not a number of milliseconds (0: no limit)") }
        if journal != nil, all || domains.count > 1 { throw ValidationError("--journal: a batch keeps one journal per domain in --run-directory (each outcome line names it)") }
        if let t = timeoutOption, !(t > 0 && t.isFinite && t <= 3600) { throw ValidationError("--timeout: \(t) is not between 0 and 3600 seconds") }
        if let t = transportOption, !["gift", "memfd", "copy", "auto"].contains(t) {
            throw ValidationError("--transport: '\(t)' is not gift, memfd, copy or auto")
        }
    }

    func run() throws {
        CLIConfiguration.current = try config.load()
        if all || domains.count > 1 { return try upgradeQEMUBatch() }
        var domainHandle: LibvirtDomain?
        var chDomain = false
        var record = BatonMetadata()
        var vm = self.vm ?? ""
        if let domain {
            // Preflight through libvirt, before anything is paused: Baton moves RAM only out of
            // a hypervisor that embeds its agents, and says so for any other domain.
            let d: LibvirtDomain
            do { d = try LibvirtConnection.connect(uri: connect, answeringWithin: timeout).domain(domain) } catch {
                throw fail("\(error); nothing was paused", .peerRefused)
            }
            guard try d.state().state == .running else { throw fail("domain \(d.name) is \(try d.state().state.rawValue), not running; nothing was paused", .failure) }
            if let element = try? d.metadata(), let meta = BatonMetadata(element: element), let agent = meta.agent, !agent.isEmpty {
                vm = agent
                record = meta
            } else if connect.hasPrefix("ch:"), let pid = d.id, let socket = ListeningSocketPath.of(pid: pid).first,
                      (try? VMMClient(socketPath: socket, timeoutSeconds: 5).expectOK("GET", "/api/v1/vmm.ping").text.contains("batonvmm")) == true {
                // libvirt's ch driver keeps no metadata; its VMM is found by pid, and must be batonvmm.
                vm = socket
                chDomain = true
            } else if connect.hasPrefix("qemu") {
                // A QEMU domain: QEMU's own migration with guest RAM left in shared memory.
                return try upgradeQEMU(domain: d.name)
            } else {
                throw fail("domain \(d.name) does not embed Baton's agent (no <baton:handoff agent=...> in its metadata) and \(connect) is not a QEMU driver; nothing was paused", .peerRefused)
            }
            domainHandle = d
        }
        defer {
            // The handoff record: in the domain's metadata, or, where the driver keeps none
            // (libvirt 9.0's ch driver), in Baton's state directory.
            if let d = domainHandle, (try? d.setMetadata(record.element)) == nil {
                let state = BatonPaths.environmentStateDirectory
                let line = "{\"domain\":\"\(d.name)\",\"uuid\":\"\(d.uuid)\",\"record\":\"\(record.element.replacingOccurrences(of: "\"", with: "'"))\"}\n"
                Host.appendLine(line, to: state + "/handoffs.jsonl")
            }
        }
        guard let binary else { throw fail("--binary: give the new batonvmm", .usage) }
        if let service {
            // The service keeps its own journals and run directory; the flags given go along, and
            // what they leave unsaid the service's own configuration decides.
            if journal != nil || runDirectoryOption != nil {
                throw fail("--service: the service keeps its journals and run files in its state directory; drop --journal and --run-directory", .usage)
            }
            var request: [String: Any] = ["op": "upgrade", "vm": vm, "binary": binary, "in_place": inPlace || chDomain, "strict": strict]
            if let transportOption { request["transport"] = transportOption }
            if let releaseSourceFlag { request["release_source"] = releaseSourceFlag }
            if let digestFlag { request["digest"] = digestFlag }
            let reply = try ServiceClient.request(service, request)
            if json, let report = reply["report"] {
                print(String(decoding: try JSONSerialization.data(withJSONObject: report, options: [.sortedKeys]), as: UTF8.self))
            } else if let line = reply["line"] as? String {
                print(line)
            }
            if let refused = reply["refused"] as? String { throw fail("refused: \(refused)", .failure) }
            if reply["ok"] as? Bool != true {
                let kind = (reply["kind"] as? String).flatMap(UpgradeFailure.Kind.init(rawValue:)) ?? .incomplete
                throw fail(reply["error"] as? String ?? "upgrade failed", BatonExit.forUpgrade(kind))
            }
            return
        }
        var options = UpgradeOptions(vmSocket: vm, binary: binary)
        if let d = domainHandle { options.control = LibvirtControl(domain: d, agentSocket: vm) }  // libvirt pauses and resumes
        options.transport = transport
        options.inPlace = inPlace || chDomain  // the ch driver knows the VMM by pid: keep it
        options.releaseSource = releaseSource
        options.strict = strict
        options.digest = digest
        options.pausePriority = pausePriority
        options.readyTimeoutSeconds = timeout
        options.stallTimeoutSeconds = file.stallTimeoutSeconds
        options.journalPath = journal
        options.runDirectory = runDirectory
        options.fault = try controllerFault()
        let progress = UpgradeProgress(domain ?? vm, json: json)
        options.onPhase = { progress.record($0) }
        if !json { options.onNotice = { progress.line.note("baton: notice: \($0)") } }
        do {
            let report = try progress.finishing { try UpgradeController(options: options).run() }
            record.generation += 1
            record.state = "committed"
            record.oldPid = report.oldPid
            record.newPid = report.newPid
            record.transport = report.transport
            if json { printJSON(report) } else { print(report.line) }
        } catch let failure as UpgradeFailure {
            record.state = failure.report.rolledBack ? "rolledBack" : "failed"
            if json { printJSON(failure.report) }
            throw fail(failure.description, BatonExit.forUpgrade(failure.kind))
        }
    }
}

extension UpgradeCommand {
    /// Options shared by single and batch QEMU upgrades.
    func qemuOptions(domain: String, newEmulator: String) throws -> QEMUUpgradeOptions {
        var options = QEMUUpgradeOptions(domain: domain, newEmulator: newEmulator)
        options.uri = connect
        options.journalPath = journal
        options.runDirectory = runDirectory
        options.updateDefinition = updateDefinition
        options.allowCopy = allowCopy
        options.timeoutSeconds = timeout
        options.maxPauseMs = maxPauseMs
        options.fault = try controllerFault()
        return options
    }

    /// BATON_CONTROLLER_FAULT (the fault matrices), for both hypervisors.
    func controllerFault() throws -> ControllerFault? {
        guard let text = ProcessInfo.processInfo.environment["BATON_CONTROLLER_FAULT"] else { return nil }
        guard let fault = ControllerFault(parsing: text) else { throw fail("BATON_CONTROLLER_FAULT: '\(text)' is not ACTION:PHASE", .usage) }
        return fault
    }

    /// The new QEMU for `domain`: --binary, or the binary installed at its emulator path.
    func newEmulator(for domain: String) throws -> String {
        if let binary { return binary }
        guard let emulator = try? LibvirtConnection.connect(uri: connect, answeringWithin: timeout).domain(domain).emulator() else {
            throw fail("domain \(domain): no <emulator> to upgrade to; give --binary; nothing was paused", .peerRefused)
        }
        return emulator
    }

    /// The handoff record in the domain's metadata (a fresh connection: libvirtd restarted).
    func recordHandoff(_ report: QEMUUpgradeReport) {
        guard let d = try? LibvirtConnection.connect(uri: connect, answeringWithin: timeout).domain(report.domain) else { return }
        var meta = (try? d.metadata()).flatMap { $0 }.flatMap(BatonMetadata.init(element:)) ?? BatonMetadata()
        meta.generation += 1
        meta.state = "committed"
        meta.oldPid = report.oldPid
        meta.newPid = report.newPid
        meta.transport = report.mode
        try? d.setMetadata(meta.element)
    }

    func upgradeQEMU(domain: String) throws {
        if let service { return try upgradeQEMUThroughService(service, domain: domain) }
        var options = try qemuOptions(domain: domain, newEmulator: try newEmulator(for: domain))
        let progress = UpgradeProgress(domain, json: json)
        options.onPhase = { progress.record($0) }
        let upgrade = QEMUUpgrade(options: options)
        do {
            let report = try progress.finishing { try upgrade.run() }
            recordHandoff(report)
            if json { printJSON(report) } else { print(report.line) }
        } catch let error as QEMUUpgradeError {
            if json { printJSON(upgrade.report) }
            throw fail(error.description, BatonExit.forQEMU(error))
        } catch let crash as ControllerCrashed {
            throw fail("\(crash)", .failure)
        }
    }
}

extension UpgradeCommand {
    /// `--service SOCKET --domain NAME` for a QEMU domain: `baton serve` runs it (one per domain
    /// at a time); the typed error kind it sends back picks the exit code.
    func upgradeQEMUThroughService(_ service: String, domain: String) throws {
        var request: [String: Any] = ["op": "upgrade-qemu", "domain": domain, "uri": connect, "binary": try newEmulator(for: domain),
                                      "update_definition": updateDefinition, "allow_copy": allowCopy, "timeout": timeout]
        if let maxPauseMs { request["max_pause_ms"] = maxPauseMs }
        if let journal { request["journal"] = journal }
        let reply = try ServiceClient.request(service, request)
        if json, let report = reply["report"] {
            print(String(decoding: try JSONSerialization.data(withJSONObject: report, options: [.sortedKeys]), as: UTF8.self))
        } else if let line = reply["line"] as? String {
            print(line)
        }
        if let refused = reply["refused"] as? String { throw fail("refused: \(refused)", .peerRefused) }
        guard reply["ok"] as? Bool == true else {
            let message = reply["error"] as? String ?? "upgrade failed"
            let kind = (reply["errorKind"] as? String).flatMap { QEMUUpgradeError(kind: $0, message: message) }
            throw fail(message, kind.map(BatonExit.forQEMU) ?? .failure)
        }
    }

    /// `--all` or several `--domain`s: one batch, one libvirtd restart, `--parallel` handoffs at
    /// a time. One line (or JSON object) per domain, then the batch's summary.
    func upgradeQEMUBatch() throws {
        guard service == nil else { throw fail("--service is not supported for QEMU batches; run the upgrade here", .usage) }
        let targets: [QEMUBatchUpgrade.Target]
        if all {
            let inventory: [QEMUDomainStatus]
            do { inventory = try QEMUInventory.scan(uri: connect) } catch { throw fail("\(error)", .failure) }
            targets = QEMUBatchUpgrade.staleTargets(inventory, binary: binary)
        } else {
            targets = try domains.map { QEMUBatchUpgrade.Target(domain: $0, newEmulator: try newEmulator(for: $0)) }
        }
        if targets.isEmpty {
            if json { printJSON(QEMUBatchSummary()) } else { print("baton: no stale QEMU domain on \(connect); nothing to do") }
            return
        }
        let batch = QEMUBatchUpgrade(targets: targets, template: try qemuOptions(domain: "", newEmulator: ""), parallel: parallel)
        let line = ProgressLine(json: json)
        let summary: QEMUBatchSummary
        do {
            line.show("batch: 0/\(targets.count) domains done")
            summary = try batch.run { outcome, done, total in line.show("batch: \(done)/\(total) domains done, last \(outcome.domain): \(outcome.status.rawValue)") }
        } catch let error as QEMUUpgradeError {
            line.finish()
            throw fail(error.description, BatonExit.forQEMU(error))
        }
        line.finish()
        for outcome in summary.outcomes {
            if outcome.status == .upgraded, let report = outcome.report { recordHandoff(report) }
            if json { printJSON(outcome); continue }
            switch outcome.status {
            case .upgraded: print(outcome.report?.line ?? "baton: upgraded \(outcome.domain)")
            case .skipped: print("baton: skipped \(outcome.domain): \(outcome.reason ?? "")")
            case .rolledBack: print("baton: upgrade of \(outcome.domain) ROLLED BACK: \(outcome.reason ?? "")")
            case .incomplete: print("baton: upgrade of \(outcome.domain) INCOMPLETE: \(outcome.reason ?? "")")
            }
        }
        var totals = summary
        totals.outcomes = []
        if json {
            printJSON(totals)
        } else {
            print(String(format: "baton: batch of %d: %d upgraded, %d skipped, %d rolled back, %d incomplete; %d at a time, %.0f ms in all, one libvirt gap of %.0f ms",
                         summary.outcomes.count, summary.count(.upgraded), summary.count(.skipped), summary.count(.rolledBack), summary.count(.incomplete),
                         summary.parallel, summary.wallMs, summary.managementGapMs))
        }
        // The worst outcome decides the exit code; skipped domains were never paused.
        if summary.count(.incomplete) > 0 { throw ExitCode(BatonExit.failure.rawValue) }
        if summary.count(.rolledBack) > 0 { throw ExitCode(BatonExit.handoffRolledBack.rawValue) }
    }
}

extension BatonExit {
    static func forQEMU(_ error: QEMUUpgradeError) -> BatonExit {
        switch error {
        case .refused, .unsupported: .peerRefused
        case .rolledBack: .handoffRolledBack
        case .integrity: .integrity
        case .rollForwardIncomplete, .lost: .failure
        }
    }
}

/// `baton qemu-exec`: the two stages that start a new QEMU inside the old one's cgroups and
/// mount namespace, re-parented to init (QEMULauncher). Not for people.
struct QEMUExecCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "qemu-exec", abstract: "internal: start a QEMU in another QEMU's cgroups and mount namespace", shouldDisplay: false)
    @Option var cgroupsOf: Int32
    @Option var pidFile: String?
    @Option var keepFds: String = ""
    @Flag var stageTwo = false
    @Argument(parsing: .captureForPassthrough) var argv: [String] = []

    func run() throws {
        let args = argv.first == "--" ? Array(argv.dropFirst()) : argv
        guard !args.isEmpty else { throw fail("qemu-exec: no command", .usage) }
        if stageTwo { try QEMULauncher.stageTwo(cgroupsOf: cgroupsOf, argv: args) }
        guard let pidFile else { throw fail("qemu-exec: --pid-file is required", .usage) }
        try QEMULauncher.stageOne(cgroupsOf: cgroupsOf, pidFile: pidFile, keep: keepFds.split(separator: ",").compactMap { Int32($0) }, argv: args)
    }
}

struct EnrollCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "enroll",
        abstract: "Give a QEMU domain shared-memory guest RAM in its definition (from its next cold boot) and record Baton's opt-in.")

    @Argument(help: "The domain (name or UUID).")
    var domain: String

    @Option(help: "libvirt connection URI.")
    var connect: String = "qemu:///system"

    func run() throws {
        do { print(try QEMUEnrollment.enroll(domain, uri: connect)) } catch let e as QEMUUpgradeError {
            throw fail(e.description, BatonExit.forQEMU(e))
        } catch { throw fail("\(error)", .failure) }
    }
}

struct RecoverCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "recover",
        abstract: "After a controller crash: finish (past commit) or roll back (before it) the upgrade in a journal, or (--all) every unfinished one.",
        discussion: "`baton serve` runs `--all` itself before it takes requests. Exit 0 when every journal was finished (forward or back), 1 if a guest was lost or a journal could not be finished.")

    @OptionGroup var config: ConfigFileOption

    @Option(help: "The journal of the interrupted upgrade.")
    var journal: String?

    @Flag(help: "Every unfinished journal in the state directory and the run directory (or --directory).")
    var all = false

    @Option(name: .customLong("directory"), help: "With --all: a directory to look in (repeatable). Default: [service] state_directory and [upgrade] run_directory.")
    var directories: [String] = []

    func validate() throws {
        guard (journal == nil) != !all else { throw ValidationError("give --journal PATH or --all") }
    }

    func run() throws {
        guard let journal else {
            let file = try config.load()
            let sweep = UnfinishedJournals(directories: directories.isEmpty ? [file.stateDirectory, file.runDirectory] : directories)
            let outcomes = sweep.recoverAll()
            if outcomes.isEmpty { print("baton: no unfinished journal in \(sweep.directories.joined(separator: ", "))") }
            for o in outcomes { print("baton: \(o.journal): \(o.message)") }
            if outcomes.contains(where: \.failed) { throw ExitCode(BatonExit.failure.rawValue) }
            return
        }
        let entries = try UpgradeJournal.read(path: journal)
        if entries.contains(where: { $0.context != nil }) {
            do { print("baton: \(try QEMURecovery.recover(entries: entries, journal: UpgradeJournal(path: journal)))") } catch let e as QEMUUpgradeError {
                throw fail(e.description, BatonExit.forQEMU(e))
            }
            return
        }
        let outcome = try UpgradeRecovery.recover(journalPath: journal)
        print("baton: \(outcome)")
        if outcome.result == .lost { throw ExitCode(BatonExit.failure.rawValue) }
    }
}
