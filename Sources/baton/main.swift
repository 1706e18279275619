import BatonCLI

BatonCommand.start()
