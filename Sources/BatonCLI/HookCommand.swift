import ArgumentParser
import BatonConfiguration
import BatonController
import BatonSystem
import Foundation
import Logging
import Glibc

/// `baton hook qemu <domain> <op> <sub-op> <extra>` — what /etc/libvirt/hooks/qemu runs.
/// It never calls libvirt and never blocks a domain start because Baton is down: it
/// validates, then (for opted-in domains) forwards to `baton serve` within a fixed budget, or
/// queues the request in the state directory for the service to pick up.
struct HookCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "hook",
        abstract: "libvirt hook entry point (domain XML on stdin). Exit codes: 0 ok, 2 usage, 3 bad XML, 4 name mismatch.")

    @Argument(parsing: .allUnrecognized, help: "qemu <domain> <operation> <sub-operation> <extra>")
    var arguments: [String] = []

    func run() throws {
        let started = Host.monotonicNanoseconds()
        // Its lines go to stderr, which libvirtd logs with the hook's exit status.
        LoggingSystem.bootstrap { StreamLogHandler.standardError(label: $0) }
        let log = Logger(label: "baton.hook")
        // libvirt passes no options: the environment, else the configuration file (BATON_CONFIG
        // or /etc/baton/baton.toml), else the defaults. A refused file is logged, never fatal:
        // the hook must not stop a domain from starting.
        let env = ProcessInfo.processInfo.environment
        var file = BatonConfiguration()
        var configProblem: String?
        do { file = try BatonConfiguration.load(explicitPath: nil).0 } catch { configProblem = error.description }
        let stateDirectory = env["BATON_STATE_DIR"] ?? file.stateDirectory
        let serveSocket = env["BATON_SOCKET"] ?? file.serviceSocket
        let budget = Double(env["BATON_HOOK_BUDGET"] ?? "") ?? file.hookBudgetSeconds
        // libvirt always sends the XML and closes. Bounded: a domain's XML is kilobytes, and the
        // hook must answer within its budget whatever arrives.
        var xml = Data()
        while xml.count <= HookCommand.maximumXMLBytes, let chunk = try? FileHandle.standardInput.read(upToCount: 1 << 16), !chunk.isEmpty {
            xml.append(chunk)
        }
        if xml.count > HookCommand.maximumXMLBytes {
            log.error("domain XML on stdin is larger than \(HookCommand.maximumXMLBytes >> 10) KiB (a domain's is a few KiB); ignored")
            throw ExitCode(3)
        }
        // Foundation's XML parser slows down badly on elements with tens of thousands of
        // attributes; a real domain has a few thousand at most.
        let equalsSigns = xml.reduce(0) { $0 + ($1 == UInt8(ascii: "=") ? 1 : 0) }
        if equalsSigns > HookCommand.maximumAttributes {
            log.error("domain XML on stdin has \(equalsSigns) '=' (more than \(HookCommand.maximumAttributes) attributes; a domain has a few thousand); ignored")
            throw ExitCode(3)
        }
        let request: HookRequest
        do {
            request = try HookRequest.parse(arguments: arguments, xml: xml)
        } catch {
            log.error("\(error.description)")
            throw ExitCode(error.exitCode)
        }
        var outcome = "ignored (domain did not opt in)"
        if !request.isKnownOperation {
            // A newer libvirt: never block what we do not understand.
            log.warning("ignoring operation '\(request.operation)' unknown to this Baton")
            outcome = "ignored (unknown operation)"
        } else if request.wantsService {
            outcome = forward(request, to: serveSocket, stateDirectory: stateDirectory, budget: budget)
        } else if request.optedIn, request.operation == "prepare", !request.sharedMemory {
            // Baton leaves guest RAM in place only when it is shared memory; say so while the
            // operator can still act (this start), not at upgrade time.
            outcome = "WARNING: \(request.domain) starts with private guest RAM: Baton cannot upgrade its QEMU in place (run `baton enroll \(request.domain)` and cold-boot it)"
            log.warning("\(outcome)")
        } else if request.optedIn {
            outcome = "validated (no action for \(request.operation))"
        }
        if let configProblem { outcome += "; configuration refused, defaults used: \(configProblem)" }
        let ms = Double(Host.monotonicNanoseconds() - started) / 1e6
        let line = String(format: "%@ hook qemu %@ %@ %@ %@ xml=%d bytes → %@ in %.2f ms\n",
                          ISO8601DateFormatter().string(from: Date()), request.domain, request.operation, request.subOperation,
                          request.extra, xml.count, outcome, ms)
        Host.appendLine(line, to: stateDirectory + "/hook.log")
    }

    /// The most domain XML the hook reads (libvirt's are a few KiB; the largest seen, with
    /// hundreds of devices, well under this).
    static let maximumXMLBytes = 1 << 20
    static let maximumAttributes = 20_000

    /// Sends the event to `baton serve` (bounded by the budget); if it is down, queues it.
    func forward(_ request: HookRequest, to socket: String, stateDirectory: String, budget: Double) -> String {
        let event: [String: Any] = ["op": "hook", "domain": request.domain, "uuid": request.uuid ?? "", "operation": request.operation,
                                    "subOperation": request.subOperation, "agent": request.batonAgent ?? ""]
        let line = ((try? JSONSerialization.data(withJSONObject: event)).map { String(decoding: $0, as: UTF8.self) } ?? "{}") + "\n"
        if let s = try? UnixSocket.connect(path: socket, timeoutSeconds: budget / 2) {
            try? s.setTimeout(seconds: budget / 2)
            if (try? s.send(Array(line.utf8))) != nil { return "forwarded to baton serve" }
        }
        Host.appendLine(line, to: stateDirectory + "/hook-queue.jsonl")
        return "queued (baton serve unreachable)"
    }
}
