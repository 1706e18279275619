import Foundation

/// libvirt's live record of a running QEMU domain (`/run/libvirt/qemu/NAME.xml`): what its
/// reconnect path trusts on the next libvirtd start. Baton rewrites exactly the fields that
/// describe the process (pid, vCPU thread ids, emulator, the emulator's capability flags) and
/// leaves everything else as libvirt wrote it. Pure text transformation.
public struct LibvirtStatusFile: Equatable, Sendable {
    public var xml: String

    public init(xml: String) { self.xml = xml }

    public var pid: Int32? { firstMatch(#"<domstatus [^>]*pid='(\d+)'"#).flatMap(Int32.init) }
    public var monitorPath: String? { firstMatch(#"<monitor path='([^']+)'"#) }
    public var emulator: String? { firstMatch(#"<emulator>([^<]*)</emulator>"#) }
    public var vcpuThreads: [Int: Int32] {
        var out: [Int: Int32] = [:]
        for m in xml.matches(of: #/<vcpu id='(\d+)' pid='(\d+)'/>/#) {
            if let id = Int(m.1), let tid = Int32(m.2) { out[id] = tid }
        }
        return out
    }
    public var capabilityFlags: [String] { Self.flags(in: xml) }

    /// The flags of a `<qemuCaps>` element (status file) or a capabilities-cache file.
    public static func flags(in text: String) -> [String] { text.matches(of: #/<flag name='([^']+)'/>/#).map { String($0.1) } }

    /// The same record for process `pid` with `vcpus` (index → thread id), `emulator`, and
    /// `flags` (nil keeps the recorded ones).
    public func rewritten(pid newPid: Int32, vcpus: [Int: Int32], emulator newEmulator: String, flags: [String]?) throws -> LibvirtStatusFile {
        guard pid != nil else { throw QEMUUpgradeError.unsupported("libvirt's status file has no <domstatus pid=...>") }
        var out = xml
        out.replace(#/(<domstatus [^>]*pid=')\d+(')/#, maxReplacements: 1) { "\($0.1)\(newPid)\($0.2)" }
        for (id, tid) in vcpus {
            out.replace(try Regex("(<vcpu id='\(id)' pid=')\\d+(')")) { m in "\(m.output[1].substring ?? "")\(tid)\(m.output[2].substring ?? "")" }
        }
        out.replace(#/<emulator>[^<]*</emulator>/#) { _ in "<emulator>\(Self.escaped(newEmulator))</emulator>" }
        if let flags {
            let body = flags.map { "    <flag name='\(Self.escaped($0))'/>\n" }.joined()
            out.replace(#/<qemuCaps>[\s\S]*?</qemuCaps>/#, maxReplacements: 1) { _ in "<qemuCaps>\n\(body)  </qemuCaps>" }
        }
        return LibvirtStatusFile(xml: out)
    }

    func firstMatch(_ pattern: String) -> String? {
        guard let r = try? Regex(pattern), let m = xml.firstMatch(of: r), m.output.count > 1 else { return nil }
        return m.output[1].substring.map(String.init)
    }

    static func escaped(_ s: String) -> String {
        s.replacingOccurrences(of: "&", with: "&amp;").replacingOccurrences(of: "<", with: "&lt;").replacingOccurrences(of: "'", with: "&apos;")
    }
}
