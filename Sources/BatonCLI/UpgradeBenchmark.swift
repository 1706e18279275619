import ArgumentParser
import BatonController
import BatonCore
import BatonSystem
import BatonHarness
import BatonLibvirt
import Foundation
import Glibc

/// `baton bench upgrade`: downtime of real in-place upgrades of a running reference VM,
/// repeated per transport, min/median/max, with memcpy of the same RAM size in the same run.
/// With `--load N`, each transport is measured quiet and then with N CPU-bound processes
/// running, on the same VM in the same run; the first upgrade after the VM started is
/// reported on its own (it is not one of the runs).
struct UpgradeBench: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "upgrade", abstract: "Downtime of in-place upgrades of a running batonvmm.")

    @Option(help: "Guest RAM.")
    var ram: String = "1GiB"

    @Option(help: "Upgrades per transport (and per condition with --load).")
    var runs: Int = 5

    @Option(help: "Comma-separated transports: memfd, gift, copy, auto, and in-place (memfd, the new binary exec'd in the paused process, as under libvirt's ch driver).")
    var transports: String = "memfd,gift,copy"

    @Option(help: "Also measure with this many CPU-bound processes running on the host (0: quiet only).")
    var load: Int = 0

    @Flag(inversion: .prefixedNo, help: "Put the pause's threads under SCHED_RR (`baton upgrade --pause-priority`).")
    var pausePriority = true

    @Flag(help: "Also run QEMU's own handover on the same RAM size, through plain QMP (cpr-transfer on --qemu-new, x-ignore-shared from --qemu-old to --qemu-new), and with libvirtd Baton's QEMU upgrade beside it: the ratio of batonvmm's downtime to QEMU's pause, and Baton's overhead over raw QMP.")
    var compareQemu = false

    @Option(help: "With --compare-qemu: the old QEMU.")
    var qemuOld: String = "/usr/bin/qemu-system-x86_64"

    @Option(help: "With --compare-qemu: the new QEMU (10.0, for cpr-transfer).")
    var qemuNew: String = "/opt/baton/qemu-10.0/usr/bin/qemu-system-x86_64"

    @Option(help: "With --compare-qemu: the test guest's directory (Scripts/build-guest.sh).")
    var guest: String = "/var/lib/baton/guest"

    @Option(help: "With --compare-qemu: random data the QEMU guest keeps in its RAM.")
    var qemuFill: String = "256MiB"

    @Option(help: "With --compare-qemu: libvirt URI for Baton's QEMU side (skipped, with a line saying so, if it does not answer).")
    var connect: String = "qemu:///system"

    @Flag(help: "One JSON object.")
    var json = false

    struct Row: Codable {
        let transport: String
        /// "quiet", or "load N" (N CPU-bound processes running during the runs).
        let condition: String
        let ramBytes: Int
        let runs: Int
        let downtimeMs: Spread
        let pauseMs: Spread
        let stateMs: Spread
        let ramMs: Spread
        let verifyMs: Spread
        let resumeMs: Spread
        let controlMs: Spread
        let journalMs: Spread
        /// Downtime that none of the phases covers (downtime − their sum), per run.
        let unaccountedMs: Spread
        /// The first upgrade after the VM started (quiet rows only; not among the runs).
        let firstDowntimeMs: Double?
        let memcpyMs: Spread
        let allVerified: Bool
    }

    func validate() throws {
        guard runs >= 1 else { throw ValidationError("--runs: give at least 1") }
        guard (0...64).contains(load) else { throw ValidationError("--load: give 0 to 64 CPU-bound processes") }
        for t in transports.split(separator: ",") where !["memfd", "gift", "copy", "auto", "in-place"].contains(String(t)) {
            throw ValidationError("--transports: '\(t)' is not memfd, gift, copy, auto or in-place")
        }
        if compareQemu {
            for (flag, path) in [("--qemu-old", qemuOld), ("--qemu-new", qemuNew)] where access(path, X_OK) != 0 {
                throw ValidationError("\(flag): \(path) is not an executable QEMU (Scripts/install-qemu.sh installs 10.0)")
            }
            guard FileManager.default.fileExists(atPath: guest + "/vmlinuz") else {
                throw ValidationError("--guest: no vmlinuz in \(guest) (Scripts/build-guest.sh builds it)")
            }
        }
    }

    /// N busy loops (each a shell spinning: CPU-bound, no memory, no I/O), stopped and reaped by `stop`.
    struct CPULoad {
        let pids: [pid_t]
        init(_ count: Int, logPath: String) throws {
            pids = try (0..<count).map { _ in try Spawn.detached("/bin/sh", ["-c", "while :; do :; done"], logPath: logPath) }
        }
        func stop() { for pid in pids { kill(pid, SIGKILL); _ = Spawn.exitStatus(pid) } }
    }

    func run() throws {
        let bytes = try parseSize(ram, option: "--ram")
        let vmm = Executable.besideThisProcess("batonvmm")
        let dir = try BatonProcess.makeRunDirectory("bench-upgrade")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let next = dir + "/batonvmm-next"
        try Executable.copy(from: vmm, to: next)
        let memcpyTimes = try TransferBenchmark(sizes: [bytes], runs: runs, transports: [], options: .init())
            .measureMemcpy(size: bytes).map { $0 * 1000 }
        var rows: [Row] = []
        for transport in transports.split(separator: ",").map(String.init) {
            let socket = dir + "/vm-\(transport).sock"
            let pid = try Spawn.detached(vmm, ["--ram", "\(bytes)", "--control", socket], logPath: dir + "/vmm.log")
            let client = VMMClient(socketPath: socket)
            defer { _ = try? client.request("PUT", "/api/v1/vmm.shutdown"); kill(pid, SIGKILL); _ = Spawn.exitStatus(pid) }
            guard BatonProcess.waitForPath(socket, timeoutSeconds: 60) else { throw fail("batonvmm did not start", .failure) }
            func upgrade(_ label: String) throws -> UpgradeReport {
                if !json { FileHandle.standardError.write(Data("bench: upgrade \(transport) \(ByteSize(bytes)) \(label)\n".utf8)) }
                var options = UpgradeOptions(vmSocket: socket, binary: next)
                options.transport = transport == "in-place" ? "memfd" : transport
                options.inPlace = transport == "in-place"
                options.pausePriority = pausePriority
                options.runDirectory = dir + "/run"
                let report = try UpgradeController(options: options).run()
                usleep(200_000)  // let the guest run between upgrades
                return report
            }
            let first = try upgrade("first after start")
            for (condition, hogs) in [("quiet", 0)] + (load > 0 ? [("load \(load)", load)] : []) {
                let cpu = try CPULoad(hogs, logPath: dir + "/load.log")
                defer { cpu.stop() }
                if hogs > 0 { usleep(500_000) }  // the scheduler sees the load before the first run
                let reports = try (0..<runs).map { try upgrade("\(condition) run \($0 + 1)/\(runs)") }
                let label = transport == "in-place" ? "memfd in-place" : reports.last?.transport ?? transport
                rows.append(Row(transport: label, condition: condition, ramBytes: bytes, runs: runs,
                                downtimeMs: Spread(reports.map(\.downtimeMs)), pauseMs: Spread(reports.map(\.pauseMs)),
                                stateMs: Spread(reports.map(\.stateMs)), ramMs: Spread(reports.map(\.ramMs)),
                                verifyMs: Spread(reports.map(\.verifyMs)), resumeMs: Spread(reports.map(\.resumeMs)),
                                controlMs: Spread(reports.map(\.controlMs)), journalMs: Spread(reports.map(\.journalMs)),
                                unaccountedMs: Spread(reports.map(\.unaccountedMs)),
                                firstDowntimeMs: hogs == 0 ? first.downtimeMs : nil,
                                memcpyMs: Spread(memcpyTimes), allVerified: reports.allSatisfy(\.verified) && first.verified))
            }
        }
        let qemu = compareQemu ? try compareWithQEMU(ramBytes: bytes, rows: rows) : nil
        if json { printJSON(Results(results: rows, qemu: qemu)); return }
        print("transport          load     RAM     downtime ms (min/median/max)   first    pause   state   ram      verify  control journal resume  other   memcpy ms (median)")
        for r in rows {
            print(r.transport.padding(toLength: 18, withPad: " ", startingAt: 0)
                  + r.condition.padding(toLength: 9, withPad: " ", startingAt: 0)
                  + "\(ByteSize(r.ramBytes))".padding(toLength: 8, withPad: " ", startingAt: 0)
                  + String(format: "%7.2f / %7.2f / %7.2f      %7@  %6.2f  %6.2f  %7.2f  %6.2f  %6.2f  %6.2f  %6.2f  %6.2f  %7.2f",
                           r.downtimeMs.min, r.downtimeMs.median, r.downtimeMs.max, r.firstDowntimeMs.map { String(format: "%7.2f", $0) } ?? "      –",
                           r.pauseMs.median, r.stateMs.median, r.ramMs.median, r.verifyMs.median, r.controlMs.median, r.journalMs.median,
                           r.resumeMs.median, r.unaccountedMs.median, r.memcpyMs.median)
                  + (r.allVerified ? "" : "  NOT VERIFIED"))
        }
        if let qemu { printComparison(qemu, rows: rows) }
    }

    struct Results: Codable {
        let results: [Row]
        /// `--compare-qemu`: QEMU's own handover on the same RAM size, same run.
        let qemu: QEMUComparison?
    }

    struct QEMUComparison: Codable {
        let modes: [QEMUBench.ModeResult]
        /// Why Baton's QEMU side did not run (libvirtd did not answer), if it did not.
        let batonSideSkipped: String?
        /// Each quiet batonvmm row's downtime median over the cpr-transfer raw pause median.
        let ratioToCPRTransfer: [String: Double]
    }

    /// QEMU's own handover of a guest with the same RAM (raw QMP), and Baton's QEMU upgrade
    /// under libvirt beside it when libvirtd answers (`baton bench qemu`, same runs).
    func compareWithQEMU(ramBytes: Int, rows: [Row]) throws -> QEMUComparison {
        let libvirt: String? = (try? LibvirtConnection.connect(uri: connect, answeringWithin: 5)) == nil
            ? "libvirt at \(connect) did not answer: Baton's QEMU side not run" : nil
        if let libvirt, !json { FileHandle.standardError.write(Data("bench: \(libvirt)\n".utf8)) }
        let bench = try QEMUBench.parse(["--ram", "\(ramBytes >> 20)MiB", "--fill", qemuFill, "--runs", "\(runs)",
                                          "--modes", "cpr-transfer,ignore-shared", "--old", qemuOld, "--new", qemuNew,
                                          "--guest", guest, "--connect", connect] + (json ? ["--json"] : []))
        let results = try bench.measure(rawOnly: libvirt != nil)
        var ratios: [String: Double] = [:]
        if let cpr = results.modes.first(where: { $0.mode == "cpr-transfer" })?.rawPauseMs.median, cpr > 0 {
            for r in rows where r.condition == "quiet" { ratios[r.transport] = r.downtimeMs.median / cpr }
        }
        return QEMUComparison(modes: results.modes, batonSideSkipped: libvirt, ratioToCPRTransfer: ratios)
    }

    func printComparison(_ q: QEMUComparison, rows: [Row]) {
        print("")
        print("QEMU's own handover, same RAM size, same run (raw QMP; pause = STOP in the old QEMU → RESUME in the new):")
        QEMUBench.printModes(q.modes)
        if let skipped = q.batonSideSkipped { print("(\(skipped))") }
        guard let cpr = q.modes.first(where: { $0.mode == "cpr-transfer" })?.rawPauseMs.median else { return }
        for r in rows where r.condition == "quiet" {
            guard let ratio = q.ratioToCPRTransfer[r.transport] else { continue }
            print(String(format: "batonvmm %@ downtime / QEMU 10.0 cpr-transfer pause (medians): %.2f ms / %.2f ms = %.2f×", r.transport, r.downtimeMs.median, cpr, ratio))
        }
    }
}
