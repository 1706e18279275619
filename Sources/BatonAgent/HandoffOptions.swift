import BatonCore
import BatonSystem
import BatonTransfer

/// What the operator asks for: `gift`, `memfd`, `copy` or `auto`.
public enum TransportChoice: String, Sendable, CaseIterable, Codable {
    case gift, memfd, copy, auto
}

public struct HandoffOptions: Sendable {
    public var transport: TransportChoice = .auto
    /// Under `auto`, how regions without a memfd travel (the fastest path `baton check` measured).
    public var autoStreamTransport: TransportKind = .gift
    public var lanes: Int = Host.onlineCPUs
    /// Pipe capacity asked of F_SETPIPE_SZ; refused sizes fall back by halving.
    public var pipeCapacity: Int = HandoffOptions.hostPipeMaxSize
    public var chunkSize: Int = 1 << 20
    /// Checksum every byte of memfd regions too (default: one page per chunk, they are not copied).
    public var fullVerification = false
    public var stallTimeoutSeconds: Double = 10
    /// Free each chunk of the sender's memory once its pipe holds it (gift and pipe-copy
    /// regions): the host then holds guest RAM plus the in-flight window instead of twice
    /// the RAM. The receiver writes into a memfd whose descriptor the sender keeps, so a
    /// rollback restores every byte (SourceRollback).
    public var releaseSource = false
    /// With an explicit `gift` on a kernel that refuses SPLICE_F_GIFT: refuse the handoff
    /// (before the pause) instead of falling back to the pipe copy path.
    public var strict = false
    /// Counts the bytes this handoff moves, for a progress line (nil: counted, not shown).
    public var progress: TransferProgress?
    /// Expected uid of the peer (SO_PEERCRED).
    public var peerUID: UInt32 = getuidValue()

    public init() {}

    public static var hostPipeMaxSize: Int {
        Host.readSmallFile("/proc/sys/fs/pipe-max-size").flatMap { Int($0.filter(\.isNumber)) } ?? (1 << 20)
    }
}

func getuidValue() -> UInt32 { getuid() }

import Glibc

/// One region's outcome.
public struct RegionReport: Sendable, Codable, Equatable {
    public let id: UInt32
    public let transport: String
    public let bytes: UInt64
    public let pages: PageDisposition
}

/// What a handoff really did, for logs, `--json` and the downtime breakdown.
public struct TransferReport: Sendable, Codable {
    public var regions: [RegionReport] = []
    public var protocolVersion: UInt16 = 0
    public var lanes: Int = 0
    public var pipeCapacity: Int = 0
    public var pipeSizeRefusals: [String] = []
    public var chunkCount: Int = 0
    public var bytes: UInt64 = 0
    /// transferBegin sent → sender's last byte handed to the kernel.
    public var sendSeconds: Double = 0
    /// transferBegin sent → receiver confirmed every checksum and digest.
    public var transferAndVerifySeconds: Double = 0
    public var verified = false
    /// Errno faults injected by BATON_SYSCALL_FAULTS during this process's life, per call.
    public var injectedFaults: [String: Int] = [:]
    /// The sender freed its pages as they were handed over (HandoffOptions.releaseSource).
    public var releasedSource = false
    /// What the sender decided differently from what was asked, one line each (e.g. gift
    /// refused by the kernel, streamed by pipe copy instead). Printed by the CLI as notices.
    public var notices: [String] = []

    /// True only if every streamed region's pages were observed to move (never assumed).
    public var pagesMoved: Bool {
        let streamed = regions.filter { $0.transport != TransportKind.memfd.description }
        return !streamed.isEmpty && streamed.allSatisfy { $0.pages == .moved }
    }
}
