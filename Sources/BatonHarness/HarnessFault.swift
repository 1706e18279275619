// BatonHarness proves the guarantees on real processes: it runs upgrade scenarios against
// real batonvmm instances with one injected fault each, and judges every outcome with the
// independent guest model, the instances left running and the guest-RAM digest.
import BatonController

/// One named fault of the matrix and how it is injected.
public struct HarnessFault: Sendable, Hashable, CustomStringConvertible {
    public let name: String
    /// Environment for the old instance (started fresh per case).
    public var oldEnvironment: [String: String] = [:]
    /// Environment for the new instance.
    public var newEnvironment: [String: String] = [:]
    public var controller: ControllerFault?
    /// What replaces the new binary: nil (a good copy), "missing", "not-executable", "crashes".
    public var binary: String?
    /// Transports it applies to (nil: all).
    public var transports: Set<String>?
    /// Seconds of stall timeout for the case (short, so stalls end quickly).
    public var stallTimeout: Double = 2
    /// Where the guest must end up: only a fault after the commit decision rolls forward.
    public var expected: CaseOutcome = .rolledBack
    /// Text the case's outcome must mention, proving the fault really fired (not some other failure).
    public var evidence: String?
    /// Transports for which losing the guest is physics, not a defect (reported as expectedLoss).
    public var lossExpectedFor: Set<String> = []
    /// Guest RAM backing of the old instance per transport ("shared" memfd by default, or "private").
    public var oldMemory: [String: String] = [:]

    public var description: String { name }

    public static func == (a: HarnessFault, b: HarnessFault) -> Bool { a.name == b.name }
    public func hash(into h: inout Hasher) { h.combine(name) }

    static func controllerFault(_ action: ControllerFault.Action, _ phase: UpgradeJournal.Phase) -> HarnessFault {
        let forward = action == .crash && [.committing, .committed].contains(phase)
        return HarnessFault(name: "\(action.rawValue):\(phase.rawValue)", controller: ControllerFault(action: action, phase: phase),
                            expected: forward ? .committed : .rolledBack,
                            evidence: action == .crash ? "controller crashed (injected) after \(phase.rawValue)" : nil)
    }

    /// The old instance dies after the pause. With memfd the new instance adopts the guest
    /// (roll forward); gift and copy run on anonymous RAM here, whose pages not yet handed
    /// over die with their process: an expected, reported loss (Docs/FAULTS.md).
    /// After `transferred` everything was received and verified by the new instance, so every
    /// transport rolls forward.
    static func oldDeath(_ phase: UpgradeJournal.Phase) -> HarnessFault {
        HarnessFault(name: "kill-old-after:\(phase.rawValue)", controller: ControllerFault(action: .killOld, phase: phase),
                     expected: .committed, evidence: nil, lossExpectedFor: phase == .transferred ? [] : ["gift", "copy"],
                     oldMemory: ["gift": "private", "copy": "private"])
    }

    /// The old instance dies after the pause while gift or copy stream guest RAM that lives in a
    /// memfd (batonvmm's default): the memfd went to the new instance too, held for adoption
    /// (Docs/PROTOCOL.md, region flag 3), so the guest rolls forward with nothing lost.
    static func oldDeathSharedRAM(_ phase: UpgradeJournal.Phase) -> HarnessFault {
        HarnessFault(name: "kill-old-after:\(phase.rawValue)+memfd-ram", controller: ControllerFault(action: .killOld, phase: phase),
                     transports: ["gift", "copy"], expected: .committed, evidence: "adopted the guest from its memfds")
    }

    /// Every fault the harness knows.
    public static let all: [HarnessFault] = [
        HarnessFault(name: "none", expected: .committed, evidence: "verified yes"),
        HarnessFault(name: "new-binary-missing", binary: "missing", evidence: "is missing"),
        HarnessFault(name: "new-binary-not-executable", binary: "not-executable", evidence: "not executable"),
        HarnessFault(name: "new-binary-crashes-on-start", binary: "crashes", evidence: "exited with status 139"),
        HarnessFault(name: "new-instance-enomem-mapping-ram", newEnvironment: ["BATON_SYSCALL_FAULTS": "mmap=ENOMEM@1+"], evidence: "ENOMEM"),
        controllerFault(.killNew, .newInstanceReady),
        controllerFault(.killNew, .prepared),
        controllerFault(.killNew, .paused),
        controllerFault(.killNew, .transferred),
        HarnessFault(name: "kill-new-after-chunk:2", newEnvironment: ["BATON_FAULT": "kill-receiver-after-chunk:2"], transports: ["gift", "copy"]),
        controllerFault(.crash, .newInstanceReady),
        controllerFault(.crash, .prepared),
        controllerFault(.crash, .paused),
        controllerFault(.crash, .transferred),
        controllerFault(.crash, .committing),
        controllerFault(.crash, .committed),
        HarnessFault(name: "corrupt-chunk:3", newEnvironment: ["BATON_FAULT": "corrupt-chunk:3"], evidence: "integrity check failed: region 0 offset 0x300000"),
        HarnessFault(name: "pipe-closed-after-chunk:2", oldEnvironment: ["BATON_FAULT": "close-pipe-after-chunk:2"], transports: ["gift"], evidence: "pipe"),
        HarnessFault(name: "truncated-message:transferEnd", oldEnvironment: ["BATON_FAULT": "truncate-message:transferEnd"], evidence: "truncated"),
        HarnessFault(name: "oversize-message:verify", oldEnvironment: ["BATON_FAULT": "oversize-message:verify"], evidence: "payload bytes (limit"),
        HarnessFault(name: "stalled-peer:verify", oldEnvironment: ["BATON_FAULT": "stall-message:verify"], evidence: "stall"),
        HarnessFault(name: "stalled-receiver:verifyResult", newEnvironment: ["BATON_FAULT": "stall-message:verifyResult"], evidence: "stall"),
        oldDeath(.paused),
        oldDeath(.transferred),
        oldDeathSharedRAM(.paused),
    ]

    public func applies(to transport: String) -> Bool { transports?.contains(transport) ?? true }
}
