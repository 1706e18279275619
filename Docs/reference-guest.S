# Baton's reference guest: 64-bit, runs at CPL 3 (IOPL 3 for `out`).
# Assembled once with `as --64 guest.S -o guest.o && objcopy -O binary -j .text guest.o guest.bin`;
# the bytes are embedded in GuestProgram.swift (a test re-assembles when `as` exists and compares).
#
# Entry registers: rbp = this vCPU's data page, r14 = its block, rdi = block word mask,
# rsi = heartbeat mask, r12 = delay spins per iteration, r15 = 0.
# Data page: +0 counter, +8 hash, +0x10 r15 spilled at each heartbeat, +0x18 heartbeats.
        .text
        .code64
        .globl _start
_start:
iteration:
        mov     %r12, %rcx              # delay: keeps the iteration rate modest, state in rcx only
spin:
        dec     %rcx
        jnz     spin
        mov     0(%rbp), %rax           # c = ++counter
        inc     %rax
        mov     %rax, 0(%rbp)
        mov     8(%rbp), %rdx           # h = hash
        imul    $0x2545F491, %rax, %rbx # j = (c * 0x2545F491) & mask
        and     %rdi, %rbx
        mov     %rdx, %rcx
        xor     %rax, %rcx
        mov     %rcx, (%r14,%rbx,8)     # block[j] = h ^ c
        lea     3(%rax,%rax,2), %rbx    # k = (3c + 3) & mask
        and     %rdi, %rbx
        xor     (%r14,%rbx,8), %rdx     # h ^= block[k]
        xor     %rax, %rdx              # h ^= c
        movabs  $0x100000001b3, %rcx
        imul    %rcx, %rdx              # h *= FNV-64 prime
        mov     %rdx, 8(%rbp)
        add     %rdx, %r15              # register-only state
        test    %rsi, %rax
        jnz     iteration
        mov     %r15, 0x10(%rbp)        # heartbeat: spill r15, count, tell the VMM
        incq    0x18(%rbp)
        out     %al, $0x10
        jmp     iteration
