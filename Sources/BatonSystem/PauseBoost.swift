import CBatonLinux
import Glibc

/// Raises the nice value of every thread of some processes for the length of a guest pause and
/// puts it back afterwards. On a busy host the pause is a chain of wake-ups (controller → old
/// instance → its agents → new instance) and each one waits for a CPU; at nice −20 each waits
/// far less behind CPU-bound work at nice 0 (Docs/BENCHMARKS.md, `--load`). Needs CAP_SYS_NICE
/// (root): without it nothing is changed. `restore` sets every thread the processes have then
/// (threads started during the pause inherit the raised value) back to the value its process
/// had before. A controller killed inside the pause leaves them raised until the next upgrade
/// or a `renice` (Docs/FAULTS.md).
public final class PauseBoost {
    public static let niceDuringPause: Int32 = -20
    /// pid → the nice value its main thread had before.
    private var before: [(pid: pid_t, nice: Int32)] = []
    /// Single threads raised on their own (the calling thread), with their own values.
    private var threadsBefore: [(tid: pid_t, nice: Int32)] = []
    public private(set) var raised = false

    public init() {}

    /// Raises every thread of `pids` (pids ≤ 0 are skipped) and the calling thread alone (not
    /// its whole process: a service runs other upgrades on other threads); false if not permitted.
    @discardableResult
    public func raise(_ pids: [pid_t]) -> Bool {
        let me = cbaton_gettid()
        errno = 0
        let mine = getpriority(__priority_which_t(PRIO_PROCESS.rawValue), id_t(me))
        if errno == 0, setpriority(__priority_which_t(PRIO_PROCESS.rawValue), id_t(me), Self.niceDuringPause) == 0 {
            threadsBefore.append((me, mine))
            raised = true
        }
        for pid in pids where pid > 0 {
            errno = 0
            let nice = getpriority(__priority_which_t(PRIO_PROCESS.rawValue), id_t(pid))
            if errno != 0 { continue }
            before.append((pid, nice))
            for tid in ProcessHandles.threadIDs(of: pid) {
                if setpriority(__priority_which_t(PRIO_PROCESS.rawValue), id_t(tid), Self.niceDuringPause) != 0 {
                    if errno == EPERM || errno == EACCES { restore(); return false }
                } else {
                    raised = true
                }
            }
        }
        return raised
    }

    /// Every thread of the processes back to its process's nice value from before; idempotent.
    public func restore() {
        for (pid, nice) in before {
            for tid in ProcessHandles.threadIDs(of: pid) { _ = setpriority(__priority_which_t(PRIO_PROCESS.rawValue), id_t(tid), nice) }
        }
        for (tid, nice) in threadsBefore { _ = setpriority(__priority_which_t(PRIO_PROCESS.rawValue), id_t(tid), nice) }
        before = []
        threadsBefore = []
        raised = false
    }
}
