#!/usr/bin/env bash
# Installs Debian's dataset-fashion-mnist (full Fashion-MNIST, no download at run time) when it is
# missing and we can: as root with apt-get. Otherwise says how, and leaves the decision to the user.
set -u
DIR=/usr/share/datasets/fashion-mnist
if [ -f "$DIR/train-images-idx3-ubyte.gz" ]; then
  exit 0
fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing dataset-fashion-mnist (Debian package) ..."
  if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1; then
    apt-get update -q >/dev/null 2>&1
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q dataset-fashion-mnist >/dev/null
  fi
  [ -f "$DIR/train-images-idx3-ubyte.gz" ] && exit 0
fi
cat >&2 <<MSG
sslrun: Fashion-MNIST (the default data set) is not installed at $DIR.
        Install it with:  sudo apt-get install dataset-fashion-mnist
        or train on the pip-only fallback:  make train ARGS="data=mnist5k"
MSG
exit 0
