import Foundation
#if canImport(FoundationXML)
import FoundationXML
#endif

/// What a libvirt hook call says, parsed and validated without calling libvirt (a hook that
/// calls back into libvirt deadlocks: libvirtd waits for the hook).
///
/// libvirt runs `/etc/libvirt/hooks/qemu <domain> <operation> <sub-operation> <extra>` with
/// the domain XML on stdin.
public struct HookRequest: Equatable, Sendable {
    public let object: String
    public let domain: String
    public let operation: String
    public let subOperation: String
    public let extra: String
    public let uuid: String?
    /// The `agent` of Baton's `<baton:handoff>` metadata: set only for domains that opted in.
    public let batonAgent: String?
    /// `<memoryBacking>` asks for shared memory (`<access mode='shared'/>`, memfd or file source).
    public var sharedMemory = false

    /// Operations Baton acts on, for domains that opted in.
    public static let actedOn: Set<String> = ["started", "reconnect", "stopped", "release"]
    /// Every operation libvirt 9.0's QEMU driver is known to send.
    public static let known: Set<String> = ["prepare", "start", "started", "stopped", "release", "migrate", "restore", "reconnect", "attach"]

    /// Why a hook call was refused. The exit codes are the hook's contract (Docs/OPERATIONS.md).
    public enum Refusal: Error, Equatable, CustomStringConvertible {
        case usage(String)
        case badXML(String)
        case nameMismatch(argument: String, xml: String)

        public var exitCode: Int32 {
            switch self {
            case .usage: 2
            case .badXML: 3
            case .nameMismatch: 4
            }
        }

        public var description: String {
            switch self {
            case .usage(let why): "hook usage: \(why) (expected: baton hook qemu <domain> <operation> <sub-operation> <extra>, domain XML on stdin)"
            case .badXML(let why): "hook: domain XML on stdin is \(why)"
            case let .nameMismatch(argument, xml): "hook: domain argument '\(argument)' differs from the XML's <name>\(xml)</name>"
            }
        }
    }

    public static func parse(arguments: [String], xml: Data) throws(Refusal) -> HookRequest {
        guard arguments.count == 5 else { throw .usage("got \(arguments.count) arguments, need 5") }
        guard arguments[0] == "qemu" else { throw .usage("object '\(arguments[0])' is not 'qemu'") }
        guard !arguments[1].isEmpty, !arguments[2].isEmpty else { throw .usage("empty domain or operation") }
        guard !xml.isEmpty else { throw .badXML("empty") }
        let facts = DomainXMLFacts(xml)
        if let error = facts.error { throw .badXML("malformed (\(error))") }
        guard facts.root == "domain" else { throw .badXML("not a <domain> document (root <\(facts.root ?? "?")>)") }
        guard let name = facts.name, !name.isEmpty else { throw .badXML("missing <name>") }
        guard name == arguments[1] else { throw .nameMismatch(argument: arguments[1], xml: name) }
        var request = HookRequest(object: arguments[0], domain: name, operation: arguments[2], subOperation: arguments[3],
                                  extra: arguments[4], uuid: facts.uuid, batonAgent: facts.batonAgent)
        request.sharedMemory = facts.sharedMemory
        return request
    }

    public var optedIn: Bool { batonAgent != nil }
    public var isKnownOperation: Bool { Self.known.contains(operation) }
    public var wantsService: Bool { optedIn && Self.actedOn.contains(operation) }
}

/// Name, UUID and Baton's metadata agent from a domain XML, with namespaces resolved.
final class DomainXMLFacts: NSObject, XMLParserDelegate {
    var root: String?
    var name: String?
    var uuid: String?
    var batonAgent: String?
    var sharedMemory = false
    var error: String?
    private var path: [String] = []
    private var text = ""

    init(_ data: Data) {
        super.init()
        let parser = XMLParser(data: data)
        parser.shouldProcessNamespaces = true
        parser.delegate = self
        if !parser.parse() {
            error = parser.parserError.map { "\($0.localizedDescription)" } ?? "parse error"
            if error?.isEmpty != false { error = "parse error at line \(parser.lineNumber)" }
        } else if !path.isEmpty || root == nil {
            // Some libxml2 builds stop quietly at end of input: an unclosed element is still malformed.
            error = root == nil ? "no element" : "unclosed <\(path.last!)> at end of input"
        }
    }

    func parser(_ parser: XMLParser, didStartElement name: String, namespaceURI: String?, qualifiedName: String?, attributes: [String: String] = [:]) {
        if root == nil { root = name }
        if path == ["domain", "metadata"], namespaceURI == "https://baton.dev/xmlns/handoff/1", name == "handoff" {
            batonAgent = attributes["agent"] ?? ""
        }
        if path == ["domain", "memoryBacking"], name == "access", attributes["mode"] == "shared" { sharedMemory = true }
        path.append(name)
        text = ""
    }

    func parser(_ parser: XMLParser, foundCharacters string: String) { text += string }

    func parser(_ parser: XMLParser, didEndElement name: String, namespaceURI: String?, qualifiedName: String?) {
        if path == ["domain", "name"] { self.name = text.trimmingCharacters(in: .whitespacesAndNewlines) }
        if path == ["domain", "uuid"] { uuid = text.trimmingCharacters(in: .whitespacesAndNewlines) }
        path.removeLast()
    }
}
