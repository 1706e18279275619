import Metrics

/// What the service counts, through swift-metrics (the backend, Prometheus in `baton serve`,
/// is bootstrapped by the executable; without one these calls cost nothing). Every metric has
/// one fixed label set, so a backend never sees one name both with and without labels.
public enum BatonMetrics {
    public enum Outcome: String, Sendable {
        case succeeded
        /// Failed before the new instance ran the guest; the old one runs it again.
        case rolledBack = "rolled_back"
        /// Failed after it; the new instance runs the guest (finished by recovery).
        case rolledForward = "rolled_forward"
        /// Refused before anything was paused.
        case refused
        /// Anything else (the guest's state is in the message and the journal).
        case failed
    }

    /// Help text per metric name, for backends that export it.
    public static let help: [String: String] = [
        "baton_upgrades_started_total": "Upgrades the service started, by hypervisor.",
        "baton_upgrades_total": "Upgrades that ended, by hypervisor, outcome and transport or mode.",
        "baton_downtime_seconds": "Guest paused until it ran in the new instance, by hypervisor.",
        "baton_phase_seconds": "Time in each named phase of an upgrade's pause, by hypervisor and phase.",
        "baton_bytes_moved_total": "Guest RAM bytes handed over, by hypervisor.",
        "baton_stale_domains": "Running domains whose hypervisor binary is no longer the one installed.",
        "baton_upgrades_in_flight": "Upgrades running now.",
    ]

    public static func started(hypervisor: String) {
        Counter(label: "baton_upgrades_started_total", dimensions: [("hypervisor", hypervisor)]).increment()
    }

    /// One finished upgrade. `phasesMs` are the report's breakdown (name → milliseconds).
    public static func ended(hypervisor: String, outcome: Outcome, mode: String, downtimeMs: Double?, phasesMs: [(String, Double)] = [], bytes: Int64 = 0) {
        Counter(label: "baton_upgrades_total", dimensions: [("hypervisor", hypervisor), ("outcome", outcome.rawValue), ("mode", mode)]).increment()
        guard outcome == .succeeded else { return }
        if let downtimeMs, let ns = nanoseconds(downtimeMs) {
            Timer(label: "baton_downtime_seconds", dimensions: [("hypervisor", hypervisor)]).recordNanoseconds(ns)
        }
        for (phase, ms) in phasesMs {
            guard let ns = nanoseconds(ms) else { continue }
            Timer(label: "baton_phase_seconds", dimensions: [("hypervisor", hypervisor), ("phase", phase)]).recordNanoseconds(ns)
        }
        if bytes > 0 { Counter(label: "baton_bytes_moved_total", dimensions: [("hypervisor", hypervisor)]).increment(by: bytes) }
    }

    /// Milliseconds as nanoseconds, or nil for a value no clock gives (NaN, infinite, negative,
    /// absurdly large): `Int64(_:)` would trap on those, in the service.
    static func nanoseconds(_ ms: Double) -> Int64? {
        guard ms.isFinite, ms >= 0, ms < 1e9 else { return nil }
        return Int64(ms * 1e6)
    }

    public static func staleDomains(_ count: Int) { Gauge(label: "baton_stale_domains").record(count) }
    public static func inFlight(_ count: Int) { Gauge(label: "baton_upgrades_in_flight").record(count) }

    /// Makes the always-present series exist at zero (a scrape before the first upgrade sees them).
    public static func registerBaseline() {
        for h in ["batonvmm", "qemu"] {
            Counter(label: "baton_upgrades_started_total", dimensions: [("hypervisor", h)]).increment(by: 0)
            Counter(label: "baton_bytes_moved_total", dimensions: [("hypervisor", h)]).increment(by: 0)
        }
        inFlight(0)
    }
}
