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

extension ProcessMemory {
    /// One contiguous range: `length` bytes from `remote` in `pid` to `local` here.
    public static func read(from pid: pid_t, local: UnsafeMutableRawPointer, remote: UInt, length: Int) throws -> Int {
        var l = iovec(iov_base: local, iov_len: length)
        var r = iovec(iov_base: UnsafeMutableRawPointer(bitPattern: remote), iov_len: length)
        return try withUnsafePointer(to: &l) { lp in
            try withUnsafePointer(to: &r) { rp in
                try read(from: pid, local: UnsafeBufferPointer(start: lp, count: 1), remote: UnsafeBufferPointer(start: rp, count: 1))
            }
        }
    }
}
