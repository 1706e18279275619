import ArgumentParser
import BatonAgent
import BatonController
import BatonCore
import BatonSystem
import Foundation
import Glibc

/// `baton`: one CLI for operators. Exit codes are documented in README.md and here.
public struct BatonCommand: ParsableCommand {
    public static let configuration = CommandConfiguration(
        commandName: "baton",
        abstract: "Hand a running VM's guest RAM from an old hypervisor process to a new one.",
        subcommands: [CheckCommand.self, UpgradeCommand.self, RecoverCommand.self, ServeCommand.self, StatusCommand.self, HookCommand.self, HarnessCommand.self, BenchCommand.self, DemoCommand.self, AgentCommand.self, QEMUExecCommand.self, EnrollCommand.self, ConfigCommand.self]
    )
    public init() {}
}

/// Every non-zero exit of `baton`, one meaning each.
public enum BatonExit: Int32 {
    case ok = 0
    /// Something failed that is not covered below (the message says what).
    case failure = 1
    /// `baton check`: a required capability is missing.
    case checkFailed = 2
    /// The handoff failed before commit and was rolled back; the old instance keeps the guest.
    case handoffRolledBack = 3
    /// A checksum or digest mismatch (also rolled back); the message names region and offset.
    case integrity = 4
    /// The peer was refused: wrong uid, wrong protocol version or dialect.
    case peerRefused = 5
    /// Bad command-line input (ArgumentParser's EX_USAGE).
    case usage = 64
    /// The configuration file was refused (EX_CONFIG); the message names file, key and line.
    case configuration = 78

    var code: ExitCode { ExitCode(rawValue) }
}

extension BatonExit {
    /// The exit code of a batonvmm upgrade that did not complete, from its kind.
    static func forUpgrade(_ kind: UpgradeFailure.Kind) -> BatonExit {
        switch kind {
        case .refused: .peerRefused
        case .rolledBack: .handoffRolledBack
        case .integrity: .integrity
        case .incomplete: .failure
        }
    }

    /// The exit code for a failed handoff, from the error's type (and a peer's failure code).
    static func forHandoffFailure(_ error: Error) -> BatonExit {
        switch AgentError.wrap(error).code {
        case .integrity: return .integrity
        case .peerRefused: return .peerRefused
        default: return .handoffRolledBack
        }
    }
}

/// Where the service and the hook meet by default; `BATON_SOCKET` and `BATON_STATE_DIR`
/// override them for the hook (libvirt gives it no arguments to say so).
enum BatonPaths {
    static let serviceSocket = "/run/baton/serve.sock"
    static let stateDirectory = "/var/lib/baton"
    static var environmentStateDirectory: String { ProcessInfo.processInfo.environment["BATON_STATE_DIR"] ?? stateDirectory }
    static var environmentServiceSocket: String { ProcessInfo.processInfo.environment["BATON_SOCKET"] ?? serviceSocket }
}

/// Prints one line to stderr: `baton: <what>`.
func fail(_ message: String, _ exit: BatonExit) -> ExitCode {
    FileHandle.standardError.write(Data("baton: \(message)\n".utf8))
    return exit.code
}

func parseSize(_ text: String, option: String) throws -> Int {
    guard let size = ByteSize(parsing: text), size.bytes > 0 else {
        throw ValidationError("\(option): '\(text)' is not a size (examples: 4096, 256MiB, 1GiB)")
    }
    return size.bytes
}

func printJSON<T: Encodable>(_ value: T) {
    let encoder = JSONEncoder()
    encoder.outputFormatting = [.sortedKeys]
    let data = (try? encoder.encode(value)) ?? Data("{}".utf8)
    print(String(decoding: data, as: UTF8.self))
}

extension BatonCommand {
    /// The executable's entry point: the fault switches in the environment are checked before
    /// anything runs, so a bad one is a one-line error and exit 64, never a crash later.
    public static func start() {
        if let problem = SyscallFaults.environmentProblem {
            FileHandle.standardError.write(Data("baton: \(problem)\n".utf8))
            Glibc.exit(BatonExit.usage.rawValue)
        }
        main()
    }
}
