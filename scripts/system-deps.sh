#!/usr/bin/env bash
# System packages the project uses besides PyPI: Debian's mricron-data (the Colin27 scan and the
# AAL atlas behind the built-in `colin27-lobes` dataset). Installs it when missing and possible.
set -euo pipefail
if [ -f /usr/share/mricron/templates/ch2.nii.gz ]; then exit 0; fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mricron-data >/dev/null
else
  echo "note: mricron-data is not installed; the colin27-lobes dataset will be unavailable" >&2
  echo "      (as root: apt-get install mricron-data)" >&2
fi
