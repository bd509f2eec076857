"""Training data: a TFDS image dataset (or an imported folder / ``.npz``) read from ArrayRecord with Grain.

Per process: record ids of this process's shard -> seeded shuffle (reseeded every epoch) -> repeat ->
batch of ids -> read the batch (one batched ArrayRecord read, ~5x faster than record by record), decode,
fit each image (centre crop, antialiased resize, channels), random horizontal flip seeded per example
-> prefetch (worker processes or a thread). Batches are ``{"image": float32 [b, C, H, W] in [-1, 1],
"label": int32 [b]}`` with b = batch_size // process_count. With ``data.cache`` (by default when the run
reads the whole split and it fits in memory) the shard is decoded once (by the workers) into a uint8 array
and batches are gathered from it in the main process; the batches are the same as without the cache.

Everything stays host-side numpy: reading needs only ``array_record`` and Pillow.
"""

import atexit
import contextlib
import dataclasses
import functools
import gc
import io
import logging
import math
import sys
import warnings
import weakref
from typing import Any

import grain
import grain.python
import jax
import numpy as np
import psutil
import tqdm
from grain.experimental import index_shuffle
from jaxtyping import Float32, Int32, Int64, UInt8
from PIL import Image as PILImage

from ddpm_eqx.config import DataConfig
from ddpm_eqx.data_import import DataError
from ddpm_eqx.data_prepare import DatasetInfo, feature_keys, open_split, prepare_dataset, prepared_builder

log = logging.getLogger(__name__)

__all__ = [
    "DataError", "DatasetInfo", "prepare_dataset", "make_train_iterator", "TrainIterator", "reads_from_memory",
    "load_split_array", "subset_ids", "fit_image", "to_model_images",
]


# --- one example ---------------------------------------------------------------------------------


def fit_image(
    image: UInt8[np.ndarray, "h w c_in"] | UInt8[np.ndarray, "h w"], *, image_size: int, channels: int
) -> UInt8[np.ndarray, "s s c"]:
    """Centre-crop to a square, resize with antialiasing, convert to ``channels`` (ITU-R 601 luma for grey)."""
    if image.ndim == 2:
        image = image[..., None]
    if image.shape[-1] in (2, 4):  # drop alpha
        image = image[..., :-1]
    h, w, _ = image.shape
    s = min(h, w)
    image = image[(h - s) // 2 : (h - s) // 2 + s, (w - s) // 2 : (w - s) // 2 + s]
    if channels == 1 and image.shape[-1] == 3:  # before resizing: a third of the work
        image = np.rint(image @ np.array([0.299, 0.587, 0.114])).astype(np.uint8)[..., None]
    if s != image_size:
        pil = PILImage.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
        # BICUBIC is antialiased when reducing; reducing_gap=3 first box-reduces big images (cheap, ~exact).
        pil = pil.resize((image_size, image_size), PILImage.Resampling.BICUBIC, reducing_gap=3.0)
        image = np.asarray(pil).reshape(image_size, image_size, -1)
    if channels == 3 and image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    return np.ascontiguousarray(image)


def to_model_images(images: UInt8[np.ndarray, "b h w c"]) -> Float32[np.ndarray, "b c h w"]:
    """uint8 NHWC -> float32 NCHW in [-1, 1], the model's layout."""
    x = images.transpose(0, 3, 1, 2).astype(np.float32, order="C")
    x *= 1.0 / 127.5
    x -= 1.0
    return x


# --- batches --------------------------------------------------------------------------------------


_Batch = tuple[UInt8[np.ndarray, "b s s c"], Int32[np.ndarray, " b"]]


def _decoded(image: bytes | np.ndarray) -> np.ndarray:
    """An image feature's value: encoded bytes (an ``Image`` feature, see ``open_split``) decoded by Pillow as
    TFDS's own Pillow path does (uint8, no conversion), or an array (a ``Tensor`` feature) as it is."""
    if not isinstance(image, bytes):
        return image
    with PILImage.open(io.BytesIO(image)) as pil:
        array = np.asarray(pil)  # ~4x faster than asking Pillow for a dtype, which converts through a copy
    return array if array.dtype == np.uint8 else array.astype(np.uint8)


@dataclasses.dataclass(frozen=True)
class _ReadRecords:
    """Record ids -> fitted uint8 images and labels; a dataclass so Grain workers can unpickle it."""

    source: Any  # a TFDS ArrayRecord data source
    image_key: str
    label_key: str | None
    image_size: int
    channels: int

    def __call__(self, ids: np.ndarray) -> _Batch:
        records = self.source.__getitems__([int(i) for i in ids])
        images = [fit_image(_decoded(r[self.image_key]), image_size=self.image_size, channels=self.channels)
                  for r in records]
        labels = [r[self.label_key] if self.label_key else 0 for r in records]
        return np.stack(images), np.asarray(labels, np.int32)


@dataclasses.dataclass(frozen=True)
class _InMemory:
    """Positions in a decoded shard -> its images and labels (a gather)."""

    images: np.ndarray
    labels: np.ndarray

    def __call__(self, ids: np.ndarray) -> _Batch:
        return self.images[ids], self.labels[ids]  # copies: flipping them leaves the cache alone


@functools.lru_cache(maxsize=64)
def _seed_seq(seed: int, n: int) -> tuple[int, ...]:
    """``std::seed_seq{seed}.generate`` of ``n`` 32-bit words (C++ [rand.util.seedseq]): grain's round keys."""
    m32 = 0xFFFFFFFF
    out = [0x8B8B8B8B] * n
    t = 11 if n >= 623 else 7 if n >= 68 else 5 if n >= 39 else 3 if n >= 7 else (n - 1) // 2
    p, q = (n - t) // 2, (n - t) // 2 + t

    def mix(x: int) -> int:
        return x ^ (x >> 27)

    m = max(2, n)  # max(s + 1, n) with s = 1 seed word
    for k in range(m):
        r1 = 1664525 * mix(out[k % n] ^ out[(k + p) % n] ^ out[(k - 1) % n]) & m32
        r2 = (r1 + (1 if k == 0 else k % n + seed if k == 1 else k % n)) & m32
        out[(k + p) % n] = (out[(k + p) % n] + r1) & m32
        out[(k + q) % n] = (out[(k + q) % n] + r2) & m32
        out[k % n] = r2
    for k in range(m, m + n):
        r3 = 1566083941 * mix((out[k % n] + out[(k + p) % n] + out[(k - 1) % n]) & m32) & m32
        r4 = (r3 - k % n) & m32
        out[(k + p) % n] ^= r3
        out[(k + q) % n] ^= r4
        out[k % n] = r4
    return tuple(out)


def _index_shuffle(
    index: Int64[np.ndarray, " n"], *, max_index: int, seed: int, rounds: int = 4
) -> Int64[np.ndarray, " n"]:
    """``grain.experimental.index_shuffle`` of every element of ``index``, in NumPy: a permutation of
    [0, max_index].

    Grain's algorithm (its ``index_shuffle.cc``): a Simon-cipher Feistel network on a block of at least 16
    bits, keyed by ``std::seed_seq``, walked until it lands in range. Its C++ entry point takes one index per
    Python call (~5 us each: 8 ms per batch of 1024); this does a batch in ~0.3 ms and equals it index for
    index (``tests/test_data.py``). Shards under 2**14 examples, whose indices walk the minimal 16-bit block
    for long, and the rare index still walking after 32 rounds, are left to grain's C++, as is everything
    where the installed grain no longer computes what this copies (:func:`_vectorised_is_grains`).

    One departure: grain sizes its block by ``ceil(log2(max_index))``, one bit short when ``max_index`` is a
    power of two, so where that power is even and at least 2**16 (shards of 65,537, 262,145, 1,048,577 ...
    examples; also 2**32 + 1) the block cannot hold ``max_index``: grain's function is then no permutation
    (one example is drawn twice an epoch, one never). There this uses the same cipher on a block wide
    enough for ``max_index``, walked to the end in NumPy."""
    index = np.asarray(index, np.int64)
    if max_index >= 2**14 and max_index >> _grains_block_bits(max_index):
        block = _block_bits(max_index.bit_length())  # max_index's own width: the block holds it
        return _vectorised_index_shuffle(index, max_index, seed, rounds, block=block, own=True)
    # A minimal 16-bit block mostly out of range: long walks, cheaper in grain's C++.
    if max_index < 2**14 or not _vectorised_is_grains():
        return _grains_index_shuffle(index, max_index, seed, rounds)
    return _vectorised_index_shuffle(index, max_index, seed, rounds, block=_grains_block_bits(max_index))


def _grains_block_bits(max_index: int) -> int:
    """The width of grain's cipher block for [0, max_index]: ``ceil(log2(max_index))`` taken through a double,
    as its C++ does (one bit short for a power of two), as a block (:func:`_block_bits`)."""
    return _block_bits(math.ceil(math.log2(float(max_index))))


def _block_bits(bits: int) -> int:
    """A Feistel block for ``bits``-bit indices: two equal halves (rounded up to even), at least 16 bits."""
    return max(bits + bits % 2, 16)


@functools.cache
def _vectorised_is_grains() -> bool:
    """Whether :func:`_vectorised_index_shuffle` still equals the installed grain's ``index_shuffle`` (written
    for grain 0.2.18; probed once per process on three block sizes). A grain that changed its algorithm gets
    its own function everywhere: slower, but never an order that mixes the two (which could repeat examples)."""
    probe = np.arange(64, dtype=np.int64)
    for max_index, seed in ((20_000, 1), (99_999, 2**31 + 5), (2**24 + 3, 7)):
        ours = _vectorised_index_shuffle(probe, max_index, seed, 4, block=_grains_block_bits(max_index))
        if not np.array_equal(ours, _grains_index_shuffle(probe, max_index, seed, 4)):
            warnings.warn("this grain's index_shuffle is not the one ddpm_eqx.data vectorises (grain 0.2.18's): "
                          "shuffling with grain's own, ~5 us an example", stacklevel=2)
            return False
    return True


def _vectorised_index_shuffle(
    index: np.ndarray, max_index: int, seed: int, rounds: int, *, block: int, own: bool = False
) -> np.ndarray:
    """Grain's cipher on a ``block``-bit block over an array of indices. Grain's block (``own=False``) hands
    the few indices still walking after 32 rounds to grain's function, so that the walk stays grain's; our
    own wider block (``own=True``, which holds ``max_index``) walks them to the end here."""
    word = block // 2
    mask = np.uint64((1 << word) - 1)
    shift = np.uint64(word)
    keys = [np.uint64(k) & mask for k in _seed_seq(seed % 2**32, rounds)]

    def rotl(x: np.ndarray, r: int) -> np.ndarray:
        return ((x << np.uint64(r)) | (x >> np.uint64(word - r))) & mask

    def encrypt(v: np.ndarray) -> np.ndarray:
        left, right = (v >> shift) & mask, v & mask
        for k1, k2 in zip(keys[0::2], keys[1::2]):
            left ^= (rotl(right, 1) & rotl(right, 8)) ^ rotl(right, 2) ^ k1
            right ^= (rotl(left, 1) & rotl(left, 8)) ^ rotl(left, 2) ^ k2
        return (left << shift) | right

    # Cycle walking: re-encrypt what fell outside [0, max_index] (at least 1/4 of it lands each time). On a
    # block that holds max_index, a bijection of the block: every walk ends, and [0, max_index] is permuted.
    out = encrypt(index.astype(np.uint64))
    walking = np.flatnonzero(out > np.uint64(max_index))
    rounds_walked = 0
    while walking.size and (own or rounds_walked < 32):
        out[walking] = encrypt(out[walking])
        walking = walking[out[walking] > np.uint64(max_index)]
        rounds_walked += 1
    out = out.astype(np.int64)
    if walking.size:
        out[walking] = _grains_index_shuffle(index[walking], max_index, seed, rounds)  # the rare long walk
    return out


def _grains_index_shuffle(index: np.ndarray, max_index: int, seed: int, rounds: int) -> np.ndarray:
    return np.asarray([index_shuffle(int(i), max_index=max_index, seed=seed, rounds=rounds) for i in index], np.int64)


@dataclasses.dataclass(frozen=True)
class _ShuffledIds:
    """Batch number -> the ids ``start + stride * p`` of its examples, for positions p in a shard of ``length``
    permuted anew each epoch: exactly the order of grain's ``MapDataset.range(length).shuffle(seed).repeat()
    .batch(size)`` (its ``index_shuffle``), without grain's Python layers per example (~25 us, which capped a
    cached batch of 1024 at ~45k images/s) or a Python call per example."""

    start: int
    stride: int
    length: int
    seed: int
    size: int

    def __call__(self, batch: int) -> Int64[np.ndarray, " b"]:
        positions = []
        first, last = batch * self.size, (batch + 1) * self.size
        for epoch in range(first // self.length, (last - 1) // self.length + 1):
            seed = (self.seed + epoch) % 2**32  # grain's per-epoch seed
            lo, hi = max(first, epoch * self.length), min(last, (epoch + 1) * self.length)
            within = np.arange(lo - epoch * self.length, hi - epoch * self.length, dtype=np.int64)
            positions.append(_index_shuffle(within, max_index=self.length - 1, seed=seed))
        return self.start + self.stride * np.concatenate(positions)


@dataclasses.dataclass(frozen=True)
class _MakeBatch:
    ids: _ShuffledIds
    read: _ReadRecords | _InMemory
    flip_seed: int | None

    def __call__(self, step: int) -> dict[str, np.ndarray]:
        ids = self.ids(step)
        images, labels = self.read(ids)
        if self.flip_seed is not None:
            # One draw per example, keyed by (seed, batch number): the same after a resume, whatever the
            # number of workers, and new every epoch (the batch number keeps growing).
            flip = np.random.default_rng([self.flip_seed, step]).random(len(ids)) < 0.5
            images[flip] = images[flip, :, ::-1]
        return {"image": to_model_images(images), "label": labels}


def _mark_absl_flags_parsed() -> None:
    # Grain workers read absl flags; a non-absl CLI (Typer) never parses them.
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


# An iterator whose prefetch thread still runs at interpreter exit can abort it (a C++ thread destroyed while
# joinable), and one whose workers still run leaves the shared memory of the batches they buffered: close them
# first; grain's __del__ would then close again after its modules are gone, so disarm it.
_prefetching: "weakref.WeakSet[grain.DatasetIterator]" = weakref.WeakSet()
_from_memory: "weakref.WeakSet[TrainIterator]" = weakref.WeakSet()  # see reads_from_memory
_train_iterators: "weakref.WeakSet[TrainIterator]" = weakref.WeakSet()


@atexit.register
def _close_prefetching() -> None:
    # A TrainIterator still referenced (a script's global) lets go of Grain's iterators now, while their
    # modules exist: worker iterators nest others whose __del__ would otherwise close them at teardown and fail.
    for train_iterator in list(_train_iterators):
        with contextlib.suppress(Exception):  # one that fails to close must not keep the others open
            train_iterator.release()
    for it in list(_prefetching):
        with contextlib.suppress(Exception):
            it.close()
        it.close = lambda: None
    _release_shared_memory()


def _release_shared_memory() -> None:
    """Unlinks, before returning, the shared memory that Grain's workers sent batches in and nothing uses.

    Grain unlinks a batch's shared memory when its array is garbage collected, on a background thread (one, so in
    order), and its iterators keep their last batches in a reference cycle (a traceback's frames) that only the
    cycle collector frees. A process that exits right after its last batch beats both, and Python's resource
    tracker then unlinks the rest with a "leaked shared_memory objects" warning (seen after every one-off decode
    on workers). The pool is a private attribute of Grain, so looked up gently: without it, the tracker still
    cleans up, with its warning.
    """
    pool = getattr(grain.python.SharedMemoryArray, "_del_thread_pool", None)
    if pool is None:  # no worker has sent a batch in this process
        return
    gc.collect()
    with contextlib.suppress(Exception):  # a pool already closed at exit: nothing left to wait for
        pool.apply(int)  # queued behind every unlink queued before it


def _iterate(ds: grain.MapDataset, num_workers: int, prefetch: int) -> grain.DatasetIterator:
    # num_threads=0: decoding holds the GIL, so reader threads only slow it down (3k vs 7.8k images/s).
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=0))
    if num_workers > 0:
        _mark_absl_flags_parsed()
        opts = grain.MultiprocessingOptions(num_workers=num_workers, per_worker_buffer_size=max(prefetch, 1))
        it = it.mp_prefetch(opts)
    elif prefetch > 0:  # overlap the next batch with the (GIL-releasing) training step
        it = grain.experimental.ThreadPrefetchIterDataset(it, prefetch_buffer_size=prefetch)
    else:
        return iter(it)
    prefetching = iter(it)
    _prefetching.add(prefetching)  # closed at exit, if still open, before its buffered batches are lost
    return prefetching


def _decode(read: _ReadRecords, ids: np.ndarray, num_workers: int, what: str) -> _Batch:
    """All records ``ids``, in order, fitted into one uint8 array, decoded on ``num_workers`` processes."""
    chunk = 256
    images = np.empty((len(ids), read.image_size, read.image_size, read.channels), np.uint8)
    labels = np.empty((len(ids),), np.int32)
    # One source element a chunk of ids: a source of single ids costs a Grain __getitem__ (and its metrics) each.
    chunks = [ids[i : i + chunk] for i in range(0, len(ids), chunk)]
    it = _iterate(grain.MapDataset.source(chunks).map(read), num_workers, prefetch=2 * (num_workers > 0))
    with tqdm.tqdm(total=len(ids), desc=f"Decoding {what}", unit=" images", disable=None) as bar:
        for i, (x, y) in enumerate(it):
            images[i * chunk : i * chunk + len(y)], labels[i * chunk : i * chunk + len(y)] = x, y
            bar.update(len(y))
            del x, y  # no reference left to a worker's chunk once it is copied (see _release_shared_memory)
    it.close()  # stop the workers now, not whenever the garbage collector gets to them
    del it
    _release_shared_memory()
    return images, labels


def _reader(cfg: DataConfig, split: str) -> _ReadRecords:
    builder = prepared_builder(cfg)
    image_key, label_key = feature_keys(builder)
    source = open_split(builder, split, image_bytes=image_key)
    return _ReadRecords(source, image_key, label_key, cfg.image_size, cfg.channels)


def subset_ids(n: int, max_examples: int | None) -> Int64[np.ndarray, " m"]:
    """The examples of a split of ``n`` that ``load_split_array(..., max_examples)`` returns: all, or a random
    subset (seed 0) kept in file order (files may be sorted by class)."""
    if max_examples is None or max_examples >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(0).choice(n, max_examples, replace=False))


def load_split_array(
    cfg: DataConfig, split: str, max_examples: int | None = None
) -> tuple[UInt8[np.ndarray, "n s s c"], Int32[np.ndarray, " n"]]:
    """A whole split fitted to ``cfg.image_size``/``cfg.channels``: uint8 NHWC images, int32 labels.

    ``max_examples``: at most that many, :func:`subset_ids`. Not sharded over processes; decodes on
    ``cfg.num_workers`` processes.
    """
    read = _reader(cfg, split)
    ids = subset_ids(len(read.source), max_examples)
    return _decode(read, ids, cfg.num_workers, f"{cfg.dataset}[{split}]")


# --- the training iterator -----------------------------------------------------------------------


class TrainIterator:
    """This process's batches, endlessly; ``get_state()`` is the next batch's number, whatever reads the batches
    (a prefetch thread, worker processes, the decoded split or the files), so a resume may change
    ``data.num_workers`` or ``data.cache`` (or have less memory, which decides the cache) and still continue
    exactly. Grain's own iterator states differ by kind, and one kind's state fails in another's ``set_state``."""

    def __init__(self, batches: grain.MapDataset, num_workers: int, prefetch: int):
        self._batches, self._num_workers, self._prefetch = batches, num_workers, prefetch
        self._next = 0
        self._iterator: Any = _iterate(batches, num_workers, prefetch)
        _train_iterators.add(self)

    def __iter__(self) -> "TrainIterator":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = next(self._iterator)
        if self._num_workers:
            # Workers send batches in shared memory, unlinked when their array is collected: one still held at
            # interpreter exit (a script keeping a batch) fails in Grain's __del__, a traceback per array. A copy
            # (~3 ms for 1024 Fashion-MNIST images measured here, against ~140 ms to decode them) lets it go now.
            batch = {k: np.array(v) for k, v in batch.items()}
        self._next += 1
        return batch

    def get_state(self) -> dict[str, int]:
        return {"batch": self._next}

    def set_state(self, state: dict[str, Any]) -> None:
        if "batch" in state:
            batch = int(state["batch"])
        elif "next_index" in state:  # ddpm-eqx before 0.2: grain's prefetch thread's (or plain) iterator state
            batch = int(state["next_index"])
        elif "iterators_in_use_states" in state:  # ... or its worker iterator's
            batch = _batches_taken(state)
        else:
            raise DataError(f"the checkpoint's data-iterator state has unknown keys {sorted(state)}")
        self.close()
        self._next = batch
        self._iterator = _iterate(self._batches[batch:], self._num_workers, self._prefetch)

    def close(self) -> None:
        self._iterator.close()

    def release(self) -> None:
        """Close, and drop Grain's iterators (at exit): a later ``next`` ends the iteration."""
        self.close()
        self._iterator = _Exhausted()


class _Exhausted:
    def __next__(self) -> dict[str, np.ndarray]:
        raise StopIteration

    def close(self) -> None:
        pass


def _batches_taken(state: dict[str, Any]) -> int:
    """The batches a worker iterator's (grain 0.2's ``mp_prefetch``) state has handed out: its workers take
    batches in turn, each worker's state counting its own."""
    return sum(int(s.get("next_index", 0)) for s in state.get("iterators_in_use_states", []))


def make_train_iterator(
    cfg: DataConfig, *, seed: int, examples: int | None = None, process_index: int | None = None,
    process_count: int | None = None
) -> TrainIterator:
    """An endless iterator over this process's batches; ``get_state()/set_state()`` resume it exactly.

    ``seed`` is the global seed: shuffle and flips derive from (seed, process index), and the order is
    reshuffled every epoch. ``process_index/count`` default to JAX's (overridable for tests). With the
    cache the ``cfg.num_workers`` processes only decode the split; batches are gathered here. ``examples``:
    how many the run will draw in all (all processes); with ``cfg.cache=None`` fewer than the split's size
    means reading from disk (None: endless, so the split is cached wherever it fits).
    """
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    if cfg.batch_size % count:
        raise DataError(f"data.batch_size={cfg.batch_size} must be divisible by the process count ({count})")
    read = _reader(cfg, cfg.split)
    total = len(read.source)
    # Strided shards, so that class-sorted files still give every process every class; the first total % count
    # processes hold one example more (no example is left out of every epoch).
    if total < count:
        raise DataError(f"{cfg.dataset}[{cfg.split}] has {total} examples, fewer than {count} processes")
    per_process = total // count + (index < total % count)
    start, stride = index, count
    shuffle_seed, flip_seed = (int(s) for s in np.random.SeedSequence([seed % 2**32, index]).generate_state(2))

    nbytes = per_process * cfg.image_size**2 * cfg.channels
    fits = nbytes < psutil.virtual_memory().available // 2  # leave half the memory to everything else
    what = f"{cfg.dataset}[{cfg.split}]"
    if cfg.cache and not fits:
        warnings.warn(f"data.cache: the decoded split ({nbytes / 2**30:.1f} GiB) does not fit in memory; "
                      "reading from disk instead", stacklevel=2)
    cache = fits and (cfg.cache if cfg.cache is not None else examples is None or examples >= total)
    if cfg.cache is None:
        reads = "endlessly" if examples is None else f"{examples / total:.3g}x"
        log.info("data: %s %s (%.0f MiB decoded; the run reads it %s)", what,
                 "decoded once into memory" if cache else "read from disk", nbytes / 2**20, reads)
    reader: _ReadRecords | _InMemory = read
    workers = cfg.num_workers
    if cache:
        shard = np.arange(index, total, count)
        reader = _InMemory(*_decode(read, shard, cfg.num_workers, what))
        start, stride = 0, 1  # positions in the decoded shard
        # Workers only decode the split: gathering a cached batch (~3 ms for 128) costs less than passing
        # it between processes (38k vs 19k images/s measured), and each worker would need its own copy.
        workers = 0
    size = cfg.batch_size // count
    order = _ShuffledIds(start, stride, per_process, shuffle_seed, size)
    # An endless dataset of batch numbers (its iterator's state is the next one, as with grain's own batching).
    make_batch = _MakeBatch(order, reader, flip_seed if cfg.random_flip else None)
    iterator = TrainIterator(grain.MapDataset.range(sys.maxsize // size).map(make_batch), workers, cfg.prefetch)
    if cache:
        _from_memory.add(iterator)
    return iterator


def reads_from_memory(iterator: Any) -> bool:
    """Whether ``iterator``, from :func:`make_train_iterator`, gathers its batches from the decoded split
    (``data.cache``, asked for or decided) rather than reading them from disk."""
    return iterator in _from_memory
