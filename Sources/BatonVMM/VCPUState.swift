import BatonCore
import CBatonKVM
import Foundation

/// The saved state of a paused VM, handed from the old instance to the new one.
///
/// Format (little-endian), version rule: `version` changes whenever a section's layout
/// changes; a reader accepts only its own version, and refuses blobs whose recorded struct
/// sizes differ from its own `<linux/kvm.h>` (the header names which one). Docs/STATE-FORMAT.md.
///
///   magic u32 "BTNS" · version u16 · backend u8 (1 kvm, 2 simulated) · vCPU count u8
///   sizes u32 × 8: kvm_regs, kvm_sregs, kvm_xsave, kvm_xcrs, kvm_vcpu_events, kvm_debugregs,
///                  kvm_clock_data, kvm_cpuid_entry2
///   config: u32 length + VMConfig JSON
///   kvm: clock (kvm_clock_data) · tsc kHz u32 · per vCPU: regs, sregs, xsave, xcrs, events,
///        debugregs, MSR count u32 + (index u32, 0 u32, value u64) each, CPUID count u32 + entries
///   simulated: per vCPU: r15 u64
public struct VMState: Equatable {
    public static let magic: UInt32 = 0x534E_5442  // "BTNS"
    public static let version: UInt16 = 1

    public enum Backend: UInt8, Sendable { case kvm = 1, simulated = 2 }

    public struct KVMVCPUState: Equatable {
        public var regs: [UInt8]
        public var sregs: [UInt8]
        public var xsave: [UInt8]
        public var xcrs: [UInt8]
        public var events: [UInt8]
        public var debugregs: [UInt8]
        public var msrs: [MSR]
        public var cpuid: [UInt8]  // raw kvm_cpuid_entry2 records
    }

    public struct MSR: Equatable {
        public var index: UInt32
        public var value: UInt64
    }

    public var backend: Backend
    public var config: VMConfig
    public var clock: [UInt8] = []
    public var tscKHz: UInt32 = 0
    public var kvm: [KVMVCPUState] = []
    public var simulatedR15: [UInt64] = []

    public static let structSizes: [(String, Int)] = [
        ("kvm_regs", MemoryLayout<kvm_regs>.size), ("kvm_sregs", MemoryLayout<kvm_sregs>.size),
        ("kvm_xsave", MemoryLayout<kvm_xsave>.size), ("kvm_xcrs", MemoryLayout<kvm_xcrs>.size),
        ("kvm_vcpu_events", MemoryLayout<kvm_vcpu_events>.size), ("kvm_debugregs", MemoryLayout<kvm_debugregs>.size),
        ("kvm_clock_data", MemoryLayout<kvm_clock_data>.size), ("kvm_cpuid_entry2", MemoryLayout<kvm_cpuid_entry2>.stride),
    ]

    public init(backend: Backend, config: VMConfig) {
        self.backend = backend
        self.config = config
    }

    public func encoded() -> [UInt8] {
        var w = WireWriter()
        w.u32(Self.magic); w.u16(Self.version); w.u8(backend.rawValue); w.u8(UInt8(config.vcpus))
        for (_, size) in Self.structSizes { w.u32(UInt32(size)) }
        let json = (try? JSONEncoder().encode(config)).map { Array($0) } ?? []
        w.u32(UInt32(json.count))
        var bytes = w.bytes + json
        var t = WireWriter()
        switch backend {
        case .kvm:
            bytes += clock
            t.u32(tscKHz)
            bytes += t.bytes
            for v in kvm {
                bytes += v.regs + v.sregs + v.xsave + v.xcrs + v.events + v.debugregs
                var m = WireWriter()
                m.u32(UInt32(v.msrs.count))
                for msr in v.msrs { m.u32(msr.index); m.u32(0); m.u64(msr.value) }
                m.u32(UInt32(v.cpuid.count / MemoryLayout<kvm_cpuid_entry2>.stride))
                bytes += m.bytes + v.cpuid
            }
        case .simulated:
            for r in simulatedR15 { t.u64(r) }
            bytes += t.bytes
        }
        return bytes
    }

    /// Encodes and decodes a throw-away state once, so that the real decode (between the
    /// verification and the resume, in a process that just started) finds Foundation's JSON
    /// paths and the type metadata warm: cold, it took ~0.6 ms there (measured).
    public static func warmUp() {
        var s = VMState(backend: .simulated, config: VMConfig(ramBytes: 1 << 20, simulated: true))
        s.simulatedR15 = [0]
        _ = try? decode(s.encoded())
    }

    public enum DecodeError: Error, CustomStringConvertible, Equatable {
        case badMagic(UInt32)
        case version(UInt16)
        case sizeMismatch(String, here: Int, blob: Int)
        case truncated(String)
        case config(String)

        public var description: String {
            switch self {
            case .badMagic(let m): "vCPU state: bad magic 0x\(String(m, radix: 16))"
            case .version(let v): "vCPU state: format version \(v), this batonvmm reads \(VMState.version)"
            case let .sizeMismatch(name, here, blob): "vCPU state: \(name) is \(here) bytes here, \(blob) in the blob (different kernel headers)"
            case .truncated(let what): "vCPU state: truncated at \(what)"
            case .config(let why): "vCPU state: config: \(why)"
            }
        }
    }

    public static func decode(_ bytes: [UInt8]) throws(DecodeError) -> VMState {
        var r = WireReader(bytes)
        func read<T: FixedWidthInteger>(_ f: (inout WireReader) throws(ProtocolError) -> T, _ what: String) throws(DecodeError) -> T {
            do { return try f(&r) } catch { throw .truncated(what) }
        }
        func take(_ n: Int, _ what: String) throws(DecodeError) -> [UInt8] {
            guard n >= 0, r.remaining >= n else { throw .truncated(what) }
            do { return try r.copy(n, what) } catch { throw .truncated(what) }
        }
        let magic = try read({ r throws(ProtocolError) in try r.u32("magic") }, "magic")
        guard magic == Self.magic else { throw .badMagic(magic) }
        let version = try read({ r throws(ProtocolError) in try r.u16("version") }, "version")
        guard version == Self.version else { throw .version(version) }
        let backendRaw = try read({ r throws(ProtocolError) in try r.u8("backend") }, "backend")
        let count = Int(try read({ r throws(ProtocolError) in try r.u8("count") }, "vCPU count"))
        for (name, size) in Self.structSizes {
            let blob = Int(try read({ r throws(ProtocolError) in try r.u32("size") }, "sizes"))
            guard blob == size else { throw .sizeMismatch(name, here: size, blob: blob) }
        }
        let jsonLength = Int(try read({ r throws(ProtocolError) in try r.u32("config length") }, "config length"))
        let json = try take(jsonLength, "config")
        let config: VMConfig
        do { config = try JSONDecoder().decode(VMConfig.self, from: Data(json)) } catch { throw .config("\(error)") }
        guard let backend = Backend(rawValue: backendRaw), count == config.vcpus else { throw .config("backend \(backendRaw), \(count) vCPUs") }
        var state = VMState(backend: backend, config: config)
        switch backend {
        case .kvm:
            state.clock = try take(MemoryLayout<kvm_clock_data>.size, "clock")
            state.tscKHz = try read({ r throws(ProtocolError) in try r.u32("tsc") }, "tsc kHz")
            for i in 0..<count {
                let regs = try take(MemoryLayout<kvm_regs>.size, "regs of vCPU \(i)")
                let sregs = try take(MemoryLayout<kvm_sregs>.size, "sregs of vCPU \(i)")
                let xsave = try take(MemoryLayout<kvm_xsave>.size, "xsave of vCPU \(i)")
                let xcrs = try take(MemoryLayout<kvm_xcrs>.size, "xcrs of vCPU \(i)")
                let events = try take(MemoryLayout<kvm_vcpu_events>.size, "events of vCPU \(i)")
                let debugregs = try take(MemoryLayout<kvm_debugregs>.size, "debugregs of vCPU \(i)")
                let n = Int(try read({ r throws(ProtocolError) in try r.u32("msr count") }, "MSR count of vCPU \(i)"))
                var msrs: [MSR] = []
                for _ in 0..<n {
                    let index = try read({ r throws(ProtocolError) in try r.u32("msr") }, "MSR")
                    _ = try read({ r throws(ProtocolError) in try r.u32("pad") }, "MSR")
                    msrs.append(MSR(index: index, value: try read({ r throws(ProtocolError) in try r.u64("value") }, "MSR")))
                }
                let entries = Int(try read({ r throws(ProtocolError) in try r.u32("cpuid count") }, "CPUID count of vCPU \(i)"))
                let cpuid = try take(entries * MemoryLayout<kvm_cpuid_entry2>.stride, "CPUID of vCPU \(i)")
                state.kvm.append(KVMVCPUState(regs: regs, sregs: sregs, xsave: xsave, xcrs: xcrs, events: events, debugregs: debugregs, msrs: msrs, cpuid: cpuid))
            }
        case .simulated:
            for i in 0..<count { state.simulatedR15.append(try read({ r throws(ProtocolError) in try r.u64("r15") }, "r15 of vCPU \(i)")) }
        }
        return state
    }
}

func bytes<T>(of value: T) -> [UInt8] { withUnsafeBytes(of: value) { Array($0) } }
func value<T>(_ type: T.Type, from bytes: [UInt8], initial: T) -> T {
    var v = initial
    withUnsafeMutableBytes(of: &v) { $0.copyBytes(from: bytes.prefix(MemoryLayout<T>.size)) }
    return v
}

/// The memfd region that carries a paused VM's state between instances. Written by the old
/// instance right when it pauses (so the state has left the process before any transfer),
/// read by the new one at commit — or at adoption, if the old instance died.
/// Layout: length u32 · magic u32 "BTSR" · XXH64 of the blob u64 · blob. The length is
/// written last: a half-written region reads as empty, never as a wrong state.
public enum StateRegion {
    public static let magic: UInt32 = 0x5253_5442
    public static let headerBytes = 16

    public enum ReadError: Error, CustomStringConvertible {
        case empty
        case corrupt(String)
        public var description: String {
            switch self {
            case .empty: "the state region holds no complete state (the old instance died before saving it)"
            case .corrupt(let why): "the state region is corrupt: \(why)"
            }
        }
    }

    public static func write(_ blob: [UInt8], into base: UnsafeMutableRawPointer, capacity: Int) throws {
        guard blob.count + headerBytes <= capacity else { throw ReadError.corrupt("state of \(blob.count) bytes exceeds the region") }
        base.storeBytes(of: UInt32(0), as: UInt32.self)
        _ = blob.withUnsafeBytes { memcpy(base + headerBytes, $0.baseAddress!, blob.count) }
        base.storeBytes(of: magic.littleEndian, toByteOffset: 4, as: UInt32.self)
        base.storeBytes(of: XXH64.hash(blob).littleEndian, toByteOffset: 8, as: UInt64.self)
        // Readers are other processes that look after our death or after a socket round trip,
        // both of which order these stores; the length goes last so a torn write reads empty.
        base.storeBytes(of: UInt32(blob.count).littleEndian, as: UInt32.self)
    }

    /// The vCPU count byte of the state's header (VMState's format), without reading or
    /// checking the rest: nil if the region holds no state. A hint, never trusted.
    public static func peekVCPUCount(from base: UnsafeRawPointer, capacity: Int) -> Int? {
        guard capacity >= headerBytes + 8 else { return nil }
        let length = Int(UInt32(littleEndian: base.load(as: UInt32.self)))
        guard length >= 8, UInt32(littleEndian: base.load(fromByteOffset: headerBytes, as: UInt32.self)) == VMState.magic else { return nil }
        return Int(base.load(fromByteOffset: headerBytes + 7, as: UInt8.self))
    }

    public static func read(from base: UnsafeRawPointer, capacity: Int) throws -> VMState {
        let length = Int(UInt32(littleEndian: base.load(as: UInt32.self)))
        guard length > 0 else { throw ReadError.empty }
        guard length + headerBytes <= capacity else { throw ReadError.corrupt("length \(length)") }
        guard UInt32(littleEndian: base.load(fromByteOffset: 4, as: UInt32.self)) == magic else { throw ReadError.corrupt("bad magic") }
        let blob = Array(UnsafeRawBufferPointer(start: base + headerBytes, count: length))
        guard XXH64.hash(blob) == UInt64(littleEndian: base.load(fromByteOffset: 8, as: UInt64.self)) else {
            throw ReadError.corrupt("checksum mismatch")
        }
        do { return try VMState.decode(blob) } catch { throw ReadError.corrupt("\(error)") }
    }
}
