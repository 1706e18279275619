import BatonCore
/// Baton's reference guest: 96 bytes of 64-bit code that runs at CPL 3 (native speed on
/// this host's PVM KVM, and unchanged on VMX/SVM with IOPL 3). Source: Docs/reference-guest.S.
/// Each vCPU keeps changing memory: a counter, a hash chain over a block it rewrites, a
/// register-only accumulator (r15), and a heartbeat `out` to port 0x10 now and then.
public enum ReferenceGuest {
    public static let code: [UInt8] = [
        0x4c, 0x89, 0xe1, 0x48, 0xff, 0xc9, 0x75, 0xfb, 0x48, 0x8b, 0x45, 0x00,
        0x48, 0xff, 0xc0, 0x48, 0x89, 0x45, 0x00, 0x48, 0x8b, 0x55, 0x08, 0x48,
        0x69, 0xd8, 0x91, 0xf4, 0x45, 0x25, 0x48, 0x21, 0xfb, 0x48, 0x89, 0xd1,
        0x48, 0x31, 0xc1, 0x49, 0x89, 0x0c, 0xde, 0x48, 0x8d, 0x5c, 0x40, 0x03,
        0x48, 0x21, 0xfb, 0x49, 0x33, 0x14, 0xde, 0x48, 0x31, 0xc2, 0x48, 0xb9,
        0xb3, 0x01, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x48, 0x0f, 0xaf, 0xd1,
        0x48, 0x89, 0x55, 0x08, 0x49, 0x01, 0xd7, 0x48, 0x85, 0xf0, 0x75, 0xac,
        0x4c, 0x89, 0x7d, 0x10, 0x48, 0xff, 0x45, 0x18, 0xe6, 0x10, 0xeb, 0xa0,
    ]

    public static let heartbeatPort: UInt16 = 0x10
    public static let indexMultiplier: UInt64 = 0x2545_F491
    public static let fnvPrime: UInt64 = 0x100_0000_01B3
}

/// Where things live in guest-physical memory (identity mapped, 2 MiB pages, user-accessible).
public enum GuestLayout {
    public static let pml4: UInt64 = 0x1000
    public static let pdpt: UInt64 = 0x2000
    public static let pageDirectories: UInt64 = 0x3000  // one per GiB, up to 8 (0x3000..0xAFFF)
    public static let code: UInt64 = 0xC000
    public static let dataPages: UInt64 = 0x10000       // one 4 KiB page per vCPU
    public static let blocks: UInt64 = 0x20_0000         // one block per vCPU
    public static let blockBytes: UInt64 = 1 << 20
    public static let maximumVCPUs = 16
    public static let maximumRAM = 8 << 30

    public static func dataPage(vcpu: Int) -> UInt64 { dataPages + UInt64(vcpu) * 0x1000 }
    public static func block(vcpu: Int) -> UInt64 { blocks + UInt64(vcpu) * blockBytes }
    public static var blockWordMask: UInt64 { blockBytes / 8 - 1 }
    /// Bytes below which the guest's own structures live; RAM above is filled with a pattern.
    public static func reservedBytes(vcpus: Int) -> UInt64 { block(vcpu: vcpus) }

    /// Writes page tables, code and zeroed data pages into `ram` (guest-physical 0 at `ram`).
    public static func install(into ram: UnsafeMutableRawPointer, ramBytes: Int, vcpus: Int) {
        let present: UInt64 = 1, writable: UInt64 = 2, user: UInt64 = 4, large: UInt64 = 0x80
        let flags = present | writable | user
        let gib = (ramBytes + (1 << 30) - 1) >> 30
        func put(_ address: UInt64, _ value: UInt64) { ram.storeBytes(of: value, toByteOffset: Int(address), as: UInt64.self) }
        put(pml4, pdpt | flags)
        for g in 0..<gib {
            let pd = pageDirectories + UInt64(g) * 0x1000
            put(pdpt + UInt64(g) * 8, pd | flags)
            for i in 0..<512 {
                let address = (UInt64(g) << 30) + (UInt64(i) << 21)
                put(pd + UInt64(i) * 8, address | flags | large)
            }
        }
        for (i, b) in ReferenceGuest.code.enumerated() { ram.storeBytes(of: b, toByteOffset: Int(code) + i, as: UInt8.self) }
        for v in 0..<vcpus {
            memset(ram + Int(dataPage(vcpu: v)), 0, 0x1000)
            memset(ram + Int(block(vcpu: v)), 0, Int(blockBytes))
        }
    }
}

import Glibc

extension GuestBeat {
    /// Read from the vCPU's data page at its `out` exit.
    public static func read(from ram: UnsafeRawPointer, vcpu: Int) -> GuestBeat {
        let page = ram + Int(GuestLayout.dataPage(vcpu: vcpu))
        return GuestBeat(counter: page.load(as: UInt64.self), hash: page.load(fromByteOffset: 8, as: UInt64.self),
                         r15: page.load(fromByteOffset: 0x10, as: UInt64.self), beats: page.load(fromByteOffset: 0x18, as: UInt64.self))
    }
}

/// An independent model of the reference guest, written from its specification (not from
/// the VMM's code paths): replaying N iterations from a fresh boot must give exactly the
/// counter, hash, r15 and heartbeat count the real guest shows at its Nth iteration.
public struct GuestModel {
    public let heartbeatMask: UInt64
    var block: [UInt64]
    public private(set) var counter: UInt64 = 0
    public private(set) var hash: UInt64 = 0
    public private(set) var r15: UInt64 = 0
    public private(set) var beats: UInt64 = 0
    public private(set) var spilledR15: UInt64 = 0

    public init(heartbeatMask: UInt64, blockWords: Int = Int(GuestLayout.blockBytes / 8)) {
        self.heartbeatMask = heartbeatMask
        block = [UInt64](repeating: 0, count: blockWords)
    }

    public mutating func step(to target: UInt64) {
        let mask = UInt64(block.count - 1)
        while counter < target {
            let c = counter &+ 1
            counter = c
            var h = hash
            block[Int((c &* ReferenceGuest.indexMultiplier) & mask)] = h ^ c
            h ^= block[Int((c &* 3 &+ 3) & mask)]
            h ^= c
            h = h &* ReferenceGuest.fnvPrime
            hash = h
            r15 = r15 &+ h
            if c & heartbeatMask == 0 {
                spilledR15 = r15
                beats += 1
            }
        }
    }

    /// What the guest's data page must show at a heartbeat after `counter` iterations.
    public var beat: GuestBeat { GuestBeat(counter: counter, hash: hash, r15: spilledR15, beats: beats) }
}
