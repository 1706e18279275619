import Glibc

/// A directory only this user can use, made safely: created 0700 (with any missing parents)
/// if it is missing; an existing one must be a real directory, not a symlink, and owned by this
/// user, else it is refused. The mode of a directory Baton did not make is never changed (a
/// shared 1777 directory keeps its sticky bit), and nothing in it is reached through a link that
/// someone else planted there.
public enum PrivateDirectory {
    public struct Refused: Error, CustomStringConvertible, Equatable {
        public let path: String
        public let reason: String
        public init(path: String, reason: String) {
            self.path = path
            self.reason = reason
        }
        public var description: String { "\(path): \(reason); Baton keeps journals, sockets and logs only in a directory of its own user" }
    }

    /// Makes `path` (and missing parents) 0700, or checks an existing one. `requireOwnership`
    /// false only accepts an existing directory someone else owns (a socket's directory such as
    /// /tmp): it is used as it is, never changed.
    public static func make(_ path: String, requireOwnership: Bool = true) throws {
        var st = stat()
        if lstat(path, &st) == 0 {
            if (st.st_mode & S_IFMT) == S_IFLNK { throw Refused(path: path, reason: "is a symbolic link") }
            guard (st.st_mode & S_IFMT) == S_IFDIR else { throw Refused(path: path, reason: "is not a directory") }
            if requireOwnership && st.st_uid != geteuid() {
                throw Refused(path: path, reason: "is owned by uid \(st.st_uid), not uid \(geteuid())")
            }
            return
        }
        let parent = String(path.reversed().drop { $0 != "/" }.dropFirst().reversed())
        if !parent.isEmpty, parent != path, lstat(parent, &st) != 0 { try make(parent, requireOwnership: requireOwnership) }
        guard mkdir(path, 0o700) == 0 || errno == EEXIST else { throw SyscallError("mkdir(\(path))", errno: errno) }
        // Lost a race to another creator: check what is there now.
        guard lstat(path, &st) == 0, (st.st_mode & S_IFMT) == S_IFDIR, st.st_uid == geteuid() || !requireOwnership else {
            throw Refused(path: path, reason: "appeared while it was being created and is not this user's directory")
        }
    }
}
