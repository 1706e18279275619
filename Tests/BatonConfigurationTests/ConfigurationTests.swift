import BatonConfiguration
import Foundation
import Testing

@Suite("configuration file")
struct ConfigurationTests {
    @Test("the example configuration parses and every key in it is one Baton reads")
    func exampleParses() throws {
        let path = URL(fileURLWithPath: #filePath).deletingLastPathComponent().appendingPathComponent("../../Config/baton.example.toml").standardized.path
        let text = try String(contentsOfFile: path, encoding: .utf8)
        let c = try BatonConfiguration.parse(text, path: path)
        #expect(c == BatonConfiguration(), "the example documents the defaults")
        // Every key of the rendered (effective) configuration appears in the example, and back.
        func keys(_ t: String) -> Set<String> {
            var section = "", out = Set<String>()
            for line in t.split(separator: "\n") {
                let l = line.trimmingCharacters(in: .whitespaces)
                if l.hasPrefix("[") { section = String(l.dropFirst().dropLast()) } else if !l.hasPrefix("#"), let eq = l.firstIndex(of: "=") {
                    out.insert(section + "." + l[..<eq].trimmingCharacters(in: .whitespaces))
                }
            }
            return out
        }
        #expect(keys(text) == keys(c.rendered), "example vs effective: \(keys(text).symmetricDifference(keys(c.rendered)))")
    }

    @Test("values are read and typed; the rendered configuration reads back the same")
    func valuesApply() throws {
        let c = try BatonConfiguration.parse("""
            [service]
            socket = "/tmp/x/serve.sock"
            log_level = "debug"
            [upgrade]
            policy = "on-reconnect"
            parallel = 4
            max_pause_ms = 250
            timeout_seconds = 12.5
            digest = true
            """, path: "t.toml")
        #expect(c.serviceSocket == "/tmp/x/serve.sock" && c.logLevel == "debug")
        #expect(c.policy == .onReconnect && c.parallel == 4 && c.maxPauseMs == 250 && c.timeoutSeconds == 12.5 && c.digest)
        #expect(try BatonConfiguration.parse("[upgrade]\nmax_pause_ms = 0\n[service]\nmetrics_listen = \"127.0.0.1:9464\"\n", path: "z.toml").maxPauseMs == nil, "0: no limit")
        #expect(try BatonConfiguration.parse("[service]\nmetrics_listen = \"127.0.0.1:9464\"\n", path: "z.toml").metricsListen == "127.0.0.1:9464")
        #expect(try BatonConfiguration.parse(c.rendered, path: "r.toml") == c)
    }

    @Test("unknown keys, unknown sections, bad values and bad TOML are refused with the key and line",
          arguments: [
            ("[upgrade]\nlanes = 4\n", 2, "upgrade.lanes", "unknown key"),
            ("[service]\nsocket = \"/a\"\n[transfer]\nlanes = 0\n", 3, "transfer", "unknown section"),
            ("[upgrade]\n\npolicy = \"sometimes\"\n", 3, "upgrade.policy", "not one of"),
            ("[upgrade]\nparallel = 0\n", 2, "upgrade.parallel", "not between"),
            ("[upgrade]\nparallel = 2.5\n", 2, "upgrade.parallel", "whole number"),
            ("[service]\ndrain_seconds = \"soon\"\n", 2, "service.drain_seconds", "expected a number"),
            ("[service]\nsocket = \"relative/path\"\n", 2, "service.socket", "absolute path"),
            ("[upgrade]\ndigest = 1\n", 2, "upgrade.digest", "true or false"),
            ("[service]\nsocket = \n", 2, nil, "not valid TOML"),
            ("[service]\nmetrics_listen = \"foo:1\"\n", 2, "service.metrics_listen", "not IPV4-ADDRESS:PORT"),
            ("[upgrade]\nlibvirt_uri = \"system\"\n", 2, "upgrade.libvirt_uri", "not a libvirt URI"),
          ] as [(String, Int, String?, String)])
    func refusals(text: String, line: Int, key: String?, message: String) {
        do {
            _ = try BatonConfiguration.parse(text, path: "/etc/baton/baton.toml")
            Issue.record("accepted: \(text)")
        } catch {
            #expect(error.line == line, "\(error)")
            #expect(error.key == key, "\(error)")
            #expect(error.description.contains(message) && error.description.hasPrefix("/etc/baton/baton.toml:\(line)"), "\(error)")
            #expect(!error.description.contains("\n"), "one line")
        }
    }

    @Test("a missing default file is the defaults; a file asked for by name must exist")
    func missingFiles() throws {
        let (c, path) = try BatonConfiguration.load(explicitPath: nil, environment: ["BATON_CONFIG": ""])
        #expect(path == BatonConfiguration.defaultPath)
        if !FileManager.default.fileExists(atPath: path) { #expect(c == BatonConfiguration()) }
        #expect(throws: BatonConfiguration.Problem.self) { try BatonConfiguration.load(explicitPath: "/nonexistent/baton.toml") }
        #expect(throws: BatonConfiguration.Problem.self) { try BatonConfiguration.load(explicitPath: nil, environment: ["BATON_CONFIG": "/nonexistent/b.toml"]) }
    }
}
