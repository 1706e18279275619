/// batonvmm's API under `/api/v1/baton/` (beside the Cloud Hypervisor dialect), as both ends
/// speak it: the VMM encodes and decodes these types, and the controller, the harness and the
/// tests use the very same ones. One definition, no hand-written mirrors.
public enum BatonVMMAPI {
    public static let status = "/api/v1/baton/status"
    public static let prepare = "/api/v1/baton/handoff.prepare"
    public static let transfer = "/api/v1/baton/handoff.transfer"
    public static let commit = "/api/v1/baton/handoff.commit"
    public static let abandon = "/api/v1/baton/handoff.abandon"
    public static let adopt = "/api/v1/baton/adopt"
    public static let exec = "/api/v1/baton/exec"
    /// Before the pause of an exec in place: drop the guest RAM's page tables (the guest runs on).
    public static let execPrepare = "/api/v1/baton/exec.prepare"
    public static let ping = "/api/v1/vmm.ping"
    public static let pause = "/api/v1/vm.pause"
    public static let resume = "/api/v1/vm.resume"
}

/// A batonvmm guest's run state.
public enum VMRunState: String, Codable, Sendable {
    case created = "Created"
    case running = "Running"
    case paused = "Paused"
    case shutdown = "Shutdown"
    /// A new instance waiting for a handoff (batonvmm --incoming).
    case incoming = "Incoming"
    /// A batonvmm with no VM yet.
    case notCreated = "NotCreated"
}

/// A vCPU's observable state at a heartbeat (read from its data page at the `out` exit).
public struct GuestBeat: Codable, Equatable, Sendable {
    public var counter: UInt64
    public var hash: UInt64
    public var r15: UInt64
    public var beats: UInt64

    public init(counter: UInt64, hash: UInt64, r15: UInt64, beats: UInt64) {
        self.counter = counter
        self.hash = hash
        self.r15 = r15
        self.beats = beats
    }
}

/// `GET /api/v1/baton/status`.
public struct VMStatus: Codable, Sendable {
    public var pid: Int32
    public var state: VMRunState
    /// `kvm` or `simulated`; nil before a VM exists.
    public var backend: String?
    public var ramBytes: Int
    /// Guest RAM is a memfd (memfd transport, exec in place); false: anonymous memory.
    public var ramShared: Bool
    public var vcpus: Int
    public var beats: [GuestBeat?]
    public var heartbeatExits: UInt64
    /// When the vCPUs last started running (CLOCK_MONOTONIC): the end of a handoff's downtime.
    public var startedAtMonotonicNs: UInt64
    public var failures: [String]
    public var ramDigestBeforeResume: String?
    /// How many times this process has exec'd itself into a new binary.
    public var execGeneration: Int
    /// Why the last exec in place failed, if it did (the VM stayed in this image, paused).
    public var lastExecError: String?
    public var version: String
    /// After an exec in place: when this image's main() began, and when it had the VM restored
    /// (CLOCK_MONOTONIC), so the controller can split the exec's time.
    public var imageStartedAtMonotonicNs: UInt64?
    public var restoredAtMonotonicNs: UInt64?

    /// A throw-away status for warming the JSON encoding in an image that just exec'd (its first
    /// answer is inside the guest's pause); see HandoffTransferred.warmUpSample.
    public static let warmUpSample = VMStatus(pid: 0, state: .paused, backend: "kvm", ramBytes: 0, ramShared: true, vcpus: 1, beats: [],
                                              heartbeatExits: 0, startedAtMonotonicNs: 0, failures: [], ramDigestBeforeResume: nil,
                                              execGeneration: 0, lastExecError: nil, version: "")

    public init(pid: Int32, state: VMRunState, backend: String?, ramBytes: Int, ramShared: Bool, vcpus: Int, beats: [GuestBeat?],
                heartbeatExits: UInt64, startedAtMonotonicNs: UInt64, failures: [String], ramDigestBeforeResume: String?,
                execGeneration: Int, lastExecError: String?, version: String) {
        self.pid = pid
        self.state = state
        self.backend = backend
        self.ramBytes = ramBytes
        self.ramShared = ramShared
        self.vcpus = vcpus
        self.beats = beats
        self.heartbeatExits = heartbeatExits
        self.startedAtMonotonicNs = startedAtMonotonicNs
        self.failures = failures
        self.ramDigestBeforeResume = ramDigestBeforeResume
        self.execGeneration = execGeneration
        self.lastExecError = lastExecError
        self.version = version
    }
}

/// `PUT /api/v1/baton/handoff.prepare`: connect to the new instance's agent and prepare
/// (before the pause) everything the transfer needs.
public struct HandoffPrepareRequest: Codable, Sendable {
    public var agentSocket: String
    /// `gift`, `memfd`, `copy` or `auto` (default).
    public var transport: String?
    public var releaseSource: Bool?
    /// Seconds in (0, 3600] (default 10).
    public var stallTimeoutSeconds: Double?
    /// An explicit gift on a kernel that refuses SPLICE_F_GIFT: refuse instead of copying.
    public var strict: Bool?

    public init(agentSocket: String, transport: String? = nil, releaseSource: Bool? = nil, stallTimeoutSeconds: Double? = nil, strict: Bool? = nil) {
        self.agentSocket = agentSocket
        self.transport = transport
        self.releaseSource = releaseSource
        self.stallTimeoutSeconds = stallTimeoutSeconds
        self.strict = strict
    }

    enum CodingKeys: String, CodingKey {
        case agentSocket = "agent_socket", transport, releaseSource = "release_source", stallTimeoutSeconds = "stall_timeout_seconds", strict
    }
}

/// The answer to `handoff.prepare`: each region's transport (by region id) and what was decided
/// differently from what was asked, one line each.
public struct HandoffPrepared: Codable, Sendable {
    public var transports: [String: String]
    public var notices: [String]
    public init(transports: [String: String], notices: [String]) {
        self.transports = transports
        self.notices = notices
    }
}

/// The answer to `PUT /api/v1/baton/handoff.transfer[?digest=1]` (the VM paused): what moved and
/// how, verified by the new instance.
public struct HandoffTransferred: Codable, Sendable {
    public var report: TransferReport
    /// Writing the vCPU state into the state region (done at the pause).
    public var stateMs: Double
    public var stateBytes: Int
    public var transferMs: Double
    /// Whole-RAM digest at the pause (`?digest=1` only).
    public var ramDigestAtPause: String?
    /// The state was written inside the pause request (its time is part of the pause's round
    /// trip), not by this transfer. Nil from a VMM that does not say.
    public var stateSavedAtPause: Bool?
    /// A throw-away value for warming the JSON paths (`HTTPResponse.json`, the controller's
    /// decode) before the pause: the first encode or decode of a type in a process costs
    /// ~0.2–0.3 ms more than the next (measured), and this one crosses the pause.
    public static let warmUpSample: HandoffTransferred = {
        // Every part the real answer has (regions, faults, notices), so nothing is left cold.
        var report = TransferReport()
        report.regions = [RegionReport(id: 0, transport: "memfd", bytes: 4096, pages: .shared)]
        report.injectedFaults = ["none": 0]
        report.notices = [""]
        report.pipeSizeRefusals = [""]
        return HandoffTransferred(report: report, stateMs: 0, stateBytes: 0, transferMs: 0, ramDigestAtPause: "0", stateSavedAtPause: true)
    }()

    public init(report: TransferReport, stateMs: Double, stateBytes: Int, transferMs: Double, ramDigestAtPause: String?, stateSavedAtPause: Bool? = nil) {
        self.report = report
        self.stateMs = stateMs
        self.stateBytes = stateBytes
        self.transferMs = transferMs
        self.ramDigestAtPause = ramDigestAtPause
        self.stateSavedAtPause = stateSavedAtPause
    }
}

/// `PUT /api/v1/baton/exec`: exec the paused VMM's process into `binary`, keeping its pid.
public struct ExecRequest: Codable, Sendable {
    public var binary: String
    public init(binary: String) { self.binary = binary }
}

/// Every error answer of the API: the one-line message and the typed code the controller
/// decides on (never the message's text).
public struct APIErrorBody: Codable, Sendable {
    public var error: String
    public var code: HandoffErrorCode
    public init(error: String, code: HandoffErrorCode) {
        self.error = error
        self.code = code
    }
}

/// What happened to a region's pages, observed rather than assumed.
public enum PageDisposition: String, Sendable, Codable {
    /// The receiver holds the sender's very frames and the sender's pages are gone.
    case moved
    /// The receiver holds different frames: the kernel copied (mainline vmsplice MOVE does).
    case copied
    /// Both processes map the same frames (memfd handed over as a descriptor).
    case shared
    /// Frame numbers are hidden from this process (no CAP_SYS_ADMIN) and the source kept its pages.
    case unknown
}

/// One region's outcome.
public struct RegionReport: Sendable, Codable, Equatable {
    public let id: UInt32
    public let transport: String
    public let bytes: UInt64
    public let pages: PageDisposition
    public init(id: UInt32, transport: String, bytes: UInt64, pages: PageDisposition) {
        self.id = id
        self.transport = transport
        self.bytes = bytes
        self.pages = pages
    }
}

/// What a handoff really did, for logs, `--json` and the downtime breakdown.
public struct TransferReport: Sendable, Codable {
    public var regions: [RegionReport] = []
    public var protocolVersion: UInt16 = 0
    public var lanes: Int = 0
    public var pipeCapacity: Int = 0
    public var pipeSizeRefusals: [String] = []
    public var chunkCount: Int = 0
    public var bytes: UInt64 = 0
    /// transferBegin sent → sender's last byte handed to the kernel.
    public var sendSeconds: Double = 0
    /// transferBegin sent → receiver confirmed every checksum and digest.
    public var transferAndVerifySeconds: Double = 0
    public var verified = false
    /// Errno faults injected by BATON_SYSCALL_FAULTS during this process's life, per call.
    public var injectedFaults: [String: Int] = [:]
    /// The sender freed its pages as they were handed over (HandoffOptions.releaseSource).
    public var releasedSource = false
    /// What the sender decided differently from what was asked, one line each (e.g. gift
    /// refused by the kernel, streamed by pipe copy instead). Printed by the CLI as notices.
    public var notices: [String] = []

    public init() {}

    /// True only if every streamed region's pages were observed to move (never assumed).
    public var pagesMoved: Bool {
        let streamed = regions.filter { $0.transport != TransportKind.memfd.description }
        return !streamed.isEmpty && streamed.allSatisfy { $0.pages == .moved }
    }
}
