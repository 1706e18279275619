import ArgumentParser
import BatonConfiguration
import Foundation

/// The configuration file this process read (each command that reads one sets it first).
enum CLIConfiguration {
    nonisolated(unsafe) static var current = BatonConfiguration()
}

/// `--config PATH`, shared by the commands that read Baton's configuration file.
struct ConfigFileOption: ParsableArguments {
    @Option(name: .customLong("config"), help: "Configuration file (default: $BATON_CONFIG, else /etc/baton/baton.toml if it exists).")
    var path: String?

    /// The effective file settings, or exit 78 naming the file, key and line.
    func load() throws -> BatonConfiguration {
        do { return try BatonConfiguration.load(explicitPath: path).0 } catch {
            throw fail("configuration: \(error.description)", .configuration)
        }
    }
}

struct ConfigCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "config", abstract: "Baton's configuration file.", subcommands: [ConfigCheckCommand.self])
}

struct ConfigCheckCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "check", abstract: "Validate the configuration file and print the effective configuration (exit 78 if it is refused).")

    @OptionGroup var config: ConfigFileOption

    func run() throws {
        let (c, path): (BatonConfiguration, String)
        do { (c, path) = try BatonConfiguration.load(explicitPath: config.path) } catch {
            throw fail("configuration: \(error.description)", .configuration)
        }
        let exists = FileManager.default.fileExists(atPath: path)
        print("# effective configuration (\(exists ? "from \(path)" : "\(path) absent: defaults"); flags override it)")
        print(c.rendered, terminator: "")
    }
}
