"""The stored train step and sampler (ddpm_eqx.trace_cache): bitwise the traced ones, read back without tracing,
keyed on everything that shapes the trace; a damaged file is traced again, and a step jax.export refuses runs as
before."""

import logging

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ddpm_eqx import trace_cache
from ddpm_eqx.config import Config, apply_overrides, to_json
from ddpm_eqx.parallel import make_mesh, replicate, shard_batch
from ddpm_eqx.step import make_train_step
from ddpm_eqx.train import build_state

TINY = ["model.dim=8", "model.dim_mults=1", "model.resnet_block_groups=4", "model.attn_heads=1",
        "model.attn_dim_head=8", "data.image_size=8", "data.batch_size=8", "ddpm.timesteps=100"]


def _two_steps(cfg: Config, directory, *, filter_jit: bool = False):  # noqa: ANN001, ANN202
    """Two steps; ``filter_jit``: through ``eqx.filter_jit`` of the step function (the reference), not the
    train step's own dispatch on the state's array leaves."""
    mesh = make_mesh()
    state, process, optimizer = build_state(cfg)
    state, process = replicate(state, mesh), replicate(process, mesh)
    step = make_train_step(cfg, process, optimizer, mesh, trace_cache=directory)
    rng = np.random.default_rng(0)
    losses = []
    for _ in range(2):
        batch = shard_batch((rng.uniform(-1, 1, (8, 1, 8, 8)).astype(np.float32), np.zeros(8, np.int32)), mesh)
        state, metrics = (step._fn if filter_jit else step)(state, *batch)
        losses.append(np.asarray(metrics["loss"]))
    leaves = [np.asarray(x) for x in jax.tree_util.tree_leaves(eqx.filter(state, eqx.is_array))]
    return leaves + losses, step.traces, type(state)


def _no_tracing(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
    """Stands in for ``jax.export.export`` where a stored program must be read, not traced."""
    raise AssertionError("traced although the program was stored")


def _assert_bitwise(a: list[np.ndarray], b: list[np.ndarray]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)


def test_stored_step_is_the_traced_step_bitwise_and_is_read_back_without_tracing(tmp_path, monkeypatch, caplog):
    cfg = apply_overrides(Config(), TINY)
    directory = tmp_path / "traces"

    def refused(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise ValueError("custom call not allowed")

    reference, traces, _ = _two_steps(cfg, None, filter_jit=True)
    assert traces == 1
    # A step jax.export refuses runs as without a cache (jitted here, on the state's array leaves).
    with monkeypatch.context() as m, caplog.at_level(logging.WARNING, logger="ddpm_eqx"):
        m.setattr(trace_cache.export, "export", refused)
        refused_run, traces, _ = _two_steps(cfg, directory)
    _assert_bitwise(refused_run, reference)
    assert traces == 1 and not directory.exists()
    assert any("cannot be stored (ValueError: custom call not allowed)" in r.getMessage() for r in caplog.records)

    stored, traces, state_type = _two_steps(cfg, directory)  # traced now, stored
    _assert_bitwise(stored, reference)
    assert traces == 1 and state_type.__name__ == "TrainState"
    [path] = directory.glob("train_step-*.jaxexport")
    assert not [p for p in directory.iterdir() if p.name.startswith(".")]  # no temporary file left behind

    caplog.clear()
    with monkeypatch.context() as m, caplog.at_level(logging.INFO, logger="ddpm_eqx"):
        m.setattr(trace_cache.export, "export", _no_tracing)
        read, traces, _ = _two_steps(cfg, directory)
    _assert_bitwise(read, reference)
    assert traces == 1
    assert [r.getMessage() for r in caplog.records if "train step" in r.getMessage()] == [
        f"train step read from {directory}"]  # not the plain step after a refused export

    path.write_bytes(path.read_bytes()[:1000])  # a damaged file: traced again, with a warning, and replaced
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ddpm_eqx"):
        again, _, _ = _two_steps(cfg, directory)
    _assert_bitwise(again, reference)
    assert any("could not read the stored trace" in r.getMessage() for r in caplog.records)
    assert len(path.read_bytes()) > 1000


def test_the_key_covers_config_arguments_source_and_environment(monkeypatch):
    cfg = to_json(apply_overrides(Config(), TINY))
    args = ([jnp.zeros((3, 4)), jnp.zeros((), jnp.int32)], jnp.zeros((8, 1, 8, 8)))
    key = trace_cache.cache_key("train_step", cfg, args)
    assert key == trace_cache.cache_key("train_step", cfg, args)  # deterministic
    changed = [
        trace_cache.cache_key("sampler", cfg, args),
        trace_cache.cache_key("train_step", to_json(apply_overrides(Config(), [*TINY, "optim.lr=5e-4"])), args),
        trace_cache.cache_key("train_step", cfg, ([jnp.zeros((3, 5)), args[0][1]], args[1])),  # a shape
        trace_cache.cache_key("train_step", cfg, ([jnp.zeros((3, 4), jnp.bfloat16), args[0][1]], args[1])),
    ]
    monkeypatch.setattr(trace_cache, "_source_digest", lambda: "edited")
    changed.append(trace_cache.cache_key("train_step", cfg, args))
    monkeypatch.undo()
    monkeypatch.setattr(trace_cache, "describe", lambda: {"packages": {"jax": "0.0.1"}})
    changed.append(trace_cache.cache_key("train_step", cfg, args))
    monkeypatch.undo()
    with jax.default_matmul_precision("highest"):  # a jax.config value
        changed.append(trace_cache.cache_key("train_step", cfg, args))
    assert len({key, *changed}) == len(changed) + 1, [k == key for k in changed]


def test_the_source_stamp_sees_a_file_written_added_or_removed(tmp_path):
    from ddpm_eqx import _source

    (tmp_path / "a.py").write_text("x = 1\n")
    before = _source.stamp(tmp_path)
    assert _source.stamp(tmp_path) == before
    (tmp_path / "a.py").write_text("x = 22\n")
    written = _source.stamp(tmp_path)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.py").write_text("")
    added = _source.stamp(tmp_path)
    (tmp_path / "a.py").unlink()
    assert len({before, written, added, _source.stamp(tmp_path)}) == 4
    # An editor's dangling lock link (Emacs: .#name.py) is no source file: importing ddpm_eqx crashed on it.
    (tmp_path / ".#b.py").symlink_to(tmp_path / "nowhere")
    (tmp_path / "sub" / "c.py").mkdir()  # nor a folder that looks like one
    assert [name for name, *_ in _source.stamp(tmp_path)] == ["sub/b.py"]
    assert _source.unchanged()  # the package itself, as imported


def test_source_edited_after_import_is_traced_not_read_or_stored(tmp_path, monkeypatch, caplog):
    """The key reads the source on disk; where it is no longer what this process imported (a notebook that
    edits a module, an editor saving during start-up), the program in memory would be stored under the
    edited code's key (and read back by every later run of it): it is traced as without the cache."""
    from ddpm_eqx import _source

    directory = tmp_path / "traces"
    args = (jnp.arange(3.0),)
    monkeypatch.setattr(_source, "AT_IMPORT", ())  # as if every file had been written since the import
    with caplog.at_level(logging.WARNING, logger="ddpm_eqx"):
        program = trace_cache.stored_program("double", lambda x: 2 * x, args, determines="", directory=directory)
    assert program is None and not directory.exists()
    assert "changed after this process imported them" in caplog.text
    monkeypatch.undo()
    program = trace_cache.stored_program("double", lambda x: 2 * x, args, determines="", directory=directory)
    assert program is not None and len(list(directory.iterdir())) == 1
    np.testing.assert_array_equal(program(*args), [0.0, 2.0, 4.0])


def test_off_with_the_environment_variable(monkeypatch):
    monkeypatch.setenv("DDPM_EQX_TRACE_CACHE", "0")
    assert not trace_cache.enabled() and trace_cache.default_directory() is None
    monkeypatch.setenv("DDPM_EQX_TRACE_CACHE", "1")
    assert trace_cache.enabled()  # one process; the CLI's runs check that the XLA cache's folder is used


def test_stored_sampler_draws_the_traced_samplers_images_per_argument_and_batch_shape(tmp_path, monkeypatch, caplog):
    from ddpm_eqx.diffusion import make_diffusion
    from ddpm_eqx.generate import ShardedSampler
    from ddpm_eqx.train import build_model

    cfg = apply_overrides(Config(), TINY)
    mesh = make_mesh()
    model = replicate(build_model(cfg), mesh)
    process = make_diffusion(cfg.ddpm, cfg.training.loss_type)
    directory = tmp_path / "traces"
    keys = jax.random.split(jax.random.key(3), 5)

    def draw(steps: int, n: int, stored: bool) -> np.ndarray:
        kwargs = dict(trace_cache=directory, determines=to_json(cfg)) if stored else {}
        sampler = ShardedSampler(process, model, (1, 8, 8), mesh, sampler="ddim", steps=steps, **kwargs)
        return sampler(model, keys[:n])

    cases = [(3, 2), (4, 2), (3, 5)]  # (DDIM steps, batch): one argument of the sampler, one shape
    reference = {case: draw(*case, stored=False) for case in cases}
    assert not np.array_equal(reference[3, 2], reference[4, 2])  # the two step counts draw differently
    for case, images in reference.items():  # traced now and stored: one file per steps and batch shape
        np.testing.assert_array_equal(draw(*case, stored=True), images)
    assert len(list(directory.glob("sampler-*.jaxexport"))) == 3

    monkeypatch.setattr(trace_cache.export, "export", _no_tracing)
    caplog.clear()  # the stores above log too where an earlier test left the package's logger at INFO
    with caplog.at_level(logging.INFO, logger="ddpm_eqx"):
        np.testing.assert_array_equal(draw(4, 2, stored=True), reference[4, 2])  # a new sampler reads it back
    assert [r.getMessage() for r in caplog.records] == [f"sampler read from {directory}"]


def test_a_state_with_other_static_leaves_or_structure_gets_its_own_program():
    from ddpm_eqx.state import TrainState
    from ddpm_eqx.step import TrainStep

    traces = [0]

    def fn(state, images, labels):  # noqa: ANN001, ANN202  (scales the weights by the static leaf `model[1]`)
        traces[0] += 1
        weights, scale = state.model
        model = (weights * scale + images.sum(), scale)
        return TrainState(state.step + 1, model, state.ema_model, state.opt_state), {"loss": weights.sum()}

    step = TrainStep(fn, traces)
    images, labels = jnp.ones((2, 1, 2, 2)), jnp.zeros(2, jnp.int32)

    def state(scale, n=3):  # noqa: ANN001, ANN202
        return TrainState(jnp.zeros((), jnp.int32), (jnp.ones(n), scale), None, None)

    out, metrics = step(state(2.0), images, labels)
    np.testing.assert_array_equal(out.model[0], np.full(3, 1 * 2.0 + 8))
    assert out.model[1] == 2.0 and int(out.step) == 1 and float(metrics["loss"]) == 3.0 and traces == [1]
    out, _ = step(state(3.0), images, labels)  # another static leaf: traced again, not the 2.0 program
    np.testing.assert_array_equal(out.model[0], np.full(3, 1 * 3.0 + 8))
    assert out.model[1] == 3.0 and traces == [2]
    out, _ = step(state(3.0, n=4), images, labels)  # another shape: jit traces again
    assert out.model[0].shape == (4,) and traces == [3]
    out, _ = step(out, images, labels)  # the same signature: no trace
    np.testing.assert_array_equal(out.model[0], np.full(4, (3.0 + 8) * 3.0 + 8))
    assert traces == [3]


def test_a_stored_step_is_keyed_by_the_states_static_leaves_too(tmp_path):
    """With a trace cache, a state differing only in a static leaf (a dropout rate) was traced again, then handed
    the first state's stored program: the first scale's numbers, silently, in this process and the next."""
    from ddpm_eqx.state import TrainState
    from ddpm_eqx.step import TrainStep

    def fn(state, images, labels):  # noqa: ANN001, ANN202  (scales the weights by the static leaf `model[1]`)
        weights, scale = state.model
        return TrainState(state.step + 1, (weights * scale + images.sum(), scale), None, None), {"loss": weights.sum()}

    images, labels = jnp.ones((2, 1, 2, 2)), jnp.zeros(2, jnp.int32)
    for scale in (2.0, 3.0, 3.0, 2.0):  # a new step each time: the later ones read what the earlier ones stored
        step = TrainStep(fn, [0], trace_cache=tmp_path)
        out, _ = step(TrainState(jnp.zeros((), jnp.int32), (jnp.ones(3), scale), None, None), images, labels)
        np.testing.assert_array_equal(out.model[0], np.full(3, scale + 8))
    assert len(list(tmp_path.glob("train_step*"))) == 2


def test_the_stored_programs_key_leaves_out_only_what_no_program_reads():
    """A run extended (training.num_train_steps) or logged differently traced its step again and stored a
    byte-identical copy: the key was the whole config. Now it is :func:`program_json`: every field it leaves out
    is changed here and the lowered train step is the same text; a field it keeps (the cosine schedule's length)
    changes the program."""
    from ddpm_eqx.config import program_json

    def lowered(cfg: Config) -> str:
        mesh = make_mesh()
        state, process, optimizer = build_state(cfg)
        state, process = replicate(state, mesh), replicate(process, mesh)
        step = make_train_step(cfg, process, optimizer, mesh)
        batch = shard_batch((np.zeros((8, 1, 8, 8), np.float32), np.zeros(8, np.int32)), mesh)
        return eqx.filter_jit(step._fn).lower(state, *batch).as_text()

    base = apply_overrides(Config(), [*TINY, "optim.warmup_steps=10"])
    other = apply_overrides(base, [
        "data.dataset=/elsewhere/faces.npz", "data.split=train[:50%]", "data.cache=true", "data.data_dir=/tmp/x",
        "data.manual_dir=/tmp/y", "data.num_workers=3", "data.prefetch=5", "data.random_flip=false",
        "training.num_train_steps=99", "training.log_every_steps=7", "training.save_and_sample_every=9",
        "training.num_sample=5", "training.max_to_keep=9", "training.eval_every=50", "training.eval_num=20",
        "wandb.mode=offline", "wandb.project=other", "sampling.sampler=ddim", "sampling.steps=10", "sampling.eta=0.5"])
    assert to_json(other) != to_json(base) and program_json(other) == program_json(base)
    assert lowered(other) == lowered(base)
    cosine = apply_overrides(base, ["optim.cosine_decay=true"])
    longer = apply_overrides(cosine, ["training.num_train_steps=99"])
    assert program_json(longer) != program_json(cosine) and lowered(longer) != lowered(cosine)
    for kept in ("optim.lr=3e-4", "seed=3", "ema.beta=0.9", "training.cond_drop_prob=0.2", "ddpm.objective=pred_v"):
        assert program_json(apply_overrides(base, [kept])) != program_json(base), kept
