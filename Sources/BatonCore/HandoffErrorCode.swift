/// What kind of failure a handoff step reported, as a type both ends share: the agents classify
/// their errors into it, batonvmm's API carries it as `"code"` beside the error's message, and
/// the controller and the CLI decide (roll back, exit code) on it, never on the message's text.
public enum HandoffErrorCode: String, Codable, Sendable, CaseIterable {
    /// A checksum, digest or RAM sample differed (the handoff was rolled back).
    case integrity
    /// The peer was refused: wrong uid (SO_PEERCRED), protocol version or dialect.
    case peerRefused
    /// The request does not fit the VM's state (nothing was done).
    case invalidState
    /// The request itself was malformed (nothing was done).
    case badRequest
    /// Anything else: the message says what and where.
    case failed
}
