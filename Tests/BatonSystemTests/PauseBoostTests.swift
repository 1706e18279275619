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

    @Test("every thread of a process and the calling thread go to nice -20, and back to what they had")
    func raisesAndRestores() throws {
        guard getuid() == 0 else { print("skipped: lowering a nice value needs root (CAP_SYS_NICE)"); return }
        let child = try Spawn.detached("/bin/sleep", ["30"], logPath: "/dev/null")
        defer { kill(child, SIGKILL); _ = Spawn.exitStatus(child) }
        _ = setpriority(__priority_which_t(PRIO_PROCESS.rawValue), id_t(child), 5)
        let boost = PauseBoost()
        #expect(boost.raise([child, 0]))
        #expect(nice(child) == -20)
        boost.restore()
        #expect(nice(child) == 5)
        #expect(!boost.raised)
        boost.restore()  // idempotent
        #expect(nice(child) == 5)
    }
}
