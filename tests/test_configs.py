"""The shipped configs named after the seed's carry the seed's values (the newest version of its configs/*.py,
transcribed here as reference data), where ddpm-eqx has the same option."""

from pathlib import Path

import pytest

from ddpm_eqx.config import load_config_file

ROOT = Path(__file__).resolve().parents[1]

_COMMON = {"training.log_every_steps": 100, "training.loss_type": "l1", "training.half_precision": False,
           "training.save_and_sample_every": 1000, "ema.beta": 0.995, "ema.update_every": 10,
           "ema.update_after_step": 100, "ema.inv_gamma": 1.0, "ema.power": 2 / 3, "ema.min_value": 0.0,
           "ddpm.timesteps": 1000, "ddpm.p2_loss_weight_k": 1.0, "optim.optimizer": "Adam", "optim.beta1": 0.9,
           "optim.beta2": 0.99, "optim.eps": 1e-8, "seed": 42}
_OXFORD = {"training.num_train_steps": 700_000, "training.num_sample": 64, "ddpm.beta_schedule": "cosine",
           "data.dataset": "oxford_flowers102", "data.batch_size": 64, "data.image_size": 128, "data.channels": 3,
           "model.dim": 64, "model.dim_mults": (1, 2, 4, 8), "optim.lr": 2e-4}
SEED = {
    "fashion_mnist": {"training.num_train_steps": 12_000, "training.num_sample": 64, "ddpm.beta_schedule": "linear",
                      "ddpm.p2_loss_weight_gamma": 0.0, "data.dataset": "fashion_mnist", "data.batch_size": 1024,
                      "data.image_size": 28, "data.channels": 1, "model.dim": 64, "model.dim_mults": (1, 2, 4),
                      "optim.lr": 1e-3},
    "cifar10": {"training.num_train_steps": 700_000, "training.num_sample": 36, "ddpm.beta_schedule": "cosine",
                "ddpm.p2_loss_weight_gamma": 0.0, "ddpm.self_condition": True, "data.dataset": "cifar10",
                "data.batch_size": 1024, "data.image_size": 32, "data.channels": 3, "model.dim": 64,
                "model.dim_mults": (1, 2, 4, 8), "optim.lr": 1e-3},
    "oxford102": {**_OXFORD, "ddpm.p2_loss_weight_gamma": 0.0, "ddpm.self_condition": False},
    "oxford102_p2": {**_OXFORD, "ddpm.p2_loss_weight_gamma": 1.0, "ddpm.self_condition": False},
    "oxford102_p2_selfcondition": {**_OXFORD, "ddpm.p2_loss_weight_gamma": 1.0, "ddpm.self_condition": True},
}


@pytest.mark.parametrize("name", sorted(SEED))
def test_a_config_named_after_the_seeds_has_its_values(name: str) -> None:
    cfg = load_config_file(ROOT / "configs" / f"{name}.py")
    for key, expected in {**_COMMON, **SEED[name]}.items():
        value = cfg
        for part in key.split("."):
            value = getattr(value, part)
        assert value == pytest.approx(expected) if isinstance(expected, float) else value == expected, (key, value)


def test_a_runs_config_json_is_a_config_file_and_other_files_are_one_line_errors(tmp_path) -> None:
    """`--config runs/x/config.json` crashed with an AssertionError (it was imported as Python)."""
    import dataclasses

    from ddpm_eqx.config import Config, ConfigError, to_json

    cfg = dataclasses.replace(Config(), seed=7)
    (tmp_path / "config.json").write_text(to_json(cfg))
    assert load_config_file(tmp_path / "config.json") == cfg
    (tmp_path / "notes.txt").write_text("lr 1e-3")
    with pytest.raises(ConfigError, match="notes.txt' is neither a .py with get_config\\(\\) nor a run's config.json"):
        load_config_file(tmp_path / "notes.txt")
    (tmp_path / "bad.json").write_text('{"optim": {"learning_rate": 1}}')
    with pytest.raises(ConfigError, match="bad.json is not a ddpm-eqx run's config.json"):
        load_config_file(tmp_path / "bad.json")
    (tmp_path / "torn.json").write_text('{"optim": {"lr"')
    with pytest.raises(ConfigError, match="torn.json is not a ddpm-eqx run's config.json"):
        load_config_file(tmp_path / "torn.json")
    # A folder (a run's), and a .py that fails in itself: one line naming the file and line (a traceback before).
    with pytest.raises(ConfigError, match=f"is a folder; pass --config {tmp_path / 'config.json'} .* or --workdir"):
        load_config_file(tmp_path)
    (tmp_path / "syntax.py").write_text("def get_config(:\n    pass\n")
    (tmp_path / "value.py").write_text("from ddpm_eqx.config import Config\n\n\ndef get_config():\n"
                                       "    return Config(seed=1 // 0)\n")
    (tmp_path / "missing.py").write_text("import no_such_module_here\n")
    for name, message in [("syntax.py:1: SyntaxError", "invalid syntax"),
                          ("value.py:5: ZeroDivisionError", "integer division or modulo by zero"),
                          ("missing.py:1: ModuleNotFoundError", "No module named 'no_such_module_here'")]:
        with pytest.raises(ConfigError) as err:
            load_config_file(tmp_path / name.split(":")[0])
        assert str(err.value).startswith(f"{tmp_path / name}: {message}")


def test_a_workdir_alone_that_holds_no_run_says_so(tmp_path) -> None:
    """`train --workdir EMPTY` read "give --dataset ..., --config FILE, or --workdir of a run to continue", as if
    --workdir had not been given."""
    import cli
    from ddpm_eqx.config import ConfigError

    with pytest.raises(ConfigError, match=f"^--workdir {tmp_path} holds no run to continue \\(no checkpoint, no "
                                          "config.json\\); give --dataset NAME or --config FILE to start one there$"):
        cli.resolve_config(None, None, [], tmp_path)
