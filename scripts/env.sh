# Sourced by the project's scripts: use the mold linker when the machine has it
# (links of the many test binaries dominate incremental builds on 2 cores).
if command -v mold >/dev/null 2>&1 && command -v clang >/dev/null 2>&1; then
    export CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_LINKER=clang
    export CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS="-C link-arg=-fuse-ld=mold"
fi
