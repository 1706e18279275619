import BatonLibvirt
import Foundation
import Synchronization
import Testing

/// Against libvirt's own test driver, with a per-test node file (test:///default shares its
/// state between connections in one process, which parallel tests would trample).
func testDriver(_ name: String) throws -> LibvirtConnection {
    let path = NSTemporaryDirectory() + "baton-libvirt-\(name)-\(getpid()).xml"
    let xml = """
    <node>
      <domain type='test'>
        <name>\(name)</name>
        <uuid>6695eb01-f6a4-8304-79aa-97f2502e193f</uuid>
        <memory unit='MiB'>64</memory>
        <vcpu>1</vcpu>
        <os><type arch='x86_64'>hvm</type></os>
      </domain>
    </node>
    """
    try xml.write(toFile: path, atomically: true, encoding: .utf8)
    return try LibvirtConnection(uri: "test://\(path)")
}

@Suite("libvirt adapter (test driver)")
struct LibvirtAdapterTests {
    @Test("look up by name and UUID; a missing domain is a typed error")
    func lookup() throws {
        let conn = try testDriver("lookup")
        let d = try conn.domain("lookup")
        #expect(d.name == "lookup")
        #expect(try conn.domain("6695eb01-f6a4-8304-79aa-97f2502e193f").name == "lookup")
        #expect(try d.xml().contains("<name>lookup</name>"))
        #expect {
            _ = try conn.domain(named: "no-such-domain")
        } throws: { error in
            (error as? LibvirtError)?.isNoDomain == true && "\(error)".contains("virDomainLookupByName(no-such-domain)")
        }
    }

    @Test("suspend and resume change the state, and lifecycle events report both")
    func suspendResumeEvents() throws {
        let conn = try testDriver("events")
        let d = try conn.domain(named: "events")
        #expect(try d.state().state == .running)
        let seen = Mutex<[Int32]>([])
        let subscription = try d.onLifecycle { event, _ in seen.withLock { $0.append(event) } }
        defer { subscription.cancel() }
        try d.suspend()
        #expect(try d.state().state == .paused)
        try d.resume()
        #expect(try d.state().state == .running)
        for _ in 0..<100 where seen.withLock({ $0.count }) < 2 { usleep(10_000) }
        #expect(seen.withLock { $0 } == [LifecycleSubscription.suspended, LifecycleSubscription.resumed])
        #expect(throws: LibvirtError.self) { try d.resume() }  // not paused: libvirt refuses, typed
    }

    @Test("Baton's handoff record round-trips through domain metadata under its own namespace")
    func metadataRoundTrip() throws {
        let conn = try testDriver("meta")
        let d = try conn.domain(named: "meta")
        #expect(try d.metadata() == nil)
        let record = BatonMetadata(agent: "/run/batonvmm/vm1.sock", generation: 3, state: "committed", oldPid: 10, newPid: 11, transport: "memfd")
        try d.setMetadata(record.element)
        let back = try #require(try d.metadata())
        #expect(BatonMetadata(element: back) == record)
        #expect(try d.xml().contains("xmlns:baton=\"https://baton.dev/xmlns/handoff/1\""))
    }
}

@Suite("HypervisorControl through libvirt")
struct LibvirtControlTests {
    @Test("the upgrade sequence's pause and resume, driven through the protocol, reach libvirt")
    func pauseResume() throws {
        let conn = try testDriver("control")
        let control: any HypervisorControl = LibvirtControl(domain: try conn.domain(named: "control"), agentSocket: nil)
        #expect(control.identity.hasSuffix("#control"))
        #expect(try control.state() == "Running")
        try control.pause()
        #expect(try control.state() == "Paused")
        try control.resume()
        #expect(try control.state() == "Running")
        #expect(throws: VMMClient.Failure.self) { try control.pid() }
    }
}

import BatonController
