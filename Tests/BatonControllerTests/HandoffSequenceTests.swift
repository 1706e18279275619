import BatonController
import Testing

/// The shared handoff sequence's decisions against a fake hypervisor: every step × every
/// process death, checked for what matters (one instance runs the guest, never two, never a
/// stale one after the new one ran it; lost only when neither can run it).
@Suite("Handoff sequence: rollback and roll-forward decisions")
struct HandoffSequenceTests {
    /// Where the fake fails, in the order the sequence reaches them.
    enum Point: String, CaseIterable {
        case startNew, pause, transfer, journalCommitting, runBeforeCont, runAfterCont, finish
    }
    /// Who dies at the failure.
    enum Death: String, CaseIterable { case nobody, old, new, both }

    struct Injected: Error {}

    /// A hypervisor made of flags: what each instance holds and runs.
    final class FakeHypervisor: HandoffHypervisor {
        let failAt: Point?
        let death: Death
        var oldAlive = true, newAlive = false
        var oldRuns = true, newRuns = false
        var newHoldsState = false, contSent = false
        /// The new instance ran the guest at some point (the old one's copy is stale after).
        var newEverRan = false
        var phases: [UpgradeJournal.Phase] = []
        var calls: [String] = []

        init(failAt: Point?, death: Death) {
            self.failAt = failAt
            self.death = death
        }

        func reach(_ point: Point) throws {
            guard point == failAt else { return }
            if death == .old || death == .both { oldAlive = false; oldRuns = false }
            if death == .new || death == .both { newAlive = false; newRuns = false }
            throw Injected()
        }

        func journal(_ phase: UpgradeJournal.Phase) throws {
            phases.append(phase)
            if phase == .committing { try reach(.journalCommitting) }
        }
        func startNewInstance() throws {
            newAlive = true
            try reach(.startNew)
        }
        func pauseAndTransfer() throws {
            oldRuns = false
            try reach(.pause)
            newHoldsState = true
            try reach(.transfer)
        }
        func runNewInstance() throws {
            try reach(.runBeforeCont)
            guard newAlive else { throw Injected() }
            contSent = true
            newRuns = true
            newEverRan = true
            try reach(.runAfterCont)
        }
        func finish() throws {
            try reach(.finish)
            oldAlive = false  // fenced
        }
        func situation(after error: Error, pastPointOfNoReturn: Bool) -> HandoffSituation {
            HandoffSituation(pastPointOfNoReturn: pastPointOfNoReturn, newMayHaveRunGuest: contSent,
                             oldCanResume: oldAlive, newCanRun: newAlive && newHoldsState)
        }
        func rollBack(after error: Error) -> Error {
            calls.append("rollBack")
            newAlive = false
            newRuns = false
            if oldAlive { oldRuns = true }
            return error
        }
        func rollForward(after error: Error) throws {
            calls.append("rollForward")
            guard newAlive, newHoldsState else { throw Injected() }
            contSent = true
            newRuns = true
            newEverRan = true
            oldAlive = false
            oldRuns = false
        }
        func lost(after error: Error, situation: HandoffSituation) -> Error {
            calls.append("lost")
            newAlive = false; newRuns = false
            oldAlive = false; oldRuns = false
            return error
        }
    }

    @Test("a clean run journals committing once, between the transfer and the new instance running")
    func cleanRun() throws {
        let fake = FakeHypervisor(failAt: nil, death: .nobody)
        let sequence = HandoffSequence(fake)
        try sequence.run()
        #expect(fake.phases == [.committing])
        #expect(fake.newRuns && !fake.oldRuns && !fake.oldAlive)
        #expect(sequence.finished && sequence.decision == nil)
    }

    @Test("every step × every death: one instance runs the guest, never two, never a stale one; lost only when neither can",
          arguments: Point.allCases, Death.allCases)
    func everyFault(_ point: Point, _ death: Death) {
        let fake = FakeHypervisor(failAt: point, death: death)
        let sequence = HandoffSequence(fake)
        let threw: Bool
        do { try sequence.run(); threw = false } catch { threw = true }
        let decision = sequence.decision?.0
        let context = "\(point) × \(death): \(decision.map { "\($0)" } ?? "no decision") on \(sequence.decision.map { "\($0.1)" } ?? "-")"

        // Never split brain, never the stale copy after the new instance ran the guest.
        #expect(!(fake.oldRuns && fake.newRuns), "two instances run the guest: \(context)")
        if fake.newEverRan { #expect(!fake.oldRuns, "the old instance resumed a stale guest: \(context)") }

        // What could still run the guest when it failed decides the outcome.
        let pastCommitting = [.runBeforeCont, .runAfterCont, .finish].contains(point)
        let transferred = point != .startNew && point != .pause
        let oldDied = death == .old || death == .both
        let newDied = death == .new || death == .both
        let newRanBeforeFailure = point == .runAfterCont || point == .finish
        let newCouldRun = transferred && !newDied
        let expected: HandoffDecision
        if newRanBeforeFailure {
            expected = newDied ? .lost : .rollForward
        } else if pastCommitting {
            expected = newCouldRun ? .rollForward : !oldDied ? .rollBack : .lost
        } else {
            expected = !oldDied ? .rollBack : newCouldRun ? .rollForward : .lost
        }
        #expect(decision == expected, "\(context); expected \(expected)")
        #expect(fake.calls == [expected.rawValue], "\(context): \(fake.calls)")
        switch expected {
        case .rollBack:
            #expect(threw && fake.oldRuns && !fake.newAlive, "rolled back, the old instance runs it: \(context)")
        case .rollForward:
            #expect(!threw && fake.newRuns && !fake.oldAlive, "forward, the new instance runs it and the old is fenced: \(context)")
            #expect(sequence.finished)
        case .lost:
            #expect(threw && !fake.oldRuns && !fake.newRuns, "\(context)")
        }
        // A failure after the point of no return never journals `committing` twice.
        #expect(fake.phases.filter { $0 == .committing }.count <= 1)
    }

    @Test("the decision table", arguments: [false, true], [false, true])
    func table(_ pastPointOfNoReturn: Bool, _ newMayHaveRun: Bool) {
        for oldCanResume in [false, true] {
            for newCanRun in [false, true] {
                let s = HandoffSituation(pastPointOfNoReturn: pastPointOfNoReturn || newMayHaveRun, newMayHaveRunGuest: newMayHaveRun,
                                         oldCanResume: oldCanResume, newCanRun: newCanRun)
                let d = HandoffDecision.after(s)
                if newMayHaveRun {
                    #expect(d == (newCanRun ? .rollForward : .lost), "\(s)")  // never back
                } else if pastPointOfNoReturn {
                    #expect(d == (newCanRun ? .rollForward : oldCanResume ? .rollBack : .lost), "\(s)")
                } else {
                    #expect(d == (oldCanResume ? .rollBack : newCanRun ? .rollForward : .lost), "\(s)")
                }
                #expect(d != .lost || (!oldCanResume || newMayHaveRun) && !newCanRun, "lost only when nobody can run it: \(s)")
            }
        }
    }

    @Test("a step after the handoff finished forward does nothing")
    func stepsAfterFinish() throws {
        let fake = FakeHypervisor(failAt: .transfer, death: .old)
        let sequence = HandoffSequence(fake)
        try sequence.perform(.start)
        try sequence.perform(.pause)  // the old died after the transfer: forward, finished
        #expect(sequence.finished && fake.calls == ["rollForward"])
        try sequence.perform(.finish)
        #expect(fake.calls == ["rollForward"])
    }
}
