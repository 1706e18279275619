import BatonSystem
import Glibc

/// One upgrade per VM at a time, across every `baton upgrade` and `baton serve` on the host: an
/// exclusive flock on a file named by the VM's real identity, the device and inode of its
/// control socket (so `vm.sock`, `./vm.sock` and a symlink to it are one VM). Held for the
/// upgrade's whole length; the kernel drops it if the holder dies.
public enum VMLock {
    /// "DEV-INODE" of the socket at `path` (symlinks followed), or nil if there is none.
    public static func identity(of path: String) -> String? {
        var st = stat()
        guard stat(path, &st) == 0 else { return nil }
        return "\(st.st_dev)-\(st.st_ino)"
    }

    /// Where the locks live: the same directory for the CLI and the service of one user.
    public static var directory: String { UpgradeOptions.defaultRunDirectory + "/vm-locks" }

    public struct Held: Error, CustomStringConvertible {
        public let vm: String
        public let holder: String
        public var description: String { "another upgrade of \(vm) is running (pid \(holder)); one at a time per VM; nothing was changed" }
    }

    /// Takes the VM's lock, or throws `Held` naming the holder. Returns the descriptor to close.
    public static func acquire(vmSocket: String) throws -> Int32 {
        guard let id = identity(of: vmSocket) else { throw SyscallError("stat(\(vmSocket))", errno: errno) }
        try PrivateDirectory.make(directory)
        let path = "\(directory)/vm-\(id).lock"
        let fd = try checkedCall("open(\(path))") { open(path, O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0o600) }
        guard flock(fd, LOCK_EX | LOCK_NB) == 0 else {
            var buffer = [UInt8](repeating: 0, count: 32)
            let n = pread(fd, &buffer, buffer.count, 0)
            close(fd)
            throw Held(vm: vmSocket, holder: n > 0 ? String(decoding: buffer.prefix(n), as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines) : "?")
        }
        ftruncate(fd, 0)
        let me = Array("\(getpid())\n".utf8)
        _ = pwrite(fd, me, me.count, 0)
        return fd
    }
}
