import BatonSystem
import BatonVMM
import Foundation

let imageStartedAt = Host.monotonicNanoseconds()  // before anything else: the exec-in-place breakdown

// A bad fault switch is a one-line error and exit 64 before anything runs, never a crash later.
if let problem = SyscallFaults.environmentProblem {
    FileHandle.standardError.write(Data("batonvmm: \(problem)\n".utf8))
    exit(64)
}
// After an exec in place: straight to restoring the paused VM (VMMLaunch says why).
if var launch = VMMLaunch(execArguments: CommandLine.arguments) {
    launch.imageStartedAt = imageStartedAt
    do { try launch.run() } catch { BatonVMMCommand.exit(withError: error) }
} else {
    BatonVMMCommand.main()
}
