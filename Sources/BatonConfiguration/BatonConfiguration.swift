import Foundation
import Glibc
import TOMLKit

/// Baton's configuration file (`/etc/baton/baton.toml`, or `--config` / `BATON_CONFIG`):
/// every key Config/baton.example.toml documents, with its default. Unknown keys and bad
/// values are refused with the key and its line. Command-line flags override what it says.
public struct BatonConfiguration: Sendable, Equatable {
    /// What `baton serve` does with opted-in QEMU domains whose QEMU is stale.
    public enum UpgradePolicy: String, Sendable, CaseIterable {
        /// Only `baton upgrade` moves them.
        case manual
        /// When libvirtd reconnects to them (it was restarted, as after a package upgrade).
        case onReconnect = "on-reconnect"
        /// On reconnect, and whenever the service's periodic check finds the binary changed.
        case onStale = "on-stale"
    }

    public static let defaultPath = "/etc/baton/baton.toml"

    // [service]
    public var serviceSocket = "/run/baton/serve.sock"
    public var stateDirectory = "/var/lib/baton"
    public var drainSeconds = 120.0
    /// swift-log level of `baton serve`'s log lines.
    public var logLevel = "info"
    /// Where `baton serve` serves `GET /metrics` ("127.0.0.1:9464"); nil: no HTTP endpoint.
    public var metricsListen: String?
    // [hook]
    public var hookBudgetSeconds = 1.0
    // [upgrade]
    public var policy = UpgradePolicy.manual
    public var libvirtURI = "qemu:///system"
    public var transport = "auto"
    public var releaseSource = false
    public var runDirectory = "/run/baton"
    public var timeoutSeconds = 30.0
    public var stallTimeoutSeconds = 10.0
    public var digest = false
    public var parallel = 1
    /// nil: no limit.
    public var maxPauseMs: Double?
    public var updateDefinition = false
    public var staleCheckSeconds = 60.0

    public init() {}

    /// A refusal of the file: which file, key and line, and why, in one line.
    public struct Problem: Error, CustomStringConvertible, Sendable, Equatable {
        public let path: String
        public let line: Int?
        public let key: String?
        public let message: String
        public var description: String {
            "\(path)\(line.map { ":\($0)" } ?? "")\(key.map { ": \($0)" } ?? ""): \(message)"
        }
    }

    static let logLevels = ["trace", "debug", "info", "notice", "warning", "error", "critical"]
    static let transports = ["auto", "gift", "memfd", "copy"]

    /// Every key, by section, with the setter that validates and applies its value.
    struct Key: Sendable {
        let type: String
        let apply: @Sendable (inout BatonConfiguration, TOMLValueConvertible) -> String?  // nil or why the value is bad
    }

    static func string(_ set: @escaping @Sendable (inout BatonConfiguration, String) -> String?) -> Key {
        Key(type: "a string") { c, v in v.string.map { set(&c, $0) } ?? "expected a string, got \(v.type)" }
    }
    static func bool(_ set: @escaping @Sendable (inout BatonConfiguration, Bool) -> Void) -> Key {
        Key(type: "true or false") { c, v in v.bool.map { set(&c, $0); return nil } ?? "expected true or false, got \(v.type)" }
    }
    static func number(min: Double, max: Double, _ set: @escaping @Sendable (inout BatonConfiguration, Double) -> Void) -> Key {
        Key(type: "a number") { c, v in
            guard let d = v.double ?? v.int.map(Double.init) else { return "expected a number, got \(v.type)" }
            guard d.isFinite, d >= min, d <= max else { return "\(d) is not between \(min) and \(max)" }
            set(&c, d)
            return nil
        }
    }
    static func oneOf(_ allowed: [String], _ set: @escaping @Sendable (inout BatonConfiguration, String) -> Void) -> Key {
        string { c, s in
            guard allowed.contains(s) else { return "'\(s)' is not one of \(allowed.joined(separator: ", "))" }
            set(&c, s)
            return nil
        }
    }
    static func path(_ set: @escaping @Sendable (inout BatonConfiguration, String) -> Void) -> Key {
        string { c, s in
            guard s.hasPrefix("/"), !s.contains("\0") else { return "'\(s)' is not an absolute path" }
            set(&c, s)
            return nil
        }
    }

    static let keys: [String: [String: Key]] = [
        "service": [
            "socket": path { $0.serviceSocket = $1 },
            "state_directory": path { $0.stateDirectory = $1 },
            "drain_seconds": number(min: 0, max: 86_400) { $0.drainSeconds = $1 },
            "log_level": oneOf(logLevels) { $0.logLevel = $1 },
            "metrics_listen": string { c, s in
                if s.isEmpty { c.metricsListen = nil; return nil }
                var address = in_addr()
                guard let colon = s.lastIndex(of: ":"), UInt16(s[s.index(after: colon)...]) != nil,
                      s[..<colon] == "localhost" || inet_pton(AF_INET, String(s[..<colon]), &address) == 1 else {
                    return "'\(s)' is not IPV4-ADDRESS:PORT (e.g. 127.0.0.1:9464), or \"\" for none"
                }
                c.metricsListen = s
                return nil
            },
        ],
        "hook": [
            "budget_seconds": number(min: 0.01, max: 60) { $0.hookBudgetSeconds = $1 },
        ],
        "upgrade": [
            "policy": oneOf(UpgradePolicy.allCases.map(\.rawValue)) { $0.policy = UpgradePolicy(rawValue: $1)! },
            "libvirt_uri": string { c, s in
                guard s.contains(":///") || s.contains("://") else { return "'\(s)' is not a libvirt URI (e.g. qemu:///system)" }
                c.libvirtURI = s
                return nil
            },
            "transport": oneOf(transports) { $0.transport = $1 },
            "release_source": bool { $0.releaseSource = $1 },
            "run_directory": path { $0.runDirectory = $1 },
            "timeout_seconds": number(min: 1, max: 3600) { $0.timeoutSeconds = $1 },
            "stall_timeout_seconds": number(min: 0.1, max: 3600) { $0.stallTimeoutSeconds = $1 },
            "digest": bool { $0.digest = $1 },
            "parallel": Key(type: "a whole number") { c, v in
                guard let d = v.int.map(Double.init) ?? v.double else { return "expected a whole number, got \(v.type)" }
                guard d == d.rounded() else { return "\(d) is not a whole number" }
                guard d >= 1, d <= 64 else { return "\(Int(d)) is not between 1 and 64" }
                c.parallel = Int(d)
                return nil
            },
            "max_pause_ms": number(min: 0, max: 3_600_000) { c, d in c.maxPauseMs = d == 0 ? nil : d },
            "update_definition": bool { $0.updateDefinition = $1 },
            "stale_check_seconds": number(min: 1, max: 86_400) { $0.staleCheckSeconds = $1 },
        ],
    ]

    /// Parses `text` (the contents of `path`). Pure.
    public static func parse(_ text: String, path: String) throws(Problem) -> BatonConfiguration {
        let table: TOMLTable
        do { table = try TOMLTable(string: text) } catch let e as TOMLParseError {
            throw Problem(path: path, line: e.source.begin.line, key: nil, message: "not valid TOML: \(e.description)")
        } catch {
            throw Problem(path: path, line: nil, key: nil, message: "not valid TOML: \(error)")
        }
        let lines = keyLines(text)
        var config = BatonConfiguration()
        for section in table.keys.sorted() {
            guard let known = keys[section] else {
                throw Problem(path: path, line: lines[section], key: section, message: "unknown section (known: \(keys.keys.sorted().joined(separator: ", ")))")
            }
            guard let values = table[section]?.table else {
                throw Problem(path: path, line: lines[section], key: section, message: "expected a [\(section)] table")
            }
            for name in values.keys.sorted() {
                let dotted = "\(section).\(name)"
                guard let key = known[name] else {
                    throw Problem(path: path, line: lines[dotted], key: dotted, message: "unknown key (known in [\(section)]: \(known.keys.sorted().joined(separator: ", ")))")
                }
                if let why = key.apply(&config, values[name]!) {
                    throw Problem(path: path, line: lines[dotted], key: dotted, message: why)
                }
            }
        }
        return config
    }

    /// Reads the file at `path`. A missing file is the defaults unless it was asked for by name.
    public static func load(path: String, required: Bool) throws(Problem) -> BatonConfiguration {
        guard FileManager.default.fileExists(atPath: path) else {
            if required { throw Problem(path: path, line: nil, key: nil, message: "no such file") }
            return BatonConfiguration()
        }
        guard let data = FileManager.default.contents(atPath: path), let text = String(data: data, encoding: .utf8) else {
            throw Problem(path: path, line: nil, key: nil, message: "cannot be read as UTF-8 text")
        }
        return try parse(text, path: path)
    }

    /// The file named by `--config` (required), else by `BATON_CONFIG` (required), else the
    /// default path (optional).
    public static func load(explicitPath: String?, environment: [String: String] = ProcessInfo.processInfo.environment) throws(Problem) -> (BatonConfiguration, String) {
        if let explicitPath { return (try load(path: explicitPath, required: true), explicitPath) }
        if let env = environment["BATON_CONFIG"], !env.isEmpty { return (try load(path: env, required: true), env) }
        return (try load(path: defaultPath, required: false), defaultPath)
    }

    /// Line numbers of `[section]` headers and `section.key` assignments, for error messages.
    static func keyLines(_ text: String) -> [String: Int] {
        var out: [String: Int] = [:]
        var section = ""
        for (i, raw) in text.split(separator: "\n", omittingEmptySubsequences: false).enumerated() {
            let line = raw.trimmingCharacters(in: .whitespaces)
            if line.hasPrefix("["), let end = line.firstIndex(of: "]") {
                section = line[line.index(after: line.startIndex)..<end].trimmingCharacters(in: .whitespaces)
                out[section] = out[section] ?? i + 1
            } else if let eq = line.firstIndex(of: "="), !line.hasPrefix("#") {
                let key = line[..<eq].trimmingCharacters(in: .whitespaces).trimmingCharacters(in: CharacterSet(charactersIn: "\"'"))
                out[section.isEmpty ? key : "\(section).\(key)"] = i + 1
            }
        }
        return out
    }

    /// The effective configuration as TOML (what `baton config check` prints).
    public var rendered: String {
        func q(_ s: String) -> String { "\"\(s.replacingOccurrences(of: "\\", with: "\\\\").replacingOccurrences(of: "\"", with: "\\\""))\"" }
        func n(_ d: Double) -> String { d == d.rounded() && abs(d) < 1e15 ? String(Int(d)) : String(d) }
        return """
        [service]
        socket = \(q(serviceSocket))
        state_directory = \(q(stateDirectory))
        drain_seconds = \(n(drainSeconds))
        log_level = \(q(logLevel))
        metrics_listen = \(q(metricsListen ?? ""))

        [hook]
        budget_seconds = \(n(hookBudgetSeconds))

        [upgrade]
        policy = \(q(policy.rawValue))
        libvirt_uri = \(q(libvirtURI))
        transport = \(q(transport))
        release_source = \(releaseSource)
        run_directory = \(q(runDirectory))
        timeout_seconds = \(n(timeoutSeconds))
        stall_timeout_seconds = \(n(stallTimeoutSeconds))
        digest = \(digest)
        parallel = \(parallel)
        max_pause_ms = \(n(maxPauseMs ?? 0))
        update_definition = \(updateDefinition)
        stale_check_seconds = \(n(staleCheckSeconds))

        """
    }
}
