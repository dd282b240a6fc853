#!/usr/bin/env sh
# Make sure Debian's Chromium is present for the viewer's browser test (tests/test_viewer_browser.py).
# Playwright's own browser download is not used: it needs a CDN this project cannot rely on, while
# Debian's `chromium` package comes from the ordinary apt mirrors. Idempotent: a no-op when installed.
# Never fails the build: where Chromium cannot be installed it says why and the browser test skips.
CHROMIUM="${CHROMIUM:-/usr/bin/chromium}"
if [ -x "$CHROMIUM" ]; then
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "ensure_chromium: $CHROMIUM missing and no apt-get here; install Chromium yourself to run the browser test"
    exit 0
fi
if [ "$(id -u)" = "0" ]; then
    SUDO=""
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO="sudo -n"
else
    echo "ensure_chromium: $CHROMIUM missing; not root and no passwordless sudo, so the browser test will skip" \
         "(run: sudo apt-get install -y chromium)"
    exit 0
fi
echo "ensure_chromium: installing Debian's chromium for the browser test (apt-get install -y chromium)"
export DEBIAN_FRONTEND=noninteractive
if ! $SUDO apt-get install -y --no-install-recommends chromium >/dev/null 2>&1; then
    $SUDO apt-get update -qq >/dev/null 2>&1
    $SUDO apt-get install -y --no-install-recommends chromium >/dev/null 2>&1 \
        || echo "ensure_chromium: apt-get install chromium failed; the browser test will skip"
fi
[ -x "$CHROMIUM" ] && echo "ensure_chromium: $CHROMIUM installed"
exit 0
