#!/usr/bin/env bash
# What the test suite needs from the machine, checked (and installed or started where missing) by
# `make test` and CI alike: the PostgreSQL server on 127.0.0.1:5432 the store tests run against, and
# Debian's Chromium and its driver for the browser tests. Each missing piece gets one line saying what
# was done, or what to do by hand when it cannot be done here.
set -euo pipefail

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then sudo "$@"; else
    return 1
  fi
}

if command -v pg_isready >/dev/null && ! pg_isready -h 127.0.0.1 -p 5432 -q 2>/dev/null; then
  if command -v pg_ctlcluster >/dev/null && [ -d /etc/postgresql ]; then
    echo "tests: starting the PostgreSQL server (it is installed but stopped)"
    as_root pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start ||
      echo "tests: could not start PostgreSQL; start it, or set RETRIEVER_SKIP_POSTGRES=1" >&2
  fi
fi

if [ "${RETRIEVER_SKIP_BROWSER:-0}" != 1 ] && { ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; }; then
  if command -v apt-get >/dev/null; then
    echo "tests: installing Debian's chromium and chromium-driver for the browser tests (a few minutes, once)"
    export DEBIAN_FRONTEND=noninteractive
    if ! { as_root apt-get update -qq && as_root apt-get install -y -qq chromium chromium-driver >/dev/null; }; then
      echo "tests: could not install chromium; install chromium and chromium-driver, or set RETRIEVER_SKIP_BROWSER=1" >&2
      exit 1
    fi
  else
    echo "tests: no apt-get here; install Chromium and chromedriver, or set RETRIEVER_SKIP_BROWSER=1" >&2
    exit 1
  fi
fi
