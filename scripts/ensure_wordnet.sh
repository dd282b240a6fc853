#!/usr/bin/env sh
# Make sure WordNet 3.0's database is present for the monosemanticity concepts (features/labeling/semantics.py
# reads /usr/share/wordnet/{index,data}.{noun,verb,adj,adv}; without them a "bird" feature has no "bird"
# concept). Debian's `wordnet-base` package holds exactly those files and comes from the ordinary apt mirrors.
# Idempotent: a no-op when the database is installed. Unlike the Chromium script this one fails (exit 1) when
# it cannot install the data, because `make run` and `make test` rely on it.
DATA="${WORDNET_DATA:-/usr/share/wordnet/data.noun}"
if [ -f "$DATA" ]; then
    exit 0
fi
fail() {
    echo "ensure_wordnet: $1" >&2
    echo "ensure_wordnet: WordNet's database is missing ($DATA); install Debian's wordnet-base" \
         "(apt-get install wordnet-base) or put WordNet 3.0's dict files in /usr/share/wordnet" >&2
    exit 1
}
command -v apt-get >/dev/null 2>&1 || fail "no apt-get on this machine"
if [ "$(id -u)" = "0" ]; then
    SUDO=""
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO="sudo -n"
else
    fail "not root and no passwordless sudo"
fi
echo "ensure_wordnet: installing Debian's wordnet-base (apt-get update; apt-get install -y wordnet-base)"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq >/dev/null 2>&1 || fail "apt-get update failed (no network or no apt mirror?)"
$SUDO apt-get install -y -qq --no-install-recommends wordnet-base >/dev/null 2>&1 \
    || fail "apt-get install wordnet-base failed"
[ -f "$DATA" ] || fail "wordnet-base installed but $DATA is still missing"
echo "ensure_wordnet: WordNet installed in $(dirname "$DATA")"
