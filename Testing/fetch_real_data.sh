#!/usr/bin/env bash
# Unpack the real CT shipped in two public source distributions into a folder (default .real-data),
# for the optional tests in Testing/tests/test_real_data.py:
#   bash Testing/fetch_real_data.sh && CLEAR_REAL_DATA=.real-data make test
set -euo pipefail
dest=${1:-.real-data}
mkdir -p "$dest"
cd "$dest"
fetch() {  # name version: the sdist from the package index
  local url
  url=$(curl -fsSL "https://pypi.org/simple/$1/" | grep -o "href=\"[^\"]*$1-$2.tar.gz[^\"]*\"" | head -n 1 \
        | sed 's/^href="//; s/#.*//; s/"$//')
  [ -n "$url" ] || { echo "no sdist of $1 $2 found" >&2; exit 1; }
  curl -fsSL -o "$1-$2.tar.gz" "$url"
}
[ -d pyradiomics-3.1.0/data ] || { fetch pyradiomics 3.1.0; tar xzf pyradiomics-3.1.0.tar.gz --wildcards '*/data/lung*'; }
[ -d totalsegmentator-2.18.0/tests ] || {
  fetch totalsegmentator 2.18.0
  tar xzf totalsegmentator-2.18.0.tar.gz --wildcards '*/tests/reference_files/example_ct*'
}
rm -f ./*.tar.gz
echo "real CT in $(pwd)"
