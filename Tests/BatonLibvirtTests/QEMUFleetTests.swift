import BatonLibvirt
import BatonSystem
import BatonHarness
import Foundation
import Glibc
import Testing

extension RealLibvirtHost {
@Suite("stale QEMU domains and batch upgrades", .serialized)
struct QEMUFleetTests {
    typealias U = QEMUUpgradeTests

    /// `baton status --json`'s domains among `ours`, by name, and how many of them are stale
    /// (the host may run other domains).
    static func status(_ ours: [String]) throws -> (stale: Int, domains: [String: [String: Any]]) {
        let r = try U.baton(["status", "--socket", "/nonexistent/baton.sock", "--json"])
        #expect(r.status == 0, "baton status: \(r.out)")
        let list = (r.report["qemuDomains"] as? [[String: Any]] ?? []).filter { ours.contains($0["domain"] as? String ?? "") }
        return (list.filter { $0["stale"] as? Bool == true }.count, Dictionary(uniqueKeysWithValues: list.map { ($0["domain"] as? String ?? "", $0) }))
    }

    /// A QEMU install of its own, where the domains' `<emulator>` points: a copy of Debian's
    /// QEMU 7.2. QEMU finds its modules and firmware relative to its executable (ROOT/usr/lib,
    /// ROOT/usr/share), as a relocatable install: here, the system's 7.2 ones.
    static func installOldQEMU(_ tag: String) throws -> (root: String, emulator: String) {
        let root = "/var/lib/baton/test-emulator-\(tag)-\(getpid())"
        let emulator = "\(root)/usr/bin/qemu-system-x86_64"
        try? FileManager.default.removeItem(atPath: root)
        try FileManager.default.createDirectory(atPath: "\(root)/usr/bin", withIntermediateDirectories: true)
        try Executable.copy(from: "/usr/bin/qemu-system-x86_64", to: emulator)
        for dir in ["lib", "share"] { try FileManager.default.createSymbolicLink(atPath: "\(root)/usr/\(dir)", withDestinationPath: "/usr/\(dir)") }
        return (root, emulator)
    }

    /// The package upgrade, as dpkg does it: QEMU 10.0 written beside the old file and renamed
    /// over it (running processes keep the old, now deleted, inode), with its own modules and
    /// firmware (a qemu-bundle directory beside the executable comes first in QEMU's search).
    static func packageUpgrade(root: String, emulator: String) throws {
        try Executable.copy(from: RealQEMU.newQEMU, to: emulator + ".dpkg-new")
        #expect(rename(emulator + ".dpkg-new", emulator) == 0)
        try FileManager.default.createSymbolicLink(atPath: "\(root)/usr/bin/qemu-bundle", withDestinationPath: "/opt/baton/qemu-10.0")
    }

    @Test("a package upgrade replaces the emulator: status lists the domains as stale, upgrade --all --parallel 4 moves every shared-RAM one in one libvirt gap, skips the private one unpaused; --max-pause-ms cancels")
    func staleDomainsUpgradedAsABatch() throws {
        if let why = RealQEMU.unavailableReason { try Test.cancel("real QEMU upgrade unavailable: \(why)") }
        let state = try RealLibvirt.bringUp("qemu-fleet")
        // The path the domains start from: a copy of Debian's QEMU 7.2, later replaced the way a
        // package upgrade replaces it (new file beside it, renamed over it).
        let (root, emulator) = try Self.installOldQEMU("fleet")
        defer { try? FileManager.default.removeItem(atPath: root) }

        let names = (1...4).map { "baton-fleet-\(getpid())-\($0)" }
        let privateName = "baton-fleet-\(getpid())-private"
        var consoles: [String: GuestConsole] = [:]
        defer { for n in names + [privateName] { U.remove(n) } }
        for n in names { consoles[n] = try U.boot(n, memoryMiB: 256, fillMiB: 32, state: state, emulator: emulator).1 }
        consoles[privateName] = try U.boot(privateName, memoryMiB: 256, fillMiB: 32, shared: false, state: state, emulator: emulator).1
        var before: [String: GuestConsole.Check] = [:]
        for (n, c) in consoles { before[n] = try c.ask("check", timeoutSeconds: 600) }
        let oldPids = Dictionary(uniqueKeysWithValues: (names + [privateName]).map { ($0, RealQEMU.processes(of: $0).first ?? 0) })

        var s = try Self.status(names + [privateName])
        #expect(s.stale == 0, "nothing is stale before the package upgrade: \(s.domains)")
        #expect(s.domains[names[0]]?["sharedRAM"] as? Bool == true && s.domains[privateName]?["sharedRAM"] as? Bool == false)

        // A pause limit no handoff can meet cancels it before the new QEMU runs the guest.
        let limited = try U.upgrade(names[0], to: RealQEMU.newQEMU, extra: ["--max-pause-ms", "0.001"])
        #expect(limited.status == 3, "over --max-pause-ms: exit 3 (rolled back): \(limited.out)")
        #expect((limited.report["error"] as? String ?? "").contains("--max-pause-ms"), "\(limited.out)")
        #expect(RealQEMU.processes(of: names[0]) == [oldPids[names[0]]!], "the domain stays on its old QEMU")
        before[names[0]] = try U.expectContinued(names[0], console: consoles[names[0]]!, before: before[names[0]]!, binary: emulator, pid: oldPids[names[0]])

        try Self.packageUpgrade(root: root, emulator: emulator)
        s = try Self.status(names + [privateName])
        #expect(s.stale == 5, "every domain runs the replaced binary: \(s.domains)")
        for n in names + [privateName] {
            let d = s.domains[n] ?? [:]
            #expect(d["stale"] as? Bool == true && d["installedVersion"] as? String == "10.0.2" && (d["runningVersion"] as? String ?? "").hasPrefix("7.2."), "\(n): \(d)")
            #expect((d["staleReason"] as? String ?? "").contains("replaced"), "\(n): \(d)")
        }

        func reconnects(_ n: String) -> Int {
            (Host.readSmallFile(state + "/hook.log") ?? "").split(separator: "\n").filter { $0.contains("hook qemu \(n) reconnect") }.count
        }
        let reconnectsBefore = names.map(reconnects)
        let r = try U.baton(["upgrade", "--all", "--connect", "qemu:///system", "--parallel", "4", "--json"])
        #expect(r.status == 0, "upgrade --all: \(r.out)")
        let lines = r.out.split(separator: "\n").filter { $0.hasPrefix("{") }.compactMap { (try? JSONSerialization.jsonObject(with: Data($0.utf8))) as? [String: Any] }
        let outcomes = Dictionary(uniqueKeysWithValues: lines.compactMap { l in (l["domain"] as? String).map { ($0, l) } })
        #expect(outcomes.count == 5, "one JSON line per domain: \(r.out)")
        for n in names {
            #expect(outcomes[n]?["status"] as? String == "upgraded", "\(n): \(outcomes[n] ?? [:])")
            let report = outcomes[n]?["report"] as? [String: Any] ?? [:]
            #expect(report["mode"] as? String == "ignore-shared" && report["verified"] as? Bool == true, "\(n): \(report)")
            before[n] = try U.expectContinued(n, console: consoles[n]!, before: before[n]!, binary: emulator, pid: (report["newPid"] as? Int).map(Int32.init))
            try U.expectManaged(n, version: "\"major\":10")
        }
        #expect(outcomes[privateName]?["status"] as? String == "skipped")
        #expect((outcomes[privateName]?["reason"] as? String ?? "").contains("baton enroll"), "\(outcomes[privateName] ?? [:])")
        #expect(RealQEMU.processes(of: privateName) == [oldPids[privateName]!], "the skipped domain keeps its QEMU")
        _ = try U.expectContinued(privateName, console: consoles[privateName]!, before: before[privateName]!, binary: emulator + " (deleted)", pid: oldPids[privateName])
        // One libvirtd restart for the whole batch: libvirt reconnected to each domain exactly once.
        let reconnectsAfter = names.map(reconnects)
        #expect(zip(reconnectsBefore, reconnectsAfter).allSatisfy { $1 - $0 == 1 }, "reconnects per domain: \(reconnectsBefore) → \(reconnectsAfter)")
        #expect(((outcomes[names[1]]?["report"] as? [String: Any])?["managementGapMs"] as? Double ?? 0) > 0)
        let summary = lines.last { $0["domain"] == nil } ?? [:]
        #expect(summary["parallel"] as? Int == 4 && (summary["wallMs"] as? Double ?? 0) > 0, "summary: \(summary)")

        s = try Self.status(names + [privateName])
        #expect(s.stale == 1 && s.domains[privateName]?["stale"] as? Bool == true, "only the private-RAM domain is left stale: \(s.domains)")
        // A second run finds only what it cannot upgrade.
        let again = try U.baton(["upgrade", "--all", "--connect", "qemu:///system", "--json"])
        #expect(again.status == 0 && again.out.contains("\"skipped\"") && !again.out.contains("\"upgraded\""), "\(again.out)")
    }

    @Test("[upgrade] policy = \"on-reconnect\": restarting libvirtd after a package upgrade moves a stale opted-in domain with no other command; the hook stays under 100 ms")
    func onReconnectPolicy() throws {
        if let why = RealQEMU.unavailableReason { try Test.cancel("real QEMU upgrade unavailable: \(why)") }
        let state = try RealLibvirt.bringUp("qemu-policy")
        let (root, emulator) = try Self.installOldQEMU("policy")
        defer { try? FileManager.default.removeItem(atPath: root) }
        let name = "baton-policy-\(getpid())"
        let (_, console) = try U.boot(name, memoryMiB: 256, fillMiB: 32, state: state, emulator: emulator)
        defer { U.remove(name) }
        let before = try console.ask("check", timeoutSeconds: 600)
        let oldPid = RealQEMU.processes(of: name).first ?? 0
        let enrolled = try U.baton(["enroll", name])
        #expect(enrolled.status == 0, "\(enrolled.out)")

        // The service, configured by file only (the hook reaches it at state/serve.sock).
        let config = state + "/baton.toml"
        try """
            [service]
            socket = "\(state)/serve.sock"
            state_directory = "\(state)/service"
            [upgrade]
            policy = "on-reconnect"
            run_directory = "\(state)/run"
            """.write(toFile: config, atomically: true, encoding: .utf8)
        let serve = try Spawn.detached(BatonProcess.executablePath, ["serve", "--config", config], logPath: state + "/serve.log")
        defer { kill(serve, SIGKILL); _ = Spawn.wait(serve) }
        #expect(BatonProcess.waitForPath(state + "/serve.sock"), "serve did not start: \(Host.readSmallFile(state + "/serve.log") ?? "")")

        try Self.packageUpgrade(root: root, emulator: emulator)
        // libvirtd restarts (as a package upgrade's maintainer script would): it reconnects to
        // the domain, the hook forwards that, the service upgrades the stale domain.
        let up = try RealLibvirt.run(["/bin/bash", RealLibvirt.upScript, state + "/qemu-hook"])
        #expect(up.status == 0, "\(up.out)")
        let deadline = Date().addingTimeInterval(120)
        var upgradedPid: pid_t?
        while Date() < deadline {
            if let pid = RealQEMU.processes(of: name).first, pid != oldPid, (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/\(pid)/exe")) == emulator,
               (try? RealLibvirt.virsh("domstate", name)) == "running",
               Host.readSmallFile("/run/libvirt/qemu/\(name).pid")?.trimmingCharacters(in: .whitespacesAndNewlines) == "\(pid)" {
                upgradedPid = pid
                break
            }
            usleep(250_000)
        }
        // The service logs its line once the batch returns (after libvirt adopted the domain).
        var log = ""
        while Date() < deadline {
            log = Host.readSmallFile(state + "/serve.log") ?? ""
            if log.contains("outcome=") { break }
            usleep(100_000)
        }
        #expect(upgradedPid != nil, "the service did not upgrade \(name): \(log)")
        _ = try U.expectContinued(name, console: console, before: before, binary: emulator, pid: upgradedPid)
        try U.expectManaged(name, version: "\"major\":10")
        #expect(log.contains("outcome=upgraded") && log.contains("mode=ignore-shared"), "one structured line per upgrade: \(log)")
        // The hook forwarded the reconnect and each of its runs stayed within 100 ms.
        let hookLines = (Host.readSmallFile(state + "/hook.log") ?? "").split(separator: "\n").filter { $0.contains("hook qemu \(name) ") }
        #expect(hookLines.contains { $0.contains("reconnect") && $0.contains("forwarded to baton serve") }, "\(hookLines)")
        for line in hookLines {
            let ms = line.split(separator: " ").reversed().dropFirst().first.flatMap { Double($0) } ?? .infinity
            #expect(ms < 100, "hook run took \(ms) ms: \(line)")
        }
        let metrics = try U.baton(["status", "--config", config, "--metrics"])
        #expect(metrics.out.contains("baton_upgrades_total{hypervisor=\"qemu\",outcome=\"succeeded\",mode=\"ignore-shared\"} 1"), "\(metrics.out)")
        #expect(metrics.out.contains("baton_downtime_seconds_count{hypervisor=\"qemu\"} 1"), "\(metrics.out)")
        kill(serve, SIGTERM)
        #expect(Spawn.wait(serve) == 0, "serve did not stop cleanly: \(Host.readSmallFile(state + "/serve.log") ?? "")")
    }

    @Test("baton upgrade --service: the service runs a QEMU domain's upgrade; its typed error picks the exit code")
    func throughTheService() throws {
        if let why = RealQEMU.unavailableReason { try Test.cancel("real QEMU upgrade unavailable: \(why)") }
        let state = try RealLibvirt.bringUp("qemu-service")
        let name = "baton-service-\(getpid())"
        let (_, console) = try U.boot(name, memoryMiB: 256, fillMiB: 32, state: state)
        defer { U.remove(name) }
        var before = try console.ask("check", timeoutSeconds: 600)
        let serve = try Spawn.detached(BatonProcess.executablePath, ["serve", "--socket", state + "/serve.sock", "--state", state + "/service"], logPath: state + "/serve.log")
        defer { kill(serve, SIGKILL); _ = Spawn.wait(serve) }
        #expect(BatonProcess.waitForPath(state + "/serve.sock"))
        let oldPid = RealQEMU.processes(of: name).first
        let limited = try U.upgrade(name, to: RealQEMU.newQEMU, extra: ["--service", state + "/serve.sock", "--max-pause-ms", "0.001"])
        #expect(limited.status == 3, "rolled back in the service: exit 3 from the error's kind: \(limited.out)")
        #expect(RealQEMU.processes(of: name).first == oldPid)
        let r = try U.upgrade(name, to: RealQEMU.newQEMU, extra: ["--service", state + "/serve.sock"])
        #expect(r.status == 0, "\(r.out)")
        #expect(r.report["mode"] as? String == "ignore-shared" && r.report["verified"] as? Bool == true, "\(r.report)")
        before = try U.expectContinued(name, console: console, before: before, binary: RealQEMU.newQEMU, pid: (r.report["newPid"] as? Int).map(Int32.init))
        try U.expectManaged(name, version: "\"major\":10")
        let metrics = try U.baton(["status", "--socket", state + "/serve.sock", "--metrics"])
        #expect(metrics.out.contains("baton_upgrades_total{hypervisor=\"qemu\",outcome=\"rolled_back\",mode=\"ignore-shared\"} 1"), "\(metrics.out)")
        #expect(metrics.out.contains("baton_upgrades_total{hypervisor=\"qemu\",outcome=\"succeeded\",mode=\"ignore-shared\"} 1"), "\(metrics.out)")
        kill(serve, SIGTERM)
        #expect(Spawn.wait(serve) == 0)
    }
}
}
