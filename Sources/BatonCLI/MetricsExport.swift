import BatonController
import BatonSystem
import BatonVMM
import CoreMetrics
import Foundation
import Prometheus

/// swift-metrics → swift-prometheus, with the help text BatonMetrics gives each metric (the
/// stock factory exports none, and `promtool check metrics` wants it).
struct BatonMetricsFactory: MetricsFactory {
    let registry: PrometheusCollectorRegistry
    /// Histogram buckets for every timer: 0.5 ms … 5 s (a handoff's pause and its phases).
    let buckets: [Duration] = [0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 5].map { Duration.nanoseconds(Int64($0 * 1e9)) }

    func descriptor(_ label: String) -> MetricNameDescriptor {
        MetricNameDescriptor(metricName: label, unitName: "", helpText: BatonMetrics.help[label] ?? label)
    }

    func makeCounter(label: String, dimensions: [(String, String)]) -> any CounterHandler {
        registry.makeCounter(descriptor: descriptor(label), labels: dimensions)
    }
    func makeFloatingPointCounter(label: String, dimensions: [(String, String)]) -> any FloatingPointCounterHandler {
        registry.makeCounter(descriptor: descriptor(label), labels: dimensions)
    }
    func makeRecorder(label: String, dimensions: [(String, String)], aggregate: Bool) -> any RecorderHandler {
        aggregate ? registry.makeValueHistogram(descriptor: descriptor(label), labels: dimensions, buckets: [1, 10, 100, 1000])
                  : registry.makeGauge(descriptor: descriptor(label), labels: dimensions)
    }
    func makeMeter(label: String, dimensions: [(String, String)]) -> any MeterHandler {
        registry.makeGauge(descriptor: descriptor(label), labels: dimensions)
    }
    func makeTimer(label: String, dimensions: [(String, String)]) -> any TimerHandler {
        registry.makeDurationHistogram(descriptor: descriptor(label), labels: dimensions, buckets: buckets)
    }
    func destroyCounter(_ handler: any CounterHandler) {}
    func destroyFloatingPointCounter(_ handler: any FloatingPointCounterHandler) {}
    func destroyRecorder(_ handler: any RecorderHandler) {}
    func destroyMeter(_ handler: any MeterHandler) {}
    func destroyTimer(_ handler: any TimerHandler) {}
}

/// `baton serve`'s metrics: the registry (bootstrapped once per process) and, when configured,
/// an HTTP endpoint (`GET /metrics`) Prometheus scrapes.
enum MetricsExport {
    static let registry: PrometheusCollectorRegistry = {
        let r = PrometheusCollectorRegistry()
        MetricsSystem.bootstrap(BatonMetricsFactory(registry: r))
        BatonMetrics.registerBaseline()
        return r
    }()

    static func text() -> String { registry.emitToString() }

    /// Listens on `address` and serves `GET /metrics` with `text()` (other paths: 404).
    /// Returns the address as bound (port 0: the kernel's choice).
    static func serve(on address: String, text: @escaping @Sendable () -> String) throws -> (HTTPServer, String) {
        let listener = try TCPListener(address: address)
        let server = HTTPServer(listener: listener.fd) { request in
            guard request.method == "GET", request.path == "/metrics" || request.path.hasPrefix("/metrics?") else {
                return .error(404, "only GET /metrics is served here")
            }
            var r = HTTPResponse(status: 200, body: Array(text().utf8))
            r.contentType = "text/plain; version=0.0.4; charset=utf-8"
            return r
        }
        server.start()
        return (server, listener.address)
    }
}
