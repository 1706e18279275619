import ArgumentParser
import BatonController
import Foundation
import Glibc

struct UpgradeCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "upgrade",
        abstract: "Upgrade a running batonvmm in place to a new binary, rolling back on any failure before commit.")

    @Option(help: "The VM's control socket (batonvmm --control / --api-socket path=).")
    var vm: String

    @Option(help: "The new batonvmm binary.")
    var binary: String

    @Option(help: "gift | memfd | copy | auto")
    var transport: String = "auto"

    @Flag(help: "Free the old instance's RAM chunk by chunk as the new one confirms it (gift): RAM + window instead of 2× RAM.")
    var releaseSource = false

    @Flag(help: "Digest all guest RAM at pause and in the new instance before it resumes (adds downtime).")
    var digest = false

    @Option(help: "Crash-safe journal path (default: in the run directory).")
    var journal: String?

    @Option(help: "Run directory for agent sockets and logs (0700).")
    var runDirectory: String = UpgradeOptions.defaultRunDirectory

    @Flag(help: "Print the report as one JSON object.")
    var json = false

    func validate() throws {
        guard ["gift", "memfd", "copy", "auto"].contains(transport) else {
            throw ValidationError("--transport: '\(transport)' is not gift, memfd, copy or auto")
        }
    }

    func run() throws {
        var options = UpgradeOptions(vmSocket: vm, binary: binary)
        options.transport = transport
        options.releaseSource = releaseSource
        options.digest = digest
        options.journalPath = journal
        options.runDirectory = runDirectory
        do {
            let report = try UpgradeController(options: options).run()
            if json { printJSON(report) } else { print(report.line) }
        } catch let failure as UpgradeFailure {
            if json { printJSON(failure.report) }
            throw fail(failure.description, failure.report.rolledBack ? .handoffRolledBack : .failure)
        }
    }
}

struct RecoverCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "recover",
        abstract: "After a controller crash: finish (past commit) or roll back (before it) the upgrade in a journal.")

    @Option(help: "The journal of the interrupted upgrade.")
    var journal: String

    func run() throws {
        let outcome = try UpgradeRecovery.recover(journalPath: journal)
        print("baton: \(outcome)")
    }
}
