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
    local host status code attempt
    host=$(echo "$url" | cut -d/ -f3)
    status=0
    curl --silent --head --location --max-time 20 --output /dev/null "$url" || status=$?
    if [[ $status -eq 6 || $status -eq 7 || $status -eq 28 ]]; then
        echo "error: cannot reach $host (offline?); rerun later, downloads resume where they stopped" >&2
        return 1
    fi
    for attempt in 1 2 3 4 5; do
        status=0
        code=$(curl --location --continue-at - --connect-timeout 30 --write-out '%{http_code}' \
            --output "$dest" "$url") || status=$?
        # 416: the server has no bytes beyond what we hold, so the file is complete.
        if [[ $status -eq 0 && ( $code == 2* || $code == 416 ) ]] || [[ $code == 416 && -s "$dest" ]]; then
            break
        fi
        if [[ $code == 4* ]]; then
            echo "error: $url answered HTTP $code" >&2
            return 1
        fi
        if [[ $attempt -eq 5 ]]; then
            # Never fall through with a partial file: it would be marked complete.
            echo "error: download of $url failed (curl exit $status, HTTP $code); rerun to resume" >&2
            return 1
        fi
        echo "[retry $attempt] $url (curl exit $status, HTTP $code)" >&2
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

# fetch_tgz URL DEST: no checksums are published upstream, so an archive counts as complete only
# once tar (and gzip's CRC) can read it to the end; an error page or a truncated file fails here.
fetch_tgz() {
    local url=$1 dest=$2
    fetch "$url" "$dest"
    [[ -f "$dest.valid" ]] && return 0
    echo "checking $dest ..."
    if tar -tzf "$dest" >/dev/null 2>&1; then
        touch "$dest.valid"
    else
        rm -f "$dest" "$dest.done"
        echo "error: $dest is not a readable .tgz (truncated, or an error page); removed, rerun to download it again" >&2
        return 1
    fi
}

# fetch_pickle URL DEST: a pickle starts with the PROTO opcode (0x80) and ends with STOP ('.').
fetch_pickle() {
    local url=$1 dest=$2
    fetch "$url" "$dest"
    if [[ $(head -c 1 "$dest" | od -An -tx1 | tr -d ' \n') != 80 \
          || $(tail -c 1 "$dest" | od -An -tx1 | tr -d ' \n') != 2e ]]; then
        rm -f "$dest" "$dest.done"
        echo "error: $dest is not a pickle (an error page?); removed, rerun to download it again" >&2
        return 1
    fi
}

# move_files FROM TO PATTERN: archives may nest their files in folders; the evaluation wants
# one flat directory. Safe to rerun after an interruption.
move_files() {
    local from=$1 to=$2 pattern=$3
    mkdir -p "$to"
    [[ -d "$from" ]] || return 0
    find "$from" -type f -name "$pattern" -exec mv -f -t "$to" {} +
    find "$from" -depth -type d -empty -delete
}
