"""Fine-tuning (``train --init-from``): a new run from another run's EMA weights, at step 0, fresh optimizer."""

import json
import shutil
import subprocess

import numpy as np
import pytest

from _cli import TINY, _cmd, _env, in_process_config


def _source(workdir, cfg):  # noqa: ANN001, ANN202
    """A run's checkpoint at step 5 whose EMA differs from its model, with its config in the meta."""
    import equinox as eqx
    import jax

    from ddpm_eqx.checkpoint import Checkpointer
    from ddpm_eqx.config import to_dict
    from ddpm_eqx.state import build_model, init_state, make_optimizer

    state = init_state(build_model(cfg), make_optimizer(cfg.optim, cfg.training.num_train_steps))
    ema = jax.tree_util.tree_map(lambda x: 0.5 * x + 0.25 if eqx.is_inexact_array(x) else x, state.ema_model)
    state = eqx.tree_at(lambda s: s.ema_model, state, ema)
    ckpt = Checkpointer(workdir / "checkpoints", async_save=False)
    ckpt.save(5, state, None, {"step": 5, "config": to_dict(cfg)})
    ckpt.close()
    return state


def _arrays(tree):  # noqa: ANN001, ANN202
    import equinox as eqx
    import jax

    return [np.asarray(x) for x in jax.tree_util.tree_leaves(eqx.filter(tree, eqx.is_array))]


def test_init_from_takes_the_sources_ema_weights_read_with_the_config_it_was_trained_with(tmp_path):
    """The source trained with another optimizer (clipping, AdamW, a cosine schedule: another optimizer state)
    and no dropout; the new run keeps its own config's non-weight fields (dropout) and the source's EMA arrays."""
    from ddpm_eqx.config import Config, apply_overrides
    from ddpm_eqx.state import state_skeleton
    from ddpm_eqx.train import initial_weights

    source_cfg = apply_overrides(Config(), [*TINY, "optim.grad_clip=1.0", "optim.optimizer=AdamW",
                                            "optim.weight_decay=0.01", "optim.cosine_decay=true"])
    source = _source(tmp_path / "source", source_cfg)
    cfg = apply_overrides(Config(), [*TINY, "model.dropout=0.1", "data.image_size=16", "seed=3"])
    skeleton = state_skeleton(cfg).model
    (tmp_path / "new").mkdir()
    for where in (tmp_path / "source", tmp_path / "source" / "checkpoints", tmp_path / "source" / "checkpoints" / "5"):
        model = initial_weights(cfg, skeleton, where, tmp_path / "new")
        for got, want in zip(_arrays(model), _arrays(source.ema_model), strict=True):
            np.testing.assert_array_equal(got, want)
        assert model.dropout == 0.1 and source.ema_model.dropout == 0.0
        assert json.loads((tmp_path / "new" / "init_from.json").read_text()) == {
            "init_from": str(where), "checkpoint": str(tmp_path / "source" / "checkpoints" / "5"), "step": 5}


def test_init_from_another_architecture_names_the_settings_that_differ(tmp_path, caplog):
    """Refused even where the shapes fit (2 heads of 4 have the shapes of 1 head of 8); a source without a config
    in its meta is held to the shapes; another diffusion or other class labels are trained from, with a warning."""
    from ddpm_eqx.checkpoint import Checkpointer, CheckpointError
    from ddpm_eqx.config import Config, apply_overrides
    from ddpm_eqx.state import state_skeleton
    from ddpm_eqx.train import initial_weights

    source_cfg = apply_overrides(Config(), [*TINY, "model.num_classes=3"])
    source = _source(tmp_path / "source", source_cfg)

    def init(*overrides: str):  # noqa: ANN202
        cfg = apply_overrides(source_cfg, list(overrides))
        return initial_weights(cfg, state_skeleton(cfg).model, tmp_path / "source")

    with pytest.raises(CheckpointError, match=r"--init-from .*source: its model is another architecture than this "
                                              r"config's \(model.dim=8 there, 16 here; ddpm.self_condition=False "
                                              r"there, True here\); --set the model to match it"):
        init("model.dim=16", "ddpm.self_condition=true")
    with pytest.raises(CheckpointError, match=r"\(model.attn_heads=1 there, 2 here; model.attn_dim_head=8 there, "
                                              r"4 here\)"):
        init("model.attn_heads=2", "model.attn_dim_head=4")
    with caplog.at_level("WARNING"):
        model = init("ddpm.objective=pred_v", "ddpm.timesteps=500", "data.dataset=mnist")
    [warned] = [r.getMessage() for r in caplog.records if "--init-from" in r.getMessage()]
    assert ("the source was trained for something else (objective 'pred_noise' there, 'pred_v' here; "
            "ddpm.timesteps=1000 there, 500 here; class labels of 'fashion_mnist' there, of 'mnist' here") in warned
    for got, want in zip(_arrays(model), _arrays(source.ema_model), strict=True):
        np.testing.assert_array_equal(got, want)
    # Without a config in the meta (as a hand-made checkpoint), the shapes decide.
    ckpt = Checkpointer(tmp_path / "bare" / "checkpoints", async_save=False)
    ckpt.save(2, source, None, {"step": 2})
    ckpt.close()
    caplog.clear()
    with caplog.at_level("WARNING"):
        model = initial_weights(source_cfg, state_skeleton(source_cfg).model, tmp_path / "bare")
    assert any("step 2 holds no config this version reads; its weights fit" in r.getMessage() for r in caplog.records)
    for got, want in zip(_arrays(model), _arrays(source.ema_model), strict=True):
        np.testing.assert_array_equal(got, want)
    cfg = apply_overrides(source_cfg, ["model.dim=16"])
    with pytest.raises(CheckpointError, match=r"--init-from .*bare: its checkpoints name no config, and their "
                                              r"weights have other shapes than this config's model \(expected array "
                                              r"shape .*\); --set the model to match them"):
        initial_weights(cfg, state_skeleton(cfg).model, tmp_path / "bare")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="--init-from .*empty: no checkpoint in"):
        initial_weights(cfg, state_skeleton(cfg).model, tmp_path / "empty")
    assert not (tmp_path / "source" / "init_from.json").exists()


@pytest.mark.slow
def test_a_fine_tuning_run_starts_at_step_0_with_a_fresh_optimizer_from_the_sources_ema(fashion_mnist_data_dir,
                                                                                        tmp_path):
    """Adam's first update moves each weight by at most the learning rate (|m / sqrt(v)| = 1 at step 1), so after
    one step every weight is within lr of the source's EMA, and far from the weights the config would draw."""
    import jax

    from ddpm_eqx.checkpoint import Checkpointer
    from ddpm_eqx.config import apply_overrides
    from ddpm_eqx.state import build_model
    from ddpm_eqx.train import train

    cfg = apply_overrides(in_process_config(fashion_mnist_data_dir), ["training.num_train_steps=1"])
    source = _source(tmp_path / "source", apply_overrides(cfg, ["optim.optimizer=AdamW", "optim.weight_decay=0.1"]))
    result = train(cfg, tmp_path / "new", init_from=tmp_path / "source", progress=False)
    assert result.step == 1 and int(result.state.step) == 1
    counts = [int(x) for x in jax.tree_util.tree_leaves(result.state.opt_state) if np.ndim(x) == 0]
    assert counts and set(counts) == {1}
    moved = [np.abs(a - b).max() for a, b in zip(_arrays(result.state.model), _arrays(source.ema_model), strict=True)]
    assert max(moved) <= cfg.optim.lr * (1 + 1e-5) and max(moved) > 0
    fresh = [np.abs(a - b).max() for a, b in zip(_arrays(result.state.model), _arrays(build_model(cfg)), strict=True)]
    assert max(fresh) > 100 * cfg.optim.lr
    # Its checkpoints name where it started (the meta travels into a W&B artifact; init_from.json does not).
    reader = Checkpointer(tmp_path / "new" / "checkpoints", read_only=True)
    origin = reader.restore_meta(1)["init_from"]
    reader.close()
    assert origin == {"init_from": str(tmp_path / "source"),
                      "checkpoint": str(tmp_path / "source" / "checkpoints" / "5"), "step": 5}
    # A rerun resumes its own checkpoint (step 1), as with --restore-from.
    assert train(cfg, tmp_path / "new", init_from=tmp_path / "source", progress=False).step == 1
    # Stopped before its first checkpoint, a rerun without the flag starts from the same weights again.
    shutil.rmtree(tmp_path / "new" / "checkpoints")
    again = train(cfg, tmp_path / "new", progress=False)
    for a, b in zip(_arrays(again.state.model), _arrays(result.state.model), strict=True):
        np.testing.assert_array_equal(a, b)


def test_restore_from_and_init_from_together_are_refused(tmp_path):
    args = _cmd("train", "--dataset", "fashion_mnist", "--workdir", str(tmp_path / "never"), "--restore-from", "a",
                "--init-from", "b")
    result = subprocess.run(args, env=_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.strip() == (
        "error: --restore-from continues another run, --init-from starts a new one from its weights: give one of them")
    assert not (tmp_path / "never").exists()
