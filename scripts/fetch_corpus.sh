#!/usr/bin/env bash
# Fetches the English corpus of bench/train_parity.py from Debian packages and writes it to data/corpus.txt
# (about 6.8 MB): the King James Bible (bible-kjv-text, printed by the bible program of bible-kjv) followed by the
# fortune-cookie collection (fortunes: quotations, poems, definitions). Needs apt-get and dpkg; installs nothing.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
chmod a+rwx "$work"  # apt downloads as its own user
cd "$work"
apt-get download bible-kjv bible-kjv-text fortunes >/dev/null
for deb in *.deb; do dpkg -x "$deb" tree; done
mkdir -p "$root/data"
{
  ./tree/usr/bin/bible -p tree/usr/lib "Gen1:1-Rev22:21"
  for f in tree/usr/share/games/fortunes/*; do
    case "$f" in *.dat | *.u8) ;; *) cat "$f" ;; esac
  done
} >"$root/data/corpus.txt"
ls -l "$root/data/corpus.txt"
