import BatonSystem
import Glibc
import Synchronization

/// Runs one blocking body per lane on its own pthread (never the cooperative pool), pins
/// lane k to CPU k so a pipe's writer and reader share a CPU (a cross-CPU wake-up costs
/// 50–65 µs here), and returns the first error after all lanes have joined.
public enum LaneThreads {
    final class Job: @unchecked Sendable {
        let lane: Int
        let pin: Bool
        let body: (Int) throws -> Void
        var error: Error?
        let finished = Atomic<Bool>(false)
        init(lane: Int, pin: Bool, body: @escaping (Int) throws -> Void) {
            self.lane = lane
            self.pin = pin
            self.body = body
        }
    }

    public static func run(lanes: Int, pin: Bool = true, _ body: @escaping (Int) throws -> Void) throws {
        try LaneJob(lanes: lanes, pin: pin, body).wait()
    }
}

private func laneThreadMain(_ context: UnsafeMutableRawPointer?) -> UnsafeMutableRawPointer? {
    let job = Unmanaged<LaneThreads.Job>.fromOpaque(context!).takeRetainedValue()
    if job.pin { Host.pinCurrentThread(to: job.lane) }
    do { try job.body(job.lane) } catch { job.error = error }
    job.finished.store(true, ordering: .releasing)
    return nil
}

/// Lanes started in the background; `wait()` joins them and rethrows the first error.
public final class LaneJob: @unchecked Sendable {
    private var threads: [pthread_t] = []
    private var jobs: [LaneThreads.Job] = []
    private var joined = false

    public init(lanes: Int, pin: Bool = true, _ body: @escaping (Int) throws -> Void) throws {
        jobs = (0..<lanes).map { LaneThreads.Job(lane: $0, pin: pin, body: body) }
        for job in jobs {
            var thread = pthread_t()
            let rc = pthread_create(&thread, nil, laneThreadMain, Unmanaged.passRetained(job).toOpaque())
            guard rc == 0 else { throw SyscallError("pthread_create", errno: rc) }
            threads.append(thread)
        }
    }

    /// True once every lane has returned (successfully or not).
    public var isFinished: Bool { jobs.allSatisfy { $0.finished.load(ordering: .acquiring) } }

    /// True once any lane has failed.
    public var hasFailed: Bool { jobs.contains { $0.finished.load(ordering: .acquiring) && $0.error != nil } }

    public func wait() throws {
        if !joined {
            for t in threads { pthread_join(t, nil) }
            joined = true
        }
        // The cause, not a lane that stopped because of it.
        let errors = jobs.compactMap(\.error)
        if let cause = errors.first(where: { if case TransferError.cancelled = $0 { false } else { true } }) ?? errors.first { throw cause }
    }

    deinit { if !joined { for t in threads { pthread_join(t, nil) } } }
}
