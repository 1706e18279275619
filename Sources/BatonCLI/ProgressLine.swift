import BatonController
import BatonCore
import BatonSystem
import BatonTransfer
import Foundation
import Glibc

/// One status line on the terminal (stderr), rewritten in place, for long work: a transfer, the
/// harness, a batch. Silent with `--json` and whenever stderr is not a terminal, so logs and
/// pipes never see carriage returns.
final class ProgressLine: @unchecked Sendable {
    let enabled: Bool
    private let lock = NSLock()
    private var shown = false
    private var ticker: Thread?
    private var stopped = false

    init(json: Bool = false) {
        enabled = !json && isatty(STDERR_FILENO) == 1
    }

    /// Replaces the line with `text` (cut to the terminal's width).
    func show(_ text: String) {
        guard enabled else { return }
        lock.lock(); defer { lock.unlock() }
        guard !stopped else { return }  // a ticker's last redraw after `finish`
        var size = winsize()
        let width = ioctl(STDERR_FILENO, UInt(TIOCGWINSZ), &size) == 0 && size.ws_col > 0 ? Int(size.ws_col) - 1 : 119
        FileHandle.standardError.write(Data("\r\u{1B}[K\(text.prefix(width))".utf8))
        shown = true
    }

    /// Prints a whole line above the progress line (a finished case, a note).
    func note(_ text: String) {
        guard enabled else { FileHandle.standardError.write(Data((text + "\n").utf8)); return }
        lock.lock(); defer { lock.unlock() }
        FileHandle.standardError.write(Data("\r\u{1B}[K\(text)\n".utf8))
        shown = false
    }

    /// Redraws `text()` five times a second on a thread of its own until `finish`.
    func tick(_ text: @escaping @Sendable () -> String) {
        guard enabled else { return }
        let t = Thread { [self] in
            while !isStopped { show(text()); usleep(200_000) }
        }
        ticker = t
        t.start()
    }

    private var isStopped: Bool { lock.lock(); defer { lock.unlock() }; return stopped }

    /// Stops the ticker and clears the line.
    func finish() {
        guard enabled else { return }
        lock.lock()
        stopped = true
        if shown { FileHandle.standardError.write(Data("\r\u{1B}[K".utf8)) }
        shown = false
        lock.unlock()
    }

}

/// A transfer's rate, counted from its first byte (mapping and pre-faulting before it are not
/// transfer time): "sent 1.50GiB of 4GiB, 3.21 GiB/s".
final class RateMeter: @unchecked Sendable {
    private let lock = NSLock()
    private var firstByteAt: UInt64?

    func describe(bytes: Int, of total: Int?, verb: String) -> String {
        let of = total.map { " of \(ByteSize($0))" } ?? ""
        guard bytes > 0 else { return "\(verb) 0B\(of) (setting up)" }
        let now = Host.monotonicNanoseconds()
        lock.lock()
        if firstByteAt == nil { firstByteAt = now }
        let seconds = Double(now &- firstByteAt!) / 1e9
        lock.unlock()
        let rate = seconds > 0.05 ? String(format: ", %.2f GiB/s", Double(bytes) / seconds / Double(1 << 30)) : ""
        return "\(verb) \(ByteSize(bytes))\(of)\(rate)"
    }
}

/// The run a benchmark is on, for its progress line: "bench: gift run 2/5: moved 512MiB of 1GiB,
/// 9.80 GiB/s".
final class CurrentRun: @unchecked Sendable {
    private let lock = NSLock()
    private var label = "bench: starting"
    private var moved: TransferProgress?
    private var total = 0
    private var rate = RateMeter()

    func begin(_ label: String, moved: TransferProgress, of total: Int) {
        lock.lock(); defer { lock.unlock() }
        (self.label, self.moved, self.total, rate) = (label, moved, total, RateMeter())
    }

    func describe() -> String {
        lock.lock(); defer { lock.unlock() }
        guard let moved else { return label }
        return "\(label): " + rate.describe(bytes: moved.bytesMoved, of: total, verb: "moved")
    }
}

/// One upgrade's progress line, from the phases its journal records: "upgrade of web1: paused,
/// moving the guest (2.1 s)".
final class UpgradeProgress: @unchecked Sendable {
    let line: ProgressLine
    private let lock = NSLock()
    private var phase: UpgradeJournal.Phase?
    private let startedAt = Host.monotonicNanoseconds()

    init(_ what: String, json: Bool) {
        line = ProgressLine(json: json)
        line.tick { [self] in
            lock.lock()
            let phase = self.phase
            lock.unlock()
            let seconds = Double(Host.monotonicNanoseconds() - startedAt) / 1e9
            return "upgrade of \(what): \(phase.map(Self.describe) ?? "preflight") (\(String(format: "%.1f", seconds)) s)"
        }
    }

    /// Runs the upgrade and clears the line however it ends, before its report is printed.
    func finishing<T>(_ upgrade: () throws -> T) rethrows -> T {
        defer { line.finish() }
        return try upgrade()
    }

    /// `UpgradeOptions.onPhase`: stores the phase only (it is called inside the pause).
    func record(_ phase: UpgradeJournal.Phase) {
        lock.lock()
        self.phase = phase
        lock.unlock()
    }

    static func describe(_ phase: UpgradeJournal.Phase) -> String {
        switch phase {
        case .started: "starting the new instance"
        case .newInstanceReady: "new instance ready"
        case .prepared: "prepared, pausing"
        case .paused: "paused, moving the guest"
        case .transferred: "moved, verifying"
        case .committing: "committing"
        case .committed: "committed, resuming in the new instance"
        case .resumed: "guest runs in the new instance, finishing"
        case .adopted: "adopted by its manager"
        case .rolledBack: "rolled back"
        case .done: "done"
        }
    }
}
