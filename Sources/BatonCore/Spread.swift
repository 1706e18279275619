/// min / median / max of repeated runs.
public struct Spread: Codable, Sendable {
    public let min: Double
    public let median: Double
    public let max: Double

    public init(_ samples: [Double]) {
        let s = samples.sorted()
        min = s.first ?? 0
        max = s.last ?? 0
        median = s.isEmpty ? 0 : (s.count % 2 == 1 ? s[s.count / 2] : (s[s.count / 2 - 1] + s[s.count / 2]) / 2)
    }
}
