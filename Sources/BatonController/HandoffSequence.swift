/// One handoff sequence for every hypervisor: start the new instance (guest running), pause and
/// move the guest, journal the point of no return, run the new instance, finish (fence the old
/// one, hand the new one to its manager). After a failure the sequence, not the hypervisor,
/// decides between back, forward and lost, from what the hypervisor observed. batonvmm
/// (`UpgradeController`) and QEMU under libvirt (`QEMUUpgrade`) are its two implementations.
public protocol HandoffHypervisor: AnyObject {
    /// Records `phase` in the upgrade's journal (and fires a fault point set for it). Up to and
    /// including `committing`, a write that fails throws: the upgrade then rolls back.
    func journal(_ phase: UpgradeJournal.Phase) throws
    /// Before the pause: the new instance runs and is ready to receive. The guest runs on.
    func startNewInstance() throws
    /// Pauses the guest and moves and verifies its state into the new instance. Nobody runs the
    /// guest when it returns; the old instance could still resume it.
    func pauseAndTransfer() throws
    /// After `committing` is journaled: the new instance runs the guest.
    func runNewInstance() throws
    /// The new instance runs the guest: fence the old one, have the manager adopt the new one.
    func finish() throws
    /// What is true now, observed after `error`, not what should be.
    func situation(after error: Error, pastPointOfNoReturn: Bool) -> HandoffSituation
    /// Stops the new instance and resumes the old one; returns what to throw (saying whether the
    /// old instance was observed running the guest).
    func rollBack(after error: Error) -> Error
    /// Has the new instance take (or keep) the guest without the old one. Returns if the handoff
    /// then finished; throws what is left (`baton recover`) otherwise.
    func rollForward(after error: Error) throws
    /// Neither instance can run the guest: cleans up and returns what to throw.
    func lost(after error: Error, situation: HandoffSituation) -> Error
}

/// What a hypervisor can still do with the guest after a failure, as observed.
public struct HandoffSituation: Equatable, Sendable, CustomStringConvertible {
    /// `committing` was journaled: the new instance may be told to run the guest.
    public var pastPointOfNoReturn: Bool
    /// The new instance may have run the guest (told to, even if the answer was lost): the
    /// old instance's copy is stale from then on.
    public var newMayHaveRunGuest: Bool
    /// The old instance lives and holds the guest as it was at the pause (or runs it still).
    public var oldCanResume: Bool
    /// The new instance lives and holds all of the guest (state and RAM), or runs it.
    public var newCanRun: Bool

    public init(pastPointOfNoReturn: Bool, newMayHaveRunGuest: Bool, oldCanResume: Bool, newCanRun: Bool) {
        self.pastPointOfNoReturn = pastPointOfNoReturn
        self.newMayHaveRunGuest = newMayHaveRunGuest
        self.oldCanResume = oldCanResume
        self.newCanRun = newCanRun
    }

    public var description: String {
        "pastPointOfNoReturn=\(pastPointOfNoReturn) newMayHaveRunGuest=\(newMayHaveRunGuest) oldCanResume=\(oldCanResume) newCanRun=\(newCanRun)"
    }
}

public enum HandoffDecision: String, Equatable, Sendable {
    case rollBack, rollForward, lost

    /// Before the point of no return back is preferred (the old instance never stopped owning
    /// the guest); after it forward; once the new instance may have run the guest, never back
    /// (two copies of one guest would have diverged).
    public static func after(_ s: HandoffSituation) -> HandoffDecision {
        if s.newMayHaveRunGuest { return s.newCanRun ? .rollForward : .lost }
        if s.pastPointOfNoReturn { return s.newCanRun ? .rollForward : s.oldCanResume ? .rollBack : .lost }
        return s.oldCanResume ? .rollBack : s.newCanRun ? .rollForward : .lost
    }
}

/// Runs a `HandoffHypervisor` through the handoff, step by step (a batch interleaves the steps
/// of several domains) or whole.
public final class HandoffSequence {
    public enum Step: CaseIterable, Sendable { case start, pause, finish }

    /// Unowned: an implementation may keep its sequence (QEMU's batch drives it step by step).
    public unowned let hypervisor: any HandoffHypervisor
    /// `committing` is journaled.
    public private(set) var pastPointOfNoReturn = false
    /// The handoff ended forward: later steps do nothing.
    public private(set) var finished = false
    /// The decision taken after a failure, and what it was taken on.
    public private(set) var decision: (HandoffDecision, HandoffSituation)?

    public init(_ hypervisor: any HandoffHypervisor) { self.hypervisor = hypervisor }

    public func run() throws {
        for step in Step.allCases { try perform(step) }
    }

    /// Runs one step; on a failure rolls back, forward or declares the guest lost, as the
    /// situation allows, and throws what happened (a roll forward that finished returns).
    public func perform(_ step: Step) throws {
        guard !finished else { return }
        do {
            switch step {
            case .start:
                try hypervisor.startNewInstance()
            case .pause:
                try hypervisor.pauseAndTransfer()
                // The point of no return: from here the new instance may run the guest.
                try hypervisor.journal(.committing)
                pastPointOfNoReturn = true
                try hypervisor.runNewInstance()
            case .finish:
                try hypervisor.finish()
                finished = true
            }
        } catch let crash as ControllerCrashed {
            throw crash  // stop dead, as a crashed controller would: `baton recover` finishes
        } catch {
            let situation = hypervisor.situation(after: error, pastPointOfNoReturn: pastPointOfNoReturn)
            let decided = HandoffDecision.after(situation)
            decision = (decided, situation)
            switch decided {
            case .rollBack:
                throw hypervisor.rollBack(after: error)
            case .rollForward:
                try hypervisor.rollForward(after: error)
                finished = true
            case .lost:
                throw hypervisor.lost(after: error, situation: situation)
            }
        }
    }
}
