import BatonSystem
import Foundation
import Glibc
import Testing

@Suite("Syscall layer")
struct SystemTests {
    @Test("connecting to a listener that never accepts gives up at the deadline instead of hanging")
    func boundedConnect() throws {
        let dir = "/tmp/baton-connect-test-\(getpid())"
        mkdir(dir, 0o700)
        defer { rmdir(dir) }
        let listener = try UnixListener(path: dir + "/wedged.sock", backlog: 0)
        defer { listener.remove() }
        var held: [UnixSocket] = []
        // Fill the backlog (a listener that is up but deaf, as an EMFILE'd accept loop leaves it).
        while let s = try? UnixSocket.connect(path: listener.path, timeoutSeconds: 0.05) { held.append(s); if held.count > 64 { break } }
        #expect(held.count <= 64, "backlog never filled")
        let start = Host.monotonicNanoseconds()
        #expect(throws: SyscallError.self) { _ = try UnixSocket.connect(path: listener.path, timeoutSeconds: 0.3) }
        let waited = Double(Host.monotonicNanoseconds() - start) / 1e9
        #expect(waited >= 0.25 && waited < 5, "waited \(waited) s")
    }

    @Test("socket timeouts accept any Double (1e300 once trapped converting to Int)")
    func socketTimeoutClamps() throws {
        let (a, _) = try UnixSocket.pair()
        for seconds in [1e300, -5, .nan, .infinity, 0.25] { try a.setTimeout(seconds: seconds) }
    }

    @Test("errors name the call, the errno symbol and its text")
    func errorText() {
        let e = SyscallError("vmsplice", errno: EAGAIN)
        #expect(e.description == "'vmsplice' failed: (11) EAGAIN Resource temporarily unavailable")
        #expect(ErrnoName.code(named: "eperm") == EPERM)
        #expect(ErrnoName.of(9999) == "E9999")
    }

    @Test("descriptors travel over a Unix socket with SCM_RIGHTS and stay usable")
    func descriptorPassing() throws {
        let (a, b) = try UnixSocket.pair()
        let pipe = try BatonSystem.Pipe()
        try a.send([1, 2, 3], descriptors: [pipe.writeEnd.raw])
        let got = try b.receive(count: 3)
        #expect(got.bytes == [1, 2, 3])
        #expect(got.descriptors.count == 1)
        try got.descriptors[0].writeAll([42])
        var byte: UInt8 = 0
        #expect(try pipe.readEnd.read(into: &byte, count: 1) == 1)
        #expect(byte == 42)
    }

    @Test("SO_PEERCRED reports this process at the other end of a socketpair")
    func peerCredentials() throws {
        let (a, _) = try UnixSocket.pair()
        let peer = try a.peerCredentials()
        #expect(peer.pid == getpid())
        #expect(peer.uid == getuid())
    }

    @Test("a pipe grows to what the host allows and reports queued bytes")
    func pipeCapacity() throws {
        let pipe = try BatonSystem.Pipe()
        let maxSize = Int(Host.readSmallFile("/proc/sys/fs/pipe-max-size")!.filter(\.isNumber))!
        let outcome = try pipe.resize(toAtMost: maxSize * 4)
        #expect(outcome.granted == maxSize, "above pipe-max-size the kernel refuses (EPERM) and we halve to it")
        #expect(outcome.refusals.allSatisfy { $0.errno == EPERM })
        try pipe.writeEnd.writeAll([1, 2, 3, 4, 5])
        #expect(try Pipe.queuedBytes(in: pipe.readEnd) == 5)
    }

    @Test("released memory reads back as zero and leaves the resident set")
    func releaseAndResidency() throws {
        let page = Host.pageSize
        let m = try MemoryMapping.anonymous(length: 16 * page)
        m.prefault(pageSize: page)
        memset(m.base, 0xAB, 16 * page)
        #expect(try PageMap.residentPages(base: m.base, length: 16 * page, pageSize: page) == 16)
        try m.release(offset: 4 * page, length: 8 * page)
        #expect(try PageMap.residentPages(base: m.base, length: 16 * page, pageSize: page) == 8)
        #expect(m.base.load(fromByteOffset: 5 * page, as: UInt8.self) == 0)
        #expect(m.base.load(fromByteOffset: 0, as: UInt8.self) == 0xAB)
        let entries = try PageMap.entries(for: [UnsafeRawPointer(m.base)], pageSize: page)
        #expect(entries[0].present)
    }

    @Test("a listener's path appears only once it accepts, with mode 0600")
    func listenerPath() throws {
        let path = "/tmp/baton-listener-\(getpid()).sock"
        let listener = try UnixListener(path: path)
        defer { listener.remove() }
        var st = stat()
        #expect(stat(path, &st) == 0)
        #expect(st.st_mode & 0o777 == 0o600)
        let client = try UnixSocket.connect(path: path)
        let server = try listener.accept(timeoutSeconds: 5)
        try client.send([7])
        #expect(try server.receive(count: 1).bytes == [7])
        #expect(throws: SyscallError.self) { try UnixSocket.connect(path: "/tmp/baton-no-such-\(getpid()).sock") }
    }
}

@Suite("Private directories")
struct PrivateDirectoryTests {
    func scratch() throws -> String {
        let dir = "/tmp/baton-privdir-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        try PrivateDirectory.make(dir)
        return dir
    }

    func mode(_ path: String) -> mode_t {
        var st = stat()
        return lstat(path, &st) == 0 ? st.st_mode & 0o7777 : 0
    }

    @Test("missing directories are made 0700, parents too")
    func makes() throws {
        let base = try scratch()
        defer { _ = try? FileManager.default.removeItem(atPath: base) }
        #expect(mode(base) == 0o700)
        try PrivateDirectory.make(base + "/a/b")
        #expect(mode(base + "/a") == 0o700 && mode(base + "/a/b") == 0o700)
    }

    @Test("an existing shared directory keeps its mode (sticky bit and all); a link or another user's directory is refused")
    func existing() throws {
        let base = try scratch()
        defer { _ = try? FileManager.default.removeItem(atPath: base) }
        let shared = base + "/shared"
        mkdir(shared, 0o777)
        chmod(shared, 0o1777)
        try PrivateDirectory.make(shared)
        #expect(mode(shared) == 0o1777, "the mode of a directory Baton did not make was changed")
        let link = base + "/link"
        symlink(shared, link)
        #expect(throws: PrivateDirectory.Refused(path: link, reason: "is a symbolic link")) { try PrivateDirectory.make(link) }
        if geteuid() == 0 {
            let foreign = base + "/foreign"
            mkdir(foreign, 0o700)
            chown(foreign, 65534, 65534)
            #expect(throws: PrivateDirectory.Refused(path: foreign, reason: "is owned by uid 65534, not uid 0")) { try PrivateDirectory.make(foreign) }
            try PrivateDirectory.make(foreign, requireOwnership: false)  // a socket's shared directory: used as it is
            #expect(mode(foreign) == 0o700)
        }
    }
}
