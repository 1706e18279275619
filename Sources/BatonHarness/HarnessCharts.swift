import BatonCore
import Foundation

/// The report a person reads: a Markdown summary and SVG charts (downtime by RAM size and
/// transport; the fault matrix as a pass/fail grid).
public enum HarnessCharts {
    public static func markdown(_ report: HarnessReport, command: String) -> String {
        var md = "# Baton harness report\n\nCommand: `\(command)`\n\n"
        let s = report.summary
        if s.total > 0 {
            md += "**\(s.passed) / \(s.total) cases passed** — lost \(s.lost) (unexpected \(s.unexpectedLoss)), split brain \(s.splitBrain).\n\n"
            md += "![fault matrix](faults.svg)\n\n| fault | transport | outcome | verified | instances | downtime ms | detail |\n|---|---|---|---|---|---|---|\n"
            for c in report.cases {
                let detail = c.detail.replacingOccurrences(of: "|", with: "/").prefix(160)
                md += "| \(c.fault) | \(c.transport) | \(c.outcome.rawValue)\(c.expectedLoss ? " (expected)" : "") | \(c.verified ? "yes" : "**no**") | \(c.instancesRunning) | \(c.downtimeMs.map { String(format: "%.2f", $0) } ?? "–") | \(detail) |\n"
            }
        }
        if !report.downtime.isEmpty {
            md += "\n## Downtime\n\n![downtime](downtime.svg)\n\n| transport | RAM | runs | min ms | median ms | max ms | all verified |\n|---|---|---|---|---|---|---|\n"
            for r in report.downtime {
                md += "| \(r.transport) | \(ByteSize(r.ramBytes)) | \(r.runs) | \(String(format: "%.2f", r.downtimeMs.min)) | \(String(format: "%.2f", r.downtimeMs.median)) | \(String(format: "%.2f", r.downtimeMs.max)) | \(r.allVerified ? "yes" : "no") |\n"
            }
        }
        return md
    }

    static func escape(_ s: String) -> String {
        s.replacingOccurrences(of: "&", with: "&amp;").replacingOccurrences(of: "<", with: "&lt;").replacingOccurrences(of: ">", with: "&gt;")
    }

    /// Rows: faults; columns: transports; green committed, blue rolled back, red failed, grey n/a.
    public static func faultGrid(_ cases: [CaseResult]) -> String {
        let faults = cases.map(\.fault).reduce(into: [String]()) { if !$0.contains($1) { $0.append($1) } }
        let transports = cases.map(\.transport).reduce(into: [String]()) { if !$0.contains($1) { $0.append($1) } }
        let cellW = 120, cellH = 22, left = 300, top = 50
        let width = max(640, left + cellW * transports.count + 20), height = top + cellH * faults.count + 80
        var svg = "<svg xmlns='http://www.w3.org/2000/svg' width='\(width)' height='\(height)' font-family='sans-serif' font-size='12'>\n"
        svg += "<text x='10' y='22' font-size='16' font-weight='bold'>Fault matrix: every fault × transport</text>\n"
        for (j, t) in transports.enumerated() {
            svg += "<text x='\(left + j * cellW + cellW / 2)' y='\(top - 8)' text-anchor='middle' font-weight='bold'>\(escape(t))</text>\n"
        }
        for (i, f) in faults.enumerated() {
            let y = top + i * cellH
            svg += "<text x='\(left - 8)' y='\(y + 15)' text-anchor='end'>\(escape(f))</text>\n"
            for (j, t) in transports.enumerated() {
                let x = left + j * cellW
                guard let c = cases.first(where: { $0.fault == f && $0.transport == t }) else {
                    svg += "<rect x='\(x + 2)' y='\(y + 2)' width='\(cellW - 4)' height='\(cellH - 4)' fill='#dddddd'/><text x='\(x + cellW / 2)' y='\(y + 15)' text-anchor='middle' fill='#777'>n/a</text>\n"
                    continue
                }
                let color = !c.passed ? "#d9534f" : (c.outcome == .committed ? "#5cb85c" : c.outcome == .lost ? "#f0ad4e" : "#5b9bd5")
                let label = !c.passed ? "FAIL" : c.outcome == .lost ? "lost (expected)" : c.outcome.rawValue
                svg += "<rect x='\(x + 2)' y='\(y + 2)' width='\(cellW - 4)' height='\(cellH - 4)' fill='\(color)'><title>\(escape(c.detail))</title></rect>"
                svg += "<text x='\(x + cellW / 2)' y='\(y + 15)' text-anchor='middle' fill='white'>\(label)</text>\n"
            }
        }
        let ly = top + faults.count * cellH + 25
        svg += "<rect x='10' y='\(ly - 11)' width='12' height='12' fill='#5cb85c'/><text x='28' y='\(ly)'>committed (new instance runs the guest)</text>"
        svg += "<rect x='280' y='\(ly - 11)' width='12' height='12' fill='#5b9bd5'/><text x='298' y='\(ly)'>rolled back (old instance kept it)</text>"
        svg += "<rect x='10' y='\(ly + 9)' width='12' height='12' fill='#f0ad4e'/><text x='28' y='\(ly + 20)'>lost, expected (anonymous RAM not yet handed over when the old instance died)</text>"
        svg += "<rect x='520' y='\(ly - 11)' width='12' height='12' fill='#d9534f'/><text x='538' y='\(ly)'>failed</text>\n</svg>\n"
        return svg
    }

    /// Grouped bars: median downtime per RAM size, one bar per transport, min–max whiskers, log scale.
    public static func downtimeChart(_ rows: [DowntimeRow]) -> String {
        let sizes = rows.map(\.ramBytes).reduce(into: [Int]()) { if !$0.contains($1) { $0.append($1) } }
        let transports = rows.map(\.transport).reduce(into: [String]()) { if !$0.contains($1) { $0.append($1) } }
        let colors = ["#5cb85c", "#f0ad4e", "#5b9bd5", "#9b59b6"]
        let plotH = 300.0, top = 50.0, left = 70.0, groupW = 60.0 * Double(max(1, transports.count)) + 40
        let width = Int(left + groupW * Double(sizes.count) + 180), height = Int(top + plotH + 60)
        let maxMs = max(10, rows.map(\.downtimeMs.max).max() ?? 10)
        let logMax = log10(maxMs * 1.5), logMin = log10(0.5)
        func y(_ ms: Double) -> Double { top + plotH - (log10(max(ms, 0.5)) - logMin) / (logMax - logMin) * plotH }
        var svg = "<svg xmlns='http://www.w3.org/2000/svg' width='\(width)' height='\(height)' font-family='sans-serif' font-size='12'>\n"
        svg += "<text x='10' y='22' font-size='16' font-weight='bold'>Upgrade downtime (pause → guest running in the new instance), median with min–max</text>\n"
        for tick in [1.0, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000] where tick <= maxMs * 1.5 {
            svg += "<line x1='\(left)' x2='\(Double(width) - 170)' y1='\(y(tick))' y2='\(y(tick))' stroke='#eee'/><text x='\(left - 6)' y='\(y(tick) + 4)' text-anchor='end'>\(Int(tick)) ms</text>\n"
        }
        for (g, size) in sizes.enumerated() {
            let gx = left + 20 + Double(g) * groupW
            svg += "<text x='\(gx + groupW / 2 - 20)' y='\(top + plotH + 20)' text-anchor='middle'>\(ByteSize(size))</text>\n"
            for (k, t) in transports.enumerated() {
                guard let r = rows.first(where: { $0.ramBytes == size && $0.transport == t }) else { continue }
                let x = gx + Double(k) * 60
                let med = r.downtimeMs.median
                svg += "<rect x='\(x)' y='\(y(med))' width='40' height='\(top + plotH - y(med))' fill='\(colors[k % colors.count])'><title>\(t) \(ByteSize(size)): \(String(format: "%.2f", med)) ms</title></rect>"
                svg += "<line x1='\(x + 20)' x2='\(x + 20)' y1='\(y(r.downtimeMs.max))' y2='\(y(r.downtimeMs.min))' stroke='black'/>"
                svg += "<text x='\(x + 20)' y='\(y(med) - 4)' text-anchor='middle' font-size='10'>\(String(format: "%.1f", med))</text>\n"
            }
        }
        for (k, t) in transports.enumerated() {
            svg += "<rect x='\(Double(width) - 160)' y='\(top + Double(k) * 20)' width='12' height='12' fill='\(colors[k % colors.count])'/><text x='\(Double(width) - 142)' y='\(top + Double(k) * 20 + 11)'>\(escape(t))</text>\n"
        }
        svg += "</svg>\n"
        return svg
    }
}
