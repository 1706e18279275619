import BatonVMM

BatonVMMCommand.main()
