// swift-tools-version:6.0
import PackageDescription

// Layers import in one direction only:
//   CBatonLinux → BatonSystem → BatonCore-free syscall layer
//   BatonCore (pure) → BatonTransfer → BatonAgent → BatonCLI → baton
let package = Package(
    name: "Baton",
    platforms: [.macOS(.v14)],
    products: [
        .executable(name: "baton", targets: ["baton"]),
        .executable(name: "batonvmm", targets: ["batonvmm"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.8.2"),
        .package(url: "https://github.com/apple/swift-log", from: "1.16.2"),
        .package(url: "https://github.com/LebJe/TOMLKit", from: "0.6.0"),
        .package(url: "https://github.com/apple/swift-metrics", from: "2.13.0"),
        .package(url: "https://github.com/swift-server/swift-prometheus", from: "2.4.1"),
        .package(url: "https://github.com/swift-server/swift-service-lifecycle", from: "2.13.0"),
    ],
    targets: [
        // Thin C shim: only what Swift cannot import (_GNU_SOURCE calls, CMSG_*, function-like macros).
        .target(name: "CBatonLinux"),
        // Typed syscall wrappers with errno injection; no domain logic.
        .target(name: "BatonSystem", dependencies: ["CBatonLinux"]),
        // Pure: sizes, regions, page ranges, wire codec, receiver state machine, hashing.
        .target(name: "BatonCore"),
        // Moving pages: pipes, vmsplice, memfd, process_vm_readv, integrity, move detection.
        .target(name: "BatonTransfer", dependencies: ["BatonSystem", "BatonCore", "CBatonLinux"]),
        // The old-instance and new-instance agents speaking Baton's protocol.
        .target(name: "BatonAgent", dependencies: ["BatonSystem", "BatonCore", "BatonTransfer"]),
        // <linux/kvm.h> request numbers as constants, flexible-array accessors.
        .target(name: "CBatonKVM"),
        // The reference hypervisor: KVM or simulated vCPUs, the reference guest and its model,
        // vCPU state format, the Cloud Hypervisor-dialect API; embeds the agents.
        .target(name: "BatonVMM", dependencies: ["CBatonKVM", "BatonSystem", "BatonCore", "BatonTransfer", "BatonAgent"]),
        // libvirt's C API (Debian's libvirt-dev).
        .systemLibrary(name: "CLibvirt", pkgConfig: "libvirt", providers: [.apt(["libvirt-dev"])]),
        // Baton's libvirt adapter: connections, domains, metadata, events, HypervisorControl.
        .target(name: "BatonLibvirt", dependencies: ["CLibvirt", "BatonController"]),
        // The upgrade sequence, journal, HypervisorControl and its implementations.
        .target(name: "BatonController", dependencies: [
            "BatonSystem", "BatonCore", .product(name: "Metrics", package: "swift-metrics"), .product(name: "Logging", package: "swift-log"),
        ]),
        // QEMU under libvirt: QMP, command-line translation, cpr-transfer / x-ignore-shared
        // handover, libvirt adopting the new process.
        .target(name: "BatonQEMU", dependencies: ["BatonSystem", "BatonCore", "BatonController", "BatonLibvirt"]),
        // The handoff harness: fault matrix, load, reports, and how it and the benchmarks drive
        // and observe processes from outside (the baton executable as a child, RSS, a guest's console).
        .target(name: "BatonHarness", dependencies: ["BatonController", "BatonVMM", "BatonCore", "BatonSystem", "BatonLibvirt", "BatonQEMU"]),
        // /etc/baton/baton.toml: parsed with TOMLKit, validated key by key with line numbers.
        .target(name: "BatonConfiguration", dependencies: [.product(name: "TOMLKit", package: "TOMLKit")]),
        // Command implementations (check, bench, agent helpers); the executable only calls in.
        .target(name: "BatonCLI", dependencies: [
            "BatonSystem", "BatonCore", "BatonTransfer", "BatonAgent", "BatonController", "BatonVMM", "BatonHarness", "BatonLibvirt", "BatonQEMU", "BatonConfiguration",
            .product(name: "ArgumentParser", package: "swift-argument-parser"),
            .product(name: "Logging", package: "swift-log"),
            .product(name: "Prometheus", package: "swift-prometheus"),
            .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
            .product(name: "CoreMetrics", package: "swift-metrics"),
        ]),
        .executableTarget(name: "baton", dependencies: ["BatonCLI"]),
        .executableTarget(name: "batonvmm", dependencies: [
            "BatonVMM", "BatonCore", "BatonSystem",
            .product(name: "ArgumentParser", package: "swift-argument-parser"),
            .product(name: "Logging", package: "swift-log"),
        ], linkerSettings: [
            // Released batonvmm links the Swift runtime and Foundation statically: the image an
            // exec-in-place upgrade starts inside the guest's pause then loads no Swift shared
            // libraries (~20 of them, ~4 ms of that pause; Docs/BENCHMARKS.md). Debug builds (the
            // tests link this module) stay dynamic.
            .unsafeFlags(["-static-stdlib", "-lCoreFoundation", "-l_FoundationCollections", "-l_FoundationCShims", "-l_FoundationICU", "-lstdc++"], .when(configuration: .release)),
        ]),
        .testTarget(name: "BatonCoreTests", dependencies: ["BatonCore"]),
        .testTarget(name: "BatonControllerTests", dependencies: ["BatonController"]),
        .testTarget(name: "BatonConfigurationTests", dependencies: ["BatonConfiguration", "baton"]),
        .testTarget(name: "BatonVMMTests", dependencies: [
            "BatonVMM", "BatonController", "BatonHarness", "BatonLibvirt", "BatonSystem", "BatonCore", "batonvmm", "baton",
        ]),
        .testTarget(name: "BatonFuzzTests", dependencies: ["BatonCore", "BatonVMM"]),
        .testTarget(name: "BatonLibvirtTests", dependencies: ["BatonLibvirt", "BatonQEMU", "BatonController", "BatonSystem", "BatonHarness", "baton"]),
        .testTarget(name: "BatonSystemTests", dependencies: ["BatonSystem", "CBatonLinux"]),
        .testTarget(name: "BatonTransferTests", dependencies: [
            "BatonSystem", "BatonCore", "BatonTransfer", "BatonAgent", "BatonHarness", "BatonCLI", "baton",
        ]),
    ]
)
