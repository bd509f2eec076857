"""The diffusion maths against closed forms and independent float64 computations."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_eqx.config import DDPMConfig
from ddpm_eqx.diffusion import GaussianDiffusion, diffusion_loss, loss_weights, make_diffusion
from ddpm_eqx.schedule import beta_schedule, cosine_beta_schedule, linear_beta_schedule, sigmoid_beta_schedule

jax.config.update("jax_enable_x64", False)


@pytest.mark.parametrize("T", [1000, 500, 4000])
def test_linear_schedule_endpoints_scale_with_T(T):
    betas = linear_beta_schedule(T)
    assert betas.dtype == np.float64 and betas.shape == (T,)
    np.testing.assert_allclose([betas[0], betas[-1]], [1e-4 * 1000 / T, 0.02 * 1000 / T], rtol=1e-12)
    np.testing.assert_allclose(np.diff(betas), (betas[-1] - betas[0]) / (T - 1), rtol=1e-9)


def test_cosine_schedule_matches_formula():
    T, s = 1000, 0.008
    ab = np.cumprod(1 - cosine_beta_schedule(T))
    t = np.arange(1, T + 1)
    f = lambda u: np.cos((u / T + s) / (1 + s) * np.pi / 2) ** 2  # noqa: E731
    expected = f(t) / f(0)
    unclipped = slice(0, T - 5)  # the last betas are clipped at 0.999
    np.testing.assert_allclose(ab[unclipped], expected[unclipped], rtol=1e-10, atol=1e-14)


def test_sigmoid_schedule_matches_formula():
    T = 1000
    ab = np.cumprod(1 - sigmoid_beta_schedule(T))
    sig = lambda u: 1 / (1 + np.exp(-u))  # noqa: E731
    t = np.arange(0, T + 1) / T
    raw = (sig(3.0) - sig(t * 6 - 3)) / (sig(3.0) - sig(-3.0))
    expected = raw[1:] / raw[0]
    np.testing.assert_allclose(ab[: T - 5], expected[: T - 5], rtol=1e-9, atol=1e-14)


@pytest.mark.parametrize("name", ["linear", "cosine", "sigmoid"])
def test_alphas_cumprod_monotone_and_betas_valid(name):
    betas = beta_schedule(name, 1000)
    assert np.all(betas > 0) and np.all(betas <= 0.999)
    ab = np.cumprod(1 - betas)
    assert np.all(np.diff(ab) < 0)
    process = GaussianDiffusion(timesteps=1000, beta_schedule_name=name)
    assert process.alphas_cumprod.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(process.alphas_cumprod), ab, rtol=1e-6, atol=1e-12)


def test_unknown_schedule_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown beta schedule 'quadratic'"):
        beta_schedule("quadratic", 10)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["linear", "cosine"])
@pytest.mark.parametrize("t", [0, 1, 17, 500, 999])
def test_posterior_against_bayes_rule_in_float64(name, t):
    """q(x_{t-1}|x_t,x_0) ∝ q(x_{t-1}|x_0) q(x_t|x_{t-1}): multiply the two Gaussians independently."""
    betas = beta_schedule(name, 1000)
    ab = np.cumprod(1 - betas)
    ab_prev = ab[t - 1] if t > 0 else 1.0
    rng = np.random.default_rng(t)
    x0, xt = rng.normal(size=(2, 1, 3, 4))
    process = GaussianDiffusion(timesteps=1000, beta_schedule_name=name)
    mean, var, log_var = process.q_posterior(jnp.asarray(x0, jnp.float32), jnp.asarray(xt, jnp.float32), jnp.int32(t))
    if t == 0:
        # alpha_bar_{-1} = 1: the posterior is the point mass at x_0 (the seed used alpha_bar_{T-1} here).
        np.testing.assert_allclose(np.asarray(mean), x0, rtol=1e-6)
        assert float(var) == 0.0 and float(log_var) == pytest.approx(np.log(1e-20))
        return
    precision = 1 / (1 - ab_prev) + (1 - betas[t]) / betas[t]
    expected_var = 1 / precision
    expected_mean = expected_var * (np.sqrt(ab_prev) * x0 / (1 - ab_prev) + np.sqrt(1 - betas[t]) * xt / betas[t])
    np.testing.assert_allclose(float(var), expected_var, rtol=1e-5)
    np.testing.assert_allclose(float(log_var), np.log(expected_var), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(mean), expected_mean, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("t", [0, 10, 400, 999])
def test_parameterisations_round_trip(t):
    process = GaussianDiffusion(timesteps=1000, beta_schedule_name="cosine")
    k1, k2 = jax.random.split(jax.random.key(t))
    x0 = jax.random.normal(k1, (2, 5, 5))
    eps = jax.random.normal(k2, (2, 5, 5))
    t = jnp.int32(t)
    xt = process.q_sample(x0, t, eps)
    # float32 round-off in x_t, amplified by 1/sqrt(alpha_bar) (or 1/sqrt(1 - alpha_bar)).
    ab = float(process.alphas_cumprod[t])
    tol = 1e-5 + 1e-6 / np.sqrt(min(ab, 1 - ab))
    np.testing.assert_allclose(process.predict_start_from_noise(xt, t, eps), x0, atol=tol)
    np.testing.assert_allclose(process.predict_noise_from_start(xt, t, x0), eps, atol=tol)
    v = process.predict_v(x0, t, eps)
    np.testing.assert_allclose(process.predict_start_from_v(xt, t, v), x0, atol=1e-5)
    for objective, output in [("pred_noise", eps), ("pred_x0", x0), ("pred_v", v)]:
        p = GaussianDiffusion(timesteps=1000, beta_schedule_name="cosine", objective=objective)
        np.testing.assert_allclose(p.target(x0, t, eps), output)
        pred = p.predictions(output, xt, t, clip_x0=False)
        np.testing.assert_allclose(pred.pred_x0, x0, atol=tol)


def test_q_sample_moments():
    process = GaussianDiffusion(timesteps=1000)
    t = jnp.int32(300)
    x0 = jnp.full((1, 200, 250), 0.7)
    noise = jax.random.normal(jax.random.key(0), x0.shape)
    xt = np.asarray(process.q_sample(x0, t, noise))
    ab = float(process.alphas_cumprod[300])
    assert abs(xt.mean() - np.sqrt(ab) * 0.7) < 4 * np.sqrt((1 - ab) / xt.size)
    assert abs(xt.var() / (1 - ab) - 1) < 0.02


@pytest.mark.parametrize("name,T", [("linear", 1000), ("cosine", 1000), ("cosine", 4000), ("sigmoid", 1000)])
def test_forward_process_scales_are_float64_accurate(name, T):
    """x_t's scales sqrt(alpha_bar) and sqrt(1 - alpha_bar) to float32's precision at every t: taken from the
    float32 alpha_bar, 1 - alpha_bar near t = 0 kept a few digits (1.4e-3 relative error, cosine, T = 4000)."""
    process = GaussianDiffusion(timesteps=T, beta_schedule_name=name)
    ab = np.cumprod(1.0 - beta_schedule(name, T))
    t = jnp.arange(T)
    ones = jnp.ones((T, 1, 1, 1))
    signal = jax.vmap(process.q_sample)(ones, t, 0 * ones)[:, 0, 0, 0]
    noise = jax.vmap(process.q_sample)(0 * ones, t, ones)[:, 0, 0, 0]
    np.testing.assert_allclose(signal, np.sqrt(ab), rtol=1e-6)
    np.testing.assert_allclose(noise, np.sqrt(1.0 - ab), rtol=1e-6)


def test_p2_weight_reads_k_and_gamma_separately():
    ab = np.cumprod(1 - linear_beta_schedule(1000))
    snr = ab / (1 - ab)
    w = loss_weights(ab, "pred_noise", p2_gamma=1.0, p2_k=2.0, min_snr_gamma=None)
    np.testing.assert_allclose(w, 1 / (2.0 + snr))
    np.testing.assert_allclose(loss_weights(ab, "pred_noise", 0.0, 5.0, None), 1.0)
    w = loss_weights(ab, "pred_noise", p2_gamma=0.5, p2_k=1.0, min_snr_gamma=None)
    np.testing.assert_allclose(w, (1.0 + snr) ** -0.5)


@pytest.mark.parametrize(
    "objective,expected",
    [
        ("pred_noise", lambda snr: np.minimum(snr, 5) / snr),
        ("pred_x0", lambda snr: np.minimum(snr, 5)),
        ("pred_v", lambda snr: np.minimum(snr, 5) / (snr + 1)),
    ],
)
def test_min_snr_weights(objective, expected):
    ab = np.cumprod(1 - cosine_beta_schedule(1000))
    snr = ab / (1 - ab)
    np.testing.assert_allclose(loss_weights(ab, objective, 0.0, 1.0, 5.0), expected(snr), rtol=1e-12)


def test_make_diffusion_from_config_maps_seed_pred_x0():
    process = make_diffusion(DDPMConfig(pred_x0=True, timesteps=100), "l2")
    assert process.objective == "pred_x0" and process.loss_type == "l2" and process.timesteps == 100


def test_linear_schedule_rejects_too_few_steps():
    with pytest.raises(ValueError, match="timesteps >= 21"):
        linear_beta_schedule(20)


class Affine(eqx.Module):
    """A stand-in network: out = a * x + b * x_self_cond (+ label), enough to check the loss plumbing."""

    a: jax.Array
    b: jax.Array

    def __call__(self, x, t, *, x_self_cond=None, label=None, key=None, inference=True):
        sc = jnp.zeros_like(x) if x_self_cond is None else x_self_cond
        return self.a * x + self.b * sc


@pytest.mark.parametrize("loss_type", ["l1", "l2"])
def test_loss_matches_manual_computation(loss_type):
    process = GaussianDiffusion(timesteps=100, loss_type=loss_type, p2_loss_weight_gamma=1.0)
    model = Affine(jnp.float32(0.3), jnp.float32(0.0))
    x0 = jax.random.uniform(jax.random.key(1), (1, 4, 4), minval=-1, maxval=1)
    key = jax.random.key(7)
    loss = diffusion_loss(process, model, x0, key=key)
    t_key, noise_key, *_ = jax.random.split(key, 6)
    t = jax.random.randint(t_key, (), 0, 100)
    noise = jax.random.normal(noise_key, x0.shape)
    diff = 0.3 * process.q_sample(x0, t, noise) - noise
    per = jnp.abs(diff) if loss_type == "l1" else diff**2
    np.testing.assert_allclose(loss, jnp.mean(per) * process.loss_weight[t], rtol=1e-6)


def test_self_conditioning_stops_the_gradient_of_the_first_pass():
    process = GaussianDiffusion(timesteps=100, loss_type="l2", self_condition=True)
    model = Affine(jnp.float32(0.5), jnp.float32(0.25))
    x0 = jax.random.uniform(jax.random.key(2), (1, 3, 3), minval=-1, maxval=1)
    key = jax.random.key(3)
    t_key, noise_key, *_ = jax.random.split(key, 6)
    t = jax.random.randint(t_key, (), 0, 100)
    noise = jax.random.normal(noise_key, x0.shape)
    xt = process.q_sample(x0, t, noise)
    # The first pass's x_0 estimate, treated as a constant.
    sc = process.predictions(model(xt, t), xt, t, clip_x0=False).pred_x0

    def manual(m):
        return jnp.mean((m.a * xt + m.b * sc - noise) ** 2)

    g_loss = jax.grad(lambda m: diffusion_loss(process, m, x0, key=key, use_self_cond=jnp.bool_(True)))(model)
    g_manual = jax.grad(manual)(model)
    np.testing.assert_allclose(g_loss.a, g_manual.a, rtol=1e-5)
    np.testing.assert_allclose(g_loss.b, g_manual.b, rtol=1e-5)
    off = diffusion_loss(process, model, x0, key=key, use_self_cond=jnp.bool_(False))
    np.testing.assert_allclose(off, jnp.mean((0.5 * xt - noise) ** 2), rtol=1e-6)


def test_self_conditioning_first_pass_is_not_differentiated():
    """The first pass's gradient is stopped at the weights, so JAX does not differentiate the cond that runs it
    (a cond closing over weights that carry tangents gets both branches linearised: seconds of tracing for a
    U-Net). Seen in the JVP's program: the cond's branches are the primal program's, with no tangent work."""
    process = GaussianDiffusion(timesteps=100, loss_type="l2", self_condition=True)
    model = Affine(jnp.float32(0.5), jnp.float32(0.25))

    def loss(m: Affine) -> jax.Array:
        return diffusion_loss(process, m, jnp.zeros((1, 3, 3)), key=jax.random.key(0), use_self_cond=jnp.bool_(True))

    def branches(closed: jax.extend.core.ClosedJaxpr) -> list[list[str]]:
        conds = [e for e in closed.jaxpr.eqns if e.primitive.name == "cond"]
        assert len(conds) == 1
        return [[str(e.primitive) for e in b.jaxpr.eqns] for b in conds[0].params["branches"]]

    primal = branches(jax.make_jaxpr(loss)(model))
    assert any("mul" in b for b in primal)  # the branch that runs the model
    for coin in (True, False):  # a Python bool is a coin too (the annotation refused it)
        np.testing.assert_array_equal(
            diffusion_loss(process, model, jnp.ones((1, 3, 3)), key=jax.random.key(0), use_self_cond=coin),
            diffusion_loss(process, model, jnp.ones((1, 3, 3)), key=jax.random.key(0), use_self_cond=jnp.bool_(coin)))
    assert branches(jax.make_jaxpr(lambda m, dm: jax.jvp(loss, (m,), (dm,)))(model, model)) == primal


def test_offset_noise_adds_a_per_channel_constant():
    base = GaussianDiffusion(timesteps=100, loss_type="l2")
    offset = GaussianDiffusion(timesteps=100, loss_type="l2", offset_noise_strength=0.5)
    model = Affine(jnp.float32(0.0), jnp.float32(0.0))  # loss = mean(noise^2) * w
    x0 = jnp.zeros((2, 8, 8))
    key = jax.random.key(4)
    _, noise_key, offset_key, *_ = jax.random.split(key, 6)
    noise = jax.random.normal(noise_key, x0.shape)
    shift = 0.5 * jax.random.normal(offset_key, (2, 1, 1))
    np.testing.assert_allclose(diffusion_loss(offset, model, x0, key=key), jnp.mean((noise + shift) ** 2), rtol=1e-6)
    np.testing.assert_allclose(diffusion_loss(base, model, x0, key=key), jnp.mean(noise**2), rtol=1e-6)


@pytest.mark.parametrize("kwargs, message", [
    ({"timesteps": 0}, "timesteps must be positive, got 0"),
    ({"min_snr_gamma": 0.0}, r"min_snr_gamma must be positive \(None: no min-SNR weighting\), got 0.0"),
    ({"offset_noise_strength": -0.1}, "offset_noise_strength must be >= 0"),
])
def test_process_arguments_that_would_fall_through_are_errors(kwargs, message):
    """An unknown objective trained as pred_v and an unknown loss as l2, silently; min_snr_gamma=0 zeroed every
    weight; timesteps=0 divided by zero."""
    with pytest.raises(ValueError, match=message):
        GaussianDiffusion(**kwargs)
    # The Literal arguments: the tests' import hook refuses them first (a TypeError), so the check users without
    # it meet is called itself.
    from ddpm_eqx.diffusion import _check_process

    plain = {"timesteps": 10, "objective": "pred_noise", "loss_type": "l1", "min_snr_gamma": None,
             "offset_noise_strength": 0.0}
    with pytest.raises(ValueError, match="objective must be one of pred_noise, pred_x0, pred_v, got 'pred_eps'"):
        _check_process(**{**plain, "objective": "pred_eps"})
    with pytest.raises(ValueError, match="loss_type must be one of l1, l2, got 'huber'"):
        _check_process(**{**plain, "loss_type": "huber"})


class Narrow(eqx.Module):
    """A network answering with ``channels`` channels whatever the image has."""

    channels: int = eqx.field(static=True)
    self_condition: bool = eqx.field(static=True, default=False)

    def __call__(self, x, t, *, x_self_cond=None, label=None, key=None, inference=True):
        return jnp.zeros((self.channels, *x.shape[1:]), x.dtype)


def test_the_network_must_return_an_image_and_match_the_process_self_conditioning():
    """A 1-channel output for 3-channel images was broadcast into the loss (and the sampler) silently; a model
    and a process that disagreed about self-conditioning ran silently too."""
    from ddpm_eqx.sample import sample

    process = GaussianDiffusion(timesteps=30)
    x0 = jnp.zeros((3, 4, 4))
    np.testing.assert_array_equal(diffusion_loss(process, Narrow(3), x0, key=jax.random.key(0)) >= 0, True)
    narrow = r"output has shape \(1, 4, 4\), the images \(3, 4, 4\): .* out_dim must equal its channels"
    with pytest.raises(ValueError, match=narrow):
        diffusion_loss(process, Narrow(1), x0, key=jax.random.key(0))
    draw = lambda m: sample(process, m, jax.random.split(jax.random.key(0), 2), (3, 4, 4))  # noqa: E731
    with pytest.raises((ValueError, TypeError), match=f"{narrow}|Actual value: f32\\[1,4,4\\]"):  # the hook's, first
        draw(Narrow(1))
    for call in (lambda m: diffusion_loss(process, m, x0, key=jax.random.key(0)), draw):
        with pytest.raises(ValueError, match="built with self_condition=True, the process with self_condition=False"):
            call(Narrow(3, self_condition=True))
    with pytest.raises(ValueError, match="built with self_condition=False, the process with self_condition=True"):
        diffusion_loss(GaussianDiffusion(timesteps=30, self_condition=True), Narrow(3), x0, key=jax.random.key(0))
