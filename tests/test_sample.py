"""Samplers: DDIM(eta=1, all steps) = DDPM, exact sampling of a Gaussian with its optimal denoiser."""

import re

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_eqx.diffusion import GaussianDiffusion
from ddpm_eqx.generate import ShardedSampler
from ddpm_eqx.parallel import make_mesh
from ddpm_eqx.sample import ddim_sigma, ddim_step, ddim_timesteps, ddpm_step, guided, sample


class GaussianOracle(eqx.Module):
    """The exact x_0-predictor E[x_0 | x_t] for data x_0 ~ N(mu, s^2) per pixel (an optimal network)."""

    alphas_cumprod: jax.Array
    mu: float = eqx.field(static=True)
    s: float = eqx.field(static=True)
    objective: str = eqx.field(static=True)
    label_shift: float = eqx.field(static=True, default=0.0)

    def __call__(self, x, t, *, x_self_cond=None, label=None, key=None, inference=True):
        mu = self.mu + (0.0 if label is None else self.label_shift * label)
        ab = self.alphas_cumprod[t]
        gain = jnp.sqrt(ab) * self.s**2 / (ab * self.s**2 + 1 - ab)
        x0 = mu + gain * (x - jnp.sqrt(ab) * mu)
        if self.objective == "pred_x0":
            return x0
        eps = (x - jnp.sqrt(ab) * x0) / jnp.sqrt(1 - ab)
        if self.objective == "pred_v":
            return jnp.sqrt(ab) * eps - jnp.sqrt(1 - ab) * x0
        return eps


def _process(objective="pred_noise", schedule="linear", T=1000):
    return GaussianDiffusion(timesteps=T, beta_schedule_name=schedule, objective=objective)


def test_ddim_eta_one_over_all_steps_is_ddpm():
    process = _process(schedule="cosine")
    oracle = GaussianOracle(process.alphas_cumprod, 0.1, 0.3, "pred_noise")
    denoise = guided(oracle, None, 1.0)
    ts, t_prevs = ddim_timesteps(1000, 1000)
    np.testing.assert_array_equal(ts, np.arange(999, -1, -1))
    np.testing.assert_array_equal(t_prevs, ts - 1)
    x = jax.random.normal(jax.random.key(0), (1, 6, 6))
    for t in [999, 500, 20, 1]:
        t = jnp.int32(t)
        sigma2 = ddim_sigma(process, t, t - 1, 1.0) ** 2
        np.testing.assert_allclose(sigma2, process.posterior_variance[t], rtol=1e-3)  # fp32: 1 - ab/ab_prev
        key = jax.random.key(int(t))
        a, _ = ddpm_step(process, denoise, x, jnp.zeros_like(x), t, key)
        b, _ = ddim_step(process, denoise, x, jnp.zeros_like(x), t, t - 1, 1.0, key)
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize(
    "objective,sampler,steps,eta",
    [("pred_noise", "ddpm", None, 0.0), ("pred_x0", "ddpm", None, 0.0), ("pred_v", "ddpm", None, 0.0),
     ("pred_noise", "ddim", 1000, 0.0)],
)
def test_samplers_draw_the_data_distribution_with_the_optimal_denoiser(objective, sampler, steps, eta):
    """With the exact E[x_0|x_t] of Gaussian data the samples must have the data's mean and std.

    (Deterministic DDIM is exact only in the limit of many steps: with 50 steps on this narrow
    Gaussian it gives std 0.124 instead of 0.15, with 1000 steps 0.148.)
    """
    mu, s = 0.2, 0.15
    process = _process(objective=objective)
    oracle = GaussianOracle(process.alphas_cumprod, mu, s, objective)
    keys = jax.random.split(jax.random.key(1), 8)
    images = np.asarray(sample(process, oracle, keys, (1, 16, 16), sampler=sampler, steps=steps, eta=eta))
    n = images.size
    assert abs(images.mean() - mu) < 5 * s / np.sqrt(n)
    assert abs(images.std() / s - 1) < 0.06


def test_sampling_is_deterministic_per_key_and_independent_of_the_batch():
    process = _process(T=50, schedule="cosine")
    oracle = GaussianOracle(process.alphas_cumprod, 0.0, 0.5, "pred_noise")
    keys = jax.random.split(jax.random.key(2), 4)
    a = sample(process, oracle, keys, (1, 4, 4))
    b = sample(process, oracle, keys, (1, 4, 4))
    np.testing.assert_array_equal(a, b)
    c = sample(process, oracle, keys[2:], (1, 4, 4))
    np.testing.assert_allclose(a[2:], c, atol=1e-6)
    assert not np.allclose(a[0], a[1])
    assert float(jnp.max(jnp.abs(a))) <= 1.0


def test_classifier_free_guidance_extrapolates_from_the_unconditional_output():
    process = _process(T=50)
    oracle = GaussianOracle(process.alphas_cumprod, 0.0, 0.2, "pred_x0", label_shift=0.1)
    x, t, label = jnp.full((1, 2, 2), 0.3), jnp.int32(10), jnp.int32(2)
    cond, uncond = oracle(x, t, label=label), oracle(x, t)
    for w in [1.0, 3.0]:
        np.testing.assert_allclose(guided(oracle, label, w)(x, t, None), uncond + w * (cond - uncond), rtol=1e-6)
    labels = jnp.array([0, 2])
    images = sample(process, oracle, jax.random.split(jax.random.key(3), 2), (1, 8, 8), labels=labels, guidance=2.0)
    assert images.shape == (2, 1, 8, 8)


def test_return_path_starts_at_noise_and_ends_at_the_sample():
    process = _process(T=30)
    oracle = GaussianOracle(process.alphas_cumprod, 0.0, 0.3, "pred_noise")
    keys = jax.random.split(jax.random.key(4), 2)
    images, path = sample(process, oracle, keys, (1, 4, 4), sampler="ddim", steps=10, return_path=True)
    assert path.shape == (2, 11, 1, 4, 4)
    np.testing.assert_allclose(jnp.clip(path[:, -1], -1, 1), images)
    assert float(path[:, 0].std()) > 0.5  # x_T ~ N(0, I)


def test_ddim_timesteps_and_eta_validation():
    with pytest.raises(ValueError, match="DDIM steps must be in 1..100"):
        ddim_timesteps(100, 0)
    process = GaussianDiffusion(timesteps=100)
    with pytest.raises(ValueError, match=r"eta must be in \[0, 1\].*got 1.5"):  # it would draw NaNs
        sample(process, lambda x, t, **kw: x, jax.random.split(jax.random.key(0), 2), (1, 4, 4), sampler="ddim",
               eta=1.5)
    ts, prev = ddim_timesteps(1000, 50)
    assert ts[0] == 999 and prev[-1] == -1 and ts.shape == (50,)
    assert np.all(np.diff(np.asarray(ts)) < 0)


def test_options_a_sampler_would_ignore_and_labels_out_of_range_are_errors():
    """DDPM ignored steps (and steps=0 ran all T); a label past the classes clamped to the null class, drawing
    unconditional images for a conditional request."""
    from ddpm_eqx.unet import UNet

    process = GaussianDiffusion(timesteps=20, beta_schedule_name="cosine")
    keys = jax.random.split(jax.random.key(0), 2)
    net = lambda x, t, **kw: x  # noqa: E731
    for kwargs in ({"steps": 5}, {"eta": 0.5}):
        with pytest.raises(ValueError, match="steps and eta are DDIM's"):
            sample(process, net, keys, (1, 4, 4), **kwargs)
    assert sample(process, net, keys, (1, 4, 4), steps=20).shape == (2, 1, 4, 4)  # all T: what DDPM runs
    with pytest.raises(ValueError, match="DDIM steps must be in 1..20, got 0"):
        sample(process, net, keys, (1, 4, 4), sampler="ddim", steps=0)
    with pytest.raises((ValueError, TypeError), match="sampler must be 'ddpm' or 'ddim', got 'DDIM'|Literal"):
        sample(process, net, keys, (1, 4, 4), sampler="DDIM")  # type: ignore[arg-type]  (a TypeError under the hook)
    model = UNet(dim=8, channels=1, image_size=8, dim_mults=(1, 2), attn_dim_head=8, num_classes=3,
                 key=jax.random.key(1))
    for labels in ([0, 3], [-1, 2]):
        with pytest.raises(ValueError, match=r"labels must be classes 0..2 \(None: unconditional\)"):
            sample(process, model, keys, (1, 8, 8), labels=jnp.array(labels), sampler="ddim", steps=1)
    # guidance without labels was ignored (the images were the unguided ones); below 0, as SamplingConfig refuses it
    with pytest.raises(ValueError, match="^guidance needs labels: it mixes the class-conditional and the "
                                         "unconditional output; pass labels, or leave guidance at 1.0$"):
        sample(process, model, keys, (1, 8, 8), sampler="ddim", steps=1, guidance=3.0)
    with pytest.raises(ValueError, match=r"^guidance must be >= 0 \(0: unconditional"):
        sample(process, model, keys, (1, 8, 8), labels=jnp.array([0, 1]), sampler="ddim", steps=1, guidance=-1.0)
    np.testing.assert_array_equal(  # NumPy labels are labels too
        sample(process, model, keys, (1, 8, 8), labels=np.array([0, 2]), sampler="ddim", steps=1, guidance=2),
        sample(process, model, keys, (1, 8, 8), labels=jnp.array([0, 2]), sampler="ddim", steps=1, guidance=2.0))
    # The sharded sampler: its labels are traced inside shard_map, where sample() cannot check them (-1 and 7 drew
    # the null class), and a sampler built unconditional dropped them (every image the null class's). Its null
    # class (3) is a label it takes.
    draw = ShardedSampler(process, model, (1, 8, 8), make_mesh(), sampler="ddim", steps=1, conditional=True)
    for labels in ([0, 4], [-1, 2]):
        with pytest.raises(ValueError, match=r"labels must be classes 0..3 \(the null class 3: unconditional\)"):
            draw(model, keys, jnp.array(labels))
    assert draw(model, keys, jnp.array([0, 3])).shape == (2, 1, 8, 8)
    with pytest.raises(ValueError, match="labels given to a sampler built with conditional=False; build it with "
                                         "conditional=True"):
        ShardedSampler(process, model, (1, 8, 8), make_mesh(), sampler="ddim", steps=1)(model, keys, jnp.array([0, 1]))


def test_another_guidance_reuses_the_compiled_sampler():
    """guidance was a static argument: a guidance sweep compiled the whole sampler again for every value."""
    from ddpm_eqx import sample as sample_module

    process = _process(T=20, schedule="cosine")
    oracle = GaussianOracle(process.alphas_cumprod, 0.0, 0.2, "pred_x0", label_shift=0.1)
    keys, labels = jax.random.split(jax.random.key(3), 2), jnp.array([0, 2])
    sample_module._sample._cached.clear_cache()  # type: ignore[attr-defined]
    draws = [sample(process, oracle, keys, (1, 4, 4), labels=labels, guidance=g, sampler="ddim", steps=4)
             for g in (2.0, 3.0, 4.0)]
    assert sample_module._sample._cached._cache_size() == 1  # type: ignore[attr-defined]
    assert not np.allclose(draws[0], draws[1])
    # guidance 1 is no guidance: one network call per step, bitwise the plain conditional draw
    np.testing.assert_array_equal(sample(process, oracle, keys, (1, 4, 4), labels=labels, guidance=1.0),
                                  sample(process, oracle, keys, (1, 4, 4), labels=labels))


# (timesteps, steps) of a short and a long sampler: DDPM runs every timestep, DDIM a chosen number of them.
@pytest.mark.parametrize("sampler, few, many", [("ddpm", (10, None), (1000, None)), ("ddim", (1000, 10), (1000, 1000))])
def test_the_sampler_program_does_not_grow_with_the_number_of_steps(sampler, few, many):
    """One ``lax.scan`` over the timesteps (issue 6): 1000 steps lower to the same operations as 10, so
    DDPM-1000 compiles as fast as DDPM-10. A Python loop of steps would make the program ~100x longer."""

    def lower(timesteps, steps):
        process = _process(schedule="cosine", T=timesteps)
        oracle = GaussianOracle(process.alphas_cumprod, 0.0, 0.5, "pred_noise")
        draw = ShardedSampler(process, oracle, (1, 4, 4), make_mesh(), sampler=sampler, steps=steps)
        keys = jax.random.split(jax.random.key(0), 3)
        return draw, oracle, keys, draw.lower(oracle, keys)

    def operations(lowered):
        return sorted(re.findall(r"stablehlo\.\w+", lowered.as_text()))

    short = operations(lower(*few)[-1])
    draw, oracle, keys, lowered = lower(*many)
    assert len(short) > 20 and operations(lowered) == short
    # The lowered program is the one a call runs: compiled ahead of time, it gives the same images.
    images = np.asarray(lowered.compile()(*draw._arguments(oracle, keys, None)))
    np.testing.assert_array_equal(images, draw(oracle, keys))
    assert images.shape == (3, 1, 4, 4) and images.std() > 0.1


def test_sample_file_names_and_eval_steps_follow_the_options_and_the_model():
    """The default grid name carries every option that changes the grid (another label no longer overwrites the
    first); eval's default DDIM steps (100) stop at a model's timesteps (a 50-step model failed on a flag the
    user never passed)."""
    from pathlib import Path

    from ddpm_eqx.config import Config, apply_overrides
    from ddpm_eqx.generate_cli import SampleRequest, default_name

    plain = SampleRequest(ckpt=Path("run"), sampler="ddim", steps=100)
    assert default_name(plain, 2500) == "sample_2500_ddim100_seed0.png"
    names = {default_name(SampleRequest(ckpt=Path("run"), label=label, guidance=g, eta=eta, num=num, sampler="ddim"), 7)
             for label in (None, 3, 5) for g in (1.0, 2.5) for eta in (0.0, 0.5) for num in (64, 16)}
    assert len(names) == 24 and "sample_7_ddim_eta0.5_label3_guidance2.5_n16_seed0.png" in names

    short = apply_overrides(Config(), ["ddpm.timesteps=50"])
    evaluating = SampleRequest(ckpt=Path("run"), sampler="ddim", eta=0.0, guidance=1.0, default_steps=100)
    assert evaluating.for_run(short).steps == 50 and evaluating.for_run(Config()).steps == 100
    assert SampleRequest(ckpt=Path("run"), sampler="ddim", steps=30, default_steps=100).for_run(short).steps == 30
    assert SampleRequest(ckpt=Path("run"), sampler="ddpm", default_steps=100).for_run(short).steps is None


def test_sample_draws_as_the_runs_training_grids_unless_told_otherwise():
    """SamplingConfig said `ddpm-eqx sample` flags override it, but sample never read it: a run whose grids were
    DDIM-100 was sampled with DDPM-1000 (minutes on a CPU), a run configured for guidance 3 at guidance 1."""
    from pathlib import Path

    from ddpm_eqx.config import Config, apply_overrides
    from ddpm_eqx.generate_cli import SampleRequest, default_name

    run = apply_overrides(Config(), ["model.num_classes=10", "sampling.sampler=ddim", "sampling.steps=40",
                                     "sampling.eta=0.5", "sampling.guidance=3"])
    asked = lambda **kw: SampleRequest(ckpt=Path("run"), default_steps=100, **kw).for_run(run)  # noqa: E731
    got = asked()
    assert (got.sampler, got.steps, got.eta, got.guidance) == ("ddim", 40, 0.5, 3.0)
    assert default_name(got, 9) == "sample_9_ddim40_eta0.5_guidance3_seed0.png"
    got = asked(steps=10)  # a sampler option given: the config's sampler settings are not mixed in
    assert (got.sampler, got.steps, got.eta, got.guidance) == ("ddim", 10, 0.0, 3.0)
    got = asked(sampler="ddpm", guidance=1.0)
    assert (got.sampler, got.steps, got.eta, got.guidance) == ("ddpm", None, 0.0, 1.0)
    got = asked(eta=1.0)
    assert (got.sampler, got.steps, got.eta) == ("ddim", 100, 1.0)
    plain = SampleRequest(ckpt=Path("run"), default_steps=100).for_run(Config())  # the seed's: DDPM, all steps
    assert (plain.sampler, plain.steps, plain.eta, plain.guidance) == ("ddpm", None, 0.0, 1.0)
    all_steps = apply_overrides(Config(), ["sampling.sampler=ddim"])  # DDIM over all T, as the grids: named so
    assert SampleRequest(ckpt=Path("run"), default_steps=100).for_run(all_steps).steps == 1000

    # A config.json an earlier version stored with settings its grids ignored samples as the grids did.
    import json

    from ddpm_eqx.config import from_json, to_dict

    stored = to_dict(Config())
    stored["sampling"].update(sampler="ddpm", steps=20, eta=0.5, guidance=3.0)  # unconditional, DDPM
    old = SampleRequest(ckpt=Path("run"), default_steps=100).for_run(from_json(json.dumps(stored)))
    assert (old.sampler, old.steps, old.eta, old.guidance) == ("ddpm", None, 0.0, 1.0)


def test_guidance_zero_is_drawn_unconditional_not_at_one(monkeypatch):
    """`--guidance 0` (the unconditional model, a sweep's first point) reached the sampler as 1 (`or 1.0`)."""
    from pathlib import Path

    from ddpm_eqx import generate_cli
    from ddpm_eqx.config import Config, apply_overrides
    from ddpm_eqx.generate_cli import SampleRequest, _draw

    seen = {}

    class Recorder:
        def __init__(self, process, model, shape, mesh, **kwargs):  # noqa: ANN001, ANN003
            seen.update(kwargs)

        def __call__(self, model, keys, labels):  # noqa: ANN001, ANN204
            return np.zeros((keys.shape[0], 1, 8, 8), np.float32)

    monkeypatch.setattr(generate_cli, "ShardedSampler", Recorder)
    cfg = apply_overrides(Config(), ["model.num_classes=3", "data.image_size=8", "sampling.eta=0"])
    for guidance, eta in ((0.0, 0.0), (2.5, 0.0)):
        _draw(SampleRequest(ckpt=Path("run"), num=2, sampler="ddim", steps=2, eta=eta, guidance=guidance), cfg,
              eqx.nn.Identity())
        assert (seen["guidance"], seen["eta"]) == (guidance, eta)


def test_a_sampler_that_cannot_fit_in_memory_is_refused_before_it_runs(monkeypatch, tmp_path):
    """As the train step (test_cli_train.py): on a CPU the kernel killed an over-large ``--batch-size`` with no
    message. With and without stored traces, checked once per batch shape; with the memory there, it draws."""
    import psutil

    process = _process(schedule="cosine", T=10)
    oracle = GaussianOracle(process.alphas_cumprod, 0.0, 0.5, "pred_noise")
    keys = jax.random.split(jax.random.key(0), 4)
    memory = psutil.virtual_memory()
    for folder in (None, tmp_path / "traces"):
        draw = ShardedSampler(process, oracle, (1, 4, 4), make_mesh(), trace_cache=folder, determines="oracle")
        with monkeypatch.context() as m:
            m.setattr(psutil, "virtual_memory", lambda: memory._replace(available=0))
            with pytest.raises(RuntimeError, match=r"^RESOURCE_EXHAUSTED: the sampler needs \d+\.\d GiB of memory, "
                                                   r"0\.0 GiB are available$"):
                draw(oracle, keys)
        images = draw(oracle, keys)
        assert images.shape == (4, 1, 4, 4) and np.isfinite(images).all()
        np.testing.assert_array_equal(draw(oracle, keys), images)
