import ArgumentParser
import BatonAgent
import BatonCore
import BatonSystem
import Foundation

struct BenchCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "bench",
        abstract: "Benchmarks (figures, never assertions).",
        subcommands: [Transfer.self, UpgradeBench.self, QEMUBench.self])

    struct Transfer: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Every transport between two real processes, side by side with memcpy of the same size.")

        @Option(help: "Comma-separated sizes (e.g. 256MiB,1GiB).")
        var size: String = "1GiB"

        @Option(help: "Repetitions per transport (min/median/max are reported).")
        var runs: Int = 5

        @Option(help: "Comma-separated among gift, memfd, copy, auto; add +release (e.g. gift+release) to free the sender's pages as they go, +unchecked to send no chunk checksums (the integrity-off figure; every byte is still checked after the timer).")
        var transports: String = "gift,gift+release,memfd,copy"

        @Option(help: "Lanes (pipes / reader threads); default: online CPUs.")
        var lanes: Int = Host.onlineCPUs

        @Option(help: "Requested pipe capacity; default /proc/sys/fs/pipe-max-size.")
        var pipeSize: String?

        @Option(help: "Chunk size (the unit checksummed and verified); default 1MiB.")
        var chunkSize: String?

        @Flag(help: "Print one JSON object.")
        var json = false

        func validate() throws {
            guard runs >= 1 else { throw ValidationError("--runs must be at least 1") }
            guard (1...64).contains(lanes) else { throw ValidationError("--lanes must be 1...64") }
            for t in transports.split(separator: ",") where TransferBenchmark.Variant(parsing: String(t)) == nil {
                throw ValidationError("--transports: unknown transport '\(t)' (gift, memfd, copy, auto, optionally +release and/or +unchecked)")
            }
        }

        func run() throws {
            var options = HandoffOptions()
            options.lanes = lanes
            if let pipeSize { options.pipeCapacity = try parseSize(pipeSize, option: "--pipe-size") }
            if let chunkSize {
                let bytes = try parseSize(chunkSize, option: "--chunk-size")
                guard bytes >= 4096, bytes <= 64 << 20, bytes % 4096 == 0 else { throw fail("--chunk-size: \(chunkSize) is not a multiple of 4KiB between 4KiB and 64MiB", .usage) }
                options.chunkSize = bytes
            }
            var bench = TransferBenchmark(
                sizes: try size.split(separator: ",").map { try parseSize(String($0), option: "--size") },
                runs: runs,
                transports: transports.split(separator: ",").compactMap { TransferBenchmark.Variant(parsing: String($0)) },
                options: options)
            // On a terminal: which run, and its bytes and rate as they move.
            let line = ProgressLine(json: json), current = CurrentRun()
            bench.progress = { run, moved, total in current.begin("bench: \(run)", moved: moved, of: total) }
            line.tick { current.describe() }
            let report: BenchReport
            do { report = try bench.run() } catch { line.finish(); throw error }
            line.finish()
            if json { printJSON(report); return }
            func pad(_ s: String, _ n: Int) -> String { s.count >= n ? s + " " : s + String(repeating: " ", count: n - s.count) }
            print(pad("transport", 10) + pad("size", 8) + pad("median s", 10) + pad("min s", 10) + pad("max s", 10)
                  + pad("GiB/s", 8) + pad("×memcpy", 9) + pad("peak RSS", 10) + pad("pages", 8) + "verified")
            for r in report.results {
                let rss = r.peakRssBytes > 0 ? "\((r.peakRssBytes + (1 << 20) - 1) >> 20)MiB" : "-"
                print(pad(r.transport, 10) + pad("\(ByteSize(r.bytes))", 8) + pad(String(format: "%.4f", r.seconds.median), 10)
                      + pad(String(format: "%.4f", r.seconds.min), 10) + pad(String(format: "%.4f", r.seconds.max), 10)
                      + pad(String(format: "%.2f", r.gibPerSecond), 8) + pad(String(format: "%.2f", r.ratioToMemcpy), 9)
                      + pad(rss, 10) + pad(r.pageDisposition, 8) + (r.verified ? "yes" : "NO"))
            }
        }
    }
}
