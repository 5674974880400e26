"""The Wan task's flow-matching time sampler (``ffid.train.wan.sample_times``), directly.

Closed forms (``z ~ N(0, 1)``, ``sigma`` = ``sigmoid_scale``, ``s`` = ``discrete_flow_shift``):

- ``uniform``: ``t ~ U(0, 1)``;
- ``sigmoid``: ``t = sigmoid(sigma z)``, so ``P(t <= x) = Phi(logit(x) / sigma)``;
- ``shift``: ``t' = s t / (1 + (s - 1) t)`` of the sigmoid draw, a monotone map of (0, 1) onto
  itself with inverse ``x / (s - (s - 1) x)``; so the q-quantile is the shifted sigmoid quantile.

Sample statistics are compared with a tolerance from the sample size: by the DKW inequality the
empirical CDF of ``N`` draws is within ``eps`` of the true one everywhere except with
probability ``2 exp(-2 N eps^2)`` (1e-9 here), so each empirical q-quantile lies between the
true (q - eps)- and (q + eps)-quantiles. The seeds are fixed, so the test is deterministic.

musubi-tuner's conventions (``training/trainer_base.py``, ``get_noisy_model_input_and_timesteps``,
read as reference) are checked against its formulas written out here: the same three modes and
keys, ``sigmoid_scale`` multiplying the normal draw before the sigmoid, the shift applied to the
sigmoid draw (not to a uniform one), ``noisy = (1 - t) x0 + t noise`` and target ``noise - x0``.
One deliberate difference: musubi hands the DiT ``1000 t + 1`` ("1 to 1000"); ffid hands it
``1000 t``, the value Wan's and diffusers' flow-matching schedulers use at inference.
"""

from __future__ import annotations

import math
from statistics import NormalDist

import pytest
import torch

from ffid.errors import ConfigError
from ffid.train import TrainConfig, config_from_mapping
from ffid.train.wan import flow_matching_loss, sample_times

N = 200_000
EPS = math.sqrt(math.log(2 / 1e-9) / (2 * N))  # DKW: sup |F_N - F| > EPS with probability 1e-9
QUANTILES = (0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99)

# (timestep_sampling, discrete_flow_shift, sigmoid_scale): the default (shift 3, 480p Wan), a
# stronger shift with a wider draw, shift 1 (= sigmoid), plain sigmoids and uniform.
SETTINGS = [
    ("shift", 3.0, 1.0),
    ("shift", 5.0, 1.5),
    ("shift", 1.0, 1.0),
    ("sigmoid", 3.0, 1.0),
    ("sigmoid", 3.0, 2.0),
    ("uniform", 3.0, 1.0),
]
IDS = [f"{m}-s{s:g}-scale{k:g}" for m, s, k in SETTINGS]


def _cfg(mode: str, shift: float = 3.0, scale: float = 1.0) -> TrainConfig:
    return TrainConfig(timestep_sampling=mode, discrete_flow_shift=shift, sigmoid_scale=scale)


def _draw(mode: str, shift: float, scale: float, n: int = N, seed: int = 0) -> torch.Tensor:
    return sample_times(n, _cfg(mode, shift, scale), torch.Generator().manual_seed(seed))


def _true_quantile(q: float, mode: str, shift: float, scale: float) -> float:
    """The q-quantile of the closed form: a monotone map of the normal's quantile."""
    if mode == "uniform":
        return q
    t = 1 / (1 + math.exp(-scale * NormalDist().inv_cdf(q)))
    if mode == "shift":
        t = shift * t / (1 + (shift - 1) * t)
    return float(t)


def _true_mean(mode: str, shift: float, scale: float) -> float:
    """E[t] of the closed form by the trapezoid rule over the normal density (float64)."""
    if mode == "uniform":
        return 0.5
    z = torch.linspace(-12, 12, 200_001, dtype=torch.float64)
    t = torch.sigmoid(scale * z)
    if mode == "shift":
        t = shift * t / (1 + (shift - 1) * t)
    density = torch.exp(-0.5 * z**2) / math.sqrt(2 * math.pi)
    return float(torch.trapezoid(t * density, z))


# -- range and distribution ------------------------------------------------------------------------
@pytest.mark.parametrize(("mode", "shift", "scale"), SETTINGS, ids=IDS)
def test_times_are_float32_in_the_unit_interval(mode, shift, scale):
    t = _draw(mode, shift, scale)
    assert t.shape == (N,) and t.dtype == torch.float32
    assert bool((t >= 0).all()) and bool((t < 1).all())
    if mode != "uniform":  # a sigmoid of a finite draw never reaches 0 at these scales
        assert bool((t > 0).all())


@pytest.mark.parametrize(("mode", "shift", "scale"), SETTINGS, ids=IDS)
def test_quantiles_match_the_closed_form_within_the_sample_size_bound(mode, shift, scale):
    t = _draw(mode, shift, scale).double()
    for q in QUANTILES:
        got = float(torch.quantile(t, q))
        lo = _true_quantile(max(q - EPS, 1e-12), mode, shift, scale)
        hi = _true_quantile(min(q + EPS, 1 - 1e-12), mode, shift, scale)
        assert lo <= got <= hi, (q, lo, got, hi)


@pytest.mark.parametrize(("mode", "shift", "scale"), SETTINGS, ids=IDS)
def test_mean_matches_the_closed_form(mode, shift, scale):
    t = _draw(mode, shift, scale).double()
    tol = 6 * float(t.std()) / math.sqrt(N)  # six standard errors
    assert float(t.mean()) == pytest.approx(_true_mean(mode, shift, scale), abs=tol)


def test_shift_favours_noisy_times_with_the_median_moved_to_s_over_1_plus_s():
    # sigmoid(sigma z) has median 1/2 for every sigma; the shift maps it to s / (1 + s).
    for shift in (1.0, 3.0, 5.0):
        med = float(torch.quantile(_draw("shift", shift, 1.0).double(), 0.5))
        assert med == pytest.approx(shift / (1 + shift), abs=4 * EPS)
    assert _draw("shift", 3.0, 1.0).mean() > _draw("sigmoid", 3.0, 1.0).mean() + 0.1


# -- the shift is the closed-form map of the same draw ---------------------------------------------
@pytest.mark.parametrize("shift", [0.5, 1.0, 3.0, 7.5])
def test_shift_is_the_closed_form_map_of_the_sigmoid_draw_with_the_same_seed(shift):
    u = _draw("sigmoid", shift, 1.3, n=1000, seed=4)
    t = _draw("shift", shift, 1.3, n=1000, seed=4)
    assert torch.equal(t, shift * u / (1 + (shift - 1) * u))
    if shift == 1.0:
        assert torch.equal(t, u)  # no shift at all, bit for bit
    # monotone: the order of the draws is kept
    assert torch.equal(torch.argsort(t, stable=True), torch.argsort(u, stable=True))


# -- musubi-tuner's formulas -----------------------------------------------------------------------
def _musubi_times(n: int, mode: str, shift: float, scale: float, g: torch.Generator) -> torch.Tensor:
    """musubi-tuner's compute_sampling_timesteps for these modes, as written there, fed from ``g``
    (musubi draws from the global RNG on the device; ffid from the trainer's CPU generator)."""
    if mode == "uniform":
        return torch.rand((n,), generator=g)
    if mode == "sigmoid":
        return torch.sigmoid(scale * torch.randn((n,), generator=g))
    logits_norm = torch.randn((n,), generator=g)
    logits_norm = logits_norm * scale  # larger scale for more uniform sampling
    t = logits_norm.sigmoid()
    return (t * shift) / (1 + (shift - 1) * t)


@pytest.mark.parametrize(("mode", "shift", "scale"), SETTINGS, ids=IDS)
def test_times_equal_musubi_tuners_formulas_on_the_same_draws(mode, shift, scale):
    ours = _draw(mode, shift, scale, n=4096, seed=11)
    theirs = _musubi_times(4096, mode, shift, scale, torch.Generator().manual_seed(11))
    assert torch.equal(ours, theirs)


def test_keys_defaults_and_refusals():
    cfg = TrainConfig()
    assert (cfg.timestep_sampling, cfg.discrete_flow_shift, cfg.sigmoid_scale) == ("shift", 3.0, 1.0)
    with pytest.raises(ConfigError, match="timestep_sampling"):
        config_from_mapping({"timestep_sampling": "sigma"})  # musubi's default mode is not offered
    with pytest.raises(ConfigError, match="discrete_flow_shift"):
        config_from_mapping({"discrete_flow_shift": 0})
    for bad in (0, -1, "nan"):  # 0 would give every item the same timestep
        with pytest.raises(ConfigError, match="sigmoid_scale"):
            config_from_mapping({"sigmoid_scale": bad})


def test_flow_matching_inputs_and_target():
    """noisy = (1 - t) x0 + t noise, timestep = 1000 t, loss = MSE(prediction, noise - x0), with
    noise drawn before t from the generator."""
    seen = {}

    class Recorder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.tensor(0.5))

        def forward(self, hidden_states, timestep, encoder_hidden_states, return_dict):
            seen.update(x=hidden_states, timestep=timestep, text=encoder_hidden_states)
            return (hidden_states * self.w,)

    x0 = torch.randn(3, 4, 1, 2, 2, generator=torch.Generator().manual_seed(2))
    text = torch.randn(3, 5, 8)
    cfg = _cfg("shift", 3.0, 1.0)
    loss = flow_matching_loss(Recorder(), x0, text, cfg, torch.Generator().manual_seed(9))
    g = torch.Generator().manual_seed(9)
    noise = torch.randn(x0.shape, generator=g)
    t = sample_times(3, cfg, g)
    noisy = (1 - t.view(-1, 1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1, 1) * noise
    torch.testing.assert_close(seen["x"], noisy, rtol=0, atol=0)
    torch.testing.assert_close(seen["timestep"], t * 1000, rtol=0, atol=0)
    assert torch.equal(seen["text"], text)
    torch.testing.assert_close(loss, torch.nn.functional.mse_loss(noisy * 0.5, noise - x0))


# -- determinism -----------------------------------------------------------------------------------
@pytest.mark.parametrize(("mode", "shift", "scale"), SETTINGS, ids=IDS)
def test_seeded_draws_repeat_and_use_only_the_given_generator(mode, shift, scale):
    assert torch.equal(_draw(mode, shift, scale, n=64, seed=3), _draw(mode, shift, scale, n=64, seed=3))
    assert not torch.equal(_draw(mode, shift, scale, n=64, seed=3), _draw(mode, shift, scale, n=64, seed=4))
    global_state = torch.get_rng_state()
    g = torch.Generator().manual_seed(5)
    sample_times(64, _cfg(mode, shift, scale), g)
    assert torch.equal(torch.get_rng_state(), global_state)  # the global RNG is not touched
    # exactly one draw of n values, so the draws after it (resume, the next step) stay in place
    ref = torch.Generator().manual_seed(5)
    (torch.rand if mode == "uniform" else torch.randn)(64, generator=ref)
    assert torch.equal(g.get_state(), ref.get_state())
