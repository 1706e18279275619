import BatonSystem
import Foundation
import Glibc
import Testing

@Suite("PauseBoost: raised for the pause, put back afterwards")
struct PauseBoostTests {
    func nice(_ id: pid_t) -> Int32 {
        errno = 0
        return getpriority(__priority_which_t(PRIO_PROCESS.rawValue), id_t(id))
    }

    @Test("every thread of a process and the calling thread go to SCHED_RR 1, and back to SCHED_OTHER with their nice value untouched")
    func raisesAndRestores() throws {
        guard getuid() == 0 else { print("skipped: a real-time policy needs root (CAP_SYS_NICE)"); return }
        let child = try Spawn.detached("/bin/sleep", ["30"], logPath: "/dev/null")
        defer { kill(child, SIGKILL); _ = Spawn.exitStatus(child) }
        _ = setpriority(__priority_which_t(PRIO_PROCESS.rawValue), id_t(child), 5)
        let boost = PauseBoost()
        #expect(boost.raise([child, 0]))
        var param = sched_param()
        #expect(sched_getscheduler(child) == 2 && sched_getparam(child, &param) == 0 && param.sched_priority == 1)
        #expect(sched_getscheduler(0) == 2, "the calling thread")
        boost.restore()
        #expect(sched_getscheduler(child) == 0 && sched_getscheduler(0) == 0)
        #expect(nice(child) == 5)
        #expect(!boost.raised)
        boost.restore()  // idempotent
        #expect(sched_getscheduler(child) == 0)
    }
}
