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

    @Test("a process in a cpu cgroup with no real-time runtime is refused and named, while the rest is still raised")
    func refusedByCgroup() throws {
        guard getuid() == 0 else { print("skipped: a real-time policy needs root (CAP_SYS_NICE)"); return }
        let group = "/sys/fs/cgroup/cpu/baton-pauseboost-test-\(getpid())"
        guard FileManager.default.fileExists(atPath: "/sys/fs/cgroup/cpu/cpu.rt_runtime_us"), mkdir(group, 0o755) == 0 else {
            print("skipped: no cgroup v1 cpu controller with real-time group scheduling here"); return
        }
        defer { rmdir(group) }
        let inside = try Spawn.detached("/bin/sleep", ["30"], logPath: "/dev/null")
        let outside = try Spawn.detached("/bin/sleep", ["30"], logPath: "/dev/null")
        defer { for p in [inside, outside] { kill(p, SIGKILL); _ = Spawn.exitStatus(p) } }
        try "\(inside)\n".write(toFile: group + "/cgroup.procs", atomically: false, encoding: .utf8)
        #expect((try? String(contentsOfFile: group + "/cpu.rt_runtime_us", encoding: .utf8))?.hasPrefix("0") == true, "a new group gets no real-time runtime")
        let boost = PauseBoost()
        #expect(boost.raise([inside, outside]))
        #expect(sched_getscheduler(inside) == 0, "left as it was")
        #expect(sched_getscheduler(outside) == 2 && sched_getscheduler(0) == 2, "the others are raised")
        #expect(boost.refusals == ["pid \(inside): SCHED_RR refused (Operation not permitted): its cpu cgroup /baton-pauseboost-test-\(getpid()) grants no real-time runtime (cpu.rt_runtime_us = 0)"], "\(boost.refusals)")
        boost.restore()
        #expect(sched_getscheduler(outside) == 0 && sched_getscheduler(0) == 0)
    }
}
