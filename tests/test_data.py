"""Data pipeline: preparation, determinism and resume, image fitting, imports, errors."""

import dataclasses
import re
import json
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grain
import jaxtyping
import numpy as np
import pytest
import tensorflow_datasets as tfds
from _archives import read_idx
from PIL import Image, ImageOps

from ddpm_eqx.config import DataConfig
from ddpm_eqx.data import (
    DataError, fit_image, load_split_array, make_train_iterator, prepare_dataset, reads_from_memory, subset_ids,
    to_model_images,
)

N_SMALL = 64  # examples of the small synthetic dataset; 4 batches of 16 per epoch


@pytest.fixture(scope="module")
def small_npz(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """(npz path, data dir): example i is a 4x4 grey image of value 2i whose first column is 255.

    Its value names it whatever the flip; a flip moves the 255 column to the right.
    """
    root = tmp_path_factory.mktemp("small")
    images = np.repeat(2 * np.arange(N_SMALL, dtype=np.uint8), 16).reshape(N_SMALL, 4, 4, 1)
    images[:, :, 0] = 255
    np.savez(root / "small.npz", image=images, label=np.arange(N_SMALL) % 4)
    return str(root / "small.npz"), str(root / "tfds")


def small_cfg(small_npz: tuple[str, str], **kw: object) -> DataConfig:
    """Read from disk unless ``cache`` is given (None: the default, decided by the run's length)."""
    path, data_dir = small_npz
    kw = {"dataset": path, "data_dir": data_dir, "batch_size": 16, "image_size": 4, "cache": False, **kw}
    return DataConfig(**kw)  # type: ignore[arg-type]


def to_uint8(images: np.ndarray) -> np.ndarray:
    return np.rint((images + 1.0) * 127.5).astype(np.uint8)


def ids_and_flips(batch: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    x = to_uint8(batch["image"][:, 0])  # [b, h, w]
    return x[:, 0, 1] // 2, x[:, 0, -1] == 255


def take(it: grain.DatasetIterator, n: int) -> list[dict[str, np.ndarray]]:
    return [next(it) for _ in range(n)]


_open_iterators: list[grain.DatasetIterator] = []


def iterator(cfg: DataConfig, **kw: Any) -> grain.DatasetIterator:
    """``make_train_iterator``, closed after the test (prefetch threads and workers stop at once)."""
    _open_iterators.append(make_train_iterator(cfg, **kw))
    return _open_iterators[-1]


@pytest.fixture(autouse=True)
def _close_iterators() -> Iterator[None]:
    yield
    while _open_iterators:
        _open_iterators.pop().close()


# --- the real fashion_mnist ----------------------------------------------------------------------


def test_fashion_mnist_offline(fashion_mnist_data_dir: str, shared_file: Callable[..., Path]) -> None:
    cfg = DataConfig(dataset="fashion_mnist", data_dir=fashion_mnist_data_dir)
    info = prepare_dataset(cfg, download=False)
    assert info.splits == {"train": 60_000, "test": 10_000}
    assert (info.image_shape, info.num_classes, info.label_key) == ((28, 28, 1), 10, "label")
    labels = tfds.data_source(
        "fashion_mnist", split="train", data_dir=fashion_mnist_data_dir, decoders={"image": tfds.decode.SkipDecoding()}
    )
    counts = np.bincount([r["label"] for r in labels.__getitems__(list(range(60_000)))])
    assert counts.tolist() == [6000] * 10
    images, _ = load_split_array(cfg, "train", max_examples=6000)
    assert images.shape == (6000, 28, 28, 1) and images.dtype == np.uint8
    assert abs(images.mean() / 255 - 72.94 / 255) < 0.01

    # The images we decode ourselves (Pillow on the stored PNG bytes) are the official archive's, bit for bit:
    # the same multiset of (image, label) pairs (TFDS stores the examples in its own order).
    images, labels = load_split_array(cfg, "test")
    official = read_idx(shared_file("fashion_mnist", "t10k-images-idx3-ubyte.gz")).reshape(10_000, -1)
    official_labels = read_idx(shared_file("fashion_mnist", "t10k-labels-idx1-ubyte.gz"))
    ours = sorted(x.tobytes() + bytes([y]) for x, y in zip(images.reshape(10_000, -1), labels))
    assert ours == sorted(x.tobytes() + bytes([y]) for x, y in zip(official, official_labels))

    batch = next(iterator(dataclasses.replace(cfg, batch_size=32, cache=False), seed=0))
    assert batch["image"].shape == (32, 1, 28, 28) and batch["image"].dtype == np.float32
    assert batch["label"].dtype == np.int32 and -1.0 <= batch["image"].min() < batch["image"].max() <= 1.0


# --- determinism and resume ----------------------------------------------------------------------


@pytest.mark.parametrize("cache", [False, True])
def test_epochs_seeds_and_resume(small_npz: tuple[str, str], cache: bool) -> None:
    cfg = small_cfg(small_npz, cache=cache)
    batches = take(iterator(cfg, seed=1), 8)
    epoch1, epoch2 = (np.concatenate([ids_and_flips(b)[0] for b in batches[i : i + 4]]) for i in (0, 4))
    assert sorted(epoch1) == sorted(epoch2) == list(range(N_SMALL))  # each epoch sees every example once
    assert not np.array_equal(epoch1, epoch2)  # ... in a new order
    assert all(np.array_equal(b["label"], ids_and_flips(b)[0] % 4) for b in batches)

    again = take(iterator(cfg, seed=1), 8)
    assert all(np.array_equal(a["image"], b["image"]) for a, b in zip(batches, again))
    other = np.concatenate([ids_and_flips(b)[0] for b in take(iterator(cfg, seed=2), 4)])
    assert not np.array_equal(other, epoch1)

    other_mode = take(iterator(dataclasses.replace(cfg, cache=not cache), seed=1), 8)
    assert all(np.array_equal(a["image"], b["image"]) for a, b in zip(batches, other_mode))  # cache: same data

    it = iterator(cfg, seed=1)
    take(it, 3)
    state = json.dumps(it.get_state())  # a checkpoint stores it as JSON
    expected = take(it, 5)
    resumed = iterator(cfg, seed=1)
    resumed.set_state(json.loads(state))
    for a, b in zip(expected, take(resumed, 5)):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])


def test_batches_take_grains_shuffled_order() -> None:
    """Batch ids are computed per batch (for speed) but must stay in the order of grain's shuffle/repeat/batch,
    which earlier versions used: their checkpoints' data state (the next batch number) resumes into it."""
    from ddpm_eqx.data import _ShuffledIds

    # (start, stride, shard length, seed, batch): a process's strided shard; a seed whose epochs wrap past
    # 2**32; batches larger than an epoch; a shard large enough for the vectorised permutation (2**14 or
    # more), with a batch across an epoch's end.
    for start, stride, length, seed, size in [(0, 1, 64, 7, 16), (1, 3, 37, 2**32 - 2, 10), (0, 1, 5, 3, 12),
                                              (2, 3, 20_000, 2**32 - 1, 3_000)]:
        reference = grain.MapDataset.range(start, start + stride * length, stride).shuffle(seed).repeat()
        reference = reference.batch(size, drop_remainder=True)
        order = _ShuffledIds(start, stride, length, seed, size)
        for batch in (0, 1, 2, 3, 4, 7, 1000):
            np.testing.assert_array_equal(order(batch), np.asarray(reference[batch]), err_msg=f"{length=} {batch=}")


@pytest.mark.parametrize("max_index", [0, 1, 2, 5, 255, 256, 257, 16_383, 16_384, 59_999, 65_535, 65_537, 131_072,
                                       1_000_003, 2**32 - 1, 2**40 + 5, 2**61 + 9])
def test_the_vectorised_permutation_is_grains_index_for_index(max_index: int) -> None:
    """``_index_shuffle`` reimplements grain's C++ ``index_shuffle`` (Simon cipher, ``std::seed_seq`` keys,
    cycle walking) over arrays; block sizes from 16 bits to 64 (131,072 = 2**17: grain's one-bit-short block
    rounded up to 18 bits, still wide enough), and seeds at both ends of 32 bits."""
    from grain.experimental import index_shuffle

    from ddpm_eqx.data import _grains_block_bits, _index_shuffle, _vectorised_index_shuffle, _vectorised_is_grains

    assert _vectorised_is_grains()  # so _index_shuffle takes the vectorised path (above 2**14)
    ids = (np.arange(max_index + 1) if max_index < 70_000
           else np.random.default_rng(max_index % 2**32).integers(0, max_index, 2000, endpoint=True))
    for seed in (0, 1, 12_345, 2**32 - 1):
        expected = [index_shuffle(int(i), max_index=max_index, seed=seed, rounds=4) for i in ids]
        np.testing.assert_array_equal(_index_shuffle(ids, max_index=max_index, seed=seed), expected,
                                      err_msg=f"{seed=}")
        if max_index >= 2**14:  # the copy itself, not whatever _index_shuffle would fall back to
            copy = _vectorised_index_shuffle(ids, max_index, seed, 4, block=_grains_block_bits(max_index))
            np.testing.assert_array_equal(copy, expected, err_msg=f"{seed=}")


@pytest.mark.parametrize("length", [65_537, 262_145])
def test_every_shard_length_is_permuted_where_grains_block_is_one_bit_short(length: int) -> None:
    """Grain 0.2.18 sizes its block by ceil(log2(max_index)): for max_index = 2**16, 2**18, ... that block
    cannot hold max_index, and its function maps the shard into one value fewer (an example twice an epoch,
    one never). Those lengths get a block wide enough: every epoch is a permutation of the shard (each example
    once), other lengths keep grain's order (above)."""
    from grain.experimental import index_shuffle

    from ddpm_eqx.data import _ShuffledIds

    max_index = length - 1
    grains = {index_shuffle(i, max_index=max_index, seed=5, rounds=4) for i in range(0, length, 7)}
    assert max(grains) < max_index  # what is mended: grain never reaches the last example

    order = _ShuffledIds(start=3, stride=2, length=length, seed=2**32 - 1, size=4096)
    epoch = np.concatenate([order(b) for b in range(2 * length // 4096 + 1)])
    for e in range(2):  # both epochs (their seeds wrap past 2**32), and the batch across their boundary
        np.testing.assert_array_equal(np.sort(epoch[e * length:(e + 1) * length]), 3 + 2 * np.arange(length))
    assert not np.array_equal(epoch[:length], epoch[length:2 * length])


def test_a_grain_whose_index_shuffle_changed_shuffles_with_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    """The vectorised copy is checked against the installed grain once per process: where grain's algorithm
    is no longer the one copied, every index comes from grain's function (with a warning), so an epoch never
    mixes two permutations."""
    from grain.experimental import index_shuffle

    from ddpm_eqx import data

    def changed(i: int, *, max_index: int, seed: int, rounds: int) -> int:  # another permutation
        return index_shuffle(i, max_index=max_index, seed=seed + 1, rounds=rounds)

    monkeypatch.setattr(data, "index_shuffle", changed)
    data._vectorised_is_grains.cache_clear()
    try:
        ids = np.arange(0, 100_000, 7)
        with pytest.warns(UserWarning, match="not the one ddpm_eqx.data vectorises"):
            shuffled = data._index_shuffle(ids, max_index=99_999, seed=3)
        np.testing.assert_array_equal(shuffled, [changed(int(i), max_index=99_999, seed=3, rounds=4) for i in ids])
    finally:
        data._vectorised_is_grains.cache_clear()


def test_the_split_is_cached_by_default_when_the_run_reads_all_of_it(small_npz: tuple[str, str],
                                                                     info_logged: list[str]) -> None:
    """``data.cache=None``: decoded into memory for a run of at least one epoch (or an endless iterator), read
    from disk for a shorter one; the same batches either way. ``reads_from_memory`` tells the run which (its
    input-bound warning depends on it)."""
    iterators = {examples: iterator(small_cfg(small_npz, cache=None), seed=1, examples=examples)
                 for examples in (N_SMALL - 1, N_SMALL, None)}
    runs = {examples: take(it, 5) for examples, it in iterators.items()}
    assert [reads_from_memory(it) for it in iterators.values()] == [False, True, True]
    forced = {cache: iterator(small_cfg(small_npz, cache=cache), seed=1, examples=1) for cache in (True, False)}
    assert reads_from_memory(forced[True]) and not reads_from_memory(forced[False])
    take(forced[False], 1)  # explicit: nothing to say
    records = info_logged
    assert len(records) == 3
    assert "read from disk" in records[0] and "reads it 0.984x" in records[0]
    assert "decoded once into memory" in records[1] and "reads it 1x" in records[1]
    assert "decoded once into memory" in records[2] and "reads it endlessly" in records[2]
    for batches in (runs[N_SMALL], runs[None]):
        for a, b in zip(runs[N_SMALL - 1], batches):
            np.testing.assert_array_equal(a["image"], b["image"])


def test_reference_images_from_a_decoded_train_split_are_the_subset_decoded_alone(small_npz: tuple[str, str]) -> None:
    """``ddpm-eqx eval`` takes the metric's reference subset from the train split it has just decoded to train
    its classifier, instead of decoding that subset again; ``--reference all`` takes the whole split."""
    from ddpm_eqx import evaluate
    from ddpm_eqx.config import Config

    cfg = Config(data=small_cfg(small_npz))
    train, _ = load_split_array(cfg.data, "train")
    alone = evaluate.reference_images(cfg, reference=10)
    assert alone.shape == (10, 1, 4, 4)
    np.testing.assert_array_equal(alone, to_model_images(train[subset_ids(len(train), 10)]))
    np.testing.assert_array_equal(evaluate.reference_images(cfg, train, reference=10), alone)
    whole = to_model_images(train)  # every image, in the split's order
    assert whole.shape[0] > 10
    np.testing.assert_array_equal(evaluate.reference_images(cfg, reference=None), whole)
    np.testing.assert_array_equal(evaluate.reference_images(cfg, train, reference=None), whole)
    np.testing.assert_array_equal(evaluate.reference_images(cfg, reference=len(train) + 5), whole)  # no more than it has


def test_resume_with_worker_process(small_npz: tuple[str, str]) -> None:
    cfg = small_cfg(small_npz, num_workers=1)
    it = iterator(cfg, seed=3)
    take(it, 2)
    state = json.dumps(it.get_state())
    expected = take(it, 3)
    resumed = iterator(cfg, seed=3)
    resumed.set_state(json.loads(state))
    got = take(resumed, 3)
    reference = take(iterator(small_cfg(small_npz), seed=3), 5)[2:]  # no workers: same batches
    for a, b, c in zip(expected, got, reference):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["image"], c["image"])


_WORKERS_THEN_EXIT = """
import sys
from ddpm_eqx.config import DataConfig
from ddpm_eqx.data import load_split_array, make_train_iterator

if __name__ == "__main__":
    cfg = DataConfig(dataset=sys.argv[1], data_dir=sys.argv[2], batch_size=16, image_size=4, cache=False,
                     num_workers=2)
    closed = make_train_iterator(cfg, seed=1)
    next(closed)
    closed.close()  # closed, but still referenced at exit
    it = make_train_iterator(cfg, seed=0)  # a run's iterator: its workers have buffered batches by exit
    kept = [next(it) for _ in range(3)]  # and a script keeps what it took (printed a traceback per array)
    images, _ = load_split_array(cfg, "train")  # then a one-off decode on workers, just before the exit
    print(len(images), sum(len(batch["image"]) for batch in kept))
"""


def test_worker_batches_leave_no_shared_memory_at_exit(small_npz: tuple[str, str], tmp_path: Path) -> None:
    """Grain's workers send batches in shared memory: a process that ends right after them unlinks it itself
    (otherwise Python's resource tracker does, warning of "leaked shared_memory objects"), and its iterators,
    closed or not, and the batches a script keeps, end quietly."""
    script = tmp_path / "workers.py"  # a file: the workers start with spawn, which re-imports __main__
    script.write_text(_WORKERS_THEN_EXIT)
    done = subprocess.run([sys.executable, str(script), *small_npz], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-2:] == [str(N_SMALL), "48"]
    assert "leaked shared_memory" not in done.stderr, done.stderr[-2000:]
    # Grain's nested worker iterators closed at teardown, when their modules are gone, printed tracebacks.
    assert "Exception ignored" not in done.stderr, done.stderr[-2000:]


def test_a_resume_may_change_workers_and_cache(small_npz: tuple[str, str]) -> None:
    """The state is the next batch's number: another reader (workers, the decoded split) continues exactly, and
    a state grain's prefetch thread wrote (ddpm-eqx before 0.2) still resumes."""
    it = iterator(small_cfg(small_npz), seed=4)
    take(it, 3)
    state = json.loads(json.dumps(it.get_state()))
    assert state == {"batch": 3}
    expected = take(it, 4)
    for changed in ({"num_workers": 1}, {"cache": True}):
        resumed = iterator(small_cfg(small_npz, **changed), seed=4)
        take(resumed, 1)  # already running: set_state moves it
        resumed.set_state(state)
        for a, b in zip(expected, take(resumed, 4), strict=True):
            np.testing.assert_array_equal(a["image"], b["image"])
        assert resumed.get_state() == {"batch": 7}
    legacy = iterator(small_cfg(small_npz), seed=4)
    legacy.set_state({"next_index": 3})
    assert np.array_equal(take(legacy, 1)[0]["image"], expected[0]["image"]) and legacy.get_state() == {"batch": 4}
    old = iterator(small_cfg(small_npz, num_workers=1), seed=4)
    take(old, 3)
    worker_state = json.loads(json.dumps(old._iterator.get_state()))  # what a worker iterator stored before 0.2
    for reader in ({"num_workers": 1}, {"num_workers": 0}):  # grain's own set_state would fail on the other kind
        legacy = iterator(small_cfg(small_npz, **reader), seed=4)
        legacy.set_state(worker_state)
        assert np.array_equal(take(legacy, 1)[0]["image"], expected[0]["image"]) and legacy.get_state() == {"batch": 4}
    with pytest.raises(DataError, match="unknown keys"):
        legacy.set_state({"position": 3})
    legacy.release()  # as at exit: the iteration ends, and closing or moving it again still works
    assert next(legacy, None) is None
    legacy.close()
    legacy.set_state({"batch": 3})
    assert np.array_equal(take(legacy, 1)[0]["image"], expected[0]["image"])


def test_process_shards(small_npz: tuple[str, str]) -> None:
    cfg = small_cfg(small_npz)
    seen = []
    for index in (0, 1):
        batches = take(iterator(cfg, seed=0, process_index=index, process_count=2), 4)
        assert batches[0]["image"].shape == (8, 1, 4, 4)  # the global batch is split over processes
        seen.append(set(np.concatenate([ids_and_flips(b)[0] for b in batches]).tolist()))
    assert seen[0].isdisjoint(seen[1]) and seen[0] | seen[1] == set(range(N_SMALL))
    # 64 examples over 3 processes: shards of 22, 21, 21 (the last example was left out of every epoch).
    three = dataclasses.replace(cfg, batch_size=15)
    shards = [set(np.concatenate([ids_and_flips(b)[0] for b in take(iterator(three, seed=0, process_index=index,
                                                                             process_count=3), 5)]).tolist())
              for index in range(3)]
    assert [len(s) for s in shards] == [22, 21, 21] and set().union(*shards) == set(range(N_SMALL))
    with pytest.raises(DataError, match="divisible"):
        make_train_iterator(dataclasses.replace(cfg, batch_size=15), seed=0, process_index=0, process_count=2)


# --- fitting images ------------------------------------------------------------------------------


def test_centre_crop_and_channels() -> None:
    image = np.arange(24, dtype=np.uint8).reshape(4, 6, 1)
    np.testing.assert_array_equal(fit_image(image, image_size=4, channels=1), image[:, 1:5])
    rgb = fit_image(image, image_size=4, channels=3)
    assert rgb.shape == (4, 4, 3) and all(np.array_equal(rgb[..., c], image[:, 1:5, 0]) for c in range(3))
    colours = np.array([[[255, 0, 0], [0, 255, 0]], [[0, 0, 255], [10, 200, 30]]], np.uint8)
    grey = fit_image(colours, image_size=2, channels=1)[..., 0]
    np.testing.assert_allclose(grey, colours @ np.array([0.299, 0.587, 0.114]), atol=0.5)  # ITU-R 601 luma
    assert fit_image(np.zeros((5, 3), np.uint8), image_size=3, channels=1).shape == (3, 3, 1)


def test_shape_checks_are_on() -> None:
    with pytest.raises(jaxtyping.TypeCheckError):  # conftest's import hook: float images are refused
        fit_image(np.zeros((4, 4, 3), np.float32), image_size=4, channels=3)


def test_resize_is_antialiased() -> None:
    checker = (np.indices((64, 64)).sum(0) % 2 * 255).astype(np.uint8)[..., None]
    small = fit_image(checker, image_size=16, channels=1)
    assert small.shape == (16, 16, 1) and np.abs(small.astype(int) - 127).max() <= 16  # no aliasing
    flat = np.full((40, 30, 3), 77, np.uint8)
    assert (fit_image(flat, image_size=8, channels=3) == 77).all()
    assert (fit_image(flat, image_size=64, channels=3) == 77).all()


def test_random_flip(small_npz: tuple[str, str]) -> None:
    batches = take(iterator(small_cfg(small_npz, batch_size=64), seed=5), 8)
    flips = np.concatenate([ids_and_flips(b)[1] for b in batches])
    assert 0.4 < flips.mean() < 0.6 and 0 < flips[:64].sum() < 64  # per example, about half
    x = to_uint8(batches[0]["image"][:, 0])
    _, flipped = ids_and_flips(batches[0])
    assert (x[flipped][:, :, -1] == 255).all() and (x[~flipped][:, :, 0] == 255).all()  # columns reversed
    # the same example is flipped differently in different epochs
    firsts = [dict(zip(*ids_and_flips(b))) for b in batches[:2]]
    assert any(firsts[0][k] != firsts[1][k] for k in firsts[0])
    unflipped = take(iterator(small_cfg(small_npz, random_flip=False), seed=5), 4)
    assert not any(ids_and_flips(b)[1].any() for b in unflipped)


# --- imports -------------------------------------------------------------------------------------


def test_image_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "images"
    rng = np.random.default_rng(0)
    for cls, value in (("cats", 40), ("dogs", 200)):
        (folder / cls / "sub").mkdir(parents=True)
        for i in range(12):
            pixels = np.clip(rng.normal(value, 3, (10, 14, 3)), 0, 255).astype(np.uint8)
            name = folder / cls / ("sub" if i % 3 == 0 else "") / f"{i}.{'png' if i % 2 else 'jpg'}"
            Image.fromarray(pixels).save(name)
    (folder / "cats" / "broken.png").write_bytes(b"not an image at all")
    listing = sorted((p, p.stat().st_mtime_ns) for p in folder.rglob("*"))
    cfg = DataConfig(dataset=str(folder), data_dir=str(tmp_path / "tfds"), image_size=8, channels=3)

    with pytest.warns(UserWarning, match="skipped 1 unreadable"):
        info = prepare_dataset(cfg)
    assert info.splits == {"train": 24} and info.num_classes == 2
    images, labels = load_split_array(cfg, "train")
    assert images.shape == (24, 8, 8, 3) and np.bincount(labels).tolist() == [12, 12]
    assert abs(images[labels == 0].mean() - 40) < 5 and abs(images[labels == 1].mean() - 200) < 5
    assert "Importing" in capsys.readouterr().out
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # imported once: no second conversion, the warning repeated for this run
        batch = next(iterator(dataclasses.replace(cfg, batch_size=8), seed=0))
    assert batch["image"].shape == (8, 3, 8, 8) and "Importing" not in capsys.readouterr().out
    assert {str(w.message) for w in caught} == {f"skipped 1 unreadable file(s) of {folder}, e.g. "
                                                f"{folder / 'cats' / 'broken.png'}"}
    assert sorted((p, p.stat().st_mtime_ns) for p in folder.rglob("*")) == listing  # the folder is untouched

    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images"):
        prepare_dataset(dataclasses.replace(cfg, dataset=str(tmp_path / "empty")))


def test_16_bit_grey_images_are_scaled_not_clipped(tmp_path: Path) -> None:
    """PIL's convert("L") clips 16-bit grey at 255 (a 0..65535 ramp came out almost all white)."""
    folder = tmp_path / "scans"
    folder.mkdir()
    ramp = np.linspace(0, 65535, 64).astype(np.uint16).reshape(8, 8)
    Image.fromarray(ramp).save(folder / "ramp.png")  # a 16-bit greyscale PNG
    with Image.open(folder / "ramp.png") as im:
        assert im.mode.startswith("I")
    cfg = DataConfig(dataset=str(folder), data_dir=str(tmp_path / "tfds"), image_size=8, channels=1)
    images, _ = load_split_array(cfg, "train")
    np.testing.assert_array_equal(images[0, :, :, 0], np.rint(ramp / 257).astype(np.uint8))


def test_a_16_bit_grey_image_with_a_transparent_value_is_white_there(tmp_path: Path) -> None:
    """The 16-bit branch ran before the transparency one: its transparent pixels stayed black (8-bit: white)."""
    folder = tmp_path / "keyed"
    folder.mkdir()
    values = np.zeros((8, 8), np.uint16)
    values[:4] = 65535  # top half white, bottom half the transparent value 0
    Image.fromarray(values).save(folder / "a16.png", transparency=0)
    Image.fromarray((values // 257).astype(np.uint8)).save(folder / "b8.png", transparency=0)
    with Image.open(folder / "a16.png") as im:
        assert im.mode.startswith("I") and im.info["transparency"] == 0
    cfg = DataConfig(dataset=str(folder), data_dir=str(tmp_path / "tfds"), image_size=8, channels=1)
    images, _ = load_split_array(cfg, "train")
    np.testing.assert_array_equal(images[..., 0], np.full((2, 8, 8), 255))


def test_npz_rgb_cifar(tmp_path: Path, shared_file: Callable[..., Path]) -> None:
    path = shared_file("cifar10_jpeg", "cifar10_jpeg_test.npz")
    with np.load(path) as npz:
        expected, expected_labels = npz["image"], npz["label"]
    cfg = DataConfig(dataset=str(path), data_dir=str(tmp_path), image_size=32, channels=3, batch_size=50)
    info = prepare_dataset(cfg)
    assert info.splits == {"train": 10_000} and info.num_classes == 10 and info.image_shape == (32, 32, 3)
    images, labels = load_split_array(cfg, "train")
    np.testing.assert_array_equal(images, expected)  # stored losslessly, no resize at the same size
    np.testing.assert_array_equal(labels, expected_labels)
    batch = next(iterator(cfg, seed=0, examples=50))  # a one-batch run: read from disk, not decoded whole first
    assert batch["image"].shape == (50, 3, 32, 32) and batch["image"].min() >= -1 and batch["image"].max() <= 1
    grey, _ = load_split_array(dataclasses.replace(cfg, channels=1, image_size=16), "train", max_examples=300)
    subset = np.sort(np.random.default_rng(0).choice(10_000, 300, replace=False))  # the documented subset
    luma = np.rint(expected[subset] @ np.array([0.299, 0.587, 0.114])).astype(np.uint8)
    assert grey.shape == (300, 16, 16, 1)
    np.testing.assert_array_equal(grey, np.stack([fit_image(y, image_size=16, channels=1) for y in luma]))


def test_npz_folder_splits_and_no_labels(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where TFDS's builder left an empty tmpXXXXtfds
    folder = tmp_path / "arrays"
    folder.mkdir()
    np.savez(folder / "digits_train.npz", image=np.zeros((20, 6, 6), np.uint8))
    np.savez(folder / "digits_test.npz", image=np.full((10, 6, 6), 255, np.uint8))
    cfg = DataConfig(dataset=str(folder), data_dir=str(tmp_path / "tfds"), image_size=6, batch_size=5)
    assert prepare_dataset(cfg).splits == {"train": 20, "test": 10}
    images, labels = load_split_array(cfg, "test")
    assert (images == 255).all() and (labels == 0).all()  # no label array: label 0
    with pytest.raises(DataError, match="no split 'validation'"):
        load_split_array(cfg, "validation")
    np.savez(tmp_path / "bad.npz", pixels=np.zeros((3, 2, 2), np.uint8))
    with pytest.raises(DataError, match="no 'image' array"):
        prepare_dataset(dataclasses.replace(cfg, dataset=str(tmp_path / "bad.npz")))
    assert not list(tmp_path.glob("tmp*tfds"))


def test_npz_files_with_labels_in_some_splits_only_are_refused(tmp_path: Path) -> None:
    """The split without a label array got label 0 for every image of a dataset counted as labelled."""
    folder = tmp_path / "mixed"
    folder.mkdir()
    np.savez(folder / "train.npz", image=np.zeros((20, 6, 6), np.uint8))
    np.savez(folder / "test.npz", image=np.zeros((10, 6, 6), np.uint8), label=np.arange(10))
    cfg = DataConfig(dataset=str(folder), data_dir=str(tmp_path / "tfds"), image_size=6, batch_size=5)
    with pytest.raises(DataError, match=r"^train.npz in .*mixed have no 'label' array where the other .npz files "
                                        r"have one; add labels to every file, or remove them from all$"):
        prepare_dataset(cfg)
    np.savez(folder / "train.npz", image=np.zeros((20, 6, 6), np.uint8), label=np.arange(20) % 10)
    assert prepare_dataset(cfg).num_classes == 10


def test_npz_splits_are_named_by_a_word_of_the_file_name(tmp_path: Path) -> None:
    """`latest.npz` was the test split ("test" in "latest") and `interval.npz` the validation split."""
    folder = tmp_path / "splits"
    folder.mkdir()
    for name, n in (("latest", 20), ("mnist_testing", 10), ("val2017", 5)):
        np.savez(folder / f"{name}.npz", image=np.zeros((n, 6, 6), np.uint8))
    cfg = DataConfig(dataset=str(folder), data_dir=str(tmp_path / "tfds"), image_size=6, batch_size=5)
    assert prepare_dataset(cfg).splits == {"train": 20, "test": 10, "validation": 5}
    np.savez(folder / "train_test.npz", image=np.zeros((5, 6, 6), np.uint8))
    with pytest.raises(DataError, match=r"^train_test.npz names the splits \['test', 'train'\]; rename it to name one "
                                        r"of train, test, validation$"):
        prepare_dataset(cfg)


def test_a_tfds_name_is_the_tfds_dataset_even_where_a_folder_here_has_its_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`data prepare fashion_mnist --manual-dir fashion_mnist` (archives kept in ./fashion_mnist) imported the
    archives' folder as images; `eval` of a fashion_mnist run from there scored against that folder."""
    import cli
    from ddpm_eqx import data_prepare

    monkeypatch.setattr(data_prepare, "_NOTED", set())
    monkeypatch.chdir(tmp_path)
    for name in ("fashion_mnist", "my_images"):
        (tmp_path / name).mkdir()
        Image.fromarray(np.zeros((6, 6), np.uint8)).save(tmp_path / name / "x.png")
    tfds_dir = str(tmp_path / "tfds")
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz"):  # TFDS's archives, not the folder's image
        prepare_dataset(DataConfig(dataset="fashion_mnist", data_dir=tfds_dir), download=False)
    assert "note: data.dataset='fashion_mnist' is the TFDS dataset, not the folder fashion_mnist/ here" in (
        capsys.readouterr().err)
    assert prepare_dataset(DataConfig(dataset="./fashion_mnist", data_dir=tfds_dir, image_size=6)).splits == {
        "train": 1}
    assert prepare_dataset(DataConfig(dataset="my_images", data_dir=tfds_dir, image_size=6)).splits == {"train": 1}
    assert cli._absolute_if_path("fashion_mnist") == "fashion_mnist"
    assert cli._absolute_if_path("./fashion_mnist") == str(tmp_path / "fashion_mnist")
    assert cli._absolute_if_path("my_images") == str(tmp_path / "my_images")
    assert cli._absolute_if_path("mnist") == "mnist"  # no such folder
    # ./NAME is the folder in the whole CLI, also where configs/NAME.py exists (that config trained TFDS's dataset)
    assert cli.resolve_config("./fashion_mnist", None, [], None).data.dataset == str(tmp_path / "fashion_mnist")
    assert cli.resolve_config("fashion_mnist", None, [], None).data.batch_size == 1024  # configs/fashion_mnist.py
    # the note is printed once in a process (the CLI validates, then reads: it was printed twice)
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz"):
        prepare_dataset(DataConfig(dataset="fashion_mnist", data_dir=tfds_dir), download=False)
    assert "note:" not in capsys.readouterr().err


# --- errors, fast and offline --------------------------------------------------------------------


def test_unknown_dataset_fails_fast(tmp_path: Path) -> None:
    start = time.monotonic()
    with pytest.raises(DataError, match=r"unknown dataset 'fashion_mnst' \(did you mean fashion_mnist.*list_builders"):
        prepare_dataset(DataConfig(dataset="fashion_mnst", data_dir=str(tmp_path)))
    with pytest.raises(DataError, match="no such file or folder"):
        make_train_iterator(DataConfig(dataset=str(tmp_path / "nowhere"), data_dir=str(tmp_path)), seed=0)
    with pytest.raises(DataError, match="no uint8 image feature"):
        prepare_dataset(DataConfig(dataset="imdb_reviews", data_dir=str(tmp_path)))
    assert time.monotonic() - start < 10


def test_missing_archives_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                caplog: pytest.LogCaptureFixture) -> None:
    temp = tmp_path / "temp"  # TFDS's builder of an unprepared dataset makes an empty tmpXXXXtfds here
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    (temp / "tmpsomeoneelsestfds").mkdir()  # not ours: stays
    start = time.monotonic()
    with pytest.raises(DataError) as err:
        prepare_dataset(DataConfig(dataset="fashion_mnist", data_dir=str(tmp_path)), download=False)
    message = str(err.value)
    assert "\n" not in message and str(tmp_path / "downloads" / "manual") in message
    assert all(name in message for name in ("train-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"))
    assert time.monotonic() - start < 10
    assert [p.name for p in temp.iterdir()] == ["tmpsomeoneelsestfds"]
    assert "Variant folder" not in caplog.text  # TFDS's warning about an unprepared dataset, before preparing it


@pytest.mark.parametrize("label, message", [
    (np.arange(20) % 3, "shape (12,), got (20,)"), (np.arange(5), "shape (12,), got (5,)"),
    (np.full((12, 2), 1), "shape (12,), got (12, 2)"), (np.eye(12, 3, dtype=np.int64), "shape (12,), got (12, 3)"),
    (np.linspace(0, 2.9, 12), "integer class indices, got float64"), (np.array(["a"] * 12), "integer class indices"),
    (np.r_[-1, np.zeros(11, np.int64)], "0..999999, got -1..0"), (np.r_[10**8, np.zeros(11, np.int64)], "got 0..100000000"),
])
def test_npz_labels_that_do_not_fit_the_images_are_refused(tmp_path: Path, label: np.ndarray, message: str) -> None:
    """Extra labels were dropped (misaligned), -1 trained the null class, float labels were truncated, an id
    made a 10^8-class model; short, column-shaped, one-hot or string labels were tracebacks."""
    path = tmp_path / "bad.npz"
    np.savez(path, image=np.zeros((12, 8, 8, 1), np.uint8), label=label)
    with pytest.raises(DataError, match=re.escape(message)):
        prepare_dataset(DataConfig(dataset=str(path), data_dir=str(tmp_path / "tfds"), image_size=8))
    for fine, classes in ((np.arange(12.0) % 3, 3), ((np.arange(12) % 4)[:, None], 4), (np.arange(12) % 2 == 1, 2)):
        np.savez(path, image=np.zeros((12, 8, 8, 1), np.uint8), label=fine)  # integral floats, keras' [N, 1], bools
        cfg = DataConfig(dataset=str(path), data_dir=str(tmp_path / "tfds"), image_size=8)
        assert prepare_dataset(cfg).num_classes == classes
        np.testing.assert_array_equal(load_split_array(cfg, "train")[1], np.ravel(fine).astype(np.int64))


def test_unreadable_or_empty_npz_files_are_one_line_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fake, empty, torn, single = (tmp_path / f"{name}.npz" for name in ("fake", "empty", "torn", "single"))
    fake.write_text("not a zip")
    np.savez(empty, image=np.zeros((0, 8, 8), np.uint8))
    np.savez(torn, image=np.zeros((12, 8, 8), np.uint8))
    torn.write_bytes(torn.read_bytes()[:300])  # a copy cut short
    with open(single, "wb") as f:
        np.save(f, np.zeros((12, 8, 8), np.uint8))  # a .npy under an .npz name
    for path, message in ((fake, "cannot be read as an .npz of arrays"), (empty, "'image' holds no images"),
                          (torn, "cannot be read as an .npz of arrays (BadZipFile"),
                          (single, "cannot be read as an .npz of arrays (ValueError: a single array")):
        with pytest.raises(DataError, match=re.escape(message)):
            prepare_dataset(DataConfig(dataset=str(path), data_dir=str(tmp_path / "tfds"), image_size=8))
    assert "Importing" not in capsys.readouterr().out  # it said so before each refusal


def test_folder_classes_skip_hidden_folders_and_follow_linked_ones(tmp_path: Path) -> None:
    """``.ipynb_checkpoints/`` became class 0 (every label shifted); a class folder that is a link was dropped."""
    folder, elsewhere = tmp_path / "pets", tmp_path / "elsewhere"
    for sub, value, count in (("cat", 30, 2), (".ipynb_checkpoints", 90, 1)):
        (folder / sub).mkdir(parents=True)
        for i in range(count):
            Image.fromarray(np.full((8, 8), value, np.uint8)).save(folder / sub / f"{i}.png")
    elsewhere.mkdir()
    for i in range(3):
        Image.fromarray(np.full((8, 8), 220, np.uint8)).save(elsewhere / f"{i}.png")
    (folder / "dog").symlink_to(elsewhere, target_is_directory=True)
    (folder / "dog" / "loop").symlink_to(folder, target_is_directory=True)  # a link back up: walked once
    cfg = DataConfig(dataset=str(folder), data_dir=str(tmp_path / "tfds"), image_size=8)
    info = prepare_dataset(cfg)
    assert info.num_classes == 2 and info.splits == {"train": 5}
    images, labels = load_split_array(cfg, "train")
    assert sorted(zip(labels.tolist(), images[:, 0, 0, 0].tolist())) == [(0, 30), (0, 30), (1, 220), (1, 220), (1, 220)]


def test_loose_images_empty_class_folders_and_mixed_kinds_are_named(tmp_path: Path) -> None:
    """A stray image beside the class folders silently made the whole folder unlabelled; a class folder without
    images silently shifted the labels of the ones after it; .npz files beside images were silently ignored."""
    folder = tmp_path / "pets"
    for sub in ("cat", "dog", "emu"):
        (folder / sub).mkdir(parents=True)
    for sub, value in (("cat", 30), ("emu", 220)):
        Image.fromarray(np.full((8, 8), value, np.uint8)).save(folder / sub / "0.png")
    cfg = DataConfig(dataset=str(folder), data_dir=str(tmp_path / "tfds"), image_size=8)
    for _ in range(2):  # the import, then a later run's use of it: warned both times
        with pytest.warns(UserWarning, match=r"subfolder\(s\) of .*pets without images are no class: dog \(labels "
                                             r"0..1 go to the 2 folders with images"):
            assert prepare_dataset(cfg).num_classes == 2
    assert load_split_array(cfg, "train")[1].tolist() == [0, 1]

    Image.fromarray(np.full((8, 8), 90, np.uint8)).save(folder / "readme.png")
    with pytest.warns(UserWarning, match=r"1 image\(s\) of .*pets sit beside its subfolders \(e.g. readme.png\), so "
                                         r"it is imported without classes; .* classes of the 2 subfolders \(cat, emu\)"):
        info = prepare_dataset(cfg)
    assert info.num_classes == 1 and info.splits == {"train": 3}

    np.savez(folder / "extra.npz", image=np.zeros((2, 8, 8), np.uint8))
    with pytest.raises(DataError, match=r"pets holds both images \(3, e.g. .*\) and .npz files \(extra.npz\): "
                                        "point --dataset at a folder of one kind"):
        prepare_dataset(cfg)


def test_transparent_pixels_are_white_in_grey_and_colour_imports(tmp_path: Path) -> None:
    """A grey image with alpha became its underlying grey (often black) where a colour one was composited on
    white; an 8-bit grey PNG with a transparent value kept it."""
    grey, colour = tmp_path / "grey", tmp_path / "colour"
    grey.mkdir(), colour.mkdir()
    alpha = np.zeros((8, 8), np.uint8)
    alpha[:, 4:] = 255  # left half transparent, right half opaque
    dark = np.full((8, 8), 20, np.uint8)
    Image.fromarray(np.stack([dark, alpha], -1), "LA").save(grey / "la.png")
    Image.fromarray(dark).save(grey / "keyed.png", transparency=20)  # every pixel is the transparent value
    Image.fromarray(np.stack([dark, dark, dark, alpha], -1), "RGBA").save(colour / "rgba.png")
    expected_grey = np.where(alpha == 255, 20, 255)
    images, _ = load_split_array(DataConfig(dataset=str(grey), data_dir=str(tmp_path / "tfds"), image_size=8), "train")
    np.testing.assert_array_equal(images[0, :, :, 0], np.full((8, 8), 255))  # keyed.png (sorted first)
    np.testing.assert_array_equal(images[1, :, :, 0], expected_grey)
    cfg = DataConfig(dataset=str(colour), data_dir=str(tmp_path / "tfds"), image_size=8, channels=3)
    images, _ = load_split_array(cfg, "train")
    np.testing.assert_array_equal(images[0], np.repeat(expected_grey[:, :, None], 3, -1))


def test_a_photo_with_an_exif_orientation_is_stored_upright(tmp_path: Path) -> None:
    """A phone's JPEG is stored as its sensor wrote it plus an Orientation tag: imported as it displays."""
    folder = tmp_path / "photos"
    folder.mkdir()
    sensor = np.zeros((16, 32), np.uint8)
    sensor[:, :16] = 255  # left half white as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    Image.fromarray(sensor).save(folder / "phone.jpg", exif=exif, quality=95)
    cfg = DataConfig(dataset=str(folder), data_dir=str(tmp_path / "tfds"), image_size=16)
    images, _ = load_split_array(cfg, "train")
    upright = np.asarray(ImageOps.exif_transpose(Image.open(folder / "phone.jpg")))  # 32 tall, 16 wide
    expected = fit_image(upright[:, :, None], image_size=16, channels=1)
    assert upright.shape == (32, 16) and upright[:16].mean() > 200 and upright[16:].mean() < 50  # top half white
    np.testing.assert_allclose(images[0].astype(float), expected.astype(float), atol=3)


def test_a_failed_import_is_one_line_and_leaves_nothing_taken_as_imported(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from ddpm_eqx import data_import

    folder = tmp_path / "few"
    folder.mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(folder / "a.png")
    cfg = DataConfig(dataset=str(folder), data_dir=str(tmp_path / "tfds"), image_size=8)

    def full(self, **kwargs):  # noqa: ANN001, ANN003, ANN202
        raise RuntimeError('Failed to finalize writing of split "train": write() failed: File too large')

    with monkeypatch.context() as m:
        m.setattr(data_import._ImportedDataset, "download_and_prepare", full)
        with pytest.raises(DataError, match=r"importing .*few into .* failed \(RuntimeError: Failed to finalize"):
            prepare_dataset(cfg)
    assert prepare_dataset(cfg).splits == {"train": 1}  # the next run imports it


def test_two_processes_importing_one_folder_at_once_both_get_it(tmp_path: Path) -> None:
    """The processes of a multi-process run on one disk each prepare the data: the second crashed on TFDS's
    final rename (FileExistsError). A lock makes it wait and find the import done. The first process is
    slowed (40 ms an image, 12 s in all) and the second starts once the first has begun importing."""
    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(300):
        Image.fromarray(np.full((8, 8), i % 256, np.uint8)).save(folder / f"{i}.png")
    script = ("import sys, time; from ddpm_eqx import data_import; from ddpm_eqx.config import DataConfig; "
              "from ddpm_eqx.data import prepare_dataset; load = data_import._load_image\n"
              "if sys.argv[3] == 'slow': data_import._load_image = lambda *a: (time.sleep(0.04), load(*a))[1]\n"
              "print(prepare_dataset(DataConfig(dataset=sys.argv[1], data_dir=sys.argv[2], image_size=8)).splits)")

    def start(speed: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-c", script, str(folder), str(tmp_path / "tfds"), speed],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    first = start("slow")
    assert first.stdout is not None and "Importing" in first.stdout.readline()
    second = start("fast")
    (out1, err1), (out2, err2) = first.communicate(timeout=300), second.communicate(timeout=300)
    assert first.returncode == 0 and "{'train': 300}" in out1, err1[-2000:]
    assert second.returncode == 0 and "{'train': 300}" in out2, err2[-2000:]
    assert "Importing" not in out2  # the second waited for the first's import, and used it


def test_the_dataset_lock_is_taken_read_only_and_never_stops_a_run(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The lock file is opened read-only (another user's, in a shared data dir, still locks), and a data dir
    this process cannot write is no error of the lock's (the import says what is wrong)."""
    from ddpm_eqx.data_import import exclusive

    lock = tmp_path / "data" / ".x.lock"
    with exclusive(lock):
        pass
    lock.chmod(0o444)
    probe = ("import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDONLY)\n"
             "try: fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\nexcept BlockingIOError: sys.exit(3)")
    with exclusive(lock):  # held: another process cannot take it
        assert subprocess.run([sys.executable, "-c", probe, str(lock)]).returncode == 3
    assert subprocess.run([sys.executable, "-c", probe, str(lock)]).returncode == 0  # released

    def refused(*args: Any, **kwargs: Any) -> int:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("ddpm_eqx.data_import.os.open", refused)
    with exclusive(tmp_path / "elsewhere" / ".y.lock"):
        pass


def test_two_links_to_one_folder_give_the_same_class_on_every_disk(tmp_path: Path) -> None:
    """os.walk visits folders in the file system's order (ext4: a per-disk hash): which of two links to one
    folder kept its files, and so the classes, could differ between two copies of a dataset. Sorted: the first."""
    from ddpm_eqx.data_import import _listing

    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "1.png").write_bytes(b"")
    root = tmp_path / "root"
    root.mkdir()
    for name in ("b", "a", "c"):  # created out of order
        (root / name).symlink_to(shared, target_is_directory=True)
    assert [p.relative_to(root).as_posix() for p in _listing(root)] == ["a/1.png"]


def test_a_dataset_without_a_config_file_takes_its_image_size_and_channels_from_the_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`train --dataset imgs/` trained 40x40 colour images as Config()'s 28x28 grey, silently."""
    import cli
    from ddpm_eqx.config import ConfigError
    from ddpm_eqx.train import fit_to_data

    folder = tmp_path / "imgs"
    for cls in ("cats", "dogs"):
        (folder / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((40, 40, 3), 60 * i, np.uint8)).save(folder / cls / f"{i}.png")
    overrides = [f"data.data_dir={tmp_path / 'tfds'}"]
    monkeypatch.chdir(tmp_path)
    cfg = cli.resolve_config("imgs/", None, overrides)
    assert cfg.data.dataset == str(folder.resolve())  # stored absolute: config.json names it from anywhere
    relative = cli.resolve_config("imgs/", None, ["data.data_dir=tfds", "data.manual_dir=~/archives"])
    assert (relative.data.data_dir, relative.data.manual_dir) == (str(tmp_path / "tfds"),
                                                                  str(Path("~/archives").expanduser()))
    fitted, note = fit_to_data(cfg)
    assert (fitted.data.image_size, fitted.data.channels) == (40, 3) and fitted.model == cfg.model
    assert "data.image_size=40 (from the data), data.channels=3 (from the data)" in note
    assert "its 2 classes are not used" in note
    kept, note = fit_to_data(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, image_size=16)),
                             explicit={"data.image_size"})
    assert (kept.data.image_size, kept.data.channels) == (16, 3)
    assert "data.image_size=16 (as given), data.channels=3 (from the data)" in note

    # A truncated file of another size (its header reads, its pixels do not) is skipped, not a second size.
    # (A JPEG: its header pass reads no pixels; PIL's getexif of a PNG decodes it all.)
    cut = folder / "dogs" / "cut.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 40, 3), np.uint8)).save(cut, quality=95)
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size * 2 // 3])
    with Image.open(cut) as im, pytest.raises(OSError, match="truncated"):
        assert im.size == (40, 30)
        im.load()
    with pytest.warns(UserWarning, match=r"skipped 1 unreadable file\(s\) of .*cut\.jpg"):
        assert fit_to_data(cfg)[0].data.image_size == 40
    cut.unlink()

    Image.fromarray(np.zeros((30, 40, 3), np.uint8)).save(folder / "dogs" / "wide.png")
    with pytest.raises(ConfigError, match=r"the images of .*imgs are of various sizes: choose the square size to train "
                                          r"at with --set data.image_size=N"):
        fit_to_data(cfg)
    assert fit_to_data(cfg, explicit={"data.image_size"})[0].data.channels == 3

    import json

    from ddpm_eqx.config import to_dict, to_json

    stored = json.loads(to_json(cfg))  # a run stored before 0.3 named the folder relative: the same dataset
    stored["data"]["dataset"] = "imgs"
    assert cli._config_differences(stored, to_dict(cfg)) == []
    stored["data"]["dataset"] = "other"
    assert cli._config_differences(stored, to_dict(cfg)) == [f"data.dataset: 'other' -> '{folder.resolve()}'"]

    big = tmp_path / "big.npz"
    np.savez(big, image=np.zeros((2, 256, 256), np.uint8))
    with pytest.raises(ConfigError, match="are 256x256: choose"):
        fit_to_data(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, dataset=str(big))))
    small = tmp_path / "small.npz"
    np.savez(small, image=np.zeros((2, 12, 12), np.uint8))
    fitted, _ = fit_to_data(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, dataset=str(small))))
    assert (fitted.data.image_size, fitted.data.channels) == (12, 1)


def test_another_datasets_archive_of_the_same_name_in_the_manual_dir_is_named(tmp_path) -> None:
    """MNIST and Fashion-MNIST name their archives alike: with Fashion-MNIST's in the manual dir (as run.sh puts
    them), preparing mnist failed on a checksum, its message cut before it said which file was wrong."""
    manual = tmp_path / "manual"
    manual.mkdir()
    (manual / "t10k-images-idx3-ubyte.gz").write_bytes(b"x" * 10)
    cfg = DataConfig(dataset="mnist", data_dir=str(tmp_path / "tfds"), manual_dir=str(manual))
    with pytest.raises(DataError, match=r"holds files named as mnist's archives that are not them: "
                                        r"t10k-images-idx3-ubyte.gz \(10 bytes, mnist's has 1,648,877\).*--manual-dir"):
        prepare_dataset(cfg)

    # In TFDS's own manual dir, each dataset's archives may sit in a folder of its name, which is read first: there
    # Fashion-MNIST's (as run.sh now puts them) are no longer in MNIST's way.
    shared = tmp_path / "tfds" / "downloads" / "manual"
    (shared / "fashion_mnist").mkdir(parents=True)
    (shared / "fashion_mnist" / "t10k-images-idx3-ubyte.gz").write_bytes(b"x" * 10)
    with pytest.raises(DataError, match=r"^cannot download mnist \(downloads disabled\): place .* in "
                                        r".*/downloads/manual/$"):
        prepare_dataset(DataConfig(dataset="mnist", data_dir=str(tmp_path / "tfds")), download=False)
    with pytest.raises(DataError, match=r"fashion_mnist's archives that are not them: t10k-images-idx3-ubyte.gz"):
        prepare_dataset(DataConfig(dataset="fashion_mnist", data_dir=str(tmp_path / "tfds")), download=False)


def test_a_class_folder_that_cannot_be_read_is_an_error_not_a_missing_class(tmp_path, monkeypatch) -> None:
    """os.walk skipped a folder it could not list: its class vanished and the later classes' labels shifted,
    with a warning calling it a folder "without images". (Unreadable by permissions is not testable as root:
    the listing is refused the way the kernel refuses it.)"""
    import os

    folder = tmp_path / "images"
    for cls in ("a", "b", "c"):
        (folder / cls).mkdir(parents=True)
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(folder / cls / "0.png")
    scandir = os.scandir

    def refusing(path: Any = ".") -> Any:
        if Path(path) == folder / "b":
            raise PermissionError(13, "Permission denied", str(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", refusing)
    cfg = DataConfig(dataset=str(folder), data_dir=str(tmp_path / "tfds"), image_size=8, channels=1)
    with pytest.raises(DataError, match=rf"cannot read {folder / 'b'} \(Permission denied\), a folder of {folder}"):
        prepare_dataset(cfg)


def test_a_conditional_model_on_data_without_labels_is_refused(tmp_path) -> None:
    from ddpm_eqx.config import Config, ConfigError, ModelConfig
    from ddpm_eqx.train import validate_setup

    np.savez(tmp_path / "faces.npz", image=np.zeros((16, 8, 8), np.uint8))
    cfg = Config(data=DataConfig(dataset=str(tmp_path / "faces.npz"), data_dir=str(tmp_path / "tfds"), image_size=8,
                                 channels=1, batch_size=8),
                 model=ModelConfig(dim=8, dim_mults=(1, 2), resnet_block_groups=4, num_classes=3))
    with pytest.raises(ConfigError, match=r"model.num_classes=3 but .*faces.npz has no class labels .*drop "
                                          r"model.num_classes"):
        validate_setup(cfg)
