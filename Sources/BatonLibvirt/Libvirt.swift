// BatonLibvirt is Baton's adapter over libvirt's C API: connections and domains as owned
// Swift objects, libvirt errors as typed errors, Baton's handoff record in domain metadata,
// lifecycle events. It never runs inside a libvirt hook (a hook must not call libvirt).
import CLibvirt
import Foundation
import Synchronization

/// A libvirt failure: the call, libvirt's error code and domain, and its message.
public struct LibvirtError: Error, CustomStringConvertible, Sendable {
    public let operation: String
    public let code: Int32
    public let domain: Int32
    public let message: String

    /// Reads libvirt's per-thread last error right after the failing call.
    static func last(_ operation: String) -> LibvirtError {
        guard let e = virGetLastError() else {
            return LibvirtError(operation: operation, code: -1, domain: -1, message: "unknown libvirt error")
        }
        let error = LibvirtError(operation: operation, code: e.pointee.code, domain: e.pointee.domain,
                                 message: e.pointee.message.map { String(cString: $0) } ?? "no message")
        virResetLastError()
        return error
    }

    public var isNoDomain: Bool { code == Int32(VIR_ERR_NO_DOMAIN.rawValue) }
    public var description: String { "libvirt \(operation) failed (code \(code)): \(message)" }
}

enum LibvirtRuntime {
    /// One-time setup: initialise, route errors away from stderr (we report them ourselves),
    /// and register the default event loop before any connection (events need it first).
    static let ready: Bool = {
        _ = virInitialize()
        virSetErrorFunc(nil, { _, _ in })
        guard virEventRegisterDefaultImpl() == 0 else { return false }
        let loop = Thread { while virEventRunDefaultImpl() >= 0 {} }
        loop.name = "libvirt-events"
        loop.start()
        return true
    }()
}

/// An open libvirt connection; closed on deinit.
public final class LibvirtConnection: @unchecked Sendable {
    let handle: OpaquePointer
    public let uri: String

    public init(uri: String) throws {
        _ = LibvirtRuntime.ready
        guard let c = virConnectOpen(uri) else { throw LibvirtError.last("virConnectOpen(\(uri))") }
        handle = c
        self.uri = uri
    }

    deinit { virConnectClose(handle) }

    /// Opens `uri` on a helper thread and waits at most `seconds` for libvirtd to answer: a
    /// libvirtd that is stopped (SIGSTOP) or wedged still accepts the connection and then never
    /// answers, and libvirt's client would wait for it forever. (A helper that never returns is
    /// left behind; the caller reports the refusal and goes on.)
    public static func connect(uri: String, answeringWithin seconds: Double) throws -> LibvirtConnection {
        final class Result: @unchecked Sendable {
            let done = NSCondition()
            var connection: LibvirtConnection?
            var error: Error?
            var finished = false
        }
        let result = Result()
        Thread {
            var c: LibvirtConnection?
            var e: Error?
            do { c = try LibvirtConnection(uri: uri); _ = try c?.activeDomainNames() } catch { e = error }
            result.done.lock()
            (result.connection, result.error, result.finished) = (c, e, true)
            result.done.broadcast()
            result.done.unlock()
        }.start()
        result.done.lock()
        defer { result.done.unlock() }
        let deadline = Date().addingTimeInterval(seconds)
        while !result.finished && result.done.wait(until: deadline) {}
        guard result.finished else {
            throw LibvirtError(operation: "virConnectOpen(\(uri))", code: -1, domain: -1, message: "libvirtd did not answer within \(seconds) s")
        }
        if let e = result.error { throw e }
        return result.connection!
    }

    public func domain(named name: String) throws -> LibvirtDomain {
        guard let d = virDomainLookupByName(handle, name) else { throw LibvirtError.last("virDomainLookupByName(\(name))") }
        return LibvirtDomain(handle: d, connection: self)
    }

    public func domain(uuid: String) throws -> LibvirtDomain {
        guard let d = virDomainLookupByUUIDString(handle, uuid) else { throw LibvirtError.last("virDomainLookupByUUIDString(\(uuid))") }
        return LibvirtDomain(handle: d, connection: self)
    }

    /// A domain by name, or by UUID if `nameOrUUID` looks like one.
    public func domain(_ nameOrUUID: String) throws -> LibvirtDomain {
        if UUID(uuidString: nameOrUUID) != nil, let d = try? domain(uuid: nameOrUUID) { return d }
        return try domain(named: nameOrUUID)
    }

    /// The names of the running (active) domains on this connection.
    public func activeDomainNames() throws -> [String] {
        var list: UnsafeMutablePointer<virDomainPtr?>?
        let n = virConnectListAllDomains(handle, &list, UInt32(VIR_CONNECT_LIST_DOMAINS_ACTIVE.rawValue))
        guard n >= 0 else { throw LibvirtError.last("virConnectListAllDomains") }
        defer { free(list) }
        return (0..<Int(n)).compactMap { i in
            guard let d = list?[i] else { return nil }
            defer { virDomainFree(d) }
            return String(cString: virDomainGetName(d))
        }
    }

    /// libvirt's domain capabilities for one emulator binary. libvirt probes the binary (and
    /// caches what it found) if it has not yet; fails if it cannot run `machine`.
    public func domainCapabilities(emulator: String, arch: String = "x86_64", machine: String?, virtType: String) throws -> String {
        guard let x = virConnectGetDomainCapabilities(handle, emulator, arch, machine, virtType, 0) else {
            throw LibvirtError.last("virConnectGetDomainCapabilities(\(emulator), \(machine ?? "default"))")
        }
        defer { free(x) }
        return String(cString: x)
    }

    /// Defines (or redefines) a persistent domain from `xml`.
    @discardableResult
    public func define(xml: String) throws -> LibvirtDomain {
        guard let d = virDomainDefineXML(handle, xml) else { throw LibvirtError.last("virDomainDefineXML") }
        return LibvirtDomain(handle: d, connection: self)
    }

    public func defineAndStart(xml: String) throws -> LibvirtDomain {
        guard let d = virDomainDefineXML(handle, xml) else { throw LibvirtError.last("virDomainDefineXML") }
        let domain = LibvirtDomain(handle: d, connection: self)
        guard virDomainCreate(d) == 0 else { throw LibvirtError.last("virDomainCreate") }
        return domain
    }
}

/// One libvirt domain.
public final class LibvirtDomain: @unchecked Sendable {
    let handle: OpaquePointer
    public let connection: LibvirtConnection

    init(handle: OpaquePointer, connection: LibvirtConnection) {
        self.handle = handle
        self.connection = connection
    }

    deinit { virDomainFree(handle) }

    public var name: String { String(cString: virDomainGetName(handle)) }

    public var uuid: String {
        var buffer = [CChar](repeating: 0, count: Int(VIR_UUID_STRING_BUFLEN))
        _ = virDomainGetUUIDString(handle, &buffer)
        return buffer.withUnsafeBufferPointer { String(cString: $0.baseAddress!) }
    }

    public enum State: String, Sendable {
        case running, blocked, paused, shutdown, shutoff, crashed, pmsuspended, nostate
    }

    public func state() throws -> (state: State, reason: Int32) {
        var state: Int32 = 0, reason: Int32 = 0
        guard virDomainGetState(handle, &state, &reason, 0) == 0 else { throw LibvirtError.last("virDomainGetState(\(name))") }
        let s: State = switch UInt32(state) {
        case VIR_DOMAIN_RUNNING.rawValue: .running
        case VIR_DOMAIN_BLOCKED.rawValue: .blocked
        case VIR_DOMAIN_PAUSED.rawValue: .paused
        case VIR_DOMAIN_SHUTDOWN.rawValue: .shutdown
        case VIR_DOMAIN_SHUTOFF.rawValue: .shutoff
        case VIR_DOMAIN_CRASHED.rawValue: .crashed
        case VIR_DOMAIN_PMSUSPENDED.rawValue: .pmsuspended
        default: .nostate
        }
        return (s, reason)
    }

    /// The persistent definition (what the next cold boot uses).
    public func inactiveXML() throws -> String {
        guard let x = virDomainGetXMLDesc(handle, UInt32(VIR_DOMAIN_XML_INACTIVE.rawValue)) else { throw LibvirtError.last("virDomainGetXMLDesc(\(name), INACTIVE)") }
        defer { free(x) }
        return String(cString: x)
    }

    public var isPersistent: Bool { virDomainIsPersistent(handle) == 1 }

    public func xml() throws -> String {
        guard let x = virDomainGetXMLDesc(handle, 0) else { throw LibvirtError.last("virDomainGetXMLDesc(\(name))") }
        defer { free(x) }
        return String(cString: x)
    }

    public func suspend() throws { guard virDomainSuspend(handle) == 0 else { throw LibvirtError.last("virDomainSuspend(\(name))") } }
    public func resume() throws { guard virDomainResume(handle) == 0 else { throw LibvirtError.last("virDomainResume(\(name))") } }
    public func destroy() throws { guard virDomainDestroy(handle) == 0 else { throw LibvirtError.last("virDomainDestroy(\(name))") } }
    public func undefine() throws { guard virDomainUndefine(handle) == 0 else { throw LibvirtError.last("virDomainUndefine(\(name))") } }

    /// Writes `element` (one XML element, unprefixed) as Baton's metadata, in the running
    /// domain (`live`) and/or its persistent definition (`config`).
    public func setMetadata(_ element: String, prefix: String = BatonMetadata.prefix, namespace: String = BatonMetadata.namespace,
                            live: Bool = true, config: Bool = false) throws {
        let flags = (live ? UInt32(VIR_DOMAIN_AFFECT_LIVE.rawValue) : 0) | (config ? UInt32(VIR_DOMAIN_AFFECT_CONFIG.rawValue) : 0)
        guard virDomainSetMetadata(handle, Int32(VIR_DOMAIN_METADATA_ELEMENT.rawValue), element, prefix, namespace, flags) == 0 else {
            throw LibvirtError.last("virDomainSetMetadata(\(name))")
        }
    }

    /// Baton's metadata element (running domain, or with `live` false the definition), or nil.
    public func metadata(namespace: String = BatonMetadata.namespace, live: Bool = true) throws -> String? {
        let flags = live ? UInt32(VIR_DOMAIN_AFFECT_LIVE.rawValue) : UInt32(VIR_DOMAIN_AFFECT_CONFIG.rawValue)
        guard let m = virDomainGetMetadata(handle, Int32(VIR_DOMAIN_METADATA_ELEMENT.rawValue), namespace, flags) else {
            let e = LibvirtError.last("virDomainGetMetadata(\(name))")
            // No element: libvirt says VIR_ERR_NO_DOMAIN_METADATA (some drivers report no error at all).
            if e.code == Int32(VIR_ERR_NO_DOMAIN_METADATA.rawValue) || e.code == -1 { return nil }
            throw e
        }
        defer { free(m) }
        return String(cString: m)
    }

    /// Calls `handler(event, detail)` for each lifecycle event of this domain until the
    /// returned token is cancelled.
    public func onLifecycle(_ handler: @escaping @Sendable (Int32, Int32) -> Void) throws -> LifecycleSubscription {
        let box = LifecycleSubscription.Box(handler: handler)
        let callback: @convention(c) (OpaquePointer?, OpaquePointer?, Int32, Int32, UnsafeMutableRawPointer?) -> Void = { _, _, event, detail, opaque in
            Unmanaged<LifecycleSubscription.Box>.fromOpaque(opaque!).takeUnretainedValue().handler(event, detail)
        }
        let id = virConnectDomainEventRegisterAny(connection.handle, handle, Int32(VIR_DOMAIN_EVENT_ID_LIFECYCLE.rawValue),
                                                  unsafeBitCast(callback, to: virConnectDomainEventGenericCallback.self),
                                                  Unmanaged.passRetained(box).toOpaque(), { opaque in
                                                      if let opaque { Unmanaged<LifecycleSubscription.Box>.fromOpaque(opaque).release() }
                                                  })
        guard id >= 0 else { throw LibvirtError.last("virConnectDomainEventRegisterAny(\(name))") }
        return LifecycleSubscription(connection: connection, id: id)
    }
}

public final class LifecycleSubscription: @unchecked Sendable {
    final class Box: @unchecked Sendable {
        let handler: @Sendable (Int32, Int32) -> Void
        init(handler: @escaping @Sendable (Int32, Int32) -> Void) { self.handler = handler }
    }
    let connection: LibvirtConnection
    let id: Int32
    init(connection: LibvirtConnection, id: Int32) {
        self.connection = connection
        self.id = id
    }
    public func cancel() { _ = virConnectDomainEventDeregisterAny(connection.handle, id) }

    public static let suspended = Int32(VIR_DOMAIN_EVENT_SUSPENDED.rawValue)
    public static let resumed = Int32(VIR_DOMAIN_EVENT_RESUMED.rawValue)
}

extension LibvirtDomain {
    /// The domain's id; for libvirt's ch driver this is the VMM's pid.
    public var id: Int32? {
        let i = virDomainGetID(handle)
        return i == UInt32.max ? nil : Int32(bitPattern: i)
    }

    /// The `<emulator>` of the domain XML.
    public func emulator() throws -> String? {
        let xml = try self.xml()
        guard let a = xml.range(of: "<emulator>"), let b = xml.range(of: "</emulator>", range: a.upperBound..<xml.endIndex) else { return nil }
        return String(xml[a.upperBound..<b.lowerBound])
    }
}

/// Finds the path of a Unix socket a process listens on, from /proc (the ch driver creates the
/// VMM's API socket itself and hands it over as `--api-socket fd=N`; this is how Baton finds it).
public enum ListeningSocketPath {
    public static func of(pid: Int32) -> [String] {
        let fdDir = "/proc/\(pid)/fd"
        let inodes = Set(((try? FileManager.default.contentsOfDirectory(atPath: fdDir)) ?? []).compactMap { fd -> String? in
            guard let target = try? FileManager.default.destinationOfSymbolicLink(atPath: "\(fdDir)/\(fd)"),
                  target.hasPrefix("socket:[") else { return nil }
            return String(target.dropFirst(8).dropLast())
        })
        guard let table = try? String(contentsOfFile: "/proc/net/unix", encoding: .utf8) else { return [] }
        // Num RefCount Protocol Flags Type St Inode Path; Flags 00010000 = listening (__SO_ACCEPTCON).
        return table.split(separator: "\n").dropFirst().compactMap { line in
            let f = line.split(separator: " ", omittingEmptySubsequences: true)
            guard f.count >= 8, f[3] == "00010000", inodes.contains(String(f[6])), f[7].hasPrefix("/") else { return nil }
            return String(f[7])
        }
    }
}
