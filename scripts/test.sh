#!/bin/sh
# What CI runs (.ci/run) and the README's test command. Installs everything the
# test suite needs on a fresh Debian machine, then checks:
#   1. ruff (stopping there on a failure);
#   2. the whole suite on the compiled build (`pip install -e .` builds in place),
#      and beside it, in the background, mypy over the compiled modules (mypyc
#      needs them to type-check; its output follows the suite's);
#   3. the data plane's tests (`-m data_plane`) on the interpreted build: the
#      same sources without their extensions, copied to a temporary directory,
#      as `BALANCER_PURE=1` installs them (a compiled module once behaved
#      differently from its source).
# It stops after the first step that failed (2: the suite and mypy both end).
# Debian packages when missing (CI runs as root, others through sudo):
# redis-server, Chromium, the load-test tools, pebble (a test ACME CA, with its
# pebble-challtestsrv DNS: tests/test_acme.py), and what building the
# package needs (gcc, the Python headers, python3-venv). Python packages from
# PyPI into the active virtual environment, else ./.venv (the README's
# install), else a new ./.venv when the system Python refuses pip installs
# (PEP 668, Debian 12 / Ubuntu 24.04), else the python3 found. Extra arguments
# go to both pytest runs (e.g. `-k proxy`). Each step's heading says how many
# seconds the run had taken when it began.
set -eu
began=$(date +%s)
step() { echo "== $1 ($(( $(date +%s) - began )) s in)"; }
cd "$(dirname "$0")/.."
# nginx and haproxy live in /usr/sbin, which a normal user's PATH may lack.
PATH="$PATH:/usr/sbin:/sbin"
export PATH

is_externally_managed() {
    python3 -c 'import os, sys, sysconfig
sys.exit(sys.prefix != sys.base_prefix or not os.path.exists(
    os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED")))'
}

needs_new_venv=""
if [ -z "${VIRTUAL_ENV:-}" ] && [ ! -x .venv/bin/python ] && is_externally_managed; then
    needs_new_venv=1
fi

missing=""
for pair in redis-server:redis-server chromium:chromium chromedriver:chromium-driver \
            wrk:wrk nginx:nginx-light haproxy:haproxy gcc:gcc openssl:openssl curl:curl \
            prlimit:util-linux systemd-analyze:systemd pebble:pebble \
            pebble-challtestsrv:pebble; do
    command -v "${pair%%:*}" >/dev/null 2>&1 || missing="$missing ${pair#*:}"
done
python3 -c 'import os, sys, sysconfig
sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' \
    || missing="$missing python3-dev"
if [ -n "$needs_new_venv" ] && ! python3 -c 'import ensurepip' 2>/dev/null; then
    missing="$missing python3-venv"
fi
if [ -n "$missing" ]; then
    echo "installing Debian packages:$missing"
    SUDO=""
    [ "$(id -u)" = 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $missing
fi

if [ -n "${VIRTUAL_ENV:-}" ]; then
    python="$VIRTUAL_ENV/bin/python"
elif [ -x .venv/bin/python ]; then
    python=.venv/bin/python
elif [ -n "$needs_new_venv" ]; then
    echo "the system Python is externally managed (PEP 668): creating .venv"
    python3 -m venv .venv
    python=.venv/bin/python
else
    python=python3
fi
step "pip install, the build"
# The build's own requirements (pyproject.toml's [build-system]: setuptools, the
# pinned mypy) go into the environment first, and the package is built there:
# pip would otherwise resolve and install them again into a throwaway
# environment of its own for the build (mypy twice).
"$python" - <<'PY'
import subprocess, sys, tomllib
with open("pyproject.toml", "rb") as file:
    requires = tomllib.load(file)["build-system"]["requires"]
sys.exit(subprocess.call([sys.executable, "-m", "pip", "install", "--quiet",
                          "--disable-pip-version-check", *requires]))
PY
"$python" -m pip install --quiet --disable-pip-version-check --no-build-isolation \
    --check-build-dependencies -e '.[test,loadtest]'
case "$python" in  # a relative path would break once the data plane's run changes directory
    */*) python=$(cd "$(dirname "$python")" && pwd)/$(basename "$python") ;;
esac

# Eight test processes (pytest-xdist) even on 2 cores: the tests mostly wait on
# real sockets, subprocesses and timers (four used 1.3 of 2 cores; six took the
# compiled pass from 432 s to 379 s with another suite beside it; six used 1.67
# of 2 cores over a whole CI run, 2026-12-07). Work
# is handed out one test at a time (`loadgroup`), except groups run whole on one
# process: the tests sharing a module's fixture (one balancer, Chromium or
# pebble per module, not one per process) and the load generators
# (`xdist_group("load_generators")`, never beside each other). The longest
# groups and the tests marked `slow` go first (tests/conftest.py orders them;
# `--no-loadscope-reorder` keeps that order). The two
# passes run one after the other: the interpreted pass run beside the compiled
# one (3 processes) saved nothing (the compiled pass took 454 s instead of
# about 350, the interpreted 106 s alone) and its tests with tight deadlines
# failed under the load.
JOBS=${BALANCER_TEST_JOBS:-8}

# Bytecode for every module, written once: the suite starts thousands of Python
# processes (balancers, their tools, the pytest workers of each pass), and under
# PYTHONDONTWRITEBYTECODE (set on some CI machines) each would compile what it
# imports again (0.2 s of CPU per balancer, 6 s per pytest worker's collection).
unset PYTHONDONTWRITEBYTECODE
compile_bytecode() {
    "$python" -m compileall -q -j 0 balancer management loadtest scripts tests >/dev/null
}
compile_bytecode

step "ruff"
"$python" -m ruff check .

build() {  # exits 0 if the sources in the current directory run compiled
    "$python" -c 'from balancer import native; print(native.describe()); \
exit(0 if native.compiled() else 1)'
}
step "the whole suite, compiled (mypy beside it)"
build || { echo "scripts/test.sh: the build is not compiled (BALANCER_PURE set?)"; exit 1; }
# pytest's assertion rewriting of the test modules, written once (tests/__pycache__,
# `*-pytest-*.pyc`): on a fresh clone each of the $JOBS workers rewrote every test
# module itself, all at once (6 cold collections: 68 CPU-s; one, then 6 warm: 13 + 28).
# The interpreted pass's copy keeps these files. A collection error shows in the run.
"$python" -m pytest -q -p no:cacheprovider --collect-only >/dev/null 2>&1 || true

scratch=$(mktemp -d)
mypy=""
trap '[ -z "$mypy" ] || kill "$mypy" 2>/dev/null || true; rm -rf "$scratch"' EXIT
trap 'exit 130' INT TERM
"$python" -m mypy >"$scratch/mypy.log" 2>&1 &
mypy=$!
failed=""
"$python" -m pytest -q -n "$JOBS" --dist loadgroup --no-loadscope-reorder "$@" \
    || failed="$failed compiled"
step "mypy"
wait "$mypy" || failed="$failed mypy"
mypy=""
cat "$scratch/mypy.log"
if [ -n "$failed" ]; then
    echo "scripts/test.sh: failed:$failed"
    exit 1
fi

step "the data plane's tests, interpreted"
# The copy keeps the bytecode just written (valid: tar keeps each source's
# time), so its compileall finds nothing to do.
pure="$scratch/pure"
mkdir "$pure"
tar -cf - --exclude='*.so' balancer management loadtest scripts tests setup.py pyproject.toml \
    | tar -xf - -C "$pure"
cd "$pure"
if build; then echo "scripts/test.sh: the copy still runs compiled code"; exit 1; fi
compile_bytecode
"$python" -m pytest -q -p no:cacheprovider -n "$JOBS" --dist loadgroup --no-loadscope-reorder \
    -m data_plane "$@"
