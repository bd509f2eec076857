#!/usr/bin/env bash
# The two set-up commands of the README:
#   ./run.sh main   install, prepare Fashion-MNIST, train, then sample from the result
#   ./run.sh test   install, then run the tests (what CI runs)
# Extra arguments after `main` go to `ddpm-eqx train` (e.g. --set training.num_train_steps=500).
set -euo pipefail
cd "$(dirname "$0")"
VENV=${VENV:-.venv}

install() {
  if [ ! -x "$VENV/bin/python" ]; then python3 -m venv "$VENV"; fi
  "$VENV/bin/pip" install -q --upgrade pip >/dev/null
  # [prepare] brings TensorFlow, which TFDS needs to prepare built-in datasets (reading does not).
  "$VENV/bin/pip" install -q -e ".[prepare,test]"
}

link_offline_archives() {
  # TFDS's manual-dir convention: archives here are used instead of downloading.
  local data_dir=${TFDS_DATA_DIR:-$HOME/tensorflow_datasets}
  local shared=../shared/data/fashion_mnist
  if [ -d "$shared" ]; then
    mkdir -p "$data_dir/downloads/manual"
    for f in "$shared"/*.gz; do ln -sf "$(realpath "$f")" "$data_dir/downloads/manual/"; done
  fi
}

case "${1:-}" in
  main)
    shift
    install
    link_offline_archives
    if "$VENV/bin/python" -c "import jax, sys; sys.exit(jax.default_backend() == 'cpu')" 2>/dev/null; then
      config=configs/fashion_mnist.py      # an accelerator: the seed's config
    else
      config=configs/fashion_mnist_cpu.py  # CPU only: about 25-40 minutes on 2 cores
    fi
    workdir=runs/fashion_mnist
    "$VENV/bin/ddpm-eqx" train --config "$config" --workdir "$workdir" "$@"
    "$VENV/bin/ddpm-eqx" sample --ckpt "$workdir" --num 64 --sampler ddim --steps 100 --out "$workdir/final_samples.png"
    ;;
  test)
    install
    "$VENV/bin/mypy"
    "$VENV/bin/python" -m pytest -q
    ;;
  *)
    echo "usage: ./run.sh main [train flags...] | ./run.sh test" >&2
    exit 2
    ;;
esac
