import BatonController
import BatonQEMU
import BatonSystem
import Foundation
import Glibc
import Logging
import ServiceLifecycle

/// The request socket and the QEMU upgrade policy: accepts until the group's graceful shutdown
/// (SIGTERM, SIGINT), then stops accepting and waits, up to `drainSeconds`, for every running
/// upgrade to end. Throws `DrainTimedOut` if one still runs then (the service exits 1; its
/// journal lets `baton recover` finish it).
struct RequestService: Service {
    let listener: UnixListener
    let service: BatonService
    let upgrader: QEMUAutoUpgrader?
    let drainSeconds: Double
    let log: Logger
    /// systemd (Type=notify), told of the drain and how long it may take.
    let manager: SystemdNotify?

    struct DrainTimedOut: Error, CustomStringConvertible {
        let seconds: Double
        let inFlight: String
        var description: String { "upgrades still running after \(seconds) s of drain: \(inFlight)" }
    }

    func run() async throws {
        let listener = self.listener, service = self.service
        Thread {
            while true {
                let client: UnixSocket
                do { client = try listener.accept() } catch let e as SyscallError where [EMFILE, ENFILE, ENOBUFS, ENOMEM, EINTR, ECONNABORTED].contains(e.errno) {
                    usleep(50_000)  // out of descriptors: back off and keep accepting, never go deaf
                    continue
                } catch { return }  // the listener was shut down (drain)
                try? client.setTimeout(seconds: 60)  // a silent client must not hold a thread forever
                Thread { ServeCommand.serve(client, service) }.start()
            }
        }.start()
        upgrader?.start()
        try? await gracefulShutdown()
        log.notice("draining", metadata: ["seconds": "\(drainSeconds)"])
        // The drain may outlast the unit's TimeoutStopSec: extend it to drain_seconds (+ 10 s to
        // remove the socket and exit), so systemd never SIGKILLs a service inside a pause.
        manager?.send("STOPPING=1\nEXTEND_TIMEOUT_USEC=\(UInt64((drainSeconds + 10) * 1e6))\nSTATUS=draining up to \(drainSeconds) s")
        let deadline = Date().addingTimeInterval(drainSeconds)
        listener.remove()
        Glibc.shutdown(listener.fd.raw, Int32(SHUT_RDWR))
        if let upgrader {
            // A batch it runs finishes first; waited for on a thread of its own, not the pool's.
            await onThread { upgrader.stop(waitingUntil: deadline) }
        }
        while service.busy && Date() < deadline { try? await Task.sleep(for: .milliseconds(50)) }
        if service.busy {
            throw DrainTimedOut(seconds: drainSeconds, inFlight: "\(service.status()["inFlight"] ?? [])")
        }
    }
}

/// Reaps the new hypervisor instances the service started once they exit (ChildReaper): a
/// zombie would pass for a live instance. Runs until the group shuts down, last.
struct ChildReaperService: Service {
    let log: Logger

    func run() async throws {
        try? await cancelWhenGracefulShutdown {
            while !Task.isCancelled {
                for (pid, status) in ChildReaper.reapExited() where status >= 0 {
                    log.info("reaped", metadata: ["pid": "\(pid)", "status": "\(status)"])
                }
                try await Task.sleep(for: .milliseconds(500))
            }
        }
        ChildReaper.reapExited()
    }
}

/// Runs blocking work on a thread of its own and resumes when it is done (the cooperative pool
/// has one thread per core here: two).
func onThread(_ work: @escaping @Sendable () -> Void) async {
    await withCheckedContinuation { (done: CheckedContinuation<Void, Never>) in
        Thread { work(); done.resume() }.start()
    }
}

/// Runs `body` on the concurrency runtime from synchronous code and waits for it.
func runToEnd(_ body: @escaping @Sendable () async throws -> Void) throws {
    let finished = DispatchSemaphore(value: 0)
    let outcome = Box<Result<Void, any Error>>()
    Task {
        do { try await body(); outcome.value = .success(()) } catch { outcome.value = .failure(error) }
        finished.signal()
    }
    finished.wait()
    try outcome.value?.get()
}

/// One `baton serve` per state directory: a second one would recover the first one's running
/// upgrades as if they were abandoned. The lock lives as long as the process.
enum ServiceLock {
    static func take(in state: String) throws {
        let path = state + "/serve.lock"
        let fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0o600)
        guard fd >= 0 else { throw fail("cannot open \(path): \(String(cString: strerror(errno)))", .failure) }
        guard flock(fd, LOCK_EX | LOCK_NB) == 0 else {
            let holder = Host.readSmallFile(path)?.trimmingCharacters(in: .whitespacesAndNewlines) ?? "?"
            throw fail("another baton serve (pid \(holder)) uses state directory \(state)", .failure)
        }
        ftruncate(fd, 0)
        let me = Array("\(getpid())\n".utf8)
        _ = pwrite(fd, me, me.count, 0)
    }
}
