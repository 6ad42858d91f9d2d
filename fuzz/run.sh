#!/usr/bin/env bash
# Runs every fuzz target for SECONDS each (default 60): fuzz/run.sh 60
#
# Needs a nightly toolchain and cargo-fuzz; installs them (rustup, cargo install) only
# when missing. New inputs libFuzzer finds go to fuzz/corpus/<target> (not checked in);
# the checked-in seeds in fuzz/seeds/<target> are read, never written. A crash leaves
# its input in fuzz/artifacts/<target>/ and makes the script fail.
# Not run in CI: the same parsers have proptests on stable in the main crate.
set -euo pipefail

seconds="${1:-60}"
case "$seconds" in
    '' | *[!0-9]*) echo "usage: $0 [SECONDS per target]" >&2; exit 2 ;;
esac
cd "$(dirname "$0")"

if ! rustup run nightly rustc --version >/dev/null 2>&1; then
    echo "installing the nightly toolchain (cargo-fuzz needs -Z sanitizer flags)"
    rustup toolchain install nightly --profile minimal
fi
if ! cargo fuzz --help >/dev/null 2>&1; then
    echo "installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi

failed=()
for target in $(cargo +nightly fuzz list); do
    mkdir -p "corpus/$target"
    echo "== $target: ${seconds}s"
    if ! cargo +nightly fuzz run "$target" "corpus/$target" "seeds/$target" -- \
        -max_total_time="$seconds" -max_len=65536; then
        failed+=("$target")
    fi
done
if ((${#failed[@]})); then
    echo "crashed: ${failed[*]} (inputs in fuzz/artifacts/)" >&2
    exit 1
fi
echo "all targets ran ${seconds}s without a crash"
