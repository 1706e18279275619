import BatonSystem
import BatonVMM
import Foundation

// A bad fault switch is a one-line error and exit 64 before anything runs, never a crash later.
if let problem = SyscallFaults.environmentProblem {
    FileHandle.standardError.write(Data("batonvmm: \(problem)\n".utf8))
    exit(64)
}
BatonVMMCommand.main()
