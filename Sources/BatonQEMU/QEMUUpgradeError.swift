/// How a QEMU upgrade ended when it did not succeed. The CLI's exit code comes from the case,
/// never from the message.
public enum QEMUUpgradeError: Error, CustomStringConvertible, Sendable {
    /// Preflight refused the upgrade; nothing was started or paused.
    case refused(String)
    /// The command line cannot be carried over to the new QEMU (preflight; nothing paused).
    case unsupported(String)
    /// A failure before the new process ran the guest; the old QEMU runs it again.
    case rolledBack(String)
    /// Verification differed (RAM sample or device set); rolled back.
    case integrity(String)
    /// After the point of no return something failed; the new QEMU runs the guest and the
    /// message says what is left to do (`baton recover`).
    case rollForwardIncomplete(String)
    /// Neither QEMU can run the guest any more (the message says why and what was cleaned up).
    case lost(String)

    /// The case's name, for carrying it across the service socket (the exit code comes from it).
    public var kind: String {
        switch self {
        case .refused: "refused"
        case .unsupported: "unsupported"
        case .rolledBack: "rolledBack"
        case .integrity: "integrity"
        case .rollForwardIncomplete: "rollForwardIncomplete"
        case .lost: "lost"
        }
    }

    /// The error named by `kind` (what the service sent), carrying `message` as it was printed.
    public init?(kind: String, message: String) {
        switch kind {
        case "refused": self = .refused(message)
        case "unsupported": self = .unsupported(message)
        case "rolledBack": self = .rolledBack(message)
        case "integrity": self = .integrity(message)
        case "rollForwardIncomplete": self = .rollForwardIncomplete(message)
        case "lost": self = .lost(message)
        default: return nil
        }
    }

    public var description: String {
        switch self {
        case .refused(let m): "refused: \(m); nothing was paused"
        case .unsupported(let m): "unsupported: \(m); nothing was paused"
        case .rolledBack(let m): "\(m); rolled back"
        case .integrity(let m): "integrity check failed: \(m); rolled back"
        case .rollForwardIncomplete(let m): "the new QEMU runs the guest, but: \(m)"
        case .lost(let m): "LOST: \(m)"
        }
    }
}
