import BatonLibvirt
import Foundation

/// `baton enroll`: makes a domain's persistent definition give its guest RAM as shared memory
/// (memfd), which is what lets Baton leave RAM in place at an upgrade, and records Baton's
/// opt-in in its metadata. libvirt applies memory backing only at a cold boot.
public enum QEMUEnrollment {
    public static let sharedBacking = "<source type='memfd'/><access mode='shared'/>"

    /// The definition with shared memfd RAM, and whether anything changed. Pure.
    public static func withSharedMemory(_ xml: String) -> (xml: String, changed: Bool) {
        if let open = xml.firstMatch(of: #/<memoryBacking\s*>/#) {
            let closeRange = xml.range(of: "</memoryBacking>", range: open.range.upperBound..<xml.endIndex)
            guard let closeRange else { return (xml, false) }
            var inner = String(xml[open.range.upperBound..<closeRange.lowerBound])
            if inner.contains("<source type='memfd'/>") && inner.contains("<access mode='shared'/>") { return (xml, false) }
            inner.replace(#/<source[^>]*/>\s*/#, with: "")
            inner.replace(#/<access[^>]*/>\s*/#, with: "")
            let updated = xml[..<open.range.upperBound] + sharedBacking + inner + xml[closeRange.lowerBound...]
            return (String(updated), true)
        }
        if let empty = xml.firstMatch(of: #/<memoryBacking\s*/>/#) {
            return (xml.replacingCharacters(in: empty.range, with: "<memoryBacking>\(sharedBacking)</memoryBacking>"), true)
        }
        let anchor = xml.range(of: "</currentMemory>") ?? xml.range(of: "</memory>")
        guard let anchor else { return (xml, false) }
        var out = xml
        out.insert(contentsOf: "\n  <memoryBacking>\(sharedBacking)</memoryBacking>", at: anchor.upperBound)
        return (out, true)
    }

    /// Enrolls `name`: returns the one line to print.
    public static func enroll(_ name: String, uri: String) throws -> String {
        let connection = try LibvirtConnection(uri: uri)
        let domain = try connection.domain(name)
        guard domain.isPersistent else { throw QEMUUpgradeError.refused("domain \(domain.name) is transient: it has no definition to enroll") }
        let (xml, changed) = withSharedMemory(try domain.inactiveXML())
        if changed { try connection.define(xml: xml) }
        let running = (try? domain.state().state) == .running
        // The opt-in goes into the definition; the running domain gets it too unless it already
        // carries a handoff record (which says more).
        var meta = (try? domain.metadata(live: false)).flatMap { $0 }.flatMap(BatonMetadata.init(element:)) ?? BatonMetadata()
        meta.state = meta.state ?? "enrolled"
        try domain.setMetadata(meta.element, live: false, config: true)
        if running, (try? domain.metadata(live: true)).flatMap({ $0 }) == nil { try domain.setMetadata(meta.element, live: true, config: false) }
        let when = running ? "takes effect at its next cold boot (shut it down and start it; a reboot inside the guest is not enough)" : "takes effect when it starts"
        return changed
            ? "baton: enrolled \(domain.name): guest RAM becomes shared memory (memfd); this \(when)"
            : "baton: \(domain.name) already has shared guest RAM in its definition; Baton's opt-in recorded"
    }
}
