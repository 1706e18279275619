import Foundation

/// Everything a QEMU upgrade changes on the host, written to the journal before it is changed,
/// so that the live sequence and `baton recover` undo or finish it with the same code.
public struct QEMUHandoffRecord: Codable, Sendable {
    public var domain: String
    public var uri: String
    public var statusFile: String
    public var monitorPath: String
    public var oldPid: Int32
    public var oldEmulator: String
    public var newEmulator: String
    public var newPid: Int32?
    public var mode: QEMUHandoffMode
    /// Listening socket paths moved to the new QEMU: path → where the old socket's inode is kept.
    public var movedSockets: [String: String] = [:]
    public var libvirtd: LibvirtDaemon
    /// libvirt's capability flags for the new binary (for the status file).
    public var newCapabilityFlags: [String]?
    public var updateDefinition = false

    public var json: String { String(decoding: (try? JSONEncoder().encode(self)) ?? Data(), as: UTF8.self) }
    public static func decode(_ text: String) -> QEMUHandoffRecord? { try? JSONDecoder().decode(QEMUHandoffRecord.self, from: Data(text.utf8)) }
}

/// How guest state reaches the new QEMU. RAM never moves in the first two: both processes map
/// the same shared memory.
public enum QEMUHandoffMode: String, Codable, Sendable {
    /// QEMU 10+ on both sides: the new process gets the old one's RAM fds over the cpr channel.
    case cprTransfer = "cpr-transfer"
    /// Migration with x-ignore-shared: shared RAM is skipped, the new process maps the same memfd.
    case ignoreShared = "ignore-shared"
    /// Private RAM (`--allow-copy`): QEMU's migration stream copies it; two copies exist for a
    /// while, and the pause is the final stop-and-copy.
    case copy = "copy"
}
