import ArgumentParser
import BatonController
import BatonCore
import BatonHarness
import BatonLibvirt
import BatonQEMU
import BatonSystem
import Foundation
import Glibc

/// `baton bench qemu`: the guest pause of Baton's QEMU upgrade under libvirt, side by side in
/// the same run with the raw QMP handover of two plain QEMU processes (no libvirt, no checks),
/// same binaries, RAM size and guest. Figures, never assertions.
struct QEMUBench: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "qemu",
        abstract: "Baton's QEMU upgrade under libvirt vs the raw QMP handover, same run, same guest (needs libvirtd, both QEMUs, the test guest).")

    @Option(help: "Guest RAM.") var ram: String = "1GiB"
    @Option(help: "Random data the guest keeps in RAM.") var fill: String = "768MiB"
    @Option(help: "Runs per mode and per side.") var runs: Int = 7
    @Option(help: "ignore-shared (old → new) and/or cpr-transfer (new → new).") var modes: String = "ignore-shared,cpr-transfer"
    @Option(help: "The old QEMU.") var old: String = "/usr/bin/qemu-system-x86_64"
    @Option(help: "The new QEMU.") var new: String = "/opt/baton/qemu-10.0/usr/bin/qemu-system-x86_64"
    @Option(help: "Directory with the guest's vmlinuz and initrd.gz (Scripts/build-guest.sh).") var guest: String = "/var/lib/baton/guest"
    @Option(help: "libvirt URI.") var connect: String = "qemu:///system"
    @Option(help: "Also boot this many domains and upgrade them as one batch (--parallel N): each pause beside the single upgrade's, the batch's one libvirt gap and wall time.") var batch: Int = 0
    @Flag(help: "One JSON object.") var json = false

    struct BatchResult: Codable {
        var domains: Int
        var pauseMs: Spread
        var samples: [Double]
        /// The single ignore-shared upgrade's median pause, same run (nil if that mode did not run).
        var singleMedianMs: Double?
        /// The batch's longest pause over the single upgrade's median.
        var worstToSingle: Double?
        var managementGapMs: Double
        var wallMs: Double
    }

    struct Results: Codable {
        var modes: [ModeResult]
        var batch: BatchResult?
    }

    struct ModeResult: Codable {
        var mode: String
        /// nil: only the raw side ran (`bench upgrade --compare-qemu` without libvirtd).
        var batonPauseMs: Spread?
        var rawPauseMs: Spread
        /// Baton's median minus the raw median: what the checks and libvirt's process cost.
        var overheadMs: Double?
        var managementGapMs: Spread?
        /// Baton's pause, phase by phase (medians over the runs; each run's phases sum to its pause).
        var batonPhasesMs: [String: Double]
        var batonSamples: [Double]
        var rawSamples: [Double]
    }

    func validate() throws {
        guard runs >= 1 else { throw ValidationError("--runs must be at least 1") }
        guard (0...16).contains(batch) else { throw ValidationError("--batch: \(batch) is not between 0 and 16") }
        for m in modes.split(separator: ",") where !["ignore-shared", "cpr-transfer"].contains(String(m)) {
            throw ValidationError("--modes: '\(m)' is not ignore-shared or cpr-transfer")
        }
    }

    func progress(_ s: String) { if !json { FileHandle.standardError.write(Data("  \(s)\n".utf8)) } }

    func run() throws {
        let results = try measure()
        if json { printJSON(results); return }
        printResults(results)
    }

    /// Every mode, Baton's side under libvirt (unless `rawOnly`) and the raw QMP side, run by run.
    func measure(rawOnly: Bool = false) throws -> Results {
        let ramMiB = try parseSize(ram, option: "--ram") >> 20, fillMiB = try parseSize(fill, option: "--fill") >> 20
        let dir = UpgradeOptions.defaultRunDirectory + "/bench-qemu-\(getpid())"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        var results: [ModeResult] = []
        for mode in modes.split(separator: ",").map(String.init) {
            var baton: [Double] = [], raw: [Double] = [], gaps: [Double] = [], phases: [String: [Double]] = [:]
            let cpr = mode == "cpr-transfer"
            // Baton: a libvirt domain on the old QEMU (cpr: first moved to the new one, not counted).
            var domain: QEMUTestDomain?
            for i in 0..<runs {
                if rawOnly {
                    raw.append(try rawHandover(cpr: cpr, ramMiB: ramMiB, fillMiB: fillMiB, dir: dir))
                    progress("\(mode) raw run \(i + 1): pause \(String(format: "%.2f", raw.last!)) ms")
                    continue
                }
                if domain == nil || !cpr {
                    domain?.remove()
                    domain = try bootDomain(ramMiB: ramMiB, fillMiB: fillMiB, dir: dir)
                    if cpr { _ = try upgrade(domain!.name) }
                }
                let r = try upgrade(domain!.name)
                guard r.mode == mode else { throw ValidationError("expected \(mode), Baton chose \(r.mode)") }
                baton.append(r.pauseMs)
                gaps.append(r.managementGapMs)
                for (name, ms) in r.breakdown.phases { phases[name, default: []].append(ms) }
                progress("\(mode) baton run \(i + 1): pause \(String(format: "%.2f", r.pauseMs)) ms, libvirt gap \(String(format: "%.0f", r.managementGapMs)) ms")
                raw.append(try rawHandover(cpr: cpr, ramMiB: ramMiB, fillMiB: fillMiB, dir: dir))
                progress("\(mode) raw run \(i + 1): pause \(String(format: "%.2f", raw.last!)) ms")
            }
            domain?.remove()
            let b = Spread(baton), r = Spread(raw)
            results.append(ModeResult(mode: mode, batonPauseMs: rawOnly ? nil : b, rawPauseMs: r, overheadMs: rawOnly ? nil : b.median - r.median,
                                      managementGapMs: rawOnly ? nil : Spread(gaps),
                                      batonPhasesMs: phases.mapValues { Spread($0).median }, batonSamples: baton, rawSamples: raw))
        }
        var batchResult: BatchResult?
        if batch > 0 {
            var domains: [QEMUTestDomain] = []
            defer { domains.forEach { $0.remove() } }
            for _ in 0..<batch { domains.append(try bootDomain(ramMiB: ramMiB, fillMiB: fillMiB, dir: dir)) }
            let names = domains.map(\.name)
            var template = QEMUUpgradeOptions(domain: "", newEmulator: new)
            template.uri = connect
            let summary = try QEMUBatchUpgrade(targets: names.map { .init(domain: $0, newEmulator: new) }, template: template, parallel: batch).run()
            let pauses = summary.outcomes.compactMap { $0.status == .upgraded ? $0.report?.pauseMs : nil }
            guard pauses.count == batch else { throw ValidationError("batch: \(summary.outcomes.map { "\($0.domain) \($0.status.rawValue) \($0.reason ?? "")" })") }
            let single = results.first { $0.mode == "ignore-shared" }?.batonPauseMs?.median
            batchResult = BatchResult(domains: batch, pauseMs: Spread(pauses), samples: pauses, singleMedianMs: single,
                                      worstToSingle: single.map { (pauses.max() ?? 0) / $0 }, managementGapMs: summary.managementGapMs, wallMs: summary.wallMs)
            progress("batch of \(batch): pauses \(pauses.map { String(format: "%.2f", $0) }.joined(separator: ", ")) ms")
        }
        return Results(modes: results, batch: batchResult)
    }

    func printResults(_ results: Results) {
        Self.printModes(results.modes)
        printBatch(results)
        print("(\(ram) guest with \(fill) of random data, TCG, \(runs) runs per side; pause = guest STOP in the old QEMU → RESUME in the new, from QEMU's event timestamps)")
    }

    static func printModes(_ modes: [ModeResult]) {
        print("mode           side   pause ms median (min–max)   libvirt gap ms median (min–max)")
        for m in modes {
            if let b = m.batonPauseMs, let gap = m.managementGapMs {
                print(String(format: "%-14@ baton  %7.2f (%.2f–%.2f)        %6.0f (%.0f–%.0f)", m.mode, b.median, b.min, b.max, gap.median, gap.min, gap.max))
                let order = QEMUUpgradeReport.Breakdown().phases.map(\.0)
                print(String(format: "%-14@ baton pause by phase (medians): ", m.mode) + order.map { String(format: "%@ %.2f", $0, m.batonPhasesMs[$0] ?? 0) }.joined(separator: ", "))
            }
            print(String(format: "%-14@ raw    %7.2f (%.2f–%.2f)        -", m.mode, m.rawPauseMs.median, m.rawPauseMs.min, m.rawPauseMs.max))
            if let overhead = m.overheadMs { print(String(format: "%-14@ Baton's overhead over raw QMP: %+.2f ms (median)", m.mode, overhead)) }
        }
    }

    func printBatch(_ results: Results) {
        if let b = results.batch {
            print(String(format: "batch of %d (--parallel %d): pause %.2f (%.2f–%.2f) ms; longest %@ the single upgrade's median; one libvirt gap %.0f ms; %.0f ms in all",
                         b.domains, b.domains, b.pauseMs.median, b.pauseMs.min, b.pauseMs.max,
                         b.worstToSingle.map { String(format: "%.2f×", $0) } ?? "(no single run to compare)", b.managementGapMs, b.wallMs))
        }
        print("(\(ram) guest with \(fill) of random data, TCG, \(runs) runs per side; pause = guest STOP in the old QEMU → RESUME in the new, from QEMU's event timestamps)")
    }

    func bootDomain(ramMiB: Int, fillMiB: Int, dir: String) throws -> QEMUTestDomain {
        try QEMUTestDomain.boot(name: "baton-bench-\(getpid())-\(UInt16.random(in: 0...UInt16.max))", uri: connect, emulator: old,
                                ramMiB: ramMiB, fillMiB: fillMiB, guest: guest, directory: dir, bootTimeoutSeconds: 900)
    }

    func upgrade(_ name: String) throws -> QEMUUpgradeReport {
        var options = QEMUUpgradeOptions(domain: name, newEmulator: new)
        options.uri = connect
        do { return try QEMUUpgrade(options: options).run() } catch { throw ValidationError("upgrade of \(name) failed: \(error)") }
    }

    /// Two plain QEMU processes and QMP only: the same RAM left in the same memfd, the same
    /// guest, live migration; pause from the old QEMU's STOP event to the new one's RESUME.
    func rawHandover(cpr: Bool, ramMiB: Int, fillMiB: Int, dir: String) throws -> Double {
        let tag = "raw-\(UInt32.random(in: 0...UInt32.max))"
        func args(_ binary: String, _ name: String, backend: String, aux: Bool) -> [String] {
            [binary, "-name", name, "-accel", "tcg", "-m", "\(ramMiB)M", "-smp", "1", "-display", "none", "-nodefaults", "-no-user-config",
             "-object", backend, "-machine", "pc-i440fx-7.2,memory-backend=pc.ram" + (aux ? ",aux-ram-share=on" : ""),
             "-qmp", "unix:\(dir)/\(name).qmp,server=on,wait=off",
             "-chardev", "socket,id=ser,path=\(dir)/\(tag).ser,server=on,wait=off", "-serial", "chardev:ser",
             "-kernel", "\(guest)/vmlinuz", "-initrd", "\(guest)/initrd.gz", "-append", "console=ttyS0 quiet panic=-1 fill=\(fillMiB)"]
        }
        let source = cpr ? new : old
        let log = "\(dir)/\(tag).log"
        let oldPid = try Spawn.detached(source, Array(args(source, "\(tag)-old", backend: "memory-backend-memfd,id=pc.ram,size=\(ramMiB)M,share=on", aux: cpr).dropFirst()), logPath: log)
        var newPid: pid_t = 0
        defer {
            kill(oldPid, SIGKILL); _ = Spawn.wait(oldPid)
            if newPid > 0 { kill(newPid, SIGKILL); _ = Spawn.wait(newPid) }
        }
        _ = try GuestConsole(path: "\(dir)/\(tag).ser").ask("ping", timeoutSeconds: 900)
        let oq = try QMPConnection(path: "\(dir)/\(tag)-old.qmp")
        guard let memfd = ProcessHandles.descriptors(of: oldPid).first(where: { $0.value.hasPrefix("/memfd:memory-backend-memfd") })?.key else {
            throw ValidationError("raw handover: no RAM memfd in the old QEMU")
        }
        let ram = try ProcessHandles.duplicate(fd: memfd, of: oldPid)
        let k: Int32 = 10
        let fileBackend = "memory-backend-file,id=pc.ram,size=\(ramMiB)M,share=on,mem-path=/proc/self/fd/\(k)"
        let out = try checkedCall("open(\(log))") { open(log, O_WRONLY | O_APPEND | O_CLOEXEC) }
        defer { close(out) }
        struct Caps: Encodable { struct C: Encodable { let capability: String; let state: Bool }; let capabilities: [C] }
        var nq: QMPConnection?
        if cpr {
            let main = "\(dir)/\(tag).main", chan = "\(dir)/\(tag).cpr"
            func channel(_ t: String, _ p: String) -> String { "{\"channel-type\":\"\(t)\",\"addr\":{\"transport\":\"socket\",\"type\":\"unix\",\"path\":\"\(p)\"}}" }
            newPid = try Spawn.withDescriptors(new, Array(args(new, "\(tag)-new", backend: fileBackend, aux: true).dropFirst()) + ["-incoming", channel("main", main), "-incoming", channel("cpr", chan)],
                                               output: out, descriptors: [k: ram.raw])
            while !UnixSocket.isListening(path: chan) { guard Host.isAlive(newPid) else { throw ValidationError("raw: new QEMU exited") }; usleep(1000) }
            try oq.execute("migrate-set-capabilities", arguments: Caps(capabilities: [.init(capability: "events", state: true)]))
            try oq.execute("migrate-set-parameters", arguments: ["mode": "cpr-transfer"])
            struct Ch: Encodable { let channels: [JSONValue] }
            let mk = { (t: String, p: String) -> JSONValue in .object(["channel-type": .string(t), "addr": .object(["transport": .string("socket"), "type": .string("unix"), "path": .string(p)])]) }
            try oq.execute("migrate", arguments: Ch(channels: [mk("main", main), mk("cpr", chan)]))
        } else {
            newPid = try Spawn.withDescriptors(new, Array(args(new, "\(tag)-new", backend: fileBackend, aux: true).dropFirst()) + ["-incoming", "defer"],
                                               output: out, descriptors: [k: ram.raw])
            let q = try QMPConnection(path: "\(dir)/\(tag)-new.qmp", timeoutSeconds: 30)
            nq = q
            let caps = Caps(capabilities: [.init(capability: "x-ignore-shared", state: true), .init(capability: "events", state: true)])
            try oq.execute("migrate-set-capabilities", arguments: caps)
            try q.execute("migrate-set-capabilities", arguments: caps)
            try q.execute("migrate-incoming", arguments: ["uri": "unix:\(dir)/\(tag).mig"])
            try oq.execute("migrate", arguments: ["uri": "unix:\(dir)/\(tag).mig"])
        }
        let deadline = Date().addingTimeInterval(60)
        // cpr: the new QEMU's monitor appears once it has read the CPR state, before the device
        // state arrives; connect as early as possible so its RESUME event is seen.
        while true {
            if nq == nil, FileManager.default.fileExists(atPath: "\(dir)/\(tag)-new.qmp") { nq = try? QMPConnection(path: "\(dir)/\(tag)-new.qmp", timeoutSeconds: 0.2) }
            if try oq.query("query-migrate", as: QEMUMigrationInfo.self).status == "completed" { break }
            guard Date() < deadline else { throw ValidationError("raw handover did not complete") }
            usleep(100)
        }
        let monitor = try nq ?? QMPConnection(path: "\(dir)/\(tag)-new.qmp", timeoutSeconds: 30)
        // The new QEMU resumes the guest by itself (no -S): read its RESUME event.
        while try monitor.query("query-status", as: QEMURunState.self).status != "running" { usleep(200) }
        guard let stop = oq.events.last(where: { $0.name == "STOP" })?.seconds else { throw ValidationError("raw: no STOP event") }
        guard let resume = monitor.events.last(where: { $0.name == "RESUME" })?.seconds else {
            throw ValidationError("raw: the new QEMU's RESUME event was missed (it resumed before its monitor connected)")
        }
        return (resume - stop) * 1000
    }
}
