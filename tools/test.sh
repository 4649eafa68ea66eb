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
  command -v npm >/dev/null 2>&1 || need_apt+=(npm)
fi
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "installing Debian packages: ${need_apt[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

python3 -m pip install -q --disable-pip-version-check -e '.[test,bench]'

if [ "${UPLOADKIT_NO_BROWSER:-0}" != "1" ]; then
  # The tus browser clients the browser tests drive (tus-js-client, Uppy), as
  # pinned by tests/js/package-lock.json; Uppy is bundled for a plain <script>.
  if ! cmp -s tests/js/package-lock.json tests/js/node_modules/.uploadkit-lock; then
    echo "installing the browser tests' npm packages"
    npm ci --prefix tests/js --no-audit --no-fund --loglevel=error
    cp tests/js/package-lock.json tests/js/node_modules/.uploadkit-lock
  fi
  npm run --silent --prefix tests/js build
fi

exec python3 -m pytest -p no:cacheprovider "$@"
