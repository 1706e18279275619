import Foundation

/// A running QEMU's command line, read from /proc, and its translation into the command line of
/// the new QEMU that takes the guest over. Pure: no process is touched here.
public struct QEMUCommandLine: Equatable, Sendable {
    public var arguments: [String]

    public init(_ arguments: [String]) { self.arguments = arguments }

    public var emulator: String { arguments.first ?? "" }

    /// A listening chardev socket libvirt passed as a descriptor (`socket,id=X,fd=N,server=on`).
    public struct PassedSocket: Equatable, Sendable {
        public let id: String
        public let fd: Int32
        public init(id: String, fd: Int32) { self.id = id; self.fd = fd }
    }

    /// Guest RAM's backend: the memfd libvirt asked for, or the file backend on an inherited
    /// memfd (`/proc/self/fd/N`) that an earlier Baton upgrade left.
    public enum RAMBackend: Equatable, Sendable {
        case memfd(id: String, shared: Bool)
        case inheritedFile(id: String, fd: Int32, shared: Bool)
        case other(id: String, type: String, shared: Bool)

        public var shared: Bool {
            switch self {
            case .memfd(_, let s), .inheritedFile(_, _, let s), .other(_, _, let s): s
            }
        }
    }

    /// Values of every occurrence of `option` (the argument after it).
    public func values(of option: String) -> [String] {
        var out: [String] = []
        var i = 1
        while i < arguments.count {
            if arguments[i] == option, i + 1 < arguments.count { out.append(arguments[i + 1]); i += 2 } else { i += 1 }
        }
        return out
    }

    public var passedSockets: [PassedSocket] {
        values(of: "-chardev").compactMap { spec in
            let keys = Self.keyValues(spec)
            guard spec.hasPrefix("socket,"), let id = keys["id"], let fd = keys["fd"].flatMap(Int32.init) else { return nil }
            return PassedSocket(id: id, fd: fd)
        }
    }

    public var monitorSocket: PassedSocket? { passedSockets.first { $0.id == "charmonitor" } }

    /// The machine type (`-machine TYPE,...` or `type=TYPE`).
    public var machineType: String? {
        guard let spec = values(of: "-machine").first else { return nil }
        let first = spec.split(separator: ",").first.map(String.init) ?? ""
        if first.hasPrefix("type=") { return String(first.dropFirst(5)) }
        return first.contains("=") ? Self.keyValues(spec)["type"] : first
    }

    /// Drivers of every `-device` (JSON or key=value form).
    public var deviceDrivers: [String] {
        values(of: "-device").compactMap { spec in
            if spec.hasPrefix("{") { return Self.jsonObject(spec)?["driver"]?.string }
            return spec.split(separator: ",").first.map(String.init)
        }
    }

    /// Memory backend objects (`-object {"qom-type":"memory-backend-*",...}`).
    public var ramBackends: [RAMBackend] {
        values(of: "-object").compactMap { spec in
            guard let o = Self.jsonObject(spec), let type = o["qom-type"]?.string, type.hasPrefix("memory-backend-") else { return nil }
            let id = o["id"]?.string ?? ""
            let shared = o["share"] == .bool(true)
            if type == "memory-backend-memfd" { return .memfd(id: id, shared: shared) }
            if type == "memory-backend-file", let path = o["mem-path"]?.string, path.hasPrefix("/proc/self/fd/"),
               let fd = Int32(path.dropFirst("/proc/self/fd/".count)) {
                return .inheritedFile(id: id, fd: fd, shared: shared)
            }
            return .other(id: id, type: type, shared: shared)
        }
    }

    /// Guest RAM size in bytes (the memory backend's `size`, else `-m` in MiB).
    public var ramBytes: Int? {
        for spec in values(of: "-object") {
            if let o = Self.jsonObject(spec), o["qom-type"]?.string?.hasPrefix("memory-backend-") == true, case .number(let n)? = o["size"] { return Int(n) }
        }
        guard let m = values(of: "-m").first else { return nil }
        let first = m.split(separator: ",").first.map(String.init) ?? m
        return Int(first.hasPrefix("size=") ? String(first.dropFirst(5)) : first).map { $0 << 20 }
    }

    /// How the new process receives the guest.
    public enum Incoming: Equatable, Sendable {
        /// `-incoming defer`; Baton starts the incoming migration over QMP.
        case deferred
        /// cpr-transfer: a `main` and a `cpr` channel, both Unix sockets.
        case cprTransfer(mainPath: String, cprPath: String)
    }

    /// One change the translation made, for the report and the log.
    public typealias Change = String

    /// The new QEMU's command line: the same guest, the new binary, the changes `newVersion`
    /// needs, guest RAM as a shared file backend on the memfd placed at `ramFD`, and
    /// `incoming`; with `ramFD` nil (copy mode) the RAM backend stays as it is. Throws
    /// `QEMUUpgradeError.unsupported` for what cannot be carried over.
    public func translated(newEmulator: String, newVersion: QEMUVersion, ramFD: Int32?, incoming: Incoming) throws -> (QEMUCommandLine, [Change]) {
        var out = [newEmulator]
        var changes: [Change] = []
        var machineExtras: [String] = []
        let modern = newVersion.qemu.major >= 9  // -no-acpi / -no-hpet are gone from 9.0 on
        var i = 1
        while i < arguments.count {
            let a = arguments[i]
            let next = i + 1 < arguments.count ? arguments[i + 1] : nil
            switch a {
            case "-incoming":
                i += 2  // an earlier upgrade's; this one sets its own
                continue
            case "-no-acpi" where modern:
                machineExtras.append("acpi=off"); changes.append("-no-acpi → -machine acpi=off")
                i += 1; continue
            case "-no-hpet" where modern:
                machineExtras.append("hpet=off"); changes.append("-no-hpet → -machine hpet=off")
                i += 1; continue
            case "-object" where ramFD != nil && next.flatMap(Self.jsonObject)?["qom-type"]?.string?.hasPrefix("memory-backend-") == true:
                let ramFD = ramFD!
                var o = Self.jsonObject(next!)!
                guard case .object(var fields) = o else { break }
                if fields["share"] != .bool(true) {
                    throw QEMUUpgradeError.unsupported("guest RAM backend '\(fields["id"]?.string ?? "")' is not shared (share=off)")
                }
                let type = fields["qom-type"]?.string ?? ""
                if type == "memory-backend-memfd" || type == "memory-backend-file" {
                    if type == "memory-backend-memfd" { changes.append("memory-backend-memfd → memory-backend-file on the inherited memfd (fd \(ramFD))") }
                    fields["qom-type"] = .string("memory-backend-file")
                    fields["mem-path"] = .string("/proc/self/fd/\(ramFD)")
                    for k in ["hugetlb", "hugetlbsize", "seal"] { fields[k] = nil }
                    o = .object(fields)
                } else {
                    throw QEMUUpgradeError.unsupported("guest RAM backend type \(type) cannot be carried over (memfd or an inherited file only)")
                }
                out += ["-object", Self.encode(o)]
                i += 2; continue
            default: break
            }
            out.append(a)
            i += 1
        }
        if newVersion.qemu.major >= 10 {
            // cpr-transfer needs every RAM block shared, the auxiliary ones (ROMs, VGA) included;
            // set it now so that the next upgrade of this process can use cpr-transfer.
            if !(values(of: "-machine").first ?? "").contains("aux-ram-share=on") {
                machineExtras.append("aux-ram-share=on")
                changes.append("-machine aux-ram-share=on (for a later cpr-transfer)")
            }
        }
        if !machineExtras.isEmpty {
            if let m = out.firstIndex(of: "-machine"), m + 1 < out.count {
                out[m + 1] += "," + machineExtras.joined(separator: ",")
            } else {
                out += ["-machine", machineExtras.joined(separator: ",")]
            }
        }
        switch incoming {
        case .deferred:
            out += ["-incoming", "defer"]
        case .cprTransfer(let main, let cpr):
            out += ["-incoming", Self.channel("main", main), "-incoming", Self.channel("cpr", cpr)]
        }
        return (QEMUCommandLine(out), changes)
    }

    static func channel(_ type: String, _ path: String) -> String {
        encode(.object(["channel-type": .string(type), "addr": .object(["transport": .string("socket"), "type": .string("unix"), "path": .string(path)])]))
    }

    static func keyValues(_ spec: String) -> [String: String] {
        var out: [String: String] = [:]
        for part in spec.split(separator: ",") {
            if let eq = part.firstIndex(of: "=") { out[String(part[..<eq])] = String(part[part.index(after: eq)...]) }
        }
        return out
    }

    static func jsonObject(_ text: String) -> JSONValue? {
        guard text.hasPrefix("{"), let v = try? JSONDecoder().decode(JSONValue.self, from: Data(text.utf8)), case .object = v else { return nil }
        return v
    }

    static func encode(_ value: JSONValue) -> String {
        let e = JSONEncoder()
        e.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
        return String(decoding: (try? e.encode(value)) ?? Data(), as: UTF8.self)
    }
}
