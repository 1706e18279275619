import BatonController
import BatonCore
import BatonSystem
import BatonHarness
import BatonVMM
import Foundation
import Glibc
import Testing

/// A second copy of batonvmm in `dir`, as an operator would install it (every suite here uses it).
func newBinary(in dir: String) throws -> String {
    let path = dir + "/batonvmm-next"
    try? FileManager.default.removeItem(atPath: path)
    try Executable.copy(from: batonvmmPath, to: path)
    return path
}

@Suite("In-place upgrade of a running guest")
struct UpgradeTests {
    func upgrade(_ vmm: RunningVMM, transport: String, binary: String) throws -> UpgradeReport {
        var options = UpgradeOptions(vmSocket: vmm.socket, binary: binary)
        options.transport = transport
        options.digest = true
        options.runDirectory = vmm.directory + "/run"
        return try UpgradeController(options: options).run()
    }

    @Test("256 MiB guest upgraded twice (gift, then memfd): state continues exactly", arguments: [false, true])
    func upgradeTwice(simulated: Bool) throws {
        if !simulated, let why = KVMHost.unavailableReason { try Test.cancel("KVM unavailable: \(why)") }
        let vmm = try RunningVMM(ram: "256MiB", simulated: simulated)
        defer { vmm.stop() }
        let binary = try newBinary(in: vmm.directory)
        var last = try vmm.beat()
        expectMatchesModel(last)
        var pids = [try vmm.status().pid]
        for transport in ["gift", "memfd"] {
            let report = try upgrade(vmm, transport: transport, binary: binary)
            #expect(report.verified)
            #expect(!report.rolledBack)
            #expect(report.newPid != report.oldPid)
            #expect(report.oldPid == pids.last)
            #expect(report.transport == (transport == "gift" ? "gift" : "memfd"))
            #expect(report.ramDigestAtPause != nil && report.ramDigestAtPause == report.ramDigestBeforeResume,
                    "guest RAM digest at pause \(report.ramDigestAtPause ?? "-") vs in the new instance \(report.ramDigestBeforeResume ?? "-")")
            #expect(report.downtimeMs > 0)
            let status = try vmm.status()
            #expect(status.pid == report.newPid, "the socket is served by the new instance")
            #expect(!Host.isAlive(report.oldPid), "the old instance exited")
            let next = try vmm.beat(after: last.counter)
            #expect(next.counter > last.counter, "no reset")
            #expect(next.beats > last.beats)
            expectMatchesModel(next, "after the \(transport) upgrade")
            last = next
            pids.append(report.newPid)
        }
    }

    @Test("a single upgrade shows its phase on a terminal (`script` gives it a pty), cleared before the report; through a pipe stderr stays free of it")
    func progressOnTerminalOnly() throws {
        guard FileManager.default.isExecutableFile(atPath: "/usr/bin/script") else {
            print("skipped: /usr/bin/script (util-linux) is missing, no pty to test on"); return
        }
        let vmm = try RunningVMM(simulated: true)
        defer { vmm.stop() }
        let next = try newBinary(in: vmm.directory)
        let piped = try BatonProcess(["upgrade", "--vm", vmm.socket, "--binary", next, "--transport", "memfd", "--run-directory", vmm.directory + "/run1"]).finish()
        #expect(piped.status == 0, "\(piped.stderr)")
        #expect(!piped.stderr.contains("\u{1B}[K"), "progress went to a pipe: \(piped.stderr)")
        // A 2 s stall after `prepared` holds the phase long enough for the 5-per-second redraw.
        let command = ["BATON_CONTROLLER_FAULT=stall-after:prepared", BatonProcess.executablePath, "upgrade", "--vm", vmm.socket, "--binary", next,
                       "--transport", "memfd", "--run-directory", vmm.directory + "/run2"].joined(separator: " ")
        let onTerminal = try Spawn.run("/usr/bin/env", ["/usr/bin/script", "-qec", command, "/dev/null"])
        #expect(onTerminal.status == 0, "\(onTerminal.output)")
        #expect(onTerminal.output.contains("\r\u{1B}[Kupgrade of \(vmm.socket): prepared, pausing ("), "\(onTerminal.output.prefix(400))")
        #expect(onTerminal.output.contains("\r\u{1B}[Kbaton: upgraded \(vmm.socket)"), "\(onTerminal.output.suffix(400))")
    }

    @Test("two upgrades of one VM at once, named two ways (path and symlink): one runs, the other is refused at once with the holder; the guest ends on one instance")
    func oneUpgradePerVM() throws {
        let vmm = try RunningVMM(simulated: true)
        defer { vmm.stop() }
        let next = try newBinary(in: vmm.directory)
        let alias = vmm.directory + "/alias.sock"
        symlink(vmm.socket, alias)
        // The first holds the VM for 2 s after `prepared` (a stall fault), so the second overlaps it.
        let journal = vmm.directory + "/first.jsonl"
        let first = try BatonProcess(["upgrade", "--vm", vmm.socket, "--binary", next, "--transport", "memfd", "--run-directory", vmm.directory + "/run1", "--journal", journal],
                                     environment: ["BATON_CONTROLLER_FAULT": "stall-after:prepared"])
        var preparing = false
        for _ in 0..<400 where !preparing {
            preparing = (try? String(contentsOfFile: journal, encoding: .utf8))?.contains("\"prepared\"") == true
            if !preparing { usleep(10_000) }
        }
        #expect(preparing, "the first upgrade never journaled `prepared`")
        let second = try BatonProcess(["upgrade", "--vm", alias, "--binary", next, "--transport", "memfd", "--run-directory", vmm.directory + "/run2"]).finish()
        #expect(second.status == 5, "\(second.stderr)")
        // Named by its real path, whichever way the command spelled it.
        #expect(second.stderr.contains("refused: another upgrade of \(vmm.socket) is running (pid \(first.pid))"), "\(second.stderr)")
        let done = first.finish()
        #expect(done.status == 0, "\(done.stderr)")
        #expect(try vmm.status().state == .running)
        _ = try vmm.beat()
    }

    /// A child memory cgroup of this process's own, limited to `bytes` (v1 or v2), or nil with why not.
    func memoryCgroup(limit bytes: Int) -> (dir: String?, why: String) {
        guard geteuid() == 0 else { return (nil, "needs root to make a memory cgroup") }
        guard let text = Host.readSmallFile("/proc/self/cgroup") else { return (nil, "no /proc/self/cgroup") }
        for line in text.split(separator: "\n") {
            let parts = line.split(separator: ":", maxSplits: 2, omittingEmptySubsequences: false).map(String.init)
            guard parts.count == 3 else { continue }
            let v1 = parts[1].split(separator: ",").contains("memory")
            guard v1 || (parts[1].isEmpty && FileManager.default.fileExists(atPath: "/sys/fs/cgroup/cgroup.controllers")) else { continue }
            let dir = (v1 ? "/sys/fs/cgroup/memory" : "/sys/fs/cgroup") + parts[2] + "/baton-test-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
            guard mkdir(dir, 0o755) == 0 else { continue }
            let file = dir + (v1 ? "/memory.limit_in_bytes" : "/memory.max")
            guard (try? "\(bytes)".write(toFile: file, atomically: false, encoding: .utf8)) != nil else { rmdir(dir); continue }
            return (dir, "")
        }
        return (nil, "no writable memory cgroup here")
    }

    @Test("gift into a cgroup that cannot hold a second copy of guest RAM is refused before anything starts, naming both figures; memfd there is not")
    func memoryCheck() throws {
        let (cgroup, why) = memoryCgroup(limit: 192 << 20)
        guard let cgroup else { print("skipped: \(why)"); return }
        defer { rmdir(cgroup) }
        let vmm = try RunningVMM(ram: "256MiB", simulated: true)
        defer { vmm.stop() }
        let oldPid = try vmm.status().pid
        let next = try newBinary(in: vmm.directory)
        let inCgroup = ["/bin/sh", "-c", "echo $$ > \(cgroup)/cgroup.procs && exec \"$0\" \"$@\""]
        let refused = try BatonProcess(["upgrade", "--vm", vmm.socket, "--binary", next, "--transport", "gift"], wrapper: inCgroup).finish()
        #expect(refused.status == 5, "\(refused.stderr)")
        #expect(refused.stderr.contains("refused: transport gift needs a second copy of the guest's RAM (256 MiB + 64 MiB for the new instance)")
                && refused.stderr.contains("cgroup \(cgroup) allows") && refused.stderr.contains("limit 192 MiB") && refused.stderr.contains("nothing was changed"),
                "\(refused.stderr)")
        #expect(try vmm.status().pid == oldPid && vmm.status().state == .running)
        let shared = try BatonProcess(["upgrade", "--vm", vmm.socket, "--binary", next, "--transport", "memfd"], wrapper: inCgroup).finish()
        #expect(shared.status == 0, "memfd shares the pages, no second copy: \(shared.stderr)")
        #expect(try vmm.status().state == .running)
    }

    @Test("a missing new binary is refused before anything is paused")
    func missingBinary() throws {
        let vmm = try RunningVMM(simulated: true)
        defer { vmm.stop() }
        let before = try vmm.beat()
        #expect {
            _ = try upgrade(vmm, transport: "auto", binary: vmm.directory + "/no-such-batonvmm")
        } throws: { error in
            "\(error)" == "new binary \(vmm.directory)/no-such-batonvmm is missing; nothing was changed"
        }
        #expect(try vmm.status().state == .running)
        #expect(try vmm.beat(after: before.counter).counter > before.counter, "still counting")
    }

    @Test("a new binary that exits at once rolls back; the old VM keeps running and counting")
    func crashingBinary() throws {
        let vmm = try RunningVMM(simulated: true)
        defer { vmm.stop() }
        let oldPid = try vmm.status().pid
        let before = try vmm.beat()
        let script = vmm.directory + "/broken-batonvmm"
        FileManager.default.createFile(atPath: script, contents: Data("#!/bin/sh\necho 'broken build' >&2\nexit 7\n".utf8), attributes: [.posixPermissions: 0o755])
        #expect {
            _ = try upgrade(vmm, transport: "memfd", binary: script)
        } throws: { error in
            let text = "\(error)"
            return text.contains("exited with status 7 before it was ready: broken build") && text.contains("rolled back")
        }
        let status = try vmm.status()
        #expect(status.pid == oldPid)
        #expect(status.state == .running)
        let after = try vmm.beat(after: before.counter)
        expectMatchesModel(after)
    }
}


@Suite("Recovery after a controller crash")
struct RecoveryTests {
    @Test("a journal that stops before commit rolls back: the new instance is killed, the old resumes")
    func recoverBeforeCommit() throws {
        let vmm = try RunningVMM(simulated: true)
        defer { vmm.stop() }
        let oldPid = try vmm.status().pid
        try vmm.client.expectOK("PUT", "/api/v1/vm.pause")
        #expect(try vmm.status().state == .paused)
        // Stand-in for a new instance the crashed controller had started.
        let stray = try Spawn.detached("/bin/sleep", ["300"], logPath: vmm.directory + "/stray.log")
        let path = vmm.directory + "/journal.jsonl"
        let journal = try UpgradeJournal(path: path)
        for phase in [UpgradeJournal.Phase.started, .newInstanceReady, .prepared, .paused] {
            try journal.record(.init(phase: phase, atMonotonicNs: Host.monotonicNanoseconds(), vm: vmm.socket, oldPid: oldPid, newPid: stray))
        }
        let outcome = try UpgradeRecovery.recover(journalPath: path)
        #expect(outcome.result == .rolledBack, "\(outcome)")
        usleep(50_000)
        #expect(Spawn.exitStatus(stray) != nil || kill(stray, 0) != 0, "the stray new instance was killed")
        #expect(try vmm.status().state == .running)
        let before = try vmm.beat()
        expectMatchesModel(try vmm.beat(after: before.counter))
        #expect(try UpgradeRecovery.recover(journalPath: path).result == .nothingToDo)
    }

    @Test("a journal path used again: only its last upgrade decides recovery; a new upgrade refuses a journal left unfinished")
    func oneJournalPerUpgrade() throws {
        let vmm = try RunningVMM(simulated: true)
        defer { vmm.stop() }
        let oldPid = try vmm.status().pid
        let path = vmm.directory + "/journal.jsonl"
        let journal = try UpgradeJournal(path: path)
        // An earlier upgrade that finished, then one interrupted inside the pause.
        for phase in [UpgradeJournal.Phase.started, .prepared, .paused, .committing, .committed, .done] {
            try journal.record(.init(phase: phase, atMonotonicNs: Host.monotonicNanoseconds(), vm: vmm.socket, oldPid: 1, newPid: oldPid))
        }
        try vmm.client.expectOK("PUT", "/api/v1/vm.pause")
        for phase in [UpgradeJournal.Phase.started, .newInstanceReady, .prepared, .paused] {
            try journal.record(.init(phase: phase, atMonotonicNs: Host.monotonicNanoseconds(), vm: vmm.socket, oldPid: oldPid, newPid: nil))
        }
        let next = try newBinary(in: vmm.directory)
        let refused = try BatonProcess(["upgrade", "--vm", vmm.socket, "--binary", next, "--journal", path]).finish()
        #expect(refused.status == 5 && refused.stderr.contains("holds an unfinished upgrade of \(vmm.socket) (last phase paused)"), "\(refused.stderr)")
        #expect(try vmm.status().state == .paused, "a refused upgrade touches nothing")
        let outcome = try UpgradeRecovery.recover(journalPath: path)
        #expect(outcome.result == .rolledBack, "the earlier upgrade's `done` must not decide: \(outcome)")
        #expect(try vmm.status().state == .running)
        // Finished now: the same path takes a new upgrade.
        let again = try BatonProcess(["upgrade", "--vm", vmm.socket, "--binary", next, "--journal", path, "--transport", "memfd"]).finish()
        #expect(again.status == 0, "\(again.stderr)")
    }

    @Test("--pause-priority: after the upgrade no thread of the new instance is left real-time (or at another nice value)")
    func pausePriorityRestored() throws {
        guard getuid() == 0 else { print("skipped: --pause-priority needs root (CAP_SYS_NICE)"); return }
        let vmm = try RunningVMM(simulated: true)  // its vCPU thread spins: one left real-time would show
        defer { vmm.stop() }
        let done = try BatonProcess(["upgrade", "--vm", vmm.socket, "--binary", try newBinary(in: vmm.directory), "--transport", "memfd", "--pause-priority"]).finish()
        #expect(done.status == 0, "\(done.stderr)")
        let pid = try vmm.status().pid
        let tids = try FileManager.default.contentsOfDirectory(atPath: "/proc/\(pid)/task").compactMap { Int32($0) }
        #expect(tids.count >= 2, "\(tids)")
        for tid in tids {
            // A short-lived thread may be gone between the listing and the read.
            guard let stat = try? String(contentsOfFile: "/proc/\(pid)/task/\(tid)/stat", encoding: .utf8) else { continue }
            // Field 19 is nice, 41 the policy; fields after the ")" of the command name start at field 3.
            let fields = stat[stat.index(after: stat.lastIndex(of: ")")!)...].split(separator: " ")
            #expect(fields[16] == "0", "thread \(tid) left at nice \(fields[16])")
            #expect(fields[38] == "0", "thread \(tid) left under scheduling policy \(fields[38]) (0: SCHED_OTHER)")
        }
    }

    @Test("a kernel that refuses SPLICE_F_GIFT: `--transport gift` says it falls back before the pause, so the notice is there even when the upgrade then rolls back")
    func giftRefusedNoticeBeforePause() throws {
        let vmm = try RunningVMM(simulated: true, environment: ["BATON_SYSCALL_FAULTS": "vmsplice=EOPNOTSUPP@*"])
        defer { vmm.stop() }
        let oldPid = try vmm.status().pid
        let failed = try BatonProcess(["upgrade", "--vm", vmm.socket, "--binary", try newBinary(in: vmm.directory), "--transport", "gift"],
                                      environment: ["BATON_CONTROLLER_FAULT": "kill-new-after:prepared"]).finish()
        #expect(failed.status != 0, "\(failed.stdout)")
        #expect(failed.stderr.contains("baton: notice: gift: this kernel refuses vmsplice(SPLICE_F_GIFT) (EOPNOTSUPP)"), "\(failed.stderr)")
        #expect(failed.stderr.contains("rolled back"), "\(failed.stderr)")
        let after = try vmm.status()
        #expect(after.state == .running && after.pid == oldPid)
    }

    @Test("the journal cannot record `committing`: the upgrade rolls back before the point of no return")
    func journalFailureBeforeCommit() throws {
        let vmm = try RunningVMM(simulated: true)
        defer { vmm.stop() }
        let next = try newBinary(in: vmm.directory)
        // Which write is `committing`: counted on a clean upgrade's journal (written, not fsync'd:
        // it is inside the pause, and only a host crash, which ends both instances, loses it).
        let clean = vmm.directory + "/clean.jsonl"
        let first = try BatonProcess(["upgrade", "--vm", vmm.socket, "--binary", next, "--journal", clean, "--transport", "memfd"]).finish()
        #expect(first.status == 0, "\(first.stderr)")
        let entries = try UpgradeJournal.read(path: clean)
        let committing = try #require(entries.firstIndex { $0.phase == .committing }) + 1
        let oldPid = try vmm.status().pid
        let path = vmm.directory + "/journal.jsonl"
        let r = try BatonProcess(["upgrade", "--vm", vmm.socket, "--binary", next, "--journal", path, "--transport", "memfd"],
                                 environment: ["BATON_SYSCALL_FAULTS": "write(\(path))=EIO@\(committing)"]).finish()
        #expect(r.status == 3, "\(r.stderr)")
        #expect(r.stderr.contains("write(\(path))") && r.stderr.contains("EIO") && r.stderr.contains("rolled back"), "\(r.stderr)")
        let status = try vmm.status()
        #expect(status.pid == oldPid && status.state == .running, "the old instance keeps the guest")
        #expect(try UpgradeJournal.read(path: path).last?.phase == .rolledBack)
        _ = try vmm.beat()
    }

    @Test("a journal past commit rolls forward: the old instance must not survive")
    func recoverAfterCommit() throws {
        let vmm = try RunningVMM(simulated: true)
        defer { vmm.stop() }
        let newPid = try vmm.status().pid  // here the running VMM plays the instance that took over
        let oldStandIn = try Spawn.detached("/bin/sleep", ["300"], logPath: vmm.directory + "/old.log")
        let path = vmm.directory + "/journal.jsonl"
        let journal = try UpgradeJournal(path: path)
        for phase in [UpgradeJournal.Phase.started, .prepared, .paused, .transferred, .committing] {
            try journal.record(.init(phase: phase, atMonotonicNs: Host.monotonicNanoseconds(), vm: vmm.socket, oldPid: oldStandIn, newPid: newPid))
        }
        let outcome = try UpgradeRecovery.recover(journalPath: path)
        #expect(outcome.result == .rolledForward, "\(outcome)")
        usleep(50_000)
        #expect(Spawn.exitStatus(oldStandIn) != nil || kill(oldStandIn, 0) != 0, "never two instances")
        #expect(try vmm.status().state == .running)
    }
}

@Suite("Exec-in-place upgrade (the pid stays)")
struct InPlaceUpgradeTests {
    @Test("upgraded in place twice: same pid, new image, the guest continues exactly", arguments: [false, true])
    func inPlaceTwice(simulated: Bool) throws {
        if !simulated, let why = KVMHost.unavailableReason { try Test.cancel("KVM unavailable: \(why)") }
        let vmm = try RunningVMM(ram: "256MiB", simulated: simulated)
        defer { vmm.stop() }
        let binary = try newBinary(in: vmm.directory)
        let pid = try vmm.status().pid
        var last = try vmm.beat()
        for _ in 0..<2 {
            var options = UpgradeOptions(vmSocket: vmm.socket, binary: binary)
            options.inPlace = true
            let report = try UpgradeController(options: options).run()
            #expect(report.oldPid == pid && report.newPid == pid, "the pid libvirt knows must stay")
            #expect(report.verified && !report.rolledBack)
            #expect(try vmm.status().state == .running)
            let exe = try FileManager.default.destinationOfSymbolicLink(atPath: "/proc/\(pid)/exe")
            #expect(exe == binary, "the process now runs the new binary: \(exe)")
            let next = try vmm.beat(after: last.counter)
            expectMatchesModel(next, "after the exec-in-place upgrade")
            last = next
        }
    }

    @Test("exec in place keeps a journal: the controller SIGKILLed before or at the exec leaves a paused guest that `baton recover` resumes in the right image; after the resume (`committed`), recover finishes the journal forward",
          arguments: [("paused", "rolled back: the old image"), ("committing", "rolled back: the old image"), ("committed", "rolled forward: the new image")])
    func inPlaceControllerKilled(_ phase: String, _ expected: String) throws {
        let vmm = try RunningVMM(ram: "64MiB", simulated: true)
        defer { vmm.stop() }
        let binary = try newBinary(in: vmm.directory)
        let pid = try vmm.status().pid
        let before = try vmm.beat()
        let journal = vmm.directory + "/inplace.jsonl"
        let killed = try BatonProcess(["upgrade", "--vm", vmm.socket, "--binary", binary, "--in-place", "--journal", journal, "--run-directory", vmm.directory + "/run"],
                                      environment: ["BATON_CONTROLLER_FAULT": "sigkill-controller-after:\(phase)"]).finish()
        #expect(killed.status == 128 + SIGKILL || killed.status == SIGKILL, "\(killed.status) \(killed.stderr)")
        // `committed` is journaled after the resume (no fsync inside the pause): the guest runs.
        let left: VMRunState = phase == "committed" ? .running : .paused
        var state: VMRunState?
        for _ in 0..<500 where state != left {  // the exec may still be restoring the VM
            state = try? vmm.status().state
            if state != left { usleep(10_000) }
        }
        #expect(state == left, "the dead controller left the guest \(left.rawValue)")
        let recovered = try BatonProcess(["recover", "--journal", journal]).finish()
        #expect(recovered.status == 0 && recovered.stdout.contains(expected), "\(recovered.stdout) \(recovered.stderr)")
        let after = try vmm.status()
        #expect(after.pid == pid && after.state == .running)
        let exe = try FileManager.default.destinationOfSymbolicLink(atPath: "/proc/\(pid)/exe")
        let expected = URL(fileURLWithPath: phase == "committed" ? binary : batonvmmPath).resolvingSymlinksInPath().path
        #expect(exe == expected, "\(exe)")
        expectMatchesModel(try vmm.beat(after: before.counter), "after recovery")
        #expect(try BatonProcess(["recover", "--journal", journal]).finish().stdout.contains("already finished"))
    }

    @Test("exec in place into a binary that passes --version and then dies: reported as LOST (observed), never as rolled back")
    func inPlaceNewImageDies() throws {
        let vmm = try RunningVMM(ram: "64MiB", simulated: true)
        defer { vmm.stop() }
        let liar = vmm.directory + "/batonvmm-liar"
        try "#!/bin/sh\nif [ \"$1\" = --version ]; then echo 'batonvmm 9.9 (liar)'; exit 0; fi\nexit 1\n".write(toFile: liar, atomically: true, encoding: .utf8)
        chmod(liar, 0o755)
        let r = try BatonProcess(["upgrade", "--vm", vmm.socket, "--binary", liar, "--in-place", "--run-directory", vmm.directory + "/run"]).finish()
        #expect(r.status == 1, "\(r.stderr)")
        #expect(r.stderr.contains("LOST:") && r.stderr.contains("is gone") && !r.stderr.contains("rolled back"), "\(r.stderr)")
    }

    @Test("exec in place into a binary whose --version never answers: refused when the probe times out, nothing paused")
    func inPlaceProbeHangs() throws {
        let vmm = try RunningVMM(ram: "64MiB", simulated: true)
        defer { vmm.stop() }
        let stuck = vmm.directory + "/batonvmm-stuck"
        try "#!/bin/sh\nexec sleep 300\n".write(toFile: stuck, atomically: true, encoding: .utf8)
        chmod(stuck, 0o755)
        let r = try BatonProcess(["upgrade", "--vm", vmm.socket, "--binary", stuck, "--in-place", "--timeout", "1", "--run-directory", vmm.directory + "/run"]).finish()
        #expect(r.status != 0 && r.stderr.contains("failed its --version probe (status 137)") && r.stderr.contains("nothing was changed"), "\(r.stderr)")
        #expect(try vmm.status().state == .running)
    }

    @Test("a new binary that cannot start is caught before the pause; the VM keeps running")
    func brokenBinary() throws {
        let vmm = try RunningVMM(simulated: true)
        defer { vmm.stop() }
        let script = vmm.directory + "/broken"
        FileManager.default.createFile(atPath: script, contents: Data("#!/bin/sh\nexit 9\n".utf8), attributes: [.posixPermissions: 0o755])
        var options = UpgradeOptions(vmSocket: vmm.socket, binary: script)
        options.inPlace = true
        #expect {
            _ = try UpgradeController(options: options).run()
        } throws: { "\($0)".contains("failed its --version probe (status 9)") && "\($0)".contains("nothing was changed") }
        let before = try vmm.beat()
        #expect(try vmm.status().state == .running)
        expectMatchesModel(try vmm.beat(after: before.counter))
    }
}
