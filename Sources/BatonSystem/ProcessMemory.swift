import CBatonLinux
import Glibc

public enum ProcessMemory {
    /// One `process_vm_readv(2)` call: copies from `remote` ranges of process `pid` into `local`.
    /// Returns bytes copied (may be short). Needs ptrace-read permission on `pid`.
    public static func read(from pid: pid_t, local: UnsafeBufferPointer<iovec>, remote: UnsafeBufferPointer<iovec>) throws -> Int {
        precondition(local.count <= maxIOVecs && remote.count <= maxIOVecs)
        return Int(try retryingEINTR("process_vm_readv") { limit in
            guard let limit else {
                return cbaton_process_vm_readv(pid, local.baseAddress, UInt(local.count), remote.baseAddress, UInt(remote.count))
            }
            var l = IOVecs.truncate(local, toBytes: limit)
            return l.withUnsafeMutableBufferPointer {
                cbaton_process_vm_readv(pid, $0.baseAddress, UInt($0.count), remote.baseAddress, UInt(remote.count))
            }
        })
    }
}
