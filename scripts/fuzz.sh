#!/usr/bin/env bash
# Run every fuzz target (or the ones named) for a bounded time each:
#   scripts/fuzz.sh [SECONDS] [TARGET...]      # default 60 s each
#
# Targets live in two cargo-fuzz crates, fuzz/ (protocol, options, parsers
# of client bytes) and crates/seekable/fuzz/ (compressed formats, whole
# images).  Each run starts from the checked-in corpus, so an input that
# once crashed a target (and was added to its corpus with the fix) is
# replayed first: a regression fails the run.
#
# Where new inputs go:
#   by default          into the corpus folders in the repository, for a
#                       developer to minimise (cargo fuzz cmin) and commit;
#   FUZZ_SCRATCH=1      into a temporary folder that is removed afterwards:
#                       the checked-in corpus is only read (what CI does, so
#                       a CI run leaves its clone as it was).
# Crash inputs land in */fuzz/artifacts/TARGET/ either way (ignored by git);
# the failing target's log is printed.
#
# Limits on every input: -rss_limit_mb (the whole-image targets decode
# with a 1 MiB cache and a bounded scratch tier, so using more means
# memory is not bounded as configured) and -timeout (a hang is a failure).
# The exit status is non-zero when any target crashed, leaked, hung, went
# over the memory limit or failed to build.
#
# cargo-fuzz needs nightly-only compiler flags; RUSTC_BOOTSTRAP lets the
# stable toolchain here accept them.  cargo-fuzz itself is installed from
# crates.io at a pinned version when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-60}
shift || true
CARGO_FUZZ_VERSION=0.13.2
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --version "$CARGO_FUZZ_VERSION" --locked
export RUSTC_BOOTSTRAP=1

scratch=""
if [ "${FUZZ_SCRATCH:-0}" = 1 ]; then
    scratch=$(mktemp -d "${TMPDIR:-/tmp}/nbdkit-rs-fuzz.XXXXXX")
fi
logs=$(mktemp -d "${TMPDIR:-/tmp}/nbdkit-rs-fuzz-logs.XXXXXX")
trap 'rm -rf "$logs" ${scratch:+"$scratch"}' EXIT

# One target directory for both crates: they share most dependencies
# (libFuzzer itself, zstd, liblzma, zlib-rs, the seekable crate), which
# are then built once.
target_dir="$PWD/target/fuzz"

status=0
start=$SECONDS
for dir in fuzz crates/seekable/fuzz; do
    [ -f "$dir/Cargo.toml" ] || continue
    mapfile -t known < <(cd "$dir" && cargo fuzz list)
    targets=("$@")
    [ ${#targets[@]} -gt 0 ] || targets=("${known[@]}")
    # Build every target of the crate in one cargo run (in parallel, and
    # once) rather than one by one under `cargo fuzz run`.
    wanted=()
    for t in "${targets[@]}"; do
        # Targets named on the command line may belong to the other crate.
        for k in "${known[@]}"; do
            if [ "$k" = "$t" ]; then wanted+=("$t"); fi
        done
    done
    [ ${#wanted[@]} -gt 0 ] || continue
    echo "== $dir: building ${#wanted[@]} target(s)"
    if ! (cd "$dir" && cargo fuzz build -O --target-dir "$target_dir") >"$logs/build.log" 2>&1; then
        tail -n 40 "$logs/build.log"
        echo "!! $dir: the fuzz targets did not build"
        status=1
        continue
    fi
    echo "   built in $((SECONDS - start))s"
    for t in "${wanted[@]}"; do
        mkdir -p "$dir/corpus/$t"
        # libFuzzer writes new inputs to the first corpus folder and only
        # reads the others.
        corpora=("corpus/$t")
        if [ -n "$scratch" ]; then
            mkdir -p "$scratch/$t"
            corpora=("$scratch/$t" "corpus/$t")
        fi
        log="$logs/$t.log"
        t0=$SECONDS
        if (cd "$dir" && cargo fuzz run -O --target-dir "$target_dir" "$t" "${corpora[@]}" -- \
            -max_total_time="$secs" -rss_limit_mb=2048 -timeout=60) >"$log" 2>&1; then
            echo "ok $dir: $t ($((SECONDS - t0))s): $(grep -E '^(#[0-9]+|Done)' "$log" | tail -n 1)"
        else
            tail -n 60 "$log"
            echo "!! $dir: $t failed (crash input in $dir/artifacts/$t/)"
            status=1
        fi
    done
done
echo "== fuzzing took $((SECONDS - start))s"
exit $status
