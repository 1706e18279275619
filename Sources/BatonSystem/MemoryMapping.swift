import CBatonLinux
import Glibc

/// Owns one mmap'd range and unmaps it in deinit. Guest RAM lives in these, never in Swift values.
public final class MemoryMapping: @unchecked Sendable {
    public let base: UnsafeMutableRawPointer
    public let length: Int
    /// The memfd behind a shared mapping, if any (kept open: it is what the memfd transport passes).
    public let backing: FileDescriptor?
    public let backingOffset: Int

    private init(base: UnsafeMutableRawPointer, length: Int, backing: FileDescriptor?, backingOffset: Int) {
        self.base = base
        self.length = length
        self.backing = backing
        self.backingOffset = backingOffset
    }

    deinit { munmap(base, length) }

    /// Private anonymous memory (MAP_NORESERVE: guest RAM is committed on touch).
    public static func anonymous(length: Int) throws -> MemoryMapping {
        let p = try map(length: length, protection: PROT_READ | PROT_WRITE,
                        flags: MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, fd: -1, offset: 0)
        return MemoryMapping(base: p, length: length, backing: nil, backingOffset: 0)
    }

    /// A fresh memfd of `length` bytes, mapped shared.
    public static func memfd(name: String, length: Int) throws -> MemoryMapping {
        let fd = try Memfd.create(name: name)
        try fd.truncate(to: length)
        return try shared(fd: fd, offset: 0, length: length)
    }

    /// Maps `length` bytes of `fd` from `offset`, shared (writes reach the file and every mapper).
    public static func shared(fd: FileDescriptor, offset: Int, length: Int, populate: Bool = false, readOnly: Bool = false) throws -> MemoryMapping {
        let flags = MAP_SHARED | (populate ? MAP_POPULATE : 0)
        let p = try map(length: length, protection: readOnly ? PROT_READ : PROT_READ | PROT_WRITE, flags: flags, fd: fd.raw, offset: offset)
        return MemoryMapping(base: p, length: length, backing: fd, backingOffset: offset)
    }

    private static func map(length: Int, protection: Int32, flags: Int32, fd: Int32, offset: Int) throws -> UnsafeMutableRawPointer {
        var mapped: UnsafeMutableRawPointer? = nil
        _ = try retryingEINTR("mmap") { _ -> Int in
            let p = mmap(nil, length, protection, flags, fd, off_t(offset))
            if p == MAP_FAILED { return -1 }
            mapped = p
            return 0
        }
        return mapped!
    }

    public var bytes: UnsafeMutableRawBufferPointer { UnsafeMutableRawBufferPointer(start: base, count: length) }

    /// Drops this process's page-table entries for a memfd-backed mapping (MADV_DONTNEED on a
    /// MAP_SHARED mapping: the pages stay in the memfd, a later touch maps them again). What an
    /// exec tears down is then only what was touched since, not every page of the guest. Does
    /// nothing for private memory, where MADV_DONTNEED would zero it: false then.
    @discardableResult
    public func dropPageTables() -> Bool {
        guard backing != nil else { return false }
        return madvise(base, length, MADV_DONTNEED) == 0
    }

    /// Asks for transparent huge pages (MADV_HUGEPAGE); a refusal is not an error, it is reported.
    @discardableResult
    public func adviseHugePages() -> Bool { madvise(base, length, CBATON_MADV_HUGEPAGE) == 0 }

    /// Maps the pages of `offset ..< offset + length` into this mapping's page table now
    /// (MADV_POPULATE_READ), so that reading them later takes no page faults. False where the
    /// kernel lacks it (before 5.14): the reads then fault as usual.
    @discardableResult
    public func populateForReading(offset: Int, length: Int) -> Bool {
        madvise(base + offset, length, CBATON_MADV_POPULATE_READ) == 0
    }

    /// Faults every page in for writing now, so later copies do not pay page faults.
    /// Uses MADV_POPULATE_WRITE where the kernel has it, else touches one byte per page.
    public func prefault(pageSize: Int) {
        if madvise(base, length, CBATON_MADV_POPULATE_WRITE) == 0 { return }
        var offset = 0
        let p = base.assumingMemoryBound(to: UInt8.self)
        while offset < length {
            p[offset] = p[offset]
            offset += pageSize
        }
    }

    /// Returns the pages of `range` to the kernel (MADV_DONTNEED on private memory,
    /// hole punching on a memfd), so a sender can shed RAM it has handed off.
    public func release(offset: Int, length: Int) throws {
        precondition(offset >= 0 && length >= 0 && offset + length <= self.length)
        if let backing {
            _ = try retryingEINTR("fallocate(PUNCH_HOLE)") { _ in
                cbaton_punch_hole(backing.raw, off_t(backingOffset + offset), off_t(length))
            }
        } else {
            _ = try retryingEINTR("madvise(MADV_DONTNEED)") { _ in madvise(base + offset, length, CBATON_MADV_DONTNEED) }
        }
    }
}

public enum Memfd {
    /// `memfd_create(2)` with MFD_CLOEXEC | MFD_ALLOW_SEALING.
    public static func create(name: String) throws -> FileDescriptor {
        let fd = try retryingEINTR("memfd_create") { _ in
            cbaton_memfd_create(name, CBATON_MFD_CLOEXEC | CBATON_MFD_ALLOW_SEALING)
        }
        return FileDescriptor(owning: fd)
    }
}
