#!/usr/bin/env bash
# System packages the project uses besides PyPI, each installed when missing and possible:
# - Debian's mricron-data: the Colin27 scan and the AAL atlas behind the built-in
#   `colin27-lobes` dataset;
# - Debian's chromium: the headless browser the serving page test drives with Playwright
#   (Playwright never downloads a browser here).
set -euo pipefail
missing=()
[ -f /usr/share/mricron/templates/ch2.nii.gz ] || missing+=(mricron-data)
[ -x /usr/bin/chromium ] || missing+=(chromium)
if [ ${#missing[@]} -eq 0 ]; then exit 0; fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive DEBCONF_NOWARNINGS=yes \
    apt-get install -y -qq "${missing[@]}" >/dev/null
else
  for package in "${missing[@]}"; do
    case "$package" in
      mricron-data) echo "note: mricron-data is not installed; the colin27-lobes dataset will be unavailable" >&2 ;;
      chromium) echo "note: chromium is not installed; the serving page test will be skipped" >&2 ;;
    esac
  done
  echo "      (as root: apt-get install ${missing[*]})" >&2
fi
