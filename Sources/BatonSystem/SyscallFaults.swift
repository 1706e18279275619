import Glibc
import Synchronization

/// Errno injection for the syscall layer, so tests can drive the short-transfer, EAGAIN,
/// EINTR and refused-size paths on demand. Rules come from `BATON_SYSCALL_FAULTS`
/// (inherited by child processes) or from `install(_:)` in tests.
///
/// Spec: comma-separated `operation=effect@when`, where effect is an errno name
/// (`EAGAIN`, `EINTR`, `EPERM`, ...) or `short:BYTES` (the call moves at most BYTES),
/// and when is `N` (the Nth call), `N-M`, `N+` (Nth and later) or `*` (every call).
/// Example: `vmsplice=short:4096@*,vmsplice=EAGAIN@2,F_SETPIPE_SZ=EPERM@1-3`.
public final class SyscallFaults: Sendable {
    public enum Effect: Equatable, Sendable {
        case errno(Int32)
        case limit(Int)
    }

    public struct Rule: Equatable, Sendable {
        public var operation: String
        public var effect: Effect
        public var first: Int
        public var last: Int  // Int.max for open-ended

        public init(operation: String, effect: Effect, first: Int = 1, last: Int = Int.max) {
            self.operation = operation
            self.effect = effect
            self.first = first
            self.last = last
        }
    }

    public struct SpecError: Error, CustomStringConvertible {
        public let description: String
    }

    struct State {
        var rules: [Rule] = []
        var calls: [String: Int] = [:]
        var injected: [String: Int] = [:]
    }

    public static let environmentVariable = "BATON_SYSCALL_FAULTS"
    public static let shared: SyscallFaults = {
        let faults = SyscallFaults()
        // A bad spec never crashes a process (it may hold a guest): the executables refuse it
        // at start (`environmentProblem`); anything that gets here without that runs unfaulted.
        if let spec = getenv(environmentVariable).map({ String(cString: $0) }), !spec.isEmpty, let rules = try? SyscallFaults.parse(spec) {
            faults.install(rules)
        }
        return faults
    }()

    /// What is wrong with `BATON_SYSCALL_FAULTS`, as one line, or nil if it is unset or valid.
    /// `baton` and `batonvmm` check it before anything else and exit 64 with it.
    public static var environmentProblem: String? {
        guard let spec = getenv(environmentVariable).map({ String(cString: $0) }), !spec.isEmpty else { return nil }
        do { _ = try parse(spec); return nil } catch { return "\(environmentVariable): \(error)" }
    }

    private let state = Mutex(State())
    private let active = Atomic<Bool>(false)

    public init() {}

    public func install(_ rules: [Rule]) {
        state.withLock { $0 = State(rules: rules) }
        active.store(!rules.isEmpty, ordering: .releasing)
    }

    public func clear() { install([]) }

    /// How many times `operation` was attempted since the rules were installed.
    public func callCount(_ operation: String) -> Int {
        state.withLock { $0.calls[operation] ?? 0 }
    }

    /// How many faults were injected, per operation (reports show that a fault really fired).
    public func injectedCounts() -> [String: Int] {
        state.withLock { $0.injected }
    }

    /// Counts one attempt of `operation` and returns the injected effect for it, if any.
    public func consume(_ operation: String) -> Effect? {
        guard active.load(ordering: .acquiring) else { return nil }
        return state.withLock { state -> Effect? in
            let n = (state.calls[operation] ?? 0) + 1
            state.calls[operation] = n
            let effect = state.rules.first { $0.operation == operation && (($0.first)...($0.last)).contains(n) }?.effect
            if effect != nil { state.injected[operation, default: 0] += 1 }
            return effect
        }
    }

    public static func parse(_ spec: String) throws -> [Rule] {
        try spec.split(separator: ",").map { item in
            let text = String(item.filter { !$0.isWhitespace })
            guard let eq = text.firstIndex(of: "="), let at = text.lastIndex(of: "@"), eq < at else {
                throw SpecError(description: "fault rule '\(text)' is not operation=effect@when")
            }
            let operation = String(text[..<eq])
            let effectText = String(text[text.index(after: eq)..<at])
            let when = String(text[text.index(after: at)...])
            let effect: Effect
            if effectText.hasPrefix("short:"), let bytes = Int(effectText.dropFirst(6)), bytes > 0 {
                effect = .limit(bytes)
            } else if let code = ErrnoName.code(named: effectText) {
                effect = .errno(code)
            } else {
                throw SpecError(description: "fault rule '\(text)': unknown effect '\(effectText)'")
            }
            let (first, last): (Int, Int)
            if when == "*" {
                (first, last) = (1, Int.max)
            } else if when.hasSuffix("+"), let n = Int(when.dropLast()), n > 0 {
                (first, last) = (n, Int.max)
            } else if let dash = when.firstIndex(of: "-"), let a = Int(when[..<dash]),
                      let b = Int(when[when.index(after: dash)...]), a > 0, b >= a {
                (first, last) = (a, b)
            } else if let n = Int(when), n > 0 {
                (first, last) = (n, n)
            } else {
                throw SpecError(description: "fault rule '\(text)': bad call selector '\(when)'")
            }
            return Rule(operation: operation, effect: effect, first: first, last: last)
        }
    }
}

