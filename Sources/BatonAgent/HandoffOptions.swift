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
    public var chunkSize: Int = HandoffOptions.defaultChunkSize
    /// The chunk size a sender uses unless told otherwise (a receiver populates its spot-check
    /// pages for it before the pause).
    public static let defaultChunkSize = 1 << 20
    /// Checksum every byte of memfd regions too (default: one page per chunk, they are not copied).
    public var fullVerification = false
    /// Streamed chunks without checksums: for `baton bench transfer --transports gift+unchecked` only (the
    /// receiver must accept it, and the benchmark then checks every byte itself).
    public var unchecked = false
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
