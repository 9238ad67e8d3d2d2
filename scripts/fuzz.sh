#!/usr/bin/env bash
# `make fuzz`: coverage-guided fuzzing of the topic and payload parsers and the protocol state machine with cargo-fuzz (libFuzzer),
# FUZZ_SECONDS per target (default 300, so 15 minutes for the three). cargo-fuzz comes from crates.io;
# its sanitizer flags need nightly features, which RUSTC_BOOTSTRAP enables on the stable toolchain.
# The figures (executions, seconds, corpus, crashes) go into docs/reliability.md.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${FUZZ_SECONDS:-300}"
command -v cargo-fuzz >/dev/null || cargo install --locked --quiet cargo-fuzz
export RUSTC_BOOTSTRAP=1
mkdir -p fuzz/logs
summary=()
for target in topic payload packets; do
    mkdir -p "fuzz/corpus/$target"
    log="fuzz/logs/$target.log"
    status=0
    cargo fuzz run --release "$target" -- -max_total_time="$seconds" -rss_limit_mb=4096 -max_len=2000000 \
        >"$log" 2>&1 || status=$?
    runs=$(grep -oE 'Done [0-9]+ runs in [0-9]+ second' "$log" | tail -1 || true)
    corpus=$(find "fuzz/corpus/$target" -type f | wc -l)
    crashes=$(find "fuzz/artifacts/$target" -type f 2>/dev/null | wc -l)
    line="target \`$target\`: ${runs:-no summary} (exit $status), $corpus corpus inputs, $crashes crashes"
    echo "$line"
    summary+=("- $line")
    if [ "$status" -ne 0 ]; then
        tail -30 "$log"
    fi
done
block="<!-- fuzz:start -->
Last \`make fuzz\`: $(date -u '+%Y-%m-%d %H:%M UTC'), ${seconds} s per target.

$(printf '%s\n' "${summary[@]}")
<!-- fuzz:end -->"
python3 - "$block" <<'PY'
import re, sys
from pathlib import Path
doc = Path("docs/reliability.md")
text = doc.read_text()
doc.write_text(re.sub(r"<!-- fuzz:start -->.*<!-- fuzz:end -->", lambda _: sys.argv[1], text, flags=re.S))
PY
! grep -q "crashes" <(printf '%s\n' "${summary[@]}" | grep -v " 0 crashes")
