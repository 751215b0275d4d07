#!/usr/bin/env bash
# Run every fuzz target for a bounded time (default 60 s each):
#   scripts/fuzz.sh [SECONDS] [TARGET...]
# cargo-fuzz needs nightly-only compiler flags; RUSTC_BOOTSTRAP lets the
# stable toolchain here accept them.  Corpora live in the repository and
# grow as the fuzzer finds new inputs; crashes land in */fuzz/artifacts/.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-60}
shift || true
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
export RUSTC_BOOTSTRAP=1
status=0
for dir in fuzz crates/seekable/fuzz; do
    [ -f "$dir/Cargo.toml" ] || continue
    mapfile -t known < <(cd "$dir" && cargo fuzz list)
    targets=("$@")
    [ ${#targets[@]} -gt 0 ] || targets=("${known[@]}")
    for t in "${targets[@]}"; do
        # Targets named on the command line may belong to the other crate.
        printf '%s\n' "${known[@]}" | grep -x -- "$t" >/dev/null || continue
        mkdir -p "$dir/corpus/$t"
        echo "== $dir: $t for ${secs}s"
        if ! (cd "$dir" && cargo fuzz run -O "$t" "corpus/$t" -- -max_total_time="$secs" -rss_limit_mb=2048 2>&1 | tail -n 3); then
            echo "!! $t found a crash (see $dir/artifacts/$t)"
            status=1
        fi
    done
done
exit $status
