import CBatonLinux
import Glibc

/// Puts every thread of some processes under the real-time round-robin policy (SCHED_RR,
/// priority 1, the lowest) for the length of a guest pause and back to SCHED_OTHER afterwards.
/// On a busy host the pause is a chain of wake-ups (controller → old instance → its agents →
/// new instance) and each one waits for a CPU behind CPU-bound work; nice −20 still shared the
/// CPU with it (memfd, 1 GiB, `--load 2`: 12.3 ms median), a real-time thread preempts it at
/// once (4.9 ms; Docs/BENCHMARKS.md). Bounded: the threads block between the steps, the kernel's
/// real-time throttling (sched_rt_runtime_us) keeps 5% of every second for everything else, and
/// a vCPU thread never runs the guest at a real-time policy (running ones, named vcpuN, are not
/// raised; new ones drop the policy when they start; one kicked out of the guest is raised while
/// it leaves, `raiseLeavingThread`, and ends at the join). Needs CAP_SYS_NICE (root): without it nothing is changed. `restore` sets every
/// thread the processes have then (threads started during the pause inherit the policy) back.
/// A controller killed inside the pause leaves the instances' service threads (not their
/// vCPUs) real-time until the next upgrade or a `chrt` (Docs/FAULTS.md).
public final class PauseBoost {
    public static let policyDuringPause: Int32 = 2  // SCHED_RR (<linux/sched.h>)
    public static let priorityDuringPause: Int32 = 1
    /// The processes raised, with the threads each had at the raise.
    private var pids: [(pid: pid_t, present: Set<pid_t>)] = []
    /// The threads this raise changed (only these, and threads started during the pause at its
    /// exact policy, are put back: a thread someone else made real-time stays so).
    private var threads: Set<pid_t> = []
    public private(set) var raised = false
    /// The processes the kernel would not raise, one line each, saying why where it can tell: a
    /// process in a cgroup v1 `cpu` group that grants no real-time runtime (libvirt's ch driver
    /// puts its VMM in one: `cpu.rt_runtime_us` = 0) refuses SCHED_RR even to root. The others
    /// are raised all the same.
    public private(set) var refusals: [String] = []

    public init() {}

    /// Raises every thread of `pids` (pids ≤ 0 are skipped) and the calling thread alone (not
    /// its whole process: a service runs other upgrades on other threads); false if nothing
    /// could be raised. A process whose threads refuse is left as it was (`refusals` says why).
    @discardableResult
    public func raise(_ pids: [pid_t]) -> Bool {
        var param = sched_param(sched_priority: Self.priorityDuringPause)
        let me = cbaton_gettid()
        if Self.isNormal(me), sched_setscheduler(me, Self.policyDuringPause, &param) == 0 {
            threads.insert(me)
            raised = true
        }
        for pid in pids where pid > 0 {
            let present = ProcessHandles.threadIDs(of: pid)
            var refusal: Int32?
            var mine: [pid_t] = []
            // vCPU threads (named vcpuN) are left alone: before the pause they run the guest.
            for tid in present where Self.isNormal(tid) && !Self.isVCPU(pid: pid, tid: tid) {
                if sched_setscheduler(tid, Self.policyDuringPause, &param) != 0 {
                    if errno == EPERM || errno == EACCES { refusal = errno; break }
                } else {
                    mine.append(tid)
                }
            }
            if let refusal {
                for tid in mine where Self.isRaisedByUs(tid) { Self.makeNormal(tid) }
                refusals.append("pid \(pid): SCHED_RR refused (\(String(cString: strerror(refusal))))\(Self.realTimeRuntimeNote(pid: pid))")
                continue
            }
            self.pids.append((pid, Set(present)))
            threads.formUnion(mine)
            raised = raised || !mine.isEmpty
        }
        return raised
    }

    /// ": its cpu cgroup P grants no real-time runtime (cpu.rt_runtime_us = 0)" when that is
    /// why, else "".
    static func realTimeRuntimeNote(pid: pid_t) -> String {
        guard let lines = Host.readSmallFile("/proc/\(pid)/cgroup")?.split(separator: "\n") else { return "" }
        for line in lines {
            let parts = line.split(separator: ":", maxSplits: 2).map(String.init)
            guard parts.count == 3, parts[1].split(separator: ",").contains("cpu") else { continue }
            for mount in ["/sys/fs/cgroup/\(parts[1])", "/sys/fs/cgroup/cpu,cpuacct", "/sys/fs/cgroup/cpu"] {
                if let runtime = Host.readSmallFile(mount + parts[2] + "/cpu.rt_runtime_us")?.filter({ !$0.isWhitespace }), runtime == "0" {
                    return ": its cpu cgroup \(parts[2]) grants no real-time runtime (cpu.rt_runtime_us = 0)"
                }
            }
        }
        return ""
    }

    /// Every thread of the processes back to SCHED_OTHER (their nice values were never
    /// changed); idempotent.
    public func restore() {
        for (pid, present) in pids {
            for tid in ProcessHandles.threadIDs(of: pid) where !present.contains(tid) && Self.isRaisedByUs(tid) { Self.makeNormal(tid) }
        }
        for tid in threads where Self.isRaisedByUs(tid) { Self.makeNormal(tid) }
        pids = []
        threads = []
        raised = false
        refusals = []
    }

    /// A thread under SCHED_OTHER (one already real-time is someone else's choice: left alone).
    static func isNormal(_ tid: pid_t) -> Bool { sched_getscheduler(tid) == 0 }

    /// At exactly the policy and priority a raise sets (0: the calling thread).
    public static func isRaisedByUs(_ tid: pid_t) -> Bool {
        var param = sched_param()
        return sched_getscheduler(tid) == policyDuringPause && sched_getparam(tid, &param) == 0 && param.sched_priority == priorityDuringPause
    }

    static func isVCPU(pid: pid_t, tid: pid_t) -> Bool {
        Host.readSmallFile("/proc/\(pid)/task/\(tid)/comm")?.hasPrefix("vcpu") == true
    }

    /// A thread of this process on its way out (a vCPU thread told to leave the guest, not yet
    /// joined) at the pause's policy, so it is not left waiting behind CPU-bound work; it ends
    /// without being put back. A thread someone made real-time is left alone.
    public static func raiseLeavingThread(_ thread: pthread_t) {
        var policy: Int32 = 0
        var param = sched_param()
        guard pthread_getschedparam(thread, &policy, &param) == 0, policy == 0 else { return }
        param.sched_priority = priorityDuringPause
        _ = pthread_setschedparam(thread, policyDuringPause, &param)
    }

    /// `tid` (0: the calling thread) back to SCHED_OTHER.
    public static func makeNormal(_ tid: pid_t) {
        var param = sched_param(sched_priority: 0)
        _ = sched_setscheduler(tid, 0, &param)
    }
}
