import Glibc
import Synchronization

/// Children this process started and will never wait for (a new hypervisor instance that now
/// runs a guest). A long-running parent (`baton serve`) reaps them when they exit, so none
/// lingers as a zombie: a zombie still answers `kill(pid, 0)`, and libvirt and Baton's own
/// checks would take it for a live hypervisor. Only released pids are reaped: a blanket
/// `waitpid(-1)` would steal the exit status of a child another thread waits for.
public enum ChildReaper {
    private static let released = Mutex<Set<pid_t>>([])

    /// From now on nobody here waits for `pid`; `reapExited` collects it once it exits.
    public static func release(_ pid: pid_t) {
        guard pid > 0 else { return }
        released.withLock { _ = $0.insert(pid) }
    }

    /// Reaps every released child that has exited; returns (pid, exit status or 128 + signal).
    @discardableResult
    public static func reapExited() -> [(pid: pid_t, status: Int32)] {
        released.withLock { pids in
            var reaped: [(pid_t, Int32)] = []
            for pid in pids {
                var status: Int32 = 0
                let r = waitpid(pid, &status, WNOHANG)
                if r == pid {
                    reaped.append((pid, (status & 0x7f) == 0 ? (status >> 8) & 0xff : 128 + (status & 0x7f)))
                } else if r < 0 && errno == ECHILD {
                    reaped.append((pid, -1))  // already collected elsewhere, or never ours
                }
            }
            for (pid, _) in reaped { pids.remove(pid) }
            return reaped
        }
    }

    /// How many released children still run (for status).
    public static var watching: Int { released.withLock { $0.count } }
}
