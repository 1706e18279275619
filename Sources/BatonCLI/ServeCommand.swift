import ArgumentParser
import BatonConfiguration
import BatonController
import BatonQEMU
import BatonSystem
import Foundation
import Glibc
import Logging
import ServiceLifecycle

/// `baton serve`: the long-running Baton service. Newline-delimited JSON on a Unix socket in a
/// 0700 directory, run as a swift-service-lifecycle ServiceGroup (ServeServices.swift): at start
/// it finishes what unfinished journals record; SIGTERM/SIGINT stop accepting, let running
/// upgrades finish (never cut one inside a pause), remove the socket and exit.
struct ServeCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "serve", abstract: "Run the Baton service (upgrade requests, hook events, status, metrics, the QEMU upgrade policy).")

    @OptionGroup var config: ConfigFileOption

    @Option(help: "Service socket (its directory is made 0700). Default: [service] socket.")
    var socket: String?

    @Option(help: "State directory: journals, hook log and queue, run files. Default: [service] state_directory.")
    var state: String?

    @Option(help: "Seconds to wait for running upgrades on shutdown. Default: [service] drain_seconds.")
    var drainSeconds: Double?

    @Option(help: "libvirt connection URI (stale-domain metrics, the upgrade policy). Default: [upgrade] libvirt_uri.")
    var connect: String?

    @Option(help: "manual | on-reconnect | on-stale. Default: [upgrade] policy.")
    var policy: String?

    @Option(help: "Serve Prometheus text at http://ADDRESS:PORT/metrics (port 0: any). Default: [service] metrics_listen.")
    var metricsListen: String?

    @Option(help: "trace | debug | info | notice | warning | error | critical. Default: [service] log_level.")
    var logLevel: String?

    func run() throws {
        // First, before any thread exists, so that every thread inherits the mask: SIGTERM and
        // SIGINT then never kill the process (not even inside a pause); swift-service-lifecycle's
        // signal source (a signalfd on Linux) takes them and starts the graceful shutdown.
        var terminating = sigset_t()
        sigemptyset(&terminating)
        sigaddset(&terminating, SIGTERM)
        sigaddset(&terminating, SIGINT)
        pthread_sigmask(SIG_BLOCK, &terminating, nil)
        signal(SIGPIPE, SIG_IGN)

        let file = try config.load()
        let socket = self.socket ?? file.serviceSocket, state = self.state ?? file.stateDirectory
        let drainSeconds = self.drainSeconds ?? file.drainSeconds, uri = connect ?? file.libvirtURI
        guard let policy = BatonConfiguration.UpgradePolicy(rawValue: self.policy ?? file.policy.rawValue) else {
            throw fail("--policy: '\(self.policy ?? "")' is not manual, on-reconnect or on-stale", .usage)
        }
        guard let level = Logger.Level(rawValue: logLevel ?? file.logLevel) else {
            throw fail("--log-level: '\(logLevel ?? "")' is not trace, debug, info, notice, warning, error or critical", .usage)
        }
        LoggingSystem.bootstrap { label in
            var handler = StreamLogHandler.standardError(label: label)
            handler.logLevel = level
            return handler
        }
        let log = Logger(label: "baton.serve")
        let manager = SystemdNotify.takeFromEnvironment()  // before any process is spawned
        do {
            // The socket's directory may be a shared one (/tmp): used as it is, never changed.
            try PrivateDirectory.make((socket as NSString).deletingLastPathComponent, requireOwnership: false)
            try PrivateDirectory.make(state)
        } catch { throw fail("\(error)", .failure) }
        try ServiceLock.take(in: state)

        // Upgrades a dead controller (an earlier service, a CLI) left half-way are finished
        // before any request is taken: a new upgrade of the same guest must not start on top.
        let sweep = UnfinishedJournals(directories: [state, file.runDirectory])
        for outcome in sweep.recoverAll() {
            let metadata: Logger.Metadata = ["journal": "\(outcome.journal)", "outcome": "\(outcome.message)"]
            if outcome.failed { log.error("recovery", metadata: metadata) } else { log.notice("recovery", metadata: metadata) }
        }

        // The QEMU upgrade policy: stale opted-in domains move on reconnect and/or periodically.
        let upgrader = Box<QEMUAutoUpgrader>()
        _ = MetricsExport.registry  // bootstraps swift-metrics before anything counts
        let service = BatonService(stateDirectory: state, staleDomainCount: { (try? QEMUInventory.scan(uri: uri))?.filter(\.stale).count },
                                   onHookEvent: { domain, operation in upgrader.value?.hookEvent(domain: domain, operation: operation) },
                                   metricsText: { MetricsExport.text() })
        service.logger = log
        var defaults = BatonService.UpgradeDefaults()
        defaults.transport = file.transport
        defaults.releaseSource = file.releaseSource
        defaults.digest = file.digest
        defaults.readyTimeoutSeconds = file.timeoutSeconds
        defaults.stallTimeoutSeconds = file.stallTimeoutSeconds
        defaults.runDirectory = file.runDirectory
        service.upgradeDefaults = defaults
        service.qemuUpgrade = { request in ServeCommand.upgradeQEMU(request, file: file, service: service, log: log) }
        var metricsAddress: String?
        if let address = metricsListen ?? file.metricsListen {
            do { metricsAddress = try MetricsExport.serve(on: address, text: { service.metrics() }).1 } catch {
                throw fail("--metrics-listen \(address): \(error)", .usage)
            }
        }
        if let metricsAddress, !(metricsAddress.hasPrefix("127.") || metricsAddress.hasPrefix("[::1]:")) {
            // Allowed (a Prometheus on another host), but worth a line: the counters name the host's VMs.
            log.warning("metrics served beyond loopback", metadata: ["address": "\(metricsAddress)"])
        }
        if policy != .manual { upgrader.value = ServeCommand.autoUpgrader(policy: policy, uri: uri, file: file, service: service, log: log) }
        // Hook events queued while the service was down.
        let queue = state + "/hook-queue.jsonl"
        if let queued = try? String(contentsOfFile: queue, encoding: .utf8) {
            for line in queued.split(separator: "\n") { _ = service.handle(String(line)) }
            try? FileManager.default.removeItem(atPath: queue)
        }
        let listener = try UnixListener(path: socket)
        log.info("listening", metadata: ["pid": "\(getpid())", "socket": "\(socket)", "state": "\(state)", "policy": "\(policy.rawValue)", "libvirt": "\(uri)",
                                         "metrics": "\(metricsAddress.map { "http://\($0)/metrics" } ?? "none")"])
        if let metricsAddress { try? metricsAddress.write(toFile: state + "/metrics.address", atomically: true, encoding: .utf8) }
        // Ready: recovered, listening, metrics served (systemd's Type=notify starts dependents now).
        manager?.send("READY=1\nMAINPID=\(getpid())\nSTATUS=listening on \(socket)")

        // Shut down in reverse order: requests and the policy drain first, the reaper goes last.
        let requests = RequestService(listener: listener, service: service, upgrader: upgrader.value, drainSeconds: drainSeconds, log: log,
                                      manager: manager)
        let group = ServiceGroup(configuration: .init(
            services: [.init(service: ChildReaperService(log: log)),
                       .init(service: requests, successTerminationBehavior: .gracefullyShutdownGroup, failureTerminationBehavior: .gracefullyShutdownGroup)],
            gracefulShutdownSignals: [.sigterm, .sigint], logger: log))
        let clean: Bool
        do {
            try runToEnd { try await group.run() }
            clean = true
            log.info("stopped")
        } catch {
            // Not a clean stop: an upgrade is still running (its journal lets `baton recover` finish it).
            clean = false
            log.error("stopped: \(error)")
        }
        // Leave without running exit handlers and static destructors: threads that never end (the
        // accept loop, libvirt's event loop, an HTTP listener) still run, and destructors freeing
        // what they use corrupted the heap at exit once in a test ("malloc_consolidate(): invalid
        // chunk size"). Everything that matters is on disk; stdio is flushed first.
        fflush(nil)
        _exit(clean ? 0 : BatonExit.failure.rawValue)
    }

    static func autoUpgrader(policy: BatonConfiguration.UpgradePolicy, uri: String, file: BatonConfiguration, service: BatonService, log: Logger) -> QEMUAutoUpgrader {
        var template = QEMUUpgradeOptions(domain: "", newEmulator: "")
        template.holdSignals = false  // SIGTERM is blocked here and starts a graceful shutdown: never ignore it
        template.uri = uri
        template.runDirectory = file.runDirectory
        template.timeoutSeconds = file.timeoutSeconds
        template.maxPauseMs = file.maxPauseMs
        template.updateDefinition = file.updateDefinition
        let settings = QEMUAutoUpgrader.Settings(uri: uri, template: template, parallel: file.parallel, onReconnect: true,
                                                 periodicSeconds: policy == .onStale ? file.staleCheckSeconds : nil)
        return QEMUAutoUpgrader(settings: settings, guardBatch: { work in
            guard service.begin("qemu-batch") else { return false }
            defer { service.end("qemu-batch") }
            work()
            return true
        }, onOutcome: { o in
            let r = o.report
            let outcome: BatonMetrics.Outcome = switch o.status {
            case .upgraded: .succeeded
            case .rolledBack: .rolledBack
            case .incomplete: .rolledForward
            case .skipped: .refused
            }
            // A batch reports each domain once it ended: a skipped one never started.
            if o.status != .skipped { BatonMetrics.started(hypervisor: "qemu") }
            service.count(mode: r?.mode ?? "none", outcome: outcome, pauseMs: r?.pauseMs ?? 0,
                          phasesMs: r.map { $0.breakdown.phases } ?? [],
                          bytes: r?.ramBytesMoved ?? 0)
            // One structured line per upgrade.
            log.info("upgrade", metadata: ["domain": "\(o.domain)", "outcome": "\(o.status.rawValue)", "mode": "\(r?.mode ?? "")",
                                           "oldPid": "\(r?.oldPid ?? 0)", "newPid": "\(r?.newPid ?? 0)",
                                           "pauseMs": "\(String(format: "%.2f", r?.pauseMs ?? 0))", "reason": "\(o.reason ?? "")"])
        }, onNote: { log.notice("\($0)") })
    }

    /// One `upgrade-qemu` request: the options from the request, the rest from the configuration.
    static func upgradeQEMU(_ request: [String: Any], file: BatonConfiguration, service: BatonService, log: Logger) -> [String: Any] {
        guard let domain = request["domain"] as? String, let binary = request["binary"] as? String else {
            return ["ok": false, "error": "upgrade-qemu needs \"domain\" and \"binary\""]
        }
        var options = QEMUUpgradeOptions(domain: domain, newEmulator: binary)
        options.holdSignals = false  // SIGTERM is blocked here and taken by sigwait: never ignore it
        options.uri = request["uri"] as? String ?? file.libvirtURI
        options.runDirectory = file.runDirectory
        options.journalPath = request["journal"] as? String
        options.updateDefinition = request["update_definition"] as? Bool ?? file.updateDefinition
        options.allowCopy = request["allow_copy"] as? Bool ?? false
        if let t = request["timeout"] as? Double, t > 0, t <= 3600 { options.timeoutSeconds = t } else { options.timeoutSeconds = file.timeoutSeconds }
        if let m = request["max_pause_ms"] as? Double, m > 0, m.isFinite { options.maxPauseMs = m } else { options.maxPauseMs = file.maxPauseMs }
        let upgrade = QEMUUpgrade(options: options)
        func encoded(_ r: QEMUUpgradeReport) -> Any { (try? JSONSerialization.jsonObject(with: JSONEncoder().encode(r))) ?? [:] }
        let phases: (QEMUUpgradeReport) -> [(String, Double)] = { $0.breakdown.phases }
        do {
            let r = try upgrade.run()
            service.count(mode: r.mode, outcome: .succeeded, pauseMs: r.pauseMs, phasesMs: phases(r), bytes: r.ramBytesMoved)
            log.info("upgrade", metadata: ["domain": "\(domain)", "outcome": "upgraded", "mode": "\(r.mode)", "oldPid": "\(r.oldPid)", "newPid": "\(r.newPid)",
                                           "pauseMs": "\(String(format: "%.2f", r.pauseMs))"])
            return ["ok": true, "line": r.line, "report": encoded(r)]
        } catch let e as QEMUUpgradeError {
            let outcome: BatonMetrics.Outcome = switch e {
            case .refused, .unsupported: .refused
            case .rolledBack, .integrity: .rolledBack
            case .rollForwardIncomplete: .rolledForward
            case .lost: .failed
            }
            let r = upgrade.report
            service.count(mode: r.mode.isEmpty ? "none" : r.mode, outcome: outcome, pauseMs: r.pauseMs, phasesMs: [], bytes: 0)
            log.info("upgrade", metadata: ["domain": "\(domain)", "outcome": "\(outcome.rawValue)", "mode": "\(r.mode)", "oldPid": "\(r.oldPid)", "newPid": "\(r.newPid)",
                                           "reason": "\(e)"])
            return ["ok": false, "error": "\(e)", "errorKind": e.kind, "report": encoded(r)]
        } catch {
            // Not a QEMUUpgradeError (a crash fault stopped it dead): counted and logged as failed;
            // its journal says where it stopped, and the next start's sweep finishes it.
            let r = upgrade.report
            service.count(mode: r.mode.isEmpty ? "none" : r.mode, outcome: .failed, pauseMs: r.pauseMs, phasesMs: [], bytes: 0)
            log.error("upgrade", metadata: ["domain": "\(domain)", "outcome": "failed", "mode": "\(r.mode)", "oldPid": "\(r.oldPid)", "newPid": "\(r.newPid)",
                                            "reason": "\(error)"])
            return ["ok": false, "error": "\(error)"]
        }
    }

    /// The longest request line the service reads (requests are a few hundred bytes).
    static let maximumLineBytes = 1 << 20

    /// One client: newline-delimited requests, one reply line each. Each byte is scanned once
    /// (consumed lines are dropped once per read, not one by one), and a line longer than
    /// `maximumLineBytes` gets one error reply and the connection is closed.
    static func serve(_ client: UnixSocket, _ service: BatonService) {
        var buffer: [UInt8] = []
        var scanned = 0
        while true {
            guard let chunk = try? client.fd.readSome(65536), !chunk.isEmpty else { return }
            buffer += chunk
            var lineStart = 0
            while let nl = buffer[scanned...].firstIndex(of: 0x0A) {
                let line = String(decoding: buffer[lineStart..<nl], as: UTF8.self)
                lineStart = nl + 1
                scanned = lineStart
                if line.isEmpty { continue }
                service.replyStarted()
                try? client.send(Array((service.handle(line) + "\n").utf8))
                service.replyWritten()
            }
            buffer.removeFirst(lineStart)
            scanned = buffer.count
            if buffer.count > maximumLineBytes {
                try? client.send(Array(#"{"ok":false,"error":"request line longer than 1 MiB; closing"}"#.utf8) + [0x0A])
                // A close with unread input resets the connection, and the peer could lose the
                // reply: end our side, then discard what it still sends (bounded: 1 s, 8 MiB).
                client.shutdownWrite()
                try? client.setTimeout(seconds: 1)
                var discarded = 0
                while discarded < 8 << 20, let more = try? client.fd.readSome(65536), !more.isEmpty { discarded += more.count }
                return
            }
        }
    }
}

/// A reference filled in after the closures that read it are made.
final class Box<T>: @unchecked Sendable {
    var value: T?
}

extension FileDescriptor {
    func readSome(_ count: Int) throws -> [UInt8] {
        var b = [UInt8](repeating: 0, count: count)
        let n = try b.withUnsafeMutableBytes { try read(into: $0.baseAddress!, count: count) }
        return Array(b.prefix(n))
    }
}

/// One request to `baton serve`, one reply line back.
enum ServiceClient {
    static func request(_ socket: String, _ object: [String: Any], timeout: Double = 600) throws -> [String: Any] {
        let s: UnixSocket
        do { s = try UnixSocket.connect(path: socket, timeoutSeconds: 5) } catch {
            throw fail("cannot reach baton serve at \(socket): \(error)", .failure)
        }
        try s.setTimeout(seconds: timeout)
        try s.send(Array(try JSONSerialization.data(withJSONObject: object)) + [0x0A])
        var buffer: [UInt8] = []
        while !buffer.contains(0x0A) {
            let chunk = try s.fd.readSome(65536)
            if chunk.isEmpty { break }
            buffer += chunk
        }
        guard let nl = buffer.firstIndex(of: 0x0A),
              let reply = try JSONSerialization.jsonObject(with: Data(buffer[..<nl])) as? [String: Any] else {
            throw fail("baton serve at \(socket) sent no reply", .failure)
        }
        return reply
    }
}

struct StatusCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "status",
        abstract: "The host's state: `baton serve` (if it runs) and every running QEMU domain, stale ones first (running a binary no longer installed at its emulator path).")

    @OptionGroup var config: ConfigFileOption

    @Option(name: .customLong("socket"), help: "Service socket. Default: [service] socket.")
    var socketOption: String?

    @Option(name: .customLong("connect"), help: "libvirt connection URI whose QEMU domains are listed. Default: [upgrade] libvirt_uri.")
    var connectOption: String?

    @Flag(help: "One JSON object: the service's fields (\"service\" says why if it is unreachable), plus \"qemuDomains\" and \"staleDomains\".")
    var json = false

    @Flag(help: "The service's Prometheus text instead.")
    var metrics = false

    func run() throws {
        let file = try config.load()
        let socket = socketOption ?? file.serviceSocket, connect = connectOption ?? file.libvirtURI
        if metrics {
            print(try ServiceClient.request(socket, ["op": "metrics"], timeout: 10)["metrics"] as? String ?? "", terminator: "")
            return
        }
        var reply: [String: Any]
        var serviceError: String?
        do { reply = try ServiceClient.request(socket, ["op": "status"], timeout: 10) } catch {
            reply = [:]
            serviceError = "\(error)"
        }
        let domains: [QEMUDomainStatus]?
        var libvirtError: String?
        do { domains = try QEMUInventory.scan(uri: connect).sorted { ($0.stale ? 0 : 1, $0.domain) < ($1.stale ? 0 : 1, $1.domain) } } catch {
            domains = nil
            libvirtError = "\(error)"
        }
        guard serviceError == nil || domains != nil else {
            throw fail("neither baton serve (\(serviceError ?? "")) nor libvirt (\(libvirtError ?? "")) answered", .failure)
        }
        if json {
            if let serviceError { reply["service"] = "unreachable: \(serviceError)" }
            if let domains {
                reply["qemuDomains"] = try JSONSerialization.jsonObject(with: JSONEncoder().encode(domains))
                reply["staleDomains"] = domains.filter(\.stale).count
            } else {
                reply["qemuDomainsError"] = libvirtError ?? ""
            }
            print(String(decoding: try JSONSerialization.data(withJSONObject: reply, options: [.sortedKeys]), as: UTF8.self))
            return
        }
        if let serviceError {
            print("baton serve: not reachable (\(serviceError))")
        } else {
            print("baton serve pid \(reply["pid"] ?? "?"), up \(reply["uptimeSeconds"] ?? 0) s: \(reply["completed"] ?? 0) completed, \(reply["failed"] ?? 0) failed (\(reply["rolledBack"] ?? 0) rolled back), \(reply["refused"] ?? 0) refused; in flight: \((reply["inFlight"] as? [String])?.joined(separator: ", ") ?? "none")")
        }
        guard let domains else { print("QEMU domains on \(connect): unknown (\(libvirtError ?? ""))"); return }
        print("QEMU domains on \(connect): \(domains.count) running, \(domains.filter(\.stale).count) stale")
        for d in domains {
            let versions = d.stale ? "QEMU \(d.runningVersion ?? "?") running, \(d.installedVersion ?? "none") installed" : "QEMU \(d.runningVersion ?? "?")"
            let ram = d.sharedRAM ? "" : "; private RAM: `baton enroll \(d.domain)` and cold-boot before it can be upgraded"
            print("  \(d.domain)  pid \(d.pid)  \(versions)  \(d.stale ? "STALE: \(d.staleReason ?? "")" : "current")\(ram)")
        }
    }
}
