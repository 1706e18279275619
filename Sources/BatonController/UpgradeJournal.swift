import BatonSystem
import Foundation
import Glibc

/// A crash-safe record of one upgrade: one JSON line per phase, written before the phase's
/// effects begin, so `baton recover` can finish (after commit) or roll back (before it).
public final class UpgradeJournal: @unchecked Sendable {
    public enum Phase: String, Codable, Sendable {
        case started, newInstanceReady, prepared, paused, transferred, committing, committed, resumed, adopted, rolledBack, done

        /// Whether the entry is fsync'd as it is written. The phases inside the guest pause are
        /// not: a written line is in the page cache, which every later reader (`baton recover`
        /// after the controller died) sees; an fsync protects only against the host itself
        /// crashing, which ends both hypervisor processes, so recovery would find the guest gone
        /// whatever the journal said. An fsync costs 0.2–1.5 ms of guest pause on this disk. The
        /// next durable entry (`committed`, right after the resume) makes them durable too.
        public var fsyncedWhenWritten: Bool { ![.paused, .transferred, .committing].contains(self) }
    }

    public struct Entry: Codable, Sendable {
        public var phase: Phase
        public var atMonotonicNs: UInt64
        public var vm: String
        public var oldPid: Int32?
        public var newPid: Int32?
        public var note: String?
        /// The hypervisor's own record of the handoff (JSON), for recovery: what a QEMU
        /// upgrade changed on the host (socket paths, libvirtd's command line, ...).
        public var context: String?
        /// An exec-in-place upgrade (one process, a new image): the image generation the VM had
        /// before it. Recovery compares it with the generation running now.
        public var inPlaceGeneration: Int?

        public init(phase: Phase, atMonotonicNs: UInt64, vm: String, oldPid: Int32?, newPid: Int32?, note: String? = nil, context: String? = nil,
                    inPlaceGeneration: Int? = nil) {
            self.context = context
            self.inPlaceGeneration = inPlaceGeneration
            self.phase = phase
            self.atMonotonicNs = atMonotonicNs
            self.vm = vm
            self.oldPid = oldPid
            self.newPid = newPid
            self.note = note
        }
    }

    public let path: String
    let fd: Int32

    public init(path: String) throws {
        self.path = path
        // O_NOFOLLOW: a link planted at the journal's path must not make Baton append elsewhere.
        fd = try checkedCall("open(\(path))") { open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC | O_NOFOLLOW, 0o600) }
    }

    deinit { close(fd) }

    /// Appends `entry`, fsync'd if `durable` (by default as its phase says).
    public func record(_ entry: Entry, durable: Bool? = nil) throws {
        let durable = durable ?? entry.phase.fsyncedWhenWritten
        let line = Array(try JSONEncoder().encode(entry)) + [UInt8(ascii: "\n")]
        _ = try line.withUnsafeBytes { raw in try checkedCall("write(\(path))") { write(fd, raw.baseAddress, raw.count) } }
        if durable { _ = try checkedCall("fsync(\(path))") { fsync(fd) } }
    }

    /// The entries of the journal's last upgrade (from its last `started` on): a path used again
    /// never lets an earlier upgrade's entries decide a later one's recovery.
    public static func read(path: String) throws -> [Entry] {
        guard let data = FileManager.default.contents(atPath: path) else {
            throw VMMClient.Failure(description: "journal \(path) cannot be read")
        }
        let all = String(decoding: data, as: UTF8.self).split(separator: "\n").compactMap {
            try? JSONDecoder().decode(Entry.self, from: Data($0.utf8))  // a torn last line is ignored
        }
        guard let start = all.lastIndex(where: { $0.phase == .started }) else { return all }
        return Array(all[start...])
    }

    /// The journal of a new upgrade at `path`. Refused if the file holds an upgrade that never
    /// finished: its recovery comes first (a new upgrade would hide it).
    public static func forNewUpgrade(path: String) throws -> UpgradeJournal {
        if FileManager.default.fileExists(atPath: path), let entries = try? read(path: path), let last = entries.last {
            let phases = Set(entries.map(\.phase))
            if !phases.contains(.done) && !phases.contains(.rolledBack) {
                throw UnfinishedJournal(path: path, vm: last.vm, phase: last.phase)
            }
        }
        return try UpgradeJournal(path: path)
    }

    public struct UnfinishedJournal: Error, CustomStringConvertible {
        public let path: String
        public let vm: String
        public let phase: Phase
        public var description: String {
            "journal \(path) holds an unfinished upgrade of \(vm) (last phase \(phase.rawValue)): finish it with `baton recover --journal \(path)` first; nothing was changed"
        }
    }
}
