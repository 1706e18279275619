import ArgumentParser
import BatonController
import BatonQEMU
import BatonSystem
import Foundation
import Glibc

/// `baton serve`: the long-running Baton service. Newline-delimited JSON on a Unix socket in a
/// 0700 directory; graceful shutdown on SIGTERM/SIGINT (stops accepting, lets running upgrades
/// finish, removes its socket).
struct ServeCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "serve", abstract: "Run the Baton service (upgrade requests, hook events, status, metrics).")

    @Option(help: "Service socket (its directory is made 0700).")
    var socket: String = BatonPaths.serviceSocket

    @Option(help: "State directory: journals, hook log and queue, run files.")
    var state: String = BatonPaths.stateDirectory

    @Option(help: "Seconds to wait for running upgrades on shutdown.")
    var drainSeconds: Double = 120

    @Option(help: "libvirt connection URI whose QEMU domains the metrics count as stale.")
    var connect: String = "qemu:///system"

    func run() throws {
        signal(SIGPIPE, SIG_IGN)
        for dir in [(socket as NSString).deletingLastPathComponent, state] {
            try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o700])
            chmod(dir, 0o700)
        }
        let uri = connect
        let service = BatonService(stateDirectory: state) { (try? QEMUInventory.scan(uri: uri))?.filter(\.stale).count }
        // Hook events queued while the service was down.
        let queue = state + "/hook-queue.jsonl"
        if let queued = try? String(contentsOfFile: queue, encoding: .utf8) {
            for line in queued.split(separator: "\n") { _ = service.handle(String(line)) }
            try? FileManager.default.removeItem(atPath: queue)
        }
        // Block the signals before any thread starts, so sigwait below receives them.
        var signals = sigset_t()
        sigemptyset(&signals)
        sigaddset(&signals, SIGTERM)
        sigaddset(&signals, SIGINT)
        pthread_sigmask(SIG_BLOCK, &signals, nil)
        let listener = try UnixListener(path: socket)
        let accepting = Thread {
            while true {
                let client: UnixSocket
                do { client = try listener.accept() } catch let e as SyscallError where [EMFILE, ENFILE, ENOBUFS, ENOMEM, EINTR, ECONNABORTED].contains(e.errno) {
                    usleep(50_000)  // out of descriptors: back off and keep accepting, never go deaf
                    continue
                } catch { return }  // the listener was shut down (drain)
                try? client.setTimeout(seconds: 60)  // a silent client must not hold a thread forever
                Thread { ServeCommand.serve(client, service) }.start()
            }
        }
        accepting.start()
        FileHandle.standardError.write(Data("baton serve \(getpid()): listening on \(socket), state in \(state)\n".utf8))
        var received: Int32 = 0
        sigwait(&signals, &received)
        FileHandle.standardError.write(Data("baton serve: signal \(received), draining\n".utf8))
        listener.remove()
        Glibc.shutdown(listener.fd.raw, Int32(SHUT_RDWR))
        let deadline = Date().addingTimeInterval(drainSeconds)
        while service.busy && Date() < deadline { usleep(50_000) }
        FileHandle.standardError.write(Data("baton serve: stopped\(service.busy ? " with upgrades still running" : "")\n".utf8))
    }

    static func serve(_ client: UnixSocket, _ service: BatonService) {
        var buffer: [UInt8] = []
        while true {
            guard let chunk = try? client.fd.readSome(4096), !chunk.isEmpty else { return }
            buffer += chunk
            while let nl = buffer.firstIndex(of: 0x0A) {
                let line = String(decoding: buffer[..<nl], as: UTF8.self)
                buffer.removeFirst(nl + 1)
                if line.isEmpty { continue }
                try? client.send(Array((service.handle(line) + "\n").utf8))
            }
        }
    }
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

    @Option(help: "Service socket.")
    var socket: String = BatonPaths.serviceSocket

    @Option(help: "libvirt connection URI whose QEMU domains are listed.")
    var connect: String = "qemu:///system"

    @Flag(help: "One JSON object: the service's fields, plus \"domains\" and \"staleDomains\".")
    var json = false

    @Flag(help: "The service's Prometheus text instead.")
    var metrics = false

    func run() throws {
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
                reply["domains"] = try JSONSerialization.jsonObject(with: JSONEncoder().encode(domains))
                reply["staleDomains"] = domains.filter(\.stale).count
            } else {
                reply["domainsError"] = libvirtError ?? ""
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
