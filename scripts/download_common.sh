#!/usr/bin/env bash
# Shared download helpers, sourced by the download_*.sh scripts.
# fetch URL DEST [MD5]: resumes a partial file, retries, verifies the md5 when given,
# and skips files already complete. Returns non-zero (with a clear message) on failure.

fetch() {
    local url=$1 dest=$2 md5=${3:-}
    if [[ -f "$dest.done" && -f "$dest" ]]; then
        echo "[skip] $dest (already verified)"
        return 0
    fi
    mkdir -p "$(dirname "$dest")"
    local attempt status
    for attempt in 1 2 3 4 5; do
        # (`if curl ...; then break; fi; status=$?` would always read 0: the status of the `if`.)
        status=0
        curl --fail --location --continue-at - --retry 3 --retry-delay 5 \
            --connect-timeout 30 --output "$dest" "$url" || status=$?
        if [[ $status -eq 0 ]]; then
            break
        fi
        if [[ $status -eq 6 || $status -eq 7 ]]; then
            echo "error: cannot reach $(echo "$url" | cut -d/ -f3) (offline?); rerun later, the download resumes" >&2
            return 1
        fi
        if [[ $status -eq 22 || $status -eq 33 ]]; then
            # A complete file answers a resume request with "range not satisfiable";
            # the checksum below decides whether it is really complete.
            [[ -s "$dest" ]] && break
            echo "error: $url answered with an HTTP error" >&2
            return 1
        fi
        if [[ $attempt -eq 5 ]]; then
            # Never fall through with a partial file: it would be marked complete.
            echo "error: download of $url failed (curl exit $status); rerun to resume" >&2
            return 1
        fi
        echo "[retry $attempt] $url (curl exit $status)" >&2
        sleep $((attempt * 5))
    done
    if [[ ! -s "$dest" ]]; then
        echo "error: download of $url failed" >&2
        return 1
    fi
    if [[ -n "$md5" ]]; then
        local actual
        actual=$(md5sum "$dest" | cut -d' ' -f1)
        if [[ "$actual" != "$md5" ]]; then
            echo "error: $dest has md5 $actual, expected $md5; removed, rerun to download again" >&2
            rm -f "$dest"
            return 1
        fi
    fi
    touch "$dest.done"
}

# extract ARCHIVE DIR: unpacks a tar archive once (a marker file records completion).
extract() {
    local archive=$1 dir=$2
    local marker="$archive.extracted"
    if [[ -f "$marker" ]]; then
        echo "[skip] $archive (already extracted)"
        return 0
    fi
    mkdir -p "$dir"
    tar -xf "$archive" -C "$dir" && touch "$marker"
}
