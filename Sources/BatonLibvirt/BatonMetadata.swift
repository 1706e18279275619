import Foundation

/// Baton's element in a domain's `<metadata>`. A domain opts in to Baton by carrying it:
///
///     <baton:handoff xmlns:baton="https://baton.dev/xmlns/handoff/1"
///                    agent="/run/batonvmm/vm1.sock" generation="3" state="committed" .../>
///
/// `agent` names the control socket of the hypervisor that embeds Baton's agents. The other
/// attributes are the handoff record Baton writes (last generation, state, pids, transport).
public struct BatonMetadata: Equatable, Sendable {
    public static let namespace = "https://baton.dev/xmlns/handoff/1"
    public static let prefix = "baton"

    public var agent: String?
    public var generation: Int = 0
    public var state: String?
    public var oldPid: Int32?
    public var newPid: Int32?
    public var transport: String?

    public init(agent: String? = nil, generation: Int = 0, state: String? = nil, oldPid: Int32? = nil, newPid: Int32? = nil, transport: String? = nil) {
        self.agent = agent
        self.generation = generation
        self.state = state
        self.oldPid = oldPid
        self.newPid = newPid
        self.transport = transport
    }

    static func escape(_ s: String) -> String {
        s.replacingOccurrences(of: "&", with: "&amp;").replacingOccurrences(of: "\"", with: "&quot;")
            .replacingOccurrences(of: "<", with: "&lt;").replacingOccurrences(of: ">", with: "&gt;")
    }

    /// The element as libvirt's SetMetadata wants it (no prefix; libvirt adds it).
    public var element: String {
        var attributes = ["generation=\"\(generation)\""]
        if let agent { attributes.append("agent=\"\(Self.escape(agent))\"") }
        if let state { attributes.append("state=\"\(Self.escape(state))\"") }
        if let oldPid { attributes.append("oldPid=\"\(oldPid)\"") }
        if let newPid { attributes.append("newPid=\"\(newPid)\"") }
        if let transport { attributes.append("transport=\"\(Self.escape(transport))\"") }
        return "<handoff \(attributes.joined(separator: " "))/>"
    }

    /// Parses the element libvirt returns from GetMetadata (attributes of its root).
    public init?(element xml: String) {
        guard let data = xml.data(using: .utf8) else { return nil }
        let parser = RootAttributes(data: data)
        guard let a = parser.attributes, parser.rootName?.hasSuffix("handoff") == true else { return nil }
        agent = a["agent"]
        generation = a["generation"].flatMap(Int.init) ?? 0
        state = a["state"]
        oldPid = a["oldPid"].flatMap { Int32($0) }
        newPid = a["newPid"].flatMap { Int32($0) }
        transport = a["transport"]
    }
}

#if canImport(FoundationXML)
import FoundationXML
#endif

/// The root element's name and attributes of a small XML document.
final class RootAttributes: NSObject, XMLParserDelegate {
    var rootName: String?
    var attributes: [String: String]?

    init(data: Data) {
        super.init()
        let parser = XMLParser(data: data)
        parser.delegate = self
        _ = parser.parse()
    }

    func parser(_ parser: XMLParser, didStartElement name: String, namespaceURI: String?, qualifiedName: String?, attributes: [String: String] = [:]) {
        if rootName == nil {
            rootName = name
            self.attributes = attributes
        }
    }
}
