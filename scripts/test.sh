#!/bin/sh
# Install everything the test suite needs on a fresh Debian machine, then run it.
# Python packages from PyPI; redis-server, Chromium and the load-test tools from
# Debian when missing (CI runs as root). Extra arguments go to pytest.
set -eu
cd "$(dirname "$0")/.."
python3 -m pip install --quiet --disable-pip-version-check -e '.[test,loadtest]'
missing=""
for pair in redis-server:redis-server chromium:chromium chromedriver:chromium-driver \
            wrk:wrk nginx:nginx-light haproxy:haproxy; do
    command -v "${pair%%:*}" >/dev/null 2>&1 || missing="$missing ${pair#*:}"
done
if [ -n "$missing" ]; then
    echo "installing Debian packages:$missing"
    SUDO=""
    [ "$(id -u)" = 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $missing
fi
exec python3 -m pytest -q "$@"
