#!/usr/bin/env bash
# Installs everything the test suite needs on a fresh Debian machine, then runs it.
# Usage: bash tools/test.sh [pytest arguments]
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v memcached >/dev/null 2>&1 || need_apt+=(memcached)
command -v curl >/dev/null 2>&1 || need_apt+=(curl)
command -v node >/dev/null 2>&1 || need_apt+=(nodejs)
if [ "${UPLOADKIT_NO_BROWSER:-0}" != "1" ]; then
  command -v chromium >/dev/null 2>&1 || need_apt+=(chromium)
  command -v chromedriver >/dev/null 2>&1 || need_apt+=(chromium-driver)
fi
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "installing Debian packages: ${need_apt[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

python3 -m pip install -q --disable-pip-version-check -e '.[test,bench]'

exec python3 -m pytest -p no:cacheprovider "$@"
