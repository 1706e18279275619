import BatonCore
import BatonSystem
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
