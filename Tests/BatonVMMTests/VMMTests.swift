import BatonController
import BatonHarness
import BatonCore
import BatonSystem
import BatonVMM
import Foundation
import Glibc
import Testing

/// The batonvmm binary beside the test bundle.
let batonvmmPath: String = {
    let baton = BatonProcess.executablePath
    return URL(fileURLWithPath: baton).deletingLastPathComponent().appendingPathComponent("batonvmm").path
}()

/// A batonvmm started with `--ram`, on its own control socket in a 0700 directory.
final class RunningVMM {
    let directory: String
    let socket: String
    let pid: pid_t
    let client: VMMClient

    init(ram: String = "64MiB", simulated: Bool = false, memory: String = "shared", environment: [String: String] = [:]) throws {
        directory = try BatonProcess.makeRunDirectory("vmm")
        socket = directory + "/vm.sock"
        var args = ["--ram", ram, "--control", socket, "--memory", memory]
        if simulated { args.append("--simulated") }
        pid = try Spawn.detached(batonvmmPath, args, logPath: directory + "/vmm.log", environment: environment)
        client = VMMClient(socketPath: socket)
        guard BatonProcess.waitForPath(socket) else { throw VMMClient.Failure(description: "batonvmm never listened: \(log)") }
    }

    var log: String { (try? String(contentsOfFile: directory + "/vmm.log", encoding: .utf8)) ?? "" }

    func status() throws -> VMStatus { try client.status() }

    /// Waits for a heartbeat newer than `after` on vCPU 0.
    func beat(after counter: UInt64 = 0, timeout: Double = 10) throws -> GuestBeat {
        if let b = client.nextBeat(after: counter, timeout: timeout) { return b }
        throw VMMClient.Failure(description: "no heartbeat after counter \(counter) within \(timeout) s; log: \(log)")
    }

    /// Stops whichever instance serves the socket now, and reaps what we started.
    func stop() {
        _ = try? client.request("PUT", "/api/v1/vmm.shutdown")
        usleep(50_000)
        kill(pid, SIGKILL)
        _ = Spawn.exitStatus(pid)
        try? FileManager.default.removeItem(atPath: directory)
    }
}

/// The independent model replayed to `beat.counter` must show exactly what the guest shows.
func expectMatchesModel(_ beat: GuestBeat, heartbeatMask: UInt64 = 0xFFFF, _ comment: Comment? = nil) {
    var model = GuestModel(heartbeatMask: heartbeatMask)
    model.step(to: beat.counter)
    #expect(model.beat == beat, comment)
}

@Suite("Reference VMM")
struct VMMTests {
    @Test("on KVM the guest's counter, hash chain, r15 and heartbeats match the independent model",
          .enabled(if: KVMHost.unavailableReason == nil, "requires a usable /dev/kvm: \(KVMHost.unavailableReason ?? "")"))
    func kvmGuestMatchesModel() throws {
        let vmm = try RunningVMM()
        defer { vmm.stop() }
        #expect(try vmm.status().backend == "kvm")
        let first = try vmm.beat()
        let later = try vmm.beat(after: first.counter)
        expectMatchesModel(first)
        expectMatchesModel(later)
        #expect(later.beats > first.beats)
    }

    @Test("the simulated vCPU runs the same guest semantics (every machine)")
    func simulatedGuestMatchesModel() throws {
        let vmm = try RunningVMM(simulated: true)
        defer { vmm.stop() }
        #expect(try vmm.status().backend == "simulated")
        let beat = try vmm.beat()
        expectMatchesModel(beat)
    }

    @Test("the API speaks HTTP/1.1 with keep-alive, chunked bodies and Expect: 100-continue, and refuses bad input")
    func apiDialect() throws {
        let dir = try BatonProcess.makeRunDirectory("api")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let socket = dir + "/api.sock"
        let pid = try Spawn.detached(batonvmmPath, ["--api-socket", "path=\(socket)"], logPath: dir + "/log")
        defer { kill(pid, SIGKILL); _ = Spawn.exitStatus(pid) }
        #expect(BatonProcess.waitForPath(socket))
        var st = stat()
        stat(socket, &st)
        #expect(st.st_mode & 0o777 == 0o600)
        let conn = try UnixSocket.connect(path: socket)
        try conn.setTimeout(seconds: 10)
        func roundTrip(_ raw: String) throws -> String {
            try conn.send(Array(raw.utf8))
            var text = ""
            while !text.contains("\r\n\r\n") || !responseComplete(text) {
                let b = try conn.receive(count: 1)
                if b.bytes.isEmpty { break }
                text += String(decoding: b.bytes, as: UTF8.self)
            }
            return text
        }
        let ping = try roundTrip("GET /api/v1/vmm.ping HTTP/1.1\r\nHost: x\r\n\r\n")
        #expect(ping.hasPrefix("HTTP/1.1 200 OK"))
        #expect(ping.contains("batonvmm"))
        let config = #"{"cpus":{"boot_vcpus":1,"max_vcpus":1},"memory":{"size":33554432,"shared":true},"payload":{"kernel":"builtin:reference"},"baton_guest":{"simulated":true}}"#
        let chunked = String(config.utf8.count, radix: 16)
        let create = try roundTrip("PUT /api/v1/vm.create HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nTransfer-Encoding: chunked\r\n\r\n\(chunked)\r\n\(config)\r\n0\r\n\r\n")
        #expect(create.contains("HTTP/1.1 100 Continue"))
        #expect(create.contains("HTTP/1.1 204"), "\(create)")
        let boot = try roundTrip("PUT /api/v1/vm.boot HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
        #expect(boot.hasPrefix("HTTP/1.1 204"))
        let info = try roundTrip("GET /api/v1/vm.info HTTP/1.1\r\nHost: x\r\n\r\n")
        #expect(info.contains("\"state\":\"Running\""), "\(info)")
        let again = try roundTrip("PUT /api/v1/vm.boot HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
        #expect(again.hasPrefix("HTTP/1.1 409"), "booting twice is a conflict: \(again)")
        let bad = try roundTrip("PUT /api/v1/vm.create HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n{oops")
        #expect(bad.hasPrefix("HTTP/1.1 400") || bad.hasPrefix("HTTP/1.1 409"))
        let unknown = try roundTrip("GET /api/v1/vm.teleport HTTP/1.1\r\nHost: x\r\n\r\n")
        #expect(unknown.hasPrefix("HTTP/1.1 404"))
    }

    @Test("the vCPU state format round-trips and refuses foreign layouts")
    func stateFormat() throws {
        var state = VMState(backend: .simulated, config: VMConfig(ramBytes: 64 << 20, vcpus: 2, simulated: true))
        state.simulatedR15 = [7, 9]
        let blob = state.encoded()
        #expect(try VMState.decode(blob) == state)
        var wrongVersion = blob
        wrongVersion[4] = 9
        #expect(throws: VMState.DecodeError.version(9)) { try VMState.decode(wrongVersion) }
        var wrongSize = blob
        wrongSize[12] &+= 8  // kvm_sregs size field
        #expect(throws: VMState.DecodeError.self) { try VMState.decode(wrongSize) }
        #expect(throws: VMState.DecodeError.truncated("r15 of vCPU 1")) { try VMState.decode(Array(blob.dropLast(4))) }
    }
}

func responseComplete(_ text: String) -> Bool {
    // Complete when the last header block's Content-Length bytes have arrived.
    guard let range = text.range(of: "\r\n\r\n", options: .backwards) else { return false }
    let head = text[..<range.lowerBound]
    let lastHead = head.components(separatedBy: "HTTP/1.1 ").last ?? ""
    if lastHead.hasPrefix("100 ") { return false }
    let length = lastHead.split(separator: "\r\n").first { $0.lowercased().hasPrefix("content-length:") }
        .flatMap { Int($0.split(separator: ":")[1].trimmingCharacters(in: .whitespaces)) } ?? 0
    return text[range.upperBound...].utf8.count >= length
}
