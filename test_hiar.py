"""Tests for hiar.py, sample.py and train_toy.py: known answers (causality, equivalence of fast
paths and references, determinism, pass counts, physics, metrics), on the tiny `smoke` preset."""
import copy
import dataclasses
import errno
import gc
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import hiar
import sample
import train_toy

HERE = Path(__file__).resolve().parent
SAMPLERS = [hiar.sample_block_major, hiar.sample_step_major]
ORDER = {hiar.sample_block_major: "block", hiar.sample_step_major: "step"}


def random_model(cfg, seed=0):
    """A model with every weight random: the real init zeroes the output layers, which would make
    many of these tests pass for the wrong reason (a constant output)."""
    torch.manual_seed(seed)
    model = hiar.VideoDiT(cfg)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.15)
    return model.eval()


@pytest.fixture(scope="module")
def cfg():
    return hiar.Config.preset("smoke")


@pytest.fixture(scope="module")
def model(cfg):
    return random_model(cfg)


def noise(cfg, batch=2, seed=1, K=None):
    return hiar.Noise(cfg, [seed * 100 + i for i in range(batch)], K=K)


def bank(noise, frames):
    """The whole table ε (K, N, B, b, 3, H, W) of a hiar.Noise for `frames` frames."""
    N = frames // noise.shape[0]
    return torch.stack([torch.stack([noise(j, n) for n in range(N)]) for j in range(noise.K)])


class NoiseBank:
    """A given table ε (K, N, B, b, 3, H, W) behind the interface of hiar.Noise: to
    differentiate through the noise, or to feed chosen draws."""

    def __init__(self, table):
        self.table, self.K, self.batch = table, table.shape[0], table.shape[2]
        self.shape, self.device = tuple(table.shape[3:]), None

    def __call__(self, j, n):
        return self.table[j, n]


def reference_sample(model, noise, frames, label=None, order="step", context_t="next",
                     exit_step=None, x0_bias=0.0, cache_grad=False, sink=False):
    """The slow oracle of both samplers: no KV cache. Every written context block is kept and
    re-run, with the current block, through the masked model at each query — the mask gives each
    frame exactly the window it had when the fast path cached its keys. With gradient on, as a
    training rollout: steps before the exit step without it, and the context detached unless
    `cache_grad` (then written at the exit step with its gradient). `sink`: once block 0 has
    left the window, the context is [block 0, the newest blocks that fill the window], re-run
    together at the window's frames — the cache's visibility for a one-layer model, whose keys
    depend on their block alone (deeper, a cached block's keys also saw its own context)."""
    b, K = model.cfg.block, noise.K
    N, J, σ = frames // b, K - 1 if exit_step is None else exit_step, \
        hiar.student_sigmas(K, model.cfg.shift)
    W = model.cfg.window_frames // b - 1               # context blocks a block sees

    def velocity(ctx, x, s, n):                        # ctx: [(x_c, σ_c)] of blocks < n
        if sink and n > W:                             # block 0 in the window's oldest slot
            ctx = ctx[:1] + ctx[n - W + 1:]
        B = x.shape[0]
        xs = torch.cat([c for c, _ in ctx] + [x], 1)
        ss = torch.cat([hiar.frame_sigma(sc, B, b) for _, sc in ctx]
                       + [hiar.frame_sigma(s, B, b)], 1)
        return model(xs, ss, label, frame0=(n + 1) * b - xs.shape[1])[:, -b:]

    grad = torch.is_grad_enabled()

    def cell(ctx, x, s, n, j):
        with torch.set_grad_enabled(grad and j == J):
            return x - s * velocity(ctx, x, s, n) + x0_bias

    def context(x_c, σ_c, j):
        return (x_c if cache_grad and j == J else x_c.detach(), σ_c)

    out = [None] * N
    if order == "block":
        ctx = []
        for n in range(N):
            x = noise(0, n)
            for j in range(J + 1):
                x0_hat = cell(ctx, x, σ[j], n, j)
                if j < J:
                    x = hiar.add_noise(x0_hat, noise(j + 1, n), σ[j + 1])
            ctx.append(context(x0_hat, 0.0, J))
            out[n] = x0_hat
        return torch.cat(out, 1)
    x = [noise(0, n) for n in range(N)]
    for j in range(J + 1):
        ctx = []
        for n in range(N):
            x0_hat = cell(ctx, x[n], σ[j], n, j)
            x_next = hiar.add_noise(x0_hat, noise(j + 1, n), σ[j + 1]) if j + 1 < K else x0_hat
            ctx.append(context(*{"next": (x_next, σ[j + 1]), "current": (x[n], σ[j]),
                                 "clean": (x0_hat, 0.0)}[context_t], j))
            out[n], x[n] = x0_hat, x_next
    return torch.cat(out, 1)


def fused_step_major(model, noise, frames, label=None, **kw):
    return torch.cat(list(hiar.step_major(model, noise, frames, label, fused=True, **kw)), 1)


# ------------------------------------------------------------------------------------------------
# Config
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("field,value,words", [
    ("frames", 7, "multiple of block"),
    ("patch", 3, "must divide size"),
    ("window", 3, "multiple of block"),
    ("window", -2, "multiple of block"),
    ("window", 2, "> block"),
    ("K", 0, "integer >= 1"),
    ("K", True, "integer >= 1"),
    ("frames", 0, "integer >= 1"),
    ("labels", -1, "integer >= 0"),
    ("context_t", "t_j", "must be one of"),
    ("heads", 3, "even head size"),
    ("shift", 0.0, "> 0"),
    ("speed", (0.5, 0.1), "low <= high"),
    ("blob_sigma", (0.0, 1.0), "low <= high"),
    ("blob_sigma", (1.0, 5.0), "size/2"),
    ("saturation", (0.5, 1.5), "<= 1"),
    ("background", (-0.1, 0.2), "0 <= low"),
    ("value", 0.5, "pair"),
])
def test_config_validation_names_field_value_and_rule(field, value, words):
    with pytest.raises(ValueError) as e:
        sample.make_config("smoke", **{field: value})
    msg = str(e.value)
    assert f"Config.{field}={value!r}" in msg and words in msg


@pytest.mark.parametrize("field,value,words", [
    ("fkl_mode", "both", "bidirectional"), ("ode_shift", -1.0, ">= 0"), ("dmd_shift", 0, "> 0"),
    ("fkl_weight", -0.1, ">= 0"), ("ema", 1.0, "[0, 1)"), ("batch", 0, "integer >= 1"),
    ("amp", 1, "true or false"), ("label_dropout", 1.0, "[0, 1)"),
    ("rollout_frames", -3, "integer >= 0"), ("ema_start", -1, "integer >= 0")])
def test_train_config_validation(field, value, words):
    with pytest.raises(ValueError) as e:
        train_toy.TrainConfig(**{field: value})
    assert f"TrainConfig.{field}={value!r}" in str(e.value) and words in str(e.value)


def test_import_hiar_loads_only_torch_and_the_standard_library():
    code = ("import sys; import torch; before = set(sys.modules); import hiar; "
            "print(sorted({m.split('.')[0] for m in set(sys.modules) - before}))")
    new = eval(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              check=True, cwd=HERE).stdout)
    assert all(m == "hiar" or m in sys.stdlib_module_names or m == "torch" for m in new), new


def test_imports_run_one_way():
    """train_toy → sample → hiar: sample.py never imports train_toy, hiar imports neither."""
    for path, banned in (("sample.py", ("train_toy",)), ("hiar.py", ("train_toy", "sample"))):
        text = (HERE / path).read_text()
        for b in banned:
            assert f"import {b}" not in text and f"from {b}" not in text, (path, b)


def test_config_presets_roundtrip_and_unknowns():
    cfg = hiar.Config.preset("toy")
    assert hiar.Config(**cfg.to_dict()) == cfg
    assert hiar.Config(**json.loads(json.dumps(cfg.to_dict()))) == cfg       # lists → tuples
    assert cfg.window_frames == cfg.frames and cfg.tokens_per_frame == 16
    with pytest.raises(ValueError, match="preset='huge' is unknown"):
        hiar.Config.preset("huge")
    with pytest.raises(TypeError, match="unexpected keyword argument 'bogus'"):
        hiar.Config(**{**cfg.to_dict(), "bogus": 1})
    with pytest.raises(ValueError, match=r"unknown Config fields \['bogus'\]"):
        sample.make_config("toy", bogus=1)
    with pytest.raises(ValueError, match="preset='huge' is unknown"):
        sample.make_config("huge")
    assert sample.make_config("smoke", K=3) == hiar.Config.preset("smoke", K=3)
    assert set(hiar.SAMPLER_FIELDS) <= set(cfg.to_dict())


# ------------------------------------------------------------------------------------------------
# Toy data: per-clip appearance, label, physics
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def toy_data():
    toy = hiar.Config.preset("toy")
    return toy, *hiar.moving_shapes(toy, 64, torch.Generator().manual_seed(3), frames=24)


def test_moving_shapes_shapes_ranges_and_determinism(toy_data):
    toy, v, st = toy_data
    B, T, S = 64, 24, toy.shapes
    assert v.shape == (B, T, 3, 16, 16) and v.dtype == torch.float32
    assert v.min() >= -1 and v.max() <= 1
    for name, rng in (("radius", toy.blob_sigma), ("saturation", toy.saturation),
                      ("value", toy.value)):
        assert st[name].shape == (B, T, S)
        assert st[name].min() >= rng[0] and st[name].max() <= rng[1], name
        assert st[name][:, 0].std() > 0.1 * (rng[1] - rng[0]), name        # continuous draws
    assert st["background"].shape == (B, T, 3)
    assert st["background"].min() >= toy.background[0] and st["background"].max() <= \
        toy.background[1]
    assert st["hue"].min() >= 0 and st["hue"].max() < 1 and st["label"].shape == (B,)
    v2, _ = hiar.moving_shapes(toy, B, torch.Generator().manual_seed(3), frames=T)
    assert torch.equal(v, v2)
    with pytest.raises(AssertionError, match="frames=0"):
        hiar.moving_shapes(toy, 1, frames=0)


def test_appearance_persists_within_a_clip_and_varies_between_clips(toy_data):
    toy, v, st = toy_data
    for name in ("hue", "saturation", "value", "radius", "background", "colour"):
        assert torch.equal(st[name], st[name][:, :1].expand_as(st[name])), name   # per clip
    bg = (v + 1) / 2                                                    # corner pixel ≈ background
    corner = bg[:, :, :, 0, 0]
    far = (st["pos"] - 0).norm(dim=-1).amin(-1) > 3 * toy.blob_sigma[1]          # no blob near
    assert torch.allclose(corner[far], st["background"][far], atol=0.02)
    assert st["background"][:, 0].std(0).min() > 0.05                # backgrounds differ by clip


def test_label_fixes_the_colour_family(toy_data):
    toy, _, st = toy_data
    centre = st["label"].float()[:, None, None] / toy.labels
    d = (st["hue"] - centre).abs()
    assert (torch.minimum(d, 1 - d) <= 0.5 / toy.labels + 1e-6).all()
    _, st1 = hiar.moving_shapes(toy, 8, torch.Generator().manual_seed(0), label=2)
    assert (st1["label"] == 2).all()
    with pytest.raises(AssertionError, match=r"label must be in \[-1, 3\]"):
        hiar.moving_shapes(toy, 2, label=7)


def test_moving_shapes_physics():
    toy = hiar.Config.preset("toy", speed=(0.8, 0.9))
    _, st = hiar.moving_shapes(toy, 64, torch.Generator().manual_seed(0), frames=60)
    pos, vel, r = st["pos"], st["vel"], st["radius"][..., None]
    lo, hi = r, toy.size - 1 - r
    assert ((pos >= lo - 1e-5) & (pos <= hi + 1e-5)).all()                  # inside the walls
    speed = vel.norm(dim=-1)
    assert torch.allclose(speed, speed[:, :1].expand_as(speed))              # constant speed
    step = pos[:, 1:] - pos[:, :-1]
    free = (vel[:, 1:] == vel[:, :-1])                                        # no bounce between
    assert free.float().mean() > 0.8
    assert torch.allclose(step[free], vel[:, :-1][free], atol=1e-4)           # p advances by v
    flips = (vel[:, 1:] == -vel[:, :-1]) & ~free                              # a bounce flips v
    assert flips.any() and (flips | free).all()


def test_moving_shapes_pieces_are_the_whole_clip():
    toy = hiar.Config.preset("toy")
    whole, _ = hiar.moving_shapes(toy, 3, torch.Generator().manual_seed(5), frames=12)
    pieces = [hiar.moving_shapes(toy, 3, torch.Generator().manual_seed(5), 3, start=s)[0]
              for s in range(0, 12, 3)]
    assert torch.allclose(torch.cat(pieces, 1), whole, atol=1e-6)


def test_hsv_roundtrip():
    h, s, v = torch.rand(100), 0.2 + 0.8 * torch.rand(100), 0.2 + 0.8 * torch.rand(100)
    h2, s2, v2 = sample.rgb_to_hsv(hiar.hsv_to_rgb(h, s, v))
    d = (h - h2).abs()
    assert torch.minimum(d, 1 - d).max() < 1e-4
    assert torch.allclose(s, s2, atol=1e-5) and torch.allclose(v, v2, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# The label path: dropout, CFG
# ------------------------------------------------------------------------------------------------

def test_label_dropout_rate_and_null_label():
    lab = torch.zeros(20000, dtype=torch.long)
    dropped = train_toy.drop_labels(lab, 0.1, torch.Generator().manual_seed(0))
    assert (dropped == -1).float().mean() == pytest.approx(0.1, abs=0.01)
    assert train_toy.drop_labels(lab, 0.0) is lab and train_toy.drop_labels(None, 0.5) is None


def test_label_changes_the_output_and_none_is_the_null_label(cfg, model):
    x = torch.randn(2, cfg.frames, 3, cfg.size, cfg.size)
    with torch.no_grad():
        a, b = model(x, 0.5, torch.tensor([0, 0])), model(x, 0.5, torch.tensor([1, 1]))
        assert not torch.allclose(a, b)
        assert torch.equal(model(x, 0.5, None), model(x, 0.5, torch.tensor([-1, -1])))
    with pytest.raises(AssertionError, match=r"label must be in \[-1, 1\]"):
        model(x, 0.5, torch.tensor([0, 2]))


def test_cfg_scale_1_is_the_conditional_score_and_others_extrapolate(cfg, model):
    x = torch.randn(2, cfg.frames, 3, cfg.size, cfg.size)
    lab = torch.tensor([0, 1])
    with torch.no_grad():
        cond = model.x0(x, 0.7, lab, causal=False)
        assert torch.equal(model.x0(x, 0.7, lab, 1.0, causal=False), cond)
        unc = model.x0(x, 0.7, None, causal=False)
        w3 = model.x0(x, 0.7, lab, 3.0, causal=False)
    assert torch.allclose(w3, unc + 3.0 * (cond - unc), atol=1e-4)     # CFG: ∅ + w·(c − ∅)


# ------------------------------------------------------------------------------------------------
# Schedule
# ------------------------------------------------------------------------------------------------

def test_student_sigmas_match_paper():
    s = hiar.student_sigmas(4, 5.0)
    assert s == pytest.approx([1.0, 0.9375, 0.8333333, 0.625, 0.0], abs=1e-6)


def test_flow_conversions_roundtrip():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 3, generator=g), torch.randn(2, 3, generator=g)
    for sigma in (0.0, 0.3, 1.0):
        x_t = hiar.add_noise(x0, eps, sigma)
        assert torch.allclose(x_t - sigma * (eps - x0), x0, atol=1e-6)   # x0 = x_σ − σ·v


def test_teacher_sigma_puts_weight_near_one():
    s = train_toy.sample_train_sigma(50000, torch.Generator().manual_seed(0), shift=3.0)
    logit_normal_share = 0.0142                  # P(sigmoid(N(0,1)) > 0.9)
    assert (s > 0.9).float().mean() == pytest.approx(0.5 * logit_normal_share + 0.5 * 0.25,
                                                     abs=0.01)
    assert s.min() >= 0 and s.max() <= 1


def test_dmd_sigma_is_uniform_t_shifted_then_clamped():
    """Official `critic_loss` / DMD levels: t ~ U[0, 1], σ = shift(t), clamp to [0.02, 0.98]
    *after* the shift (so σ reaches 0.98, not only shift(0.98) < 1 from a clamp on t)."""
    s = hiar.dmd_sigma(50000, 5.0, torch.Generator().manual_seed(0))
    assert s.min() == pytest.approx(0.02) and s.max() == pytest.approx(0.98)
    # P(σ > 0.9) = P(t > 0.9 / (5 − 4·0.9)) = 1 − 0.6429
    assert (s > 0.9).float().mean() == pytest.approx(1 - 0.9 / 1.4, abs=0.01)
    assert (s == 0.98).float().mean() == pytest.approx(1 - 0.98 / (5 - 4 * 0.98), abs=0.01)


# ------------------------------------------------------------------------------------------------
# Model: causality, KV cache, rolling window
# ------------------------------------------------------------------------------------------------

def test_masked_forward_is_block_causal_and_teacher_is_not(cfg, model):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, cfg.frames, 3, cfg.size, cfg.size, generator=g)
    sigma = torch.rand(2, cfg.frames, generator=g)
    y = x.clone()
    y[:, -cfg.block:] += 1.0                                                 # change the last block
    b = cfg.frames - cfg.block
    with torch.no_grad():
        assert torch.equal(model(x, sigma)[:, :b], model(y, sigma)[:, :b])
        assert not torch.allclose(model(x, sigma)[:, b:], model(y, sigma)[:, b:])
        full_x, full_y = model(x, sigma, causal=False), model(y, sigma, causal=False)
    assert not torch.allclose(full_x[:, :b], full_y[:, :b])                  # teacher sees ahead


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_cached_generation_is_causal(cfg, model, sampler):
    F = 4 * cfg.block
    t = bank(noise(cfg), F)
    changed = t.clone()
    changed[:, 2] += 1.0                                                     # perturb block 2
    with torch.no_grad():
        a, b = sampler(model, NoiseBank(t), F), sampler(model, NoiseBank(changed), F)
    cut = 2 * cfg.block
    assert torch.equal(a[:, :cut], b[:, :cut]) and not torch.allclose(a[:, cut:], b[:, cut:])


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("frames_x", [1, 4])          # inside the window, and 4× past it
def test_kv_cache_equals_full_recompute(cfg, model, sampler, frames_x):
    F = frames_x * cfg.frames
    lab = torch.tensor([0, -1])
    with torch.no_grad():
        fast = sampler(model, noise(cfg), F, lab)
        slow = reference_sample(model, noise(cfg), F, lab, ORDER[sampler])
    assert fast.shape == (2, F, 3, cfg.size, cfg.size)
    assert torch.allclose(fast, slow, atol=1e-5)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_attention_sink_equals_a_recompute_with_block_0_in_the_oldest_slot(cfg, sampler):
    """sink=True keeps block 0 in every KV cache, its keys rotated to the window's oldest slot
    once the window has left it: the same video as re-running [block 0, newest blocks] at the
    window's frames (one layer, where that is the cache's visibility), and not the plain
    window's. While block 0 is still in the window, the sink changes nothing (bitwise), at any
    depth."""
    one = random_model(dataclasses.replace(cfg, depth=1), 3)
    F, lab = 4 * cfg.frames, torch.tensor([0, 1])
    with torch.no_grad():
        fast = sampler(one, noise(cfg), F, lab, sink=True)
        slow = reference_sample(one, noise(cfg), F, lab, ORDER[sampler], sink=True)
        plain = sampler(one, noise(cfg), F, lab)
        assert torch.allclose(fast, slow, atol=1e-5)
        assert not torch.allclose(fast, plain, atol=1e-3)
        two = random_model(cfg, 4)                                   # block 0 never leaves
        assert torch.equal(sampler(two, noise(cfg), cfg.frames, lab, sink=True),
                           sampler(two, noise(cfg), cfg.frames, lab))
        streamed = torch.cat(list(hiar.step_major(one, noise(cfg), F, lab, sink=True)), 1)
        if sampler is hiar.sample_step_major:
            assert torch.equal(streamed, fast)
            piped = hiar.sample_pipelined(one, noise(cfg), F, lab, sink=True,
                                          threads_per_stream=None)
            assert torch.allclose(piped, fast, atol=1e-6)


def test_k1_both_orders_give_the_same_video(cfg, model):
    with torch.no_grad():
        assert torch.equal(hiar.sample_block_major(model, noise(cfg, K=1), 2 * cfg.frames),
                           hiar.sample_step_major(model, noise(cfg, K=1), 2 * cfg.frames))


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_same_seed_bitwise_same_video(cfg, model, sampler):
    with torch.no_grad():
        a = sampler(model, noise(cfg, seed=5), cfg.frames)
        b = sampler(model, noise(cfg, seed=5), cfg.frames)
        c = sampler(model, noise(cfg, seed=6), cfg.frames)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_orders_differ_for_k_above_1(cfg, model):
    with torch.no_grad():
        assert not torch.allclose(hiar.sample_block_major(model, noise(cfg), cfg.frames),
                                  hiar.sample_step_major(model, noise(cfg), cfg.frames))


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_rolling_window_bounds_the_cache(cfg, model, sampler, monkeypatch):
    held, orig = [], hiar.KVCache.store

    def spy(self, layer, k, v):
        orig(self, layer, k, v)
        held.append(self.k[layer].shape[-2] // cfg.tokens_per_frame)
    monkeypatch.setattr(hiar.KVCache, "store", spy)
    long = 4 * cfg.frames
    with torch.no_grad():
        video = sampler(model, noise(cfg), long)
        windowed, held[:] = list(held), []
        wide = copy.copy(model)                          # the same weights, a longer window
        wide.cfg = dataclasses.replace(cfg, window=long)
        unbounded = sampler(wide, noise(cfg), long)
    assert video.shape[1] == long and torch.isfinite(video).all()
    assert max(windowed) == cfg.window_frames - cfg.block                   # never more
    assert max(held) == long - cfg.block                                     # (the spy works)
    w = cfg.window_frames
    assert torch.equal(video[:, :w], unbounded[:, :w])                      # first window: same
    assert not torch.allclose(video[:, w:], unbounded[:, w:])               # then it rolls


def count_passes(model):
    calls = []
    handle = model.register_forward_hook(lambda *a: calls.append(1))
    return calls, handle


@pytest.mark.parametrize("K", [1, 2, 4])
def test_forward_passes_per_block(cfg, model, K):
    N = 5
    F = N * cfg.block
    calls, handle = count_passes(model)
    try:
        with torch.no_grad():
            hiar.sample_block_major(model, noise(cfg, K=K), F)
            assert len(calls) == N * (K + 1) - 1         # K denoising passes + 1 clean write;
            #                                              the last block is no one's context
            calls.clear()
            hiar.sample_step_major(model, noise(cfg, K=K), F)
            assert len(calls) == K * (2 * N - 1)         # per step: denoise + context write
            calls.clear()
            list(hiar.step_major(model, noise(cfg, K=K), F))
            assert len(calls) == K * (2 * N - 1)         # streaming: the same passes
            calls.clear()
            fused_step_major(model, noise(cfg, K=K), F)
            assert len(calls) == K * N                   # fused: N passes a step
            calls.clear()
            hiar.sample_pipelined(model, noise(cfg, K=K), F, streams=min(2, K), fused=True)
            assert len(calls) == K * N
    finally:
        handle.remove()


@pytest.mark.parametrize("context_t", hiar.CONTEXT_LEVELS)
def test_context_levels_differ_and_next_is_default(cfg, model, context_t):
    F = cfg.frames
    with torch.no_grad():
        out = hiar.sample_step_major(model, noise(cfg), F, context_t=context_t)
        default = hiar.sample_step_major(model, noise(cfg), F)
        others = [hiar.sample_step_major(model, noise(cfg), F, context_t=c)
                  for c in hiar.CONTEXT_LEVELS if c != context_t]
    assert torch.equal(out, default) == (context_t == "next")
    assert all(not torch.allclose(out, o) for o in others)
    # the first block never has context, so it is the same for every context level
    assert all(torch.equal(out[:, :cfg.block], o[:, :cfg.block]) for o in others)


def test_sampler_asserts_its_arguments(cfg, model):
    """The library asserts its invariants (what a user types is checked in sample.py / train_toy
    .py, with one-line errors; see the CLI tests)."""
    n = noise(cfg)
    with torch.no_grad():
        with pytest.raises(AssertionError, match="context_t='t_j'"):
            hiar.sample_step_major(model, n, cfg.frames, context_t="t_j")
        with pytest.raises(AssertionError, match="context_t='t_j'"):
            next(hiar.step_major(model, n, cfg.frames, context_t="t_j"))
        with pytest.raises(AssertionError, match="exit_step=9"):
            hiar.sample_block_major(model, n, cfg.frames, exit_step=9)
        with pytest.raises(AssertionError, match="frames=5"):
            hiar.sample_step_major(model, n, 5)
        with pytest.raises(AssertionError, match="noise draws blocks of"):
            hiar.sample_step_major(model, hiar.Noise(hiar.Config.preset("toy"), [0]), cfg.frames)
        with pytest.raises(AssertionError, match=r"label: an int or a \(2,\)"):
            hiar.sample_block_major(model, n, cfg.frames, torch.tensor([0, 1, 1]))
        with pytest.raises(AssertionError, match="frame shape"):
            model(torch.zeros(1, 2, 3, cfg.size + 4, cfg.size + 4), 0.5)
    with pytest.raises(AssertionError, match=r"ε\[j=5"):
        n(5, 0)


# ------------------------------------------------------------------------------------------------
# Streaming: per-video noise, prefixes, the literal Alg. 1 loop, bounded memory
# ------------------------------------------------------------------------------------------------

STREAMED = {
    "block": lambda m, n, F, lab: hiar.sample_block_major(m, n, F, lab),
    "step": lambda m, n, F, lab: hiar.sample_step_major(m, n, F, lab),
    "step-stream": lambda m, n, F, lab: torch.cat(list(hiar.step_major(m, n, F, lab)), 1),
    "pipelined": lambda m, n, F, lab: hiar.sample_pipelined(m, n, F, lab, streams=2),
}


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("name", list(STREAMED))
def test_video_i_is_the_same_whatever_the_batch(cfg, model, name, one_thread):
    F = 3 * cfg.frames
    with torch.no_grad():
        three = STREAMED[name](model, hiar.Noise(cfg, [10, 11, 12]), F, torch.tensor([0, 1, -1]))
        one = STREAMED[name](model, hiar.Noise(cfg, [11]), F, torch.tensor([1]))
    assert torch.equal(three[1:2], one)


@pytest.mark.parametrize("name", list(STREAMED))
def test_a_shorter_video_is_a_prefix_of_a_longer_one(cfg, model, name, one_thread):
    lab = torch.tensor([1, 0])
    with torch.no_grad():
        long = STREAMED[name](model, noise(cfg), 4 * cfg.frames, lab)
        short = STREAMED[name](model, noise(cfg), cfg.frames + cfg.block, lab)
    assert torch.equal(long[:, :short.shape[1]], short)


@pytest.mark.parametrize("context_t", hiar.CONTEXT_LEVELS)
def test_streaming_step_major_is_the_literal_alg1_loop(cfg, model, context_t):
    F = 3 * cfg.frames
    with torch.no_grad():
        literal = hiar.sample_step_major(model, noise(cfg), F, context_t=context_t)
        stream = torch.cat(list(hiar.step_major(model, noise(cfg), F, context_t=context_t)), 1)
    assert torch.equal(literal, stream)


def test_noise_bank_is_the_per_cell_source(cfg):
    n = noise(cfg, batch=3)
    table = bank(n, 2 * cfg.frames)
    assert table.shape == (cfg.K, 2 * cfg.frames // cfg.block, 3, cfg.block, 3, cfg.size, cfg.size)
    assert torch.equal(table[1, 4], n(1, 4)) and not torch.equal(n(1, 4), n(0, 4))
    assert not torch.equal(n(0, 3), n(0, 4))
    assert torch.equal(hiar.Noise(cfg, [101])(1, 4)[0], n(1, 4)[1])     # per video


def _live_blocks(shape):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return sum(1 for o in gc.get_objects()
                   if isinstance(o, torch.Tensor) and tuple(o.shape) == shape)


@pytest.mark.parametrize("name,fn", [("block", hiar.block_major), ("step", hiar.step_major),
                                     ("pipelined", hiar.pipelined)])
def test_blocks_held_do_not_grow_with_the_video(cfg, model, name, fn, monkeypatch):
    """Count (not time) what a streaming sampler holds: live block-sized tensors while it runs
    (the caller drops each block), and the frames in every KV cache."""
    shape = (2, cfg.block, 3, cfg.size, cfg.size)
    frames_held, orig = [], hiar.KVCache.store

    def spy(self, layer, k, v):
        orig(self, layer, k, v)
        frames_held.append(self.k[layer].shape[-2] // cfg.tokens_per_frame)
    monkeypatch.setattr(hiar.KVCache, "store", spy)
    peaks = []
    for N in (5, 20):
        counts = []
        with torch.no_grad():
            for x in fn(model, noise(cfg), N * cfg.block):
                del x
                counts.append(_live_blocks(shape))
        peaks.append(max(counts))
    bound = {"block": 2, "step": 2, "pipelined": 2 * (2 + 3) * 2}[name]   # pipelined: queues
    assert max(peaks) <= bound, peaks
    assert max(frames_held) == cfg.window_frames - cfg.block


def test_pipelined_stops_cleanly_when_the_caller_stops(cfg, model):
    gen = hiar.pipelined(model, noise(cfg), 20 * cfg.block)
    next(gen)
    gen.close()                                       # threads are told to stop and are joined
    assert not [t for t in threading.enumerate() if t.daemon and t.is_alive()
                and "stage" in str(t.name)]


# ------------------------------------------------------------------------------------------------
# Training rollouts: exit step, gradient flow, the bias stand-in
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sampler", SAMPLERS)
def test_exit_step_gradient_flows_only_through_the_exit_prediction(cfg, sampler):
    """Self-rollout training (§4): steps before the exit run without gradient, the context is
    detached, and only the exit step's prediction of each block carries gradient."""
    model = random_model(cfg).train()
    t = bank(noise(cfg), 3 * cfg.block).requires_grad_(True)
    out = sampler(model, NoiseBank(t), 3 * cfg.block, exit_step=1)        # (B, 3b, …)
    out[:, cfg.block:2 * cfg.block].sum().backward()         # block 1 only
    g = t.grad.abs().sum(dim=(2, 3, 4, 5, 6))                # (K, N)
    assert g[1, 1] > 0                                        # the exit step's input noise
    assert g[0].sum() == 0                                    # step 0 ran without gradient
    assert g[1, 0] == 0 and g[1, 2] == 0                      # no gradient through context
    assert all(p.grad is not None for p in model.parameters())
    with torch.no_grad():
        assert not sampler(model, noise(cfg), 3 * cfg.block, exit_step=0).requires_grad


@pytest.mark.parametrize("cache_grad", [False, True])
@pytest.mark.parametrize("sampler", SAMPLERS + [hiar.step_major])
def test_rollout_gradients_match_the_no_cache_oracle(cfg, sampler, cache_grad):
    """A training rollout's gradients equal the slow oracle's: with the context written with its
    gradient (`cache_grad`, the official causal model's cache) every gradient; detached (the
    default) the noise's — the oracle recomputes the context in the query's own pass, so its
    keys still depend on the weights there. With `cache_grad`, block 1's loss reaches block 0's
    exit step through the context."""
    model = random_model(cfg).train()
    frames = 3 * cfg.block
    grads = []
    for run in ("fast", "oracle"):
        t = bank(noise(cfg), frames).requires_grad_(True)
        model.zero_grad()
        if run == "fast":
            out = sampler(model, NoiseBank(t), frames, exit_step=1, cache_grad=cache_grad)
            out = out if torch.is_tensor(out) else torch.cat(list(out), 1)
        else:
            order = "block" if sampler is hiar.sample_block_major else "step"
            out = reference_sample(model, NoiseBank(t), frames, order=order, exit_step=1,
                                   cache_grad=cache_grad)
        out[:, cfg.block:2 * cfg.block].pow(2).sum().backward()      # block 1 only
        grads.append([t.grad.clone()] + [p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads) if cache_grad else [(grads[0][0], grads[1][0])]:
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)
    g = grads[0][0].abs().sum(dim=(2, 3, 4, 5, 6))                    # (K, N)
    assert g[0].sum() == 0 and g[1, 2] == 0 and g[1, 1] > 0
    assert (g[1, 0] > 0) == cache_grad                               # through block 0's write


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_exit_at_step_0_equals_a_one_step_sampler(cfg, model, sampler):
    kw = {"context_t": "clean"} if sampler is hiar.sample_step_major else {}   # block: always
    with torch.no_grad():
        early = sampler(model, noise(cfg), cfg.frames, exit_step=0, **kw)
        one_step = sampler(model, noise(cfg, K=1), cfg.frames, **kw)
    assert torch.equal(early, one_step)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_x0_bias_enters_every_prediction(cfg, sampler):
    """With a model that predicts x0 = 0 everywhere, the output is exactly the bias; with K = 1
    and no context effect the bias adds to the first block."""
    zero = random_model(cfg)
    zero.forward = lambda x, s, *a, **kw: x / frame_sigma(s, x)   # v = x/σ → x0_hat = 0
    with torch.no_grad():
        out = sampler(zero, noise(cfg), cfg.frames, x0_bias=0.25)
    assert torch.allclose(out, torch.full_like(out, 0.25), atol=1e-6)


def frame_sigma(s, x):
    return hiar.frame_sigma(s, x.shape[0], x.shape[1])[..., None, None, None]


def test_long_rollout_keeps_the_last_window_and_gradient_reaches_only_it(cfg, tmp_path):
    """TrainConfig.rollout_frames: the rollout is longer than the window, the loss sees only the
    last `frames`; a block before that window gets no gradient even though it is generated."""
    tc = train_toy.TrainConfig(**{**train_toy.TRAIN_PRESETS["smoke"],
                                  "rollout_frames": 3 * cfg.frames})
    run = train_toy.Run(tmp_path, cfg, tc, torch.device("cpu"), 0)
    student = random_model(cfg).train()
    seen = []
    real = hiar.block_major

    def spy(*a, **kw):
        for x in real(*a, **kw):
            x.retain_grad() if x.requires_grad else None
            seen.append(x)
            yield x
    hiar_block, hiar.block_major = hiar.block_major, spy
    try:
        out = train_toy.rollout(student, run, "block", "clean", torch.Generator().manual_seed(0),
                                None, exit_step=cfg.K - 1)
    finally:
        hiar.block_major = hiar_block
    N, keep = 3 * cfg.frames // cfg.block, cfg.frames // cfg.block
    assert len(seen) == N and out.shape[1] == cfg.frames
    assert torch.equal(out, torch.cat(seen[-keep:], 1))
    out.sum().backward()
    assert all(x.grad is None or x.grad.abs().sum() == 0 for x in seen[:-keep])
    assert all(x.grad is not None and x.grad.abs().sum() > 0 for x in seen[-keep:])


@pytest.mark.parametrize("order", ["block", "step"])
def test_training_rollouts_with_the_sink_are_the_samplers_and_their_gradients_the_oracles(
        cfg, tmp_path, order):
    """TrainConfig.sink: a rollout longer than the window keeps block 0 in it — the last window
    is the sampler's with sink=True on the rollout's noise — and its gradient to the noise is the
    recompute oracle's (one layer, exit step 1, context detached)."""
    one = dataclasses.replace(cfg, depth=1)
    student = random_model(one, 5).train()
    ctx, sampler = ("clean", hiar.sample_block_major) if order == "block" else \
        ("next", hiar.sample_step_major)
    outs = {}
    for sink in (False, True):
        tc = train_toy.TrainConfig(**{**train_toy.TRAIN_PRESETS["smoke"], "sink": sink,
                                      "rollout_frames": 3 * one.frames})
        run = train_toy.Run(tmp_path / str(sink), one, tc, torch.device("cpu"), 0)
        with torch.no_grad():
            outs[sink] = train_toy.rollout(student, run, order, ctx,
                                           torch.Generator().manual_seed(0), None, one.K - 1)
    seeds = torch.randint(2 ** 62, (tc.dmd_batch,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = sampler(student, hiar.Noise(one, seeds), 3 * one.frames, sink=True)
    assert torch.equal(outs[True], full[:, -one.frames:])
    assert not torch.allclose(outs[True], outs[False], atol=1e-3)
    frames, grads = 3 * one.frames, []
    for fast in (True, False):
        t = bank(noise(one), frames).requires_grad_(True)
        out = (sampler(student, NoiseBank(t), frames, exit_step=1, sink=True) if fast else
               reference_sample(student, NoiseBank(t), frames, order=order, exit_step=1,
                                sink=True))
        out[:, -one.block:].pow(2).sum().backward()                  # the last block's loss
        grads.append(t.grad)
    assert torch.allclose(grads[0], grads[1], atol=1e-5, rtol=1e-4)
    assert grads[0][1, -1].abs().sum() > 0                           # the exit step's noise


# ------------------------------------------------------------------------------------------------
# Pipelined sampler, fused pass, schedule, processes
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("blocks,K,S", [(6, 4, 2), (5, 4, 4), (4, 4, 1), (7, 3, 2), (3, 2, 2),
                                        (1, 4, 3)])
def test_pipelined_is_bitwise_step_major(cfg, blocks, K, S, one_thread):
    model = random_model(cfg)
    F = blocks * cfg.block
    with torch.no_grad():
        ref = hiar.sample_step_major(model, noise(cfg, K=K), F)
        pipe = hiar.sample_pipelined(model, noise(cfg, K=K), F, streams=S, threads_per_stream=1)
    assert torch.equal(ref, pipe)


def test_pipelined_with_rolling_window_context_levels_and_fused(cfg, model, one_thread):
    F = 4 * cfg.frames
    lab = torch.tensor([1, -1])
    with torch.no_grad():
        for ctx in hiar.CONTEXT_LEVELS:
            for fused in (False, True):
                one = fused_step_major if fused else hiar.sample_step_major
                assert torch.equal(
                    one(model, noise(cfg), F, lab, context_t=ctx),
                    hiar.sample_pipelined(model, noise(cfg), F, lab, context_t=ctx, streams=2,
                                          fused=fused))


def test_pipelined_rejects_bad_streams_and_surfaces_errors(cfg, model, monkeypatch):
    with pytest.raises(AssertionError, match="streams=3 must be in"):
        hiar.sample_pipelined(model, noise(cfg), cfg.frames, streams=3)   # smoke K = 2
    real = model.forward

    def failing(x, sigma, *a, frame0=0, **kw):
        if frame0 == cfg.block and float(torch.as_tensor(sigma).max()) < 1:  # stage 1, block 1
            raise RuntimeError("boom in stage 1")
        return real(x, sigma, *a, frame0=frame0, **kw)
    monkeypatch.setattr(model, "forward", failing)
    with pytest.raises(RuntimeError, match="boom in stage 1"):    # raised, not hung or lost
        hiar.sample_pipelined(model, noise(cfg), cfg.frames, streams=2)


@pytest.mark.parametrize("context_t", hiar.CONTEXT_LEVELS)
@pytest.mark.parametrize("frames_x", [1, 3])
def test_fused_pass_matches_unfused(cfg, model, context_t, frames_x):
    F = frames_x * cfg.frames
    with torch.no_grad():
        a = hiar.sample_step_major(model, noise(cfg), F, context_t=context_t)
        b = fused_step_major(model, noise(cfg), F, context_t=context_t)
    assert torch.allclose(a, b, atol=1e-5)


def test_fused_pass_with_gradient_is_refused_because_its_gradients_differ(cfg):
    """The fused pass gives block n the same output as the unfused cache, but inside it block n
    attends to block n − 1's keys with their gradient, so parameter gradients differ; the
    sampler refuses fused=True with gradient on."""
    model = random_model(cfg).train()
    g = torch.Generator().manual_seed(0)
    x_prev, x = (torch.randn(2, cfg.block, 3, cfg.size, cfg.size, generator=g) for _ in "ab")
    cache = model.new_cache()
    hiar.write(model, cache, x_prev, 0.5, 0, None)
    v_unfused = model(x, 1.0, None, frame0=cfg.block, cache=cache)
    v_fused = hiar.fused_pass(model, model.new_cache(), x_prev, 0.5, x, 1.0, 1, None)
    assert torch.allclose(v_unfused, v_fused, atol=1e-5)
    params = list(model.parameters())
    g_unfused = torch.autograd.grad(v_unfused.square().sum(), params)
    g_fused = torch.autograd.grad(v_fused.square().sum(), params)
    assert not all(torch.allclose(a, b, atol=1e-5) for a, b in zip(g_unfused, g_fused))
    with pytest.raises(ValueError, match="fused=True is for inference"):
        next(hiar.step_major(model, noise(cfg), cfg.frames, exit_step=1, fused=True))
    with torch.no_grad():                                   # inference: allowed
        assert next(hiar.step_major(model, noise(cfg), cfg.frames, fused=True)).shape[1] == 2


@pytest.mark.parametrize("N,K,S", [(8, 4, 2), (5, 4, 4), (3, 4, 1), (6, 3, 2)])
def test_pipeline_schedule_respects_dependencies(N, K, S):
    cells = sample.pipeline_schedule(N, K, S)
    assert max(c["slot"] for c in cells) + 1 == N + S - 1                 # N + S − 1 slots
    assert sorted(j for c in cells if c["block"] == 0 for j in c["steps"]) == list(range(K))
    where = {(c["block"], j): (c["slot"], c["stream"]) for c in cells for j in c["steps"]}
    assert len(where) == N * K                                            # every cell once
    for (n, j), (slot, stream) in where.items():
        if j > 0:                                                         # input: (n, j − 1)
            assert where[(n, j - 1)][0] < slot or where[(n, j - 1)] == (slot, stream)
        if n > 0:                                                         # context: (n − 1, j)
            assert where[(n - 1, j)][0] < slot
    busy = [(c["slot"], c["stream"]) for c in cells]
    assert len(busy) == len(set(busy))                                    # one cell a stream a slot


def smoke_ckpt(tmp_path, **extra):
    cfg = hiar.Config.preset("smoke")
    path = tmp_path / "smoke.pt"
    torch.save({"config": cfg.to_dict(), "model": random_model(cfg).state_dict(),
                "stage": "ode_init", **extra}, path)
    return path


@pytest.mark.slow
def test_torchrun_two_processes_equal_single_process(tmp_path):
    ckpt = smoke_ckpt(tmp_path)
    # (torchrun takes "--num" for its own --numa-binding, so -n)
    common = [f"--ckpt={ckpt}", "--frames=12", "-n", "2", "--gif=", "--seed=3", "--no-metrics"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "sample.py", *common, "--sampler", "step",
                    "--npy", str(tmp_path / "one.npy")], check=True, env=env, cwd=HERE,
                   capture_output=True)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                    "sample.py", *common, "--sampler", "pipelined",
                    "--npy", str(tmp_path / "two.npy")],
                   check=True, env=env, capture_output=True, timeout=300, cwd=HERE)
    one, two = np.load(tmp_path / "one.npy"), np.load(tmp_path / "two.npy")
    assert one.shape == (2, 12, 8, 8, 3) and np.array_equal(one, two)


# ------------------------------------------------------------------------------------------------
# Losses
# ------------------------------------------------------------------------------------------------

def test_dmd_loss_gradient_is_the_normalised_score_difference(cfg):
    """The DMD update, per video, with CFG on the real score:
    dL/dx0 = (x0_fake − x0_real^cfg) / (mean|x0 − x0_real^cfg| · numel)."""
    teacher, critic = random_model(cfg, 1), random_model(cfg, 2)
    x0 = torch.randn(2, cfg.frames, 3, cfg.size, cfg.size, requires_grad=True)
    lab = torch.tensor([0, 1])
    hiar.dmd_loss(x0, teacher, critic, 5.0, lab, 3.0, torch.Generator().manual_seed(0)).backward()
    g = torch.Generator().manual_seed(0)                   # replay the same draws by hand
    sigma = hiar.dmd_sigma(2, 5.0, g)
    x0d = x0.detach()
    x_t = hiar.add_noise(x0d, torch.randn(x0d.shape, generator=g), sigma[:, None, None, None, None])
    with torch.no_grad():
        s = sigma[:, None, None, None, None]
        v_c, v_u = teacher(x_t, sigma, lab, causal=False), teacher(x_t, sigma, None, causal=False)
        real = x_t - s * (v_u + 3.0 * (v_c - v_u))
        fake = critic.x0(x_t, sigma, lab, causal=False)
    norm = (x0d - real).abs().mean(dim=(1, 2, 3, 4), keepdim=True)
    expected = (fake - real) / norm / x0d.numel()
    assert torch.allclose(x0.grad, expected, atol=1e-6, rtol=1e-3)


def test_dmd_guidance_only_inside_an_interval(cfg):
    """guidance_sigmas (guidance in an interval, Kynkäänniemi et al. 2024): queries outside it
    see the conditional teacher (w = 1); (0, 1) guides every query, (0, 0) none; an interval
    from below and one from above split the queries between them."""
    teacher, critic = random_model(cfg, 1), random_model(cfg, 2)
    x0 = torch.randn(4, cfg.frames, 3, cfg.size, cfg.size)
    lab = torch.tensor([0, 1, 0, 1])

    def loss(**kw):
        return hiar.dmd_loss(x0, teacher, critic, 1.0, lab, generator=torch.Generator()
                             .manual_seed(0), **kw).item()
    assert loss(guidance=3.0, guidance_sigmas=(0.0, 1.0)) == pytest.approx(loss(guidance=3.0))
    assert loss(guidance=3.0, guidance_sigmas=(0.0, 0.0)) == pytest.approx(loss(guidance=1.0))
    sigma = hiar.dmd_sigma(4, 1.0, torch.Generator().manual_seed(0))
    cut = float(sigma.sort().values[1:3].mean())              # two queries below, two above
    below, above = loss(guidance=3.0, guidance_sigmas=(0.0, cut)), \
        loss(guidance=3.0, guidance_sigmas=(cut, 1.0))
    for mixed in (below, above):
        assert mixed not in (pytest.approx(loss(guidance=3.0)), pytest.approx(loss(guidance=1.0)))
    # the loss is a mean over the batch: the two halves add up to the fully guided loss's parts
    assert below + above == pytest.approx(loss(guidance=3.0) + loss(guidance=1.0), rel=1e-5)
    with pytest.raises(ValueError, match="guidance_min_sigma"):
        train_toy.TrainConfig(guidance_min_sigma=0.8, guidance_max_sigma=0.5)


def test_lever_fields_default_to_the_official_recipe_and_snapshots_are_written(smoke_run, cfg):
    """The DMD levers are TrainConfig fields (--set): the real score's guidance (official 3),
    guidance at every level, no snapshots; snapshot_every=N keeps the EMA every N steps as a
    loadable student."""
    tc = train_toy.TrainConfig()
    assert (tc.dmd_guidance, tc.guidance_min_sigma, tc.guidance_max_sigma,
            tc.snapshot_every) == (3.0, 0.0, 1.0, 0)
    run = train_toy.Run(smoke_run.path / "snap", cfg, train_toy.TrainConfig(
        **{**train_toy.TRAIN_PRESETS["smoke"], "snapshot_every": 2}), torch.device("cpu"), 0)
    pairs = {"states": torch.randn(4, cfg.K, cfg.frames, 3, cfg.size, cfg.size),
             "x0": torch.randn(4, cfg.frames, 3, cfg.size, cfg.size),
             "sigmas": torch.tensor(hiar.student_sigmas(cfg.K, cfg.shift)[:-1]),
             "label": torch.tensor([0, 1, 0, 1])}
    train_toy.train_dmd(run, "s", random_model(cfg, 1), random_model(cfg, 2), pairs, "step",
                        0.1, "next")
    snaps = sorted(p.name for p in run.path.glob("s_ema*.pt"))
    assert snaps == ["s_ema2.pt", "s_ema4.pt"]
    model, meta = sample.load_student(str(run.path / "s_ema4.pt"), "cpu")
    final = sample.load_checkpoint(run.ckpt("s"))["ema"]
    assert all(torch.equal(v, final[k].half().float()) for k, v in model.state_dict().items())
    assert meta["order"] == "step" and meta["stage"] == "s"


def test_block_major_takes_no_context_level_and_training_refuses_one(smoke_run, cfg, model):
    """Block-major context is always clean: the sampler has no context_t to ignore, and a
    block-major student asked to train at another level is refused, not trained clean."""
    with pytest.raises(TypeError, match="context_t"):
        hiar.sample_block_major(model, noise(cfg), cfg.frames, context_t="next")
    for ctx in ("next", "current"):
        with pytest.raises(ValueError, match=f"context_t='{ctx}'.*always clean"):
            train_toy.train_dmd(smoke_run, "s", model, model, {}, "block", 0.0, ctx)
    assert not smoke_run.ckpt("s").exists()


def test_dmd_loss_vanishes_when_critic_equals_teacher_without_guidance(cfg):
    teacher = random_model(cfg, 1)
    x0 = torch.randn(2, cfg.frames, 3, cfg.size, cfg.size, requires_grad=True)
    loss = hiar.dmd_loss(x0, teacher, teacher, 5.0, torch.tensor([0, 1]), guidance=1.0)
    loss.backward()
    assert loss.item() == 0 and x0.grad.abs().max() == 0
    guided = hiar.dmd_loss(x0, teacher, teacher, 5.0, torch.tensor([0, 1]), guidance=3.0)
    assert guided.item() > 0                   # CFG moves the real score away from the critic


def test_fkl_loss_modes_and_target(cfg):
    student = random_model(cfg, 3)
    x = torch.randn(2, cfg.frames, 3, cfg.size, cfg.size)
    lab = torch.tensor([1, 0])
    with torch.no_grad():
        target = student.x0(x, 1.0, lab, causal=False)
        assert hiar.fkl_loss(student, x, target, 1.0, lab, bidirectional=True) == 0
        assert hiar.fkl_loss(student, x, target, 1.0, lab, bidirectional=False) > 0
    xa, xb = torch.randn(3), torch.randn(3)
    x0 = hiar.chord_x0(xa, xb, 1.0, 0.9375)
    assert torch.allclose(hiar.add_noise(x0, xa, 0.9375), xb, atol=1e-5)  # at σ = 1: x = ε


def test_flow_loss_is_zero_for_the_true_velocity(cfg, monkeypatch):
    model = random_model(cfg)
    x0 = torch.randn(2, cfg.frames, 3, cfg.size, cfg.size)
    eps = torch.randn_like(x0)
    monkeypatch.setattr(model, "forward", lambda x, s, *a, **kw: eps - x0)
    assert hiar.flow_loss(model, x0, torch.rand(2), eps) == 0


def test_teacher_ode_keeps_states_at_requested_levels_and_guides(cfg):
    teacher = random_model(cfg)
    eps = torch.randn(2, cfg.frames, 3, cfg.size, cfg.size)
    keep = hiar.student_sigmas(4, 5.0)[:-1]
    lab = torch.tensor([0, 1])
    states, x0 = hiar.teacher_ode(teacher, eps, keep, steps=8, shift=8.0, label=lab)
    assert states.shape == (2, 4) + eps.shape[1:] and torch.equal(states[:, 0], eps)
    assert not torch.allclose(states[:, 1], eps) and torch.isfinite(x0).all()
    _, x0_cfg = hiar.teacher_ode(teacher, eps, [], steps=8, shift=8.0, label=lab, guidance=3.0)
    assert not torch.allclose(x0, x0_cfg)


def causal_reference(model, past, x_n, sigma, n, label=None, guidance=1.0):
    """The slow oracle of teacher forcing: one clip batch, block n alone after the clean blocks
    before it, on a sequence cut after block n (nothing later exists), block-causal → block n's
    x0_hat."""
    b = model.cfg.block
    xs = torch.cat([past[:, :n * b], x_n], 1)
    s = torch.cat([torch.zeros(len(xs), n * b), torch.full((len(xs), b), float(sigma))], 1)
    return model.x0(xs, s, label, guidance, causal=True)[:, n * b:]


def test_teacher_forcing_loss_sees_a_clean_past_and_a_noisy_block(cfg):
    """flow_loss with blocks n (Causal Forcing's AR teacher): each clip's block n at its σ after
    its own clean blocks, the loss on block n only — equal to the cut-sequence oracle, blind to
    everything after block n, and changed by the clean past."""
    model, B, b = random_model(cfg), 4, cfg.block
    x0, eps = torch.randn(B, cfg.frames, 3, cfg.size, cfg.size), torch.randn(B, cfg.frames, 3,
                                                                             cfg.size, cfg.size)
    sigma, n, lab = torch.tensor([0.9, 0.3, 0.6, 1.0]), torch.tensor([0, 1, 2, 1]), torch.arange(
        B) % cfg.labels
    loss = hiar.flow_loss(model, x0, sigma, eps, lab, n=n)
    ref = []
    for i in range(B):
        f = slice(n[i] * b, (n[i] + 1) * b)
        x_t = hiar.add_noise(x0[i:i + 1, f], eps[i:i + 1, f], sigma[i])
        xs = torch.cat([x0[i:i + 1, :n[i] * b], x_t], 1)
        s = torch.cat([torch.zeros(1, n[i] * b), torch.full((1, b), sigma[i].item())], 1)
        v = model(xs, s, lab[i:i + 1], causal=True)[:, n[i] * b:]
        ref.append((v - (eps[i:i + 1, f] - x0[i:i + 1, f])).pow(2).mean())
    assert loss.item() == pytest.approx(torch.stack(ref).mean().item(), rel=1e-5)
    later = x0.clone()
    later[:, 2 * b:] += 1                         # clip 0 and 1 and 3 do not see blocks >= 2
    keep = torch.tensor([True, True, False, True])
    per_clip = lambda x: torch.stack([hiar.flow_loss(model, x[i:i + 1], sigma[i:i + 1],   # noqa
                                                     eps[i:i + 1], lab[i:i + 1], n=n[i:i + 1])
                                      for i in range(B)])
    assert torch.equal(per_clip(later)[keep], per_clip(x0)[keep])
    past = x0.clone()
    past[:, :b] += 1                              # the clean block 0 is seen by blocks >= 1
    assert (per_clip(past)[1:] != per_clip(x0)[1:]).all()


def test_teacher_forced_ode_solves_each_block_after_the_clean_context(cfg):
    """teacher_ode with a context (Causal Forcing's ODE pairs): block n's trajectory is the
    oracle's Euler ODE of block n alone after the context's clean blocks before it; the states
    are kept at the requested levels; the context of later blocks plays no part."""
    teacher, B, b = random_model(cfg), 2, cfg.block
    eps = torch.randn(B, cfg.frames, 3, cfg.size, cfg.size)
    ctx, lab = torch.randn_like(eps), torch.tensor([0, 1])
    keep, steps, shift = hiar.student_sigmas(2, 5.0)[:-1], 6, 8.0
    states, x0 = hiar.teacher_ode(teacher, eps, keep, steps, shift, lab, 3.0, context=ctx)
    grid = sorted({round(float(hiar.shift_sigma(1 - i / steps, shift)), 7) for i in
                   range(steps + 1)} | {round(k, 7) for k in keep}, reverse=True)
    for n in range(cfg.frames // b):
        x, f = eps[:, n * b:(n + 1) * b], slice(n * b, (n + 1) * b)
        for a, z in zip(grid[:-1], grid[1:]):
            if a in [round(k, 7) for k in keep]:
                assert torch.allclose(states[:, [round(k, 7) for k in keep].index(a), f], x,
                                      atol=1e-5)
            x = x + (z - a) * (x - causal_reference(teacher, ctx, x, a, n, lab, 3.0)) / a
        assert torch.allclose(x0[:, f], x, atol=1e-5)
    late = ctx.clone()
    late[:, -b:] += 5                             # the last block's context is nobody's past
    assert torch.equal(hiar.teacher_ode(teacher, eps, keep, steps, shift, lab, 3.0,
                                        context=late)[1], x0)
    assert not torch.allclose(hiar.teacher_ode(teacher, eps, [], steps, shift, lab, 3.0)[1], x0)


# ------------------------------------------------------------------------------------------------
# Drift metrics (sample.py): known answers
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def long_data():
    toy = hiar.Config.preset("toy")
    return toy, *hiar.moving_shapes(toy, 24, torch.Generator().manual_seed(0), frames=90)


def metrics(toy, video):
    return sample.drift_metrics(video, toy.block, toy.shapes)


def test_drift_slope_of_a_line_is_its_slope():
    seg = torch.tensor([[1.0, 3, 5, 7, 9], [2, 2, 2, 2, 2]])
    assert torch.allclose(sample.drift_slope(seg), torch.tensor([2.0, 0.0]))


def test_blob_finder_reads_the_true_attributes(long_data):
    toy, video, st = long_data
    b = sample.find_blobs(video, toy.shapes)
    d = (b["centre"][..., :, None, :] - st["pos"][..., None, :, :]).norm(dim=-1)
    nearest, ok = d.argmin(-1), b["valid"] & (d.amin(-1) < 1.0)
    assert ok.float().mean() > 0.7                         # most blobs found where they are

    def truth(name):
        return st[name].gather(2, nearest)[ok]
    assert (b["radius"][ok] / truth("radius")).mean() == pytest.approx(1.0, abs=0.1)
    assert (b["value"][ok] / truth("value")).mean() == pytest.approx(1.0, abs=0.05)
    assert (b["saturation"][ok] / truth("saturation")).mean() == pytest.approx(1.0, abs=0.05)
    dh = (b["hue"][ok] - truth("hue")).abs()
    assert torch.minimum(dh, 1 - dh).median() < 0.01
    assert (b["background"] - st["background"]).abs().mean() < 0.01


def test_ground_truth_has_no_drift_and_the_true_speed(long_data):
    toy, video, st = long_data
    m = metrics(toy, video)
    for name, (level, slope) in m.items():      # per video noisy; on average ~0 against spread
        assert slope.mean().abs() < 0.5 * max(level.std().item(), 0.01), name
    assert m["speed"][0].mean() == pytest.approx(st["vel"].norm(dim=-1).mean().item(), rel=0.15)
    assert m["jump"][0].mean() == pytest.approx(1.0, abs=0.05)
    score = sample.drift_score(m, m)
    assert score.mean() < 0.5


def _recolour(video, fn):
    """Apply fn(h, s, v, t) → (h, s, v) per pixel, t ∈ [0, 1] the time in the video."""
    rgb = ((video + 1) / 2).permute(0, 1, 3, 4, 2)
    h, s, v = sample.rgb_to_hsv(rgb)
    t = torch.linspace(0, 1, video.shape[1])[None, :, None, None]
    out = hiar.hsv_to_rgb(*fn(h, s, v, t)).permute(0, 1, 4, 2, 3)
    return out.clamp(0, 1) * 2 - 1


def test_brightening_is_seen_by_value_and_background(long_data):
    toy, video, _ = long_data
    bright = _recolour(video, lambda h, s, v, t: (h, s, (v * (1 + 0.8 * t)).clamp(0, 1)))
    m0, m1 = metrics(toy, video), metrics(toy, bright)
    assert m1["value"][1].mean() > 0.03 > m0["value"][1].mean().abs()
    assert m1["background"][1].mean() > 0.01


def test_hue_rotation_is_seen_by_hue_error(long_data):
    toy, video, _ = long_data
    rotated = _recolour(video, lambda h, s, v, t: ((h + 0.3 * t) % 1, s, v))
    m0, m1 = metrics(toy, video), metrics(toy, rotated)
    assert m1["hue_err"][1].mean() > 0.02 > 5 * m0["hue_err"][1].mean().abs()
    assert m1["value"][1].mean().abs() < 0.01                       # brightness untouched


def test_shrinking_is_seen_by_size():
    toy = hiar.Config.preset("toy")
    segs = []
    for k, r in enumerate((2.0, 1.8, 1.6, 1.4, 1.2)):                # radius falls by segment
        c = hiar.Config.preset("toy", blob_sigma=(r, r))
        segs.append(hiar.moving_shapes(c, 16, torch.Generator().manual_seed(0), 18,
                                       start=18 * k)[0])
    m = metrics(toy, torch.cat(segs, 1))
    assert m["size"][1].mean() < -0.1 and m["value"][1].mean().abs() < 0.03


def test_slowing_is_seen_by_speed(long_data):
    toy, video, _ = long_data
    T = video.shape[1]
    t = torch.arange(T, dtype=torch.float32)
    idx = (t - 0.4 * t ** 2 / T).round().long()                      # speed 1 → 0.2
    m0, m1 = metrics(toy, video), metrics(toy, video[:, idx])
    assert m1["speed"][1].mean() < -0.05 and m0["speed"][1].mean().abs() < 0.03


def test_block_boundary_jump_is_seen_by_jump(long_data):
    toy, video, _ = long_data
    T = video.shape[1]
    n = torch.arange(T) // toy.block                                  # block index per frame
    amp = 0.15 * torch.linspace(0, 1, T)                              # grows over the video
    shift = (amp * (n % 2) * 2)[None, :, None, None, None]            # alternate blocks move
    jumpy = (video + shift).clamp(-1, 1)
    m0, m1 = metrics(toy, video), metrics(toy, jumpy)
    assert m1["jump"][1].mean() > 0.2 and m1["jump"][0].mean() > 1.5
    assert m0["jump"][1].mean().abs() < 0.05


def test_drift_meter_fed_in_pieces_equals_whole(long_data):
    toy, video, _ = long_data
    whole = metrics(toy, video)
    meter = sample.DriftMeter(video.shape[1], toy.block, toy.shapes)
    for s in range(0, video.shape[1], toy.block):
        meter.update(video[:, s:s + toy.block])
    pieces = meter.result()
    for name in sample.MEASURES:
        assert torch.allclose(whole[name][0], pieces[name][0], atol=1e-5), name
        assert torch.allclose(whole[name][1], pieces[name][1], atol=1e-5), name


def test_drift_score_scales_by_the_data_spread(long_data):
    toy, video, _ = long_data
    m = metrics(toy, video)
    fake = {k: (lvl, sl.clone()) for k, (lvl, sl) in m.items()}
    for k in fake:
        fake[k] = (fake[k][0], torch.zeros_like(fake[k][1]))
    assert sample.drift_score(fake, m).abs().max() == 0
    fake["background"] = (m["background"][0], torch.full_like(m["background"][1], 1.0))
    spread = m["background"][0].std()
    assert sample.drift_score(fake, m).mean().item() == pytest.approx(1 / spread.item() / len(sample.SCORED),
                                                               rel=1e-4)
    fake["background"] = (m["background"][0], torch.zeros_like(m["background"][1]))
    fake["jump"] = (m["jump"][0], torch.full_like(m["jump"][1], 1.0))
    assert sample.drift_score(fake, m).abs().max() == 0       # seams are reported, not scored


# ------------------------------------------------------------------------------------------------
# train_toy.py: run directory, resume, failures, recipe
# ------------------------------------------------------------------------------------------------

def run_cli(*args, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    return subprocess.run([sys.executable, *args], cwd=HERE, capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.fixture
def smoke_run(tmp_path, cfg):
    tc = train_toy.TrainConfig(**train_toy.TRAIN_PRESETS["smoke"])
    return train_toy.Run(tmp_path, cfg, tc, torch.device("cpu"), 0)


def test_train_loop_stops_on_nan_and_keeps_the_last_good_checkpoint(smoke_run):
    w = torch.nn.Linear(2, 2)
    losses = iter([1.0, 0.5, 0.25, float("nan"), 0.1])
    with pytest.raises(sample.CLIError, match=r"stage toy: loss=nan at step 3"):
        train_toy.train_loop(smoke_run, "toy", 5, {"model": w},
                             lambda step: {"loss": next(losses)}, every=2)
    ck = sample.load_checkpoint(smoke_run.ckpt("toy"))
    assert ck["step"] == 2 and not ck["done"]                       # the last good state stays


def test_train_loop_resumes_where_it_stopped(smoke_run):
    seen = []

    def step_fn(step):
        seen.append(step)
        if step == 5 and len(seen) == 6:
            raise KeyboardInterrupt                                  # a kill mid-stage
        return {"loss": 1.0}
    w = torch.nn.Linear(2, 2)
    with pytest.raises(KeyboardInterrupt):
        train_toy.train_loop(smoke_run, "toy", 8, {"model": w}, step_fn, every=2)
    train_toy.train_loop(smoke_run, "toy", 8, {"model": w}, step_fn, every=2)
    assert seen == [0, 1, 2, 3, 4, 5, 4, 5, 6, 7] and smoke_run.done("toy")


def test_run_directory_refuses_a_different_config(tmp_path, cfg, smoke_run):
    tc = train_toy.TrainConfig(**{**train_toy.TRAIN_PRESETS["smoke"], "dmd_steps": 99})
    with pytest.raises(sample.CLIError, match=r"dmd_steps: 4 vs 99"):
        train_toy.Run(tmp_path, cfg, tc, torch.device("cpu"), 0)
    ck = {"config": hiar.Config.preset("smoke", dim=64).to_dict()}
    with pytest.raises(sample.CLIError, match=r"dim: 64 vs 32"):
        train_toy.check_network(ck, cfg, "teacher.pt")
    train_toy.check_network({"config": hiar.Config.preset("smoke", shift=2.0).to_dict()}, cfg,
                            "teacher.pt")                     # sampler fields may differ


def test_checkpoints_are_written_atomically(tmp_path, monkeypatch):
    path = tmp_path / "x.pt"
    train_toy.save_atomic({"a": 1}, path)

    def broken_save(obj, f):
        Path(f).write_bytes(b"half a fi")
        raise OSError("disk full")
    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        train_toy.save_atomic({"a": 2}, path)
    assert sample.load_checkpoint(path) == {"a": 1}                # the old file is intact


def test_default_run_adopts_the_shipped_ode_init_only_when_it_fits(tmp_path):
    """`python train_toy.py` starts from checkpoints/ode_init.pt (as from the shipped teacher)
    when config, ODE settings and seed match; otherwise it makes its own."""
    toy, tc = hiar.Config.preset("toy"), train_toy.TrainConfig()
    run = train_toy.Run(tmp_path / "a", toy, tc, torch.device("cpu"), 0)
    assert train_toy.adopt_shipped_init(run) and run.done("ode_init")
    shipped = sample.load_checkpoint(train_toy.SHIPPED / "ode_init.pt")
    ours = sample.model_from_checkpoint(sample.load_checkpoint(run.ckpt("ode_init")), "x")
    ref = sample.model_from_checkpoint(shipped, "y")
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(),
                                                 ref.state_dict().values()))
    assert not train_toy.adopt_shipped_init(run)                    # once; never overwrites
    other = train_toy.Run(tmp_path / "b", toy, tc, torch.device("cpu"), 1)        # seed
    assert not train_toy.adopt_shipped_init(other) and not other.ckpt("ode_init").exists()
    fewer = train_toy.TrainConfig(ode_pairs=8)                                   # ODE setting
    third = train_toy.Run(tmp_path / "c", toy, fewer, torch.device("cpu"), 0)
    assert not train_toy.adopt_shipped_init(third)
    dmd = train_toy.TrainConfig(dmd_steps=10)                 # a DMD setting does not matter
    assert train_toy.adopt_shipped_init(train_toy.Run(tmp_path / "d", toy, dmd,
                                                      torch.device("cpu"), 0))


def test_critic_trains_on_the_dmd_query_levels_with_cfg(cfg, smoke_run, monkeypatch):
    """Recipe (official `critic_loss`): the critic's flow loss uses the levels the DMD loss
    queries (dmd_sigma), not the teacher's; and the real score carries CFG."""
    teacher = random_model(cfg, 1)
    pairs = {"states": torch.randn(4, cfg.K, cfg.frames, 3, cfg.size, cfg.size),
             "x0": torch.randn(4, cfg.frames, 3, cfg.size, cfg.size),
             "sigmas": torch.tensor(hiar.student_sigmas(cfg.K, cfg.shift)[:-1]),
             "label": torch.tensor([0, 1, 0, 1])}
    flow_sigmas, dmd_guidance, real_flow = [], [], hiar.flow_loss
    real_dmd = hiar.dmd_loss

    def spy_flow(model, x0, sigma, eps, label=None, causal=False):
        flow_sigmas.append(sigma.clone())
        return real_flow(model, x0, sigma, eps, label, causal)

    def spy_dmd(x0, t, c, shift, label=None, guidance=1.0, generator=None, sigmas=(0.0, 1.0)):
        dmd_guidance.append((guidance, shift, label is not None, sigmas))
        return real_dmd(x0, t, c, shift, label, guidance, generator, sigmas)
    dmd_levels = []
    real_sigma = hiar.dmd_sigma
    monkeypatch.setattr(hiar, "dmd_sigma", lambda *a, **k: dmd_levels.append(1) or
                        real_sigma(*a, **k))
    monkeypatch.setattr(hiar, "flow_loss", spy_flow)
    monkeypatch.setattr(hiar, "dmd_loss", spy_dmd)
    clips, opts, real_clip, real_adamw = [], [], torch.nn.utils.clip_grad_norm_, torch.optim.AdamW
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_",
                        lambda p, max_norm: clips.append(max_norm) or real_clip(p, max_norm))
    monkeypatch.setattr(torch.optim, "AdamW",
                        lambda p, **kw: opts.append(kw) or real_adamw(p, **kw))
    train_toy.train_dmd(smoke_run, "s", teacher, random_model(cfg, 2), pairs, "block", 0.0,
                        "clean")
    tc = smoke_run.tc
    assert len(flow_sigmas) == tc.dmd_steps * tc.critic_ratio
    assert len(dmd_levels) == len(flow_sigmas) + tc.dmd_steps   # critic + DMD levels: one source
    assert all(g == (tc.dmd_guidance, tc.dmd_shift, True,
                     (tc.guidance_min_sigma, tc.guidance_max_sigma))
               for g in dmd_guidance)
    # the official optimiser settings: AdamW (0, 0.999) with weight decay, both clipped at
    # grad_clip; the critic's lr is its own (official: 0.15 × the generator's)
    assert [o["lr"] for o in opts] == [tc.gen_lr, tc.critic_lr]
    assert all(o["weight_decay"] == tc.weight_decay and o["betas"] == (0.0, 0.999) for o in opts)
    assert clips == [tc.grad_clip] * (tc.dmd_steps * (tc.critic_ratio + 1))
    # the checkpoint's config says what was run (block-major: clean context), and it resumes
    ck = sample.load_checkpoint(smoke_run.ckpt("s"))
    assert ck["config"]["context_t"] == "clean" and ck["context_t"] == "clean"
    assert train_toy.train_dmd(smoke_run, "s", teacher, random_model(cfg, 2), pairs, "block", 0.0,
                               "clean") >= 0                                  # nothing to redo


def test_ode_regression_puts_each_block_at_one_level_and_regresses_on_the_endpoint(cfg):
    """The ODE-init objective (and DMD's regression anchor): every block of a trajectory sits at
    one of the student's σ_j or clean, read from the ODE pairs at that level; the block-causal
    student's x0 is regressed onto the trajectory's endpoint."""
    M, K = 6, cfg.K
    pairs = {"states": torch.randn(M, K, cfg.frames, 3, cfg.size, cfg.size),
             "x0": torch.randn(M, cfg.frames, 3, cfg.size, cfg.size),
             "sigmas": torch.tensor(hiar.student_sigmas(K, cfg.shift)[:-1]),
             "label": torch.arange(M) % cfg.labels}
    levels, sig = train_toy.ode_levels(pairs)
    assert levels.shape[1] == K + 1 and sig.tolist()[-1] == 0 and torch.equal(levels[:, K],
                                                                              pairs["x0"])
    seen = []

    class Spy(torch.nn.Module):
        def x0(self, x, sigma, label=None, causal=False):
            seen.append((x, sigma, label, causal))
            return torch.zeros_like(x)
    loss = train_toy.ode_regression(Spy(), levels, sig, pairs, 5, cfg, torch.Generator()
                                    .manual_seed(0), "cpu")
    x, sigma, label, causal = seen[0]
    assert causal and sigma.shape == (5, cfg.frames)
    targets = []
    for b in range(5):
        i = next(i for i in range(M) if torch.equal(label[b], pairs["label"][i]) and any(
            torch.equal(x[b, :cfg.block], levels[i, j, :cfg.block]) for j in range(K + 1)))
        targets.append(pairs["x0"][i])
        for n in range(cfg.frames // cfg.block):
            f = slice(n * cfg.block, (n + 1) * cfg.block)
            assert len(set(sigma[b, f].tolist())) == 1                  # one level a block
            j = sig.tolist().index(sigma[b, f][0].item())
            assert torch.equal(x[b, f], levels[i, j, f])               # read at that level
    assert loss.item() == pytest.approx(torch.stack(targets).pow(2).mean().item(), rel=1e-6)


def test_ode_regression_on_teacher_forced_pairs_sees_the_data_past(cfg):
    """With Causal Forcing's pairs (they carry the data they were solved on), each clip's block
    n sits at one student level σ_j < clean, the blocks before it are the data at σ = 0, and
    only block n's x0 is regressed onto the ODE's endpoint."""
    M, K, b = 6, cfg.K, cfg.block
    pairs = {"states": torch.randn(M, K, cfg.frames, 3, cfg.size, cfg.size),
             "x0": torch.randn(M, cfg.frames, 3, cfg.size, cfg.size),
             "data": torch.randn(M, cfg.frames, 3, cfg.size, cfg.size),
             "sigmas": torch.tensor(hiar.student_sigmas(K, cfg.shift)[:-1]),
             "label": torch.arange(M)}
    levels, sig = train_toy.ode_levels(pairs)
    seen = []

    class Spy(torch.nn.Module):
        def x0(self, x, sigma, label=None, causal=False):
            seen.append((x, sigma, label, causal))
            return x * 0 + 1                                     # predicts 1 everywhere
    loss = train_toy.ode_regression(Spy(), levels, sig, pairs, 8, cfg,
                                    torch.Generator().manual_seed(0), "cpu")
    x, sigma, label, causal = seen[0]
    errs = []
    for i in range(8):
        c, n = int(label[i]), int((sigma[i] > 0).nonzero()[0]) // b        # clip and block n
        f = slice(n * b, (n + 1) * b)
        assert causal and (sigma[i, :n * b] == 0).all() and sigma[i, f].unique().numel() == 1
        assert torch.equal(x[i, :n * b], pairs["data"][c, :n * b])
        j = sig.tolist().index(sigma[i, f][0].item())
        assert j < K and torch.equal(x[i, f], pairs["states"][c, j, f])
        errs.append((1 - pairs["x0"][c, f]).pow(2).mean())
    assert loss.item() == pytest.approx(torch.stack(errs).mean().item(), rel=1e-6)
    # init_context=mixed: each past block at one level of the student's (or clean), the data
    # noised to it; block n as before
    seen.clear()
    train_toy.ode_regression(Spy(), levels, sig, pairs, 32, cfg, torch.Generator().manual_seed(1),
                             "cpu", noisy_past=True)
    x, sigma, label, _ = seen[0]
    noisy = 0
    for i in range(32):
        c, kinds = int(label[i]), []
        for m in range(cfg.frames // b):
            f = slice(m * b, (m + 1) * b)
            lv = sigma[i, f].unique()
            assert lv.numel() == 1 and lv.item() in sig.tolist()        # one level a block
            j = sig.tolist().index(lv.item())
            if j == K:
                assert torch.equal(x[i, f], pairs["data"][c, f])        # clean: the data itself
                kinds.append("past")
            elif torch.equal(x[i, f], pairs["states"][c, j, f]):
                kinds.append("n")                                      # block n (and after it)
            else:
                assert not torch.allclose(x[i, f], pairs["data"][c, f])  # the data, noised
                kinds.append("past")
                noisy += 1
        n = kinds.index("n")                                # a past, then block n onwards
        assert set(kinds[:n]) <= {"past"} and set(kinds[n:]) == {"n"}
    assert noisy > 0


def test_causal_init_stages_and_old_runs_still_match(tmp_path):
    """init_teacher=causal adds the AR teacher and its ODE pairs before the ODE init (which
    starts from the AR teacher) and ships the AR teacher with it; TrainConfig fields added
    later read as their defaults in older run directories and checkpoints."""
    with pytest.raises(ValueError, match="init_teacher"):
        train_toy.TrainConfig(init_teacher="ar")
    r = run_cli("train_toy.py", "--preset", "smoke", "--run-dir", str(tmp_path), "--students",
                "hiar", "--set", "init_teacher=causal", "--ship", str(tmp_path / "ship"))
    assert r.returncode == 0, r.stderr
    for stage in ("ar_teacher", "ar_ode_pairs", "ode_init", "ode_pairs"):
        assert torch.load(tmp_path / f"{stage}.pt", weights_only=True)["done"], stage
    pairs = torch.load(tmp_path / "ar_ode_pairs.pt", weights_only=True)
    assert pairs["data"].shape == pairs["x0"].shape and "data" not in torch.load(
        tmp_path / "ode_pairs.pt", weights_only=True)
    assert sorted(p.name for p in (tmp_path / "ship").iterdir()) == [
        "ar_teacher.pt", "hiar_s0.pt", "ode_init.pt"]
    ar = torch.load(tmp_path / "ship" / "ar_teacher.pt", weights_only=True)
    assert all(v.dtype == torch.float32 for v in ar["model"].values())
    cfg_file = tmp_path / "config.json"                     # as written before the field existed
    old = json.loads(cfg_file.read_text())
    del old["train"]["ar_lr"]                               # the smoke preset keeps its default
    cfg_file.write_text(json.dumps(old))
    r = run_cli("train_toy.py", "--preset", "smoke", "--run-dir", str(tmp_path), "--students",
                "hiar", "--set", "init_teacher=causal")
    assert r.returncode == 0 and "nothing to do" in r.stdout, r.stderr
    del old["train"]["init_teacher"]                        # now it reads as bidirectional
    cfg_file.write_text(json.dumps(old))
    r = run_cli("train_toy.py", "--preset", "smoke", "--run-dir", str(tmp_path), "--students",
                "hiar", "--set", "init_teacher=causal")
    assert r.returncode == 2 and "init_teacher: 'bidirectional' vs 'causal'" in r.stderr


def test_regression_anchor_adds_its_weight_times_the_ode_loss(cfg, smoke_run, monkeypatch):
    """TrainConfig.reg_weight: each generator update adds reg_weight · ode_regression(student)
    (on the student being trained); 0, the default, leaves the recipe as it was (not called)."""
    pairs = {"states": torch.randn(4, cfg.K, cfg.frames, 3, cfg.size, cfg.size),
             "x0": torch.randn(4, cfg.frames, 3, cfg.size, cfg.size),
             "sigmas": torch.tensor(hiar.student_sigmas(cfg.K, cfg.shift)[:-1]),
             "label": torch.tensor([0, 1, 0, 1])}
    assert train_toy.TrainConfig().reg_weight == 0.0
    calls, real = [], train_toy.ode_regression

    def spy(student, *a):
        calls.append(student)
        return real(student, *a)
    monkeypatch.setattr(train_toy, "ode_regression", spy)
    train_toy.train_dmd(smoke_run, "plain", random_model(cfg, 1), random_model(cfg, 2), pairs,
                        "block", 0.0, "clean")
    assert calls == []
    tc = train_toy.TrainConfig(**{**train_toy.TRAIN_PRESETS["smoke"], "reg_weight": 2.0})
    run = train_toy.Run(smoke_run.path / "reg", cfg, tc, torch.device("cpu"), 0)
    losses = []
    real_backward = torch.Tensor.backward

    def spy_backward(t, *a, **k):
        losses.append(t.item())
        return real_backward(t, *a, **k)
    monkeypatch.setattr(torch.Tensor, "backward", spy_backward)
    train_toy.train_dmd(run, "s", random_model(cfg, 1), random_model(cfg, 2), pairs, "block",
                        0.0, "clean")
    assert len(calls) == tc.dmd_steps and all(c is calls[0] for c in calls)
    logs = [json.loads(line) for line in (run.path / "metrics.jsonl").read_text().splitlines()]
    logs = [r for r in logs if r.get("stage") == "s" and "step" in r]
    assert logs and all("reg" in r for r in logs)
    gen_losses = losses[tc.critic_ratio::tc.critic_ratio + 1]        # after each critic's turn
    for r in logs:                                                   # total = DMD + 2 · reg
        assert gen_losses[r["step"]] == pytest.approx(r["dmd"] + 2.0 * r["reg"], rel=1e-5)


def test_default_dmd_recipe_is_the_official_one_scaled_to_the_toy():
    """The official recipe: critic : generator updates 5 : 1, critic lr 0.15 × the generator's
    (3e-7 : 2e-6), AdamW weight decay 0.01, gradient clip 10, CFG 3 on the real score, DMD levels
    shifted by 5. The toy's own choices (docs/lab/distillation.md): 100 generator steps, EMA 0.95
    from the first step, at both orders alike (no student overrides them)."""
    tc = train_toy.TrainConfig()
    assert (tc.critic_ratio, tc.weight_decay, tc.grad_clip, tc.guidance) == (5, 0.01, 10.0, 3.0)
    assert tc.critic_lr / tc.gen_lr == pytest.approx(3e-7 / 2e-6)
    assert (tc.dmd_shift, tc.dmd_steps, tc.ema, tc.ema_start) == (5.0, 100, 0.95, 1)
    args = train_toy.parse_args(["--students", "hiar,self_forcing,hiar_no_fkl"])
    students = train_toy.resolve_students(args, hiar.Config.preset("toy"), tc)
    assert [s[1:] for s in students] == [("step", 0.1, "next"), ("block", 0.0, "clean"),
                                        ("step", 0.0, "next")]


@pytest.mark.slow
def test_smoke_preset_runs_every_stage(tmp_path):
    t = time.time()
    args = ("train_toy.py", "--preset", "smoke", "--run-dir", str(tmp_path),
            "--students", "hiar,self_forcing,hiar_no_fkl")
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr
    took = time.time() - t
    for stage in ("teacher", "ode_pairs", "ode_init", "hiar", "self_forcing", "hiar_no_fkl"):
        assert torch.load(tmp_path / f"{stage}.pt", weights_only=True)["done"], stage
    for gif in ("teacher", "ode_init", "hiar", "self_forcing", "hiar_no_fkl"):
        assert (tmp_path / f"{gif}.gif").stat().st_size > 1000
    log = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert {"dmd", "critic", "fkl"} <= set(next(r for r in log if r["stage"] == "hiar"))
    assert "fkl" not in next(r for r in log if r["stage"] == "self_forcing")
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["config"]["dim"] == 32 and saved["train"]["dmd_steps"] == 4
    print(f"smoke run: {took:.0f} s")
    r = run_cli(*args)                         # a rerun of a finished run does nothing, says so
    assert r.returncode == 0 and "done:" not in r.stdout and "nothing to do" in r.stdout
    # another training seed from the same ODE init: shared files, its own teacher, seed-named ship
    other, ship = tmp_path / "s1", tmp_path / "ship"
    r = run_cli("train_toy.py", "--preset", "smoke", "--run-dir", str(other), "--seed", "1",
                "--init-from", str(tmp_path), "--students", "self_forcing", "--ship", str(ship))
    assert r.returncode == 0, r.stderr
    assert "[self_forcing] done" in r.stdout and "[teacher]" not in r.stdout
    assert "ode_pairs" not in r.stdout and "ode_init" not in r.stdout
    assert (other / "ode_init.pt").samefile(tmp_path / "ode_init.pt")
    assert sorted(p.name for p in ship.iterdir()) == ["self_forcing_s1.pt"]
    r = run_cli("train_toy.py", "--preset", "smoke", "--run-dir", str(tmp_path / "s2"),
                "--init-from", str(tmp_path), "--set", "ode_steps=7")
    assert r.returncode == 2 and r.stderr.strip() == (
        f"error: --init-from {tmp_path}: its ode_pairs.pt differs (ode_steps: 6 vs 7)")


@pytest.mark.slow
def test_gpu_script_runs_every_lever_and_packs_the_results(tmp_path):
    """scripts/gpu_runs.sh, tiny and on the CPU: every run finishes inside its budget and the
    small checkpoints come back packed (what a lent GPU's one call returns)."""
    import tarfile
    env = {**os.environ, "PRESET": "smoke", "DEVICE": "cpu", "OUT": str(tmp_path), "BUDGET": "300"}
    work = tmp_path / "repo"                        # the code alone; runs/gpu is made there
    (work / "scripts").mkdir(parents=True)
    for f in ("hiar.py", "sample.py", "train_toy.py", "scripts/gpu_runs.sh",
              "scripts/bench.py"):
        (work / f).write_bytes((HERE / f).read_bytes())
    r = subprocess.run(["bash", "scripts/gpu_runs.sh"], cwd=work, env=env, capture_output=True,
                       text=True, timeout=400)
    assert r.returncode == 0, r.stderr
    names = {t: sorted(tarfile.open(tmp_path / f"{t}.tar").getnames())
             for t in ("causal_s0", "causal_s12", "r48", "logs")}
    assert "ship_c0/ar_teacher.pt" in names["causal_s0"] and "ship_c0/ode_init.pt" in names[
        "causal_s0"]
    for s in range(3):
        tar = names["causal_s0" if s == 0 else "causal_s12"]
        assert {f"ship_c_s{s}/{o}_s{s}.pt" for o in ("hiar", "hiar_no_fkl", "self_forcing")} \
            <= set(tar)
    assert {f"ship_r48_sink{k}/{o}_s0.pt" for k in ("true", "false")
            for o in ("hiar", "self_forcing")} <= set(names["r48"])
    assert "bench_onedevice.log" in names["logs"]          # the one-device samplers' speed


@pytest.mark.slow
def test_killed_run_resumes_when_rerun(tmp_path):
    cmd = [sys.executable, "train_toy.py", "--preset", "smoke", "--run-dir", str(tmp_path),
           "--set", "teacher_steps=400", "--students", "hiar"]
    proc = subprocess.Popen(cmd, cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    ck = tmp_path / "teacher.pt"
    deadline = time.time() + 120
    while time.time() < deadline:                                   # wait for a mid-stage save
        if ck.exists():
            try:
                c = torch.load(ck, weights_only=True)
                if 20 <= c["step"] < 200 and not c["done"]:   # well before the end
                    break
            except Exception:
                pass
        time.sleep(0.2)
    proc.kill()                                                      # SIGKILL: no cleanup
    proc.wait()
    killed_at = torch.load(ck, weights_only=True)["step"]
    assert 0 < killed_at < 400
    r = subprocess.run(cmd, cwd=HERE, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "resuming from step" in r.stdout
    assert torch.load(ck, weights_only=True)["done"]
    assert torch.load(tmp_path / "hiar.pt", weights_only=True)["done"]


# ------------------------------------------------------------------------------------------------
# sample.py command line
# ------------------------------------------------------------------------------------------------

def test_sample_cli_streams_gif_npy_and_table(tmp_path):
    ck = smoke_ckpt(tmp_path)
    r = run_cli("sample.py", "--ckpt", str(ck), "--frames", "10", "--num", "3",
                "--gif", str(tmp_path / "a.gif"), "--npy", str(tmp_path / "a.npy"))
    assert r.returncode == 0, r.stderr
    arrs = {s: np.load(tmp_path / f"a_{s}.npy") for s in ("block", "step")}
    for arr in arrs.values():                                       # one file per sampler
        assert arr.shape == (3, 10, 8, 8, 3) and arr.dtype == np.uint8
    import imageio.v3 as iio
    gif = iio.imread(tmp_path / "a.gif", index=None)
    assert gif.shape[0] == 10                                        # every frame, in order
    assert "| data |" in r.stdout and "block-major" in r.stdout and "step-major" in r.stdout
    # the same videos come from the library with the CLI's seeds and labels
    model, _ = sample.load_student(str(ck), "cpu")
    with torch.no_grad():
        v = hiar.sample_block_major(model, hiar.Noise(model.cfg, [0, 1, 2]), 10,
                                    torch.tensor([0, 1, 0]))
    assert np.array_equal(sample.to_uint8(v), arrs["block"])


def test_sample_cli_sink_gives_the_librarys_sink_videos(tmp_path):
    ck = smoke_ckpt(tmp_path)
    r = run_cli("sample.py", "--ckpt", str(ck), "--frames", "20", "--num", "2", "--sink",
                "--gif", "", "--no-metrics", "--npy", str(tmp_path / "s.npy"))
    assert r.returncode == 0, r.stderr
    model, _ = sample.load_student(str(ck), "cpu")
    for name, f in (("block", hiar.sample_block_major), ("step", hiar.sample_step_major)):
        with torch.no_grad():
            v = f(model, hiar.Noise(model.cfg, [0, 1]), 20, torch.tensor([0, 1]), sink=True)
            plain = f(model, hiar.Noise(model.cfg, [0, 1]), 20, torch.tensor([0, 1]))
        arr = np.load(tmp_path / f"s_{name}.npy")
        assert np.array_equal(sample.to_uint8(v), arr)
        assert not np.array_equal(sample.to_uint8(plain), arr)


def test_sample_cli_defaults_to_the_checkpoints_own_order_and_context(tmp_path):
    ck = smoke_ckpt(tmp_path, order="block", context_t="clean")
    r = run_cli("sample.py", "--ckpt", str(ck), "--frames", "11", "--gif", "",
                "--npy", str(tmp_path / "o.npy"))               # 11: not a multiple of block 2
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "o.npy").exists() and not (tmp_path / "o_step.npy").exists()
    assert np.load(tmp_path / "o.npy").shape == (4, 11, 8, 8, 3)
    model, _ = sample.load_student(str(ck), "cpu")
    with torch.no_grad():                                      # the first 11 of 12 frames
        v = hiar.sample_block_major(model, hiar.Noise(model.cfg, range(4)), 12,
                                    torch.arange(4) % 2)
    assert np.array_equal(sample.to_uint8(v[:, :11]), np.load(tmp_path / "o.npy"))


def test_sample_cli_mp4_is_written_or_refused_in_one_line(tmp_path):
    ck = smoke_ckpt(tmp_path)
    r = run_cli("sample.py", "--ckpt", str(ck), "--frames", "10", "--gif", "", "--no-metrics",
                "--mp4", str(tmp_path / "v.mp4"))
    try:
        import imageio_ffmpeg  # noqa: F401
    except ImportError:                      # the optional extra is missing: say how to get it
        assert r.returncode == 2 and "pip install imageio-ffmpeg" in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
        return
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "v.mp4").stat().st_size > 1000


def test_evidence_spread_is_over_training_seeds():
    """scripts/evidence.py reports mean ± std over training seeds (each the mean of its sampling
    seeds) for rows with several checkpoints, and over sampling seeds otherwise."""
    sys.path.insert(0, str(HERE / "scripts"))
    import evidence
    t, over = evidence.by_training_seed([1, 2, 3, 4, 5, 6], ["s0", "s1", "s2"])
    assert over == "training seeds" and t.tolist() == [1.5, 3.5, 5.5]
    t, over = evidence.by_training_seed([1.0, 2.0, 3.0], ["s0"])
    assert over == "sampling seeds" and t.tolist() == [1.0, 2.0, 3.0]
    assert evidence.fmt_row([1, 2, 3, 4, 5, 6], ["s0", "s1", "s2"], 2) == "3.50 ± 2.00"


def test_evidence_ground_change_sees_a_tint_change_at_a_constant_level(monkeypatch):
    """scripts/evidence.py: a ground that turns from red to green at the same mean level is
    invisible to the `background` level measure and seen by the ground change from the first
    block (RGB distance); a blob that appears in the last window is counted there, and one
    that does not move is frozen."""
    sys.path.insert(0, str(HERE / "scripts"))
    import evidence
    video = torch.full((2, 40, 3, 8, 8), -1.0)
    video[:, :, 0] = -0.6                                   # red tint 0.2 (in [0, 1] units)
    video[:, 20:, 0], video[:, 20:, 1] = -1.0, -0.6         # → green tint 0.2, same mean level
    video[:, 36:, :, 2:5, 2:5], video[:, 36:, :, 3, 3] = 0.4, 1.0   # one blob, last 4 frames
    monkeypatch.setattr(evidence, "rollout_stream",
                        lambda *a: iter(video[:, t:t + 1] for t in range(40)))
    cfg = SimpleNamespace(block=1, shapes=2, frames=4)
    res, _ = evidence.run_row({}, ["x"], evidence.Row("x", ["x"], "step", "next"), [0], 2, 40,
                              [20, 40], cfg)
    first, whole = evidence.combine(res[20]), evidence.combine(res[40])
    assert first["ground_change"] == [pytest.approx(0.0, abs=1e-6)]
    assert whole["ground_change"] == [pytest.approx(0.2 * 2 ** 0.5, rel=1e-4)]
    assert whole["background"]["level"] == [pytest.approx(0.2 / 3, rel=1e-4)]
    assert whole["background"]["drift"] == [pytest.approx(0.0, abs=1e-6)]
    assert first["blobs"] == [0.0] and whole["blobs"] == [1.0]     # last window: 4 frames
    assert whole["frozen"] == [1.0]                                  # it does not move


def test_context_probe_continues_like_block_major_and_measures_the_jump(model, cfg):
    """scripts/lab/context_probe.py: the next block after a clean context is block-major's own
    last block (same noise, same cells), and the jump is the background's move from the last
    context block: 0 for a copy, 0.1 for a ground 0.1 redder (in [0, 1] units)."""
    sys.path[:0] = [str(HERE / "scripts"), str(HERE / "scripts" / "lab")]
    import context_probe
    noise, label = hiar.Noise(cfg, [3, 4]), torch.tensor([0, 1])
    with torch.no_grad():
        video = hiar.sample_block_major(model, noise, cfg.frames, label)
    b = cfg.block
    assert torch.equal(context_probe.next_block(model, video[:, :-b], label, noise),
                       video[:, -b:])
    block = torch.full((2, b, 3, 16, 16), -0.8)
    block[:, :, :, 4:7, 4:7] = 0.3
    block[:, :, :, 5, 5] = 0.9                                         # one bright blob
    same = context_probe.jump_and_blobs(block, block.clone(), cfg.shapes)
    assert same["jump"] == 0 and same["blobs"] == 1
    redder = block.clone()
    redder[:, :, 0] += 0.2                                              # +0.1 in [0, 1] units
    assert context_probe.jump_and_blobs(block, redder, cfg.shapes)["jump"] == pytest.approx(0.1)
    # a free rollout whose ground steps +0.1 red each block: a steady slide, ratio N − 1 = 3
    slide = torch.cat([block + torch.tensor([0.2 * n, 0, 0])[:, None, None] for n in range(4)], 1)
    r = context_probe.per_block(slide, b, cfg.shapes)
    assert r["step"] == pytest.approx(0.1) and r["change"] == pytest.approx(0.3)
    assert r["blobs"] == [1.0] * 4
    for argv, words in ((["--num", "0"], "--num 0"), (["--threads", "0"], "--threads 0"),
                        (["--ckpt", "nope.pt"], "no such file")):    # checked before any work
        with pytest.raises(sample.CLIError, match=words):
            context_probe.main(argv)


def test_ar_rollout_is_the_ar_teachers_own_block_by_block_ode(cfg):
    """context_probe.ar_rollout: block n is the teacher-forced oracle's Euler ODE of block n after
    the blocks the AR teacher made itself (not after the noise, not after data)."""
    sys.path[:0] = [str(HERE / "scripts"), str(HERE / "scripts" / "lab")]
    import context_probe
    ar, b, steps, shift = random_model(cfg, 3), cfg.block, 4, 8.0
    eps, lab = torch.randn(2, cfg.frames, 3, cfg.size, cfg.size), torch.tensor([1, 0])
    video = context_probe.ar_rollout(ar, eps, lab, steps, shift, 3.0)
    grid = [float(hiar.shift_sigma(1 - i / steps, shift)) for i in range(steps + 1)]
    own = torch.zeros_like(eps)
    for n in range(cfg.frames // b):
        x = eps[:, n * b:(n + 1) * b]
        for a, z in zip(grid[:-1], grid[1:]):
            with torch.no_grad():
                x = x + (z - a) * (x - causal_reference(ar, own, x, a, n, lab, 3.0)) / a
        own[:, n * b:(n + 1) * b] = x
    assert torch.allclose(video, own, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(video[:, b:], hiar.teacher_ode(ar, eps, [], steps, shift, lab, 3.0,
                                                             context=eps)[1][:, b:], atol=1e-3)


def test_long_levers_measures_what_evidence_measures(cfg, tmp_path):
    """scripts/lab/long_levers.py: a row's 8× and 40× ground change and blobs are evidence.py's
    numbers for the same checkpoint, order, sink, context level and noise; without a level a
    student is sampled at the one it was trained with; bad rows are one-line errors."""
    sys.path[:0] = [str(HERE / "scripts"), str(HERE / "scripts" / "lab")]
    import evidence
    import long_levers
    model, path = random_model(cfg, 5), tmp_path / "m.pt"
    torch.save({"config": cfg.to_dict(), "model": model.state_dict(), "stage": "x"}, path)
    tj = tmp_path / "tj.pt"                                  # the same weights, trained at t_j
    torch.save({"config": cfg.to_dict(), "model": model.state_dict(), "stage": "x",
                "order": "step", "context_t": "current"}, tj)
    long_levers.main([f"{path}:step:sink", f"{path}:step:current", f"{tj}:step", "--num", "2",
                      "--threads", "1", "--out", str(tmp_path / "o.json")])
    out = json.loads((tmp_path / "o.json").read_text())
    lengths = [8 * cfg.frames, 40 * cfg.frames]
    for key, level, sink in [(f"{path}, step-major, sink", "next", True),
                             (f"{path}, step-major, context current", "current", False)]:
        row = evidence.Row("r", [str(path)], "step", level, sink=sink)
        res, _ = evidence.run_row({str(path): model}, [str(path)], row, [0], 2, lengths[-1],
                                  lengths, cfg)
        for L in lengths:
            assert out[key][str(L)]["ground_change"] == evidence.combine(res[L])["ground_change"][0]
            assert out[key][str(L)]["blobs"] == evidence.combine(res[L])["blobs"][0]
    as_trained = out[f"{tj}, step-major, context current"]     # no LEVEL given: t_j
    assert as_trained == out[f"{path}, step-major, context current"]
    assert long_levers.parse(f"{path}:block") == (str(path), "block", False, None)
    assert long_levers.parse(f"{path}:step:sink:clean") == (str(path), "step", True, "clean")
    for bad in (f"{path}:sideways", f"{path}:step:sank", "nope.pt:step", f"{path}:block:current",
                f"{path}:step:sink:sink", f"{path}:step:current:sink"):
        with pytest.raises(sample.CLIError):
            long_levers.main([bad])
    shortest = -(-evidence.CURVE_POINTS * cfg.block // cfg.frames)   # the curve's 20 blocks
    for lengths in (["1", "8"], [str(shortest - 1)]):
        with pytest.raises(sample.CLIError, match="--lengths"):
            long_levers.main([f"{path}:step", "--lengths", *lengths])


def _grounds_video(first, last, frames=12, size=16, blob=True):
    """Clips (B, frames, 3, size, size) whose ground is `first` (B, 3) in the first half and
    `last` in the second (in [0, 1] units), with one small bright blob moving across."""
    B = first.shape[0]
    g = torch.cat([first[:, None].expand(B, frames // 2, 3), last[:, None].expand(B, frames // 2, 3)],
                  1)                                                   # (B, T, 3)
    video = g[..., None, None].expand(B, frames, 3, size, size).clone()
    if blob:
        for t in range(frames):                     # a white peak on a grey 3×3 patch
            x = 2 + t % 10
            video[:, t, :, 5:8, x:x + 3] = 0.7
            video[:, t, :, 6, x + 1] = 1.0
    return video * 2 - 1


def test_quality_measure_known_answers():
    """scripts/quality.py: a constant ground has no background change; a
    ground that moves by d changes by |d|; clips forced to one ground per label have spread 0;
    grounds outside the data's range are counted out; a collapsed student misses 'spread'."""
    sys.path.insert(0, str(HERE / "scripts"))
    import quality
    cfg = hiar.Config.preset("toy")
    label = torch.arange(8) % 4
    grounds = torch.rand(8, 3, generator=torch.Generator().manual_seed(0)) * 0.3
    m = quality.measure(_grounds_video(grounds, grounds), label, cfg)
    assert m["bg_change"] == pytest.approx(0.0, abs=1e-6) and m["in_range"] == 1.0
    assert m["blobs"] == pytest.approx(1.0) and m["value"] == pytest.approx(1.0)
    d = torch.tensor([0.03, -0.04, 0.0])                              # |d| = 0.05
    moved = quality.measure(_grounds_video(grounds, grounds + d), label, cfg)
    assert moved["bg_change"] == pytest.approx(0.05, abs=1e-5)
    # the spread: RMS distance of a label's last grounds from their mean
    a, b = torch.tensor([0.1, 0.1, 0.1]), torch.tensor([0.1, 0.2, 0.1])
    two = torch.stack([a, a, a, a, b, b, b, b])                        # labels 0-3, then again
    m = quality.measure(_grounds_video(two, two), label, cfg)
    assert m["spread_min"] == pytest.approx(0.05, abs=1e-5)           # each label: a and b
    one = a.expand(8, 3)                                               # one ground for all
    collapsed = quality.measure(_grounds_video(grounds, one + 0.3), label, cfg)
    assert collapsed["spread_min"] == pytest.approx(0.0, abs=1e-6)
    assert collapsed["in_range"] == 0.0                                # 0.4 > 0.3 + TOL
    data = {**quality.measure(_grounds_video(grounds, grounds), label, cfg), "spread_min": 0.1}
    assert quality.verdict(data, data, data) == ["blobs"]           # one blob a frame < 1.55
    data["blobs"] = moved["blobs"] = 1.7
    assert quality.verdict(data, data, data) == []
    assert quality.verdict(data, collapsed, data) == ["spread", "in_range"]
    assert quality.verdict(moved, data, data) == ["bg_change"]
    # motion: the blob steps 1 px a frame but once jumps back 9 px (19 px in 11 steps); a blob
    # that stays put is frozen
    assert m["speed"] == pytest.approx(19 / 11, abs=1e-4) and m["frozen"] == 0.0
    still = _grounds_video(grounds, grounds, blob=False)
    still[:, :, :, 5:8, 4:7], still[:, :, :, 6, 5] = 0.4, 1.0
    frozen = quality.measure(still, label, cfg)
    assert frozen["speed"] == 0.0 and frozen["frozen"] == 1.0 and frozen["blobs"] == 1.0
    assert quality.mean_of([m, frozen])["frozen"] == 0.5
    # students of several training seeds: one summary row, mean ± std over the seeds
    row = lambda v, miss: {"1x": dict.fromkeys(quality.COLUMNS, v),             # noqa: E731
                           "long": dict.fromkeys(quality.COLUMNS, v), "miss": miss}
    groups = quality.by_training_seed({"hiar_s0, step-major": row(1.0, []),
                                       "runs/x/hiar_s1.pt, step-major": row(2.0, ["blobs"]),
                                       "ode_init, step-major": {"1x": {}, "long": {}}})
    assert list(groups) == ["hiar, step-major"] and groups["hiar, step-major"]["seeds"] == [0, 1]
    assert groups["hiar, step-major"]["1x"]["blobs"] == pytest.approx((1.5, 2 ** -0.5))
    assert groups["hiar, step-major"]["miss"] == ["blobs"]


def test_quality_samples_a_student_at_its_context_level(cfg, model):
    """scripts/quality.py: the step-major videos are hiar.step_major's at the level asked for
    (the measure passes a student's trained context_t, as sample.py does), not always t_{j+1}."""
    sys.path.insert(0, str(HERE / "scripts"))
    import quality
    frames, label = 2 * cfg.frames, torch.arange(2) % cfg.labels
    videos = {}
    for level in ("next", "current"):
        videos[level] = quality.student_video(model, "step", cfg, 2, frames, 1, level)
        noise = hiar.Noise(cfg, [1_000_003 + i for i in range(2)])
        want = torch.cat(list(hiar.step_major(model, noise, frames, label, level)), 1)
        assert torch.equal(videos[level], want)
    assert not torch.allclose(videos["next"], videos["current"], atol=1e-3)


def _pins(path):
    """{name: version} of a requirements / constraints file; every line must be NAME==VERSION."""
    pins = {}
    for line in (HERE / path).read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep and version, f"{path}: {line!r} is not pinned to an exact version"
            pins[name.strip().lower().replace("_", "-")] = version.strip()
    return pins


def test_ci_installs_exactly_the_pins():
    """.ci/run installs the CPU torch pin, then the requirements under constraints.txt; every
    requirement is pinned exactly and agrees with constraints.txt. (What is installed is checked
    only where .ci/run installed it: the next test.)"""
    ci = (HERE / ".ci" / "run").read_text()
    reqs = {**_pins("requirements.txt"), **_pins("requirements-notebooks.txt")}
    cons = _pins("constraints.txt")
    assert f"pip install -q torch=={reqs['torch']}" in ci
    assert ("pip install -q -r requirements.txt -r requirements-notebooks.txt -c constraints.txt"
            in ci)
    readme = (HERE / "README.md").read_text()
    assert "-r requirements.txt -r requirements-notebooks.txt -c constraints.txt" in readme
    assert all(cons.get(k) == v for k, v in reqs.items()), [k for k in reqs if cons.get(k) != v]
    assert "\nexport CI=true" in ci.split("pytest")[0]     # so the next test runs there


@pytest.mark.skipif(os.environ.get("CI", "").lower() != "true",
                    reason="installed versions are compared only in CI (CI=true), where .ci/run "
                           "installed them; a user's own torch stack is not a failure")
def test_ci_runs_on_exactly_the_pinned_versions():
    """In CI, on the machine .ci/run installed, every package is at its pinned version."""
    from importlib.metadata import PackageNotFoundError, version
    cons = _pins("constraints.txt")
    wrong = []
    for name, pinned in cons.items():
        try:
            have = version(name).split("+")[0]
        except PackageNotFoundError:
            have = None
        if have != pinned:
            wrong.append(f"{name}: pinned {pinned}, installed {have}")
    assert not wrong, wrong


def test_training_prints_progress_lines_without_a_terminal(tmp_path, capsys, monkeypatch):
    """`python train_toy.py > log` (no terminal, tqdm silent) still shows the run moving: a line
    when a stage starts and one at every 5 % of it."""
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    cfg = hiar.Config.preset("smoke")
    run = train_toy.Run(tmp_path, cfg, train_toy.TrainConfig(**train_toy.TRAIN_PRESETS["smoke"]),
                        torch.device("cpu"), 0)
    train_toy.train_loop(run, "toy", 40, {}, lambda step: {"loss": 1.0 / (step + 1)})
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("[toy] ")]
    assert lines[0] == "[toy] 0/40" and len(lines) == 1 + 20 + 1      # start, 20 × 5 %, done
    assert lines[1].startswith("[toy] 2/40 (5 %") and "loss 0.5" in lines[1]
    assert lines[-2].startswith("[toy] 40/40 (100 %")


def test_reports_carry_no_machine_paths():
    """docs/ is read on other machines: no absolute path of this one in it; toy_report prints
    the teacher's path relative to the repository."""
    sys.path[:0] = [str(HERE / "scripts"), str(HERE / "scripts" / "lab")]
    import toy_report
    assert toy_report.shown(HERE / "checkpoints" / "teacher.pt") == "checkpoints/teacher.pt"
    for p in [*(HERE / "docs").rglob("*.md"), *(HERE / "docs").rglob("*.json")]:
        assert str(HERE) not in p.read_text() and "/work/" not in p.read_text(), p.name


def test_readme_claims_quote_docs_claims_which_come_from_the_evidence():
    """The README's claims quote docs/claims.md or docs/long_videos.md — every 'mean ± std' in
    them is there — and
    docs/claims.md and docs/long_videos.md are what scripts/evidence.py makes of
    docs/evidence.json and docs/quality.json."""
    import re
    sys.path.insert(0, str(HERE / "scripts"))
    import evidence
    table = (HERE / "README.md").read_text().split("## What the toy shows", 1)[1]
    table = table.split("\n## ", 1)[0]
    claims = (HERE / "docs" / "claims.md").read_text()
    long = (HERE / "docs" / "long_videos.md").read_text()
    quoted = re.findall(r"\d+\.\d+ ± \d+\.\d+", table)
    assert len(quoted) >= 6 and not [q for q in quoted if q not in claims + long], quoted
    ev = evidence.load_evidence(HERE / "docs" / "evidence.json")
    quality = json.loads((HERE / "docs" / "quality.json").read_text())
    assert evidence.claims(ev, quality) == claims
    assert evidence.long_videos(ev) == long


def test_docs_link_only_to_files_the_repo_has_and_speak_without_the_tracker():
    """Every relative link of README.md and docs/*.md resolves; no text names the project's
    tracker (its issue numbers, items, rounds), which a reader of the repo cannot see."""
    import re
    pages = [HERE / "README.md", *sorted((HERE / "docs").rglob("*.md"))]      # docs/lab too
    for page in pages:
        for target in re.findall(r"\]\(([^)#\s]+)", page.read_text()):
            if "://" not in target:
                assert (page.parent / target).exists(), f"{page.name} links to {target}"
    tracker = re.compile(r"\bissue \d|\bitem \d|this (round|session)\b|\b(toy|metrics) v\d\b",
                         re.IGNORECASE)
    files = subprocess.run(["git", "ls-files", "*.md", "*.py", "*.ipynb", ".ci/run"], cwd=HERE,
                           capture_output=True, text=True).stdout.split()
    hits = [f for f in files if (HERE / f).exists() and tracker.search((HERE / f).read_text())]
    assert not hits, hits


def test_ci_runs_exactly_the_readme_test_command():
    readme = (HERE / "README.md").read_text()
    ci = (HERE / ".ci" / "run").read_text()
    cmd = 'python3 -m pytest -q -m "slow or not slow"'
    assert cmd in readme and cmd in ci


# ------------------------------------------------------------------------------------------------
# Shipped checkpoints: truthful configs
# ------------------------------------------------------------------------------------------------

SHIPPED = sorted((HERE / "checkpoints").rglob("*.pt"))      # checkpoints/causal/ too


@pytest.mark.parametrize("path", SHIPPED, ids=[str(p.relative_to(HERE / "checkpoints"))
                                              for p in SHIPPED])
def test_shipped_checkpoint_config_matches_its_note(path):
    """A checkpoint's stored configs must be the ones that made it: every --set in its note's
    command is in its config, its stage and order agree, and it loads into this code."""
    ck = torch.load(path, map_location="cpu", weights_only=True)
    note = ck["note"]
    model = sample.model_from_checkpoint(ck, path, "ema")
    assert isinstance(model, hiar.VideoDiT)
    merged = {**ck["config"], **ck.get("train", {})}
    if "--set" in note:
        for item in note.split("--set", 1)[1].split(" --")[0].split():
            if "=" in item:
                k, v = item.split("=", 1)
                have = list(merged[k]) if isinstance(merged.get(k), tuple) else merged.get(k)
                try:
                    v = json.loads(v)                      # 0 == 0.0; words stay strings
                except json.JSONDecodeError:
                    pass
                assert k in merged and have == v, item
    if ck["stage"] != "teacher":
        assert f"seed {ck['seed']}" in note
    for flag, key in (("--order", "order"), ("--context-t", "context_t")):
        if flag in note:
            assert note.split(flag, 1)[1].split()[0] == ck[key]
    if "context_t" in ck:                    # a student's config holds the level it was run at
        assert ck["config"]["context_t"] == ck["context_t"]


# ------------------------------------------------------------------------------------------------
# Notebooks: executed top to bottom (a failing cell fails the test)
# ------------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(p.stem for p in (HERE / "notebooks").glob("*.ipynb")))
def test_notebook_runs_top_to_bottom(name):
    import nbclient                     # the notebook extra (requirements-notebooks.txt)
    import nbformat
    nb = nbformat.read(HERE / "notebooks" / f"{name}.ipynb", as_version=4)
    t = time.time()
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(HERE / "notebooks")}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if o.get("output_type") == "error"]
    assert not errors
    print(f"{name}.ipynb: {time.time() - t:.0f} s")


def test_cfg_direction_averages_over_background_pixels_per_label():
    """scripts/lab/cfg_direction.py: a difference that is +1 red on background pixels and +5 on
    bright (blob) pixels reads +1 red for each label: blob pixels are left out."""
    sys.path[:0] = [str(HERE / "scripts"), str(HERE / "scripts" / "lab")]
    import cfg_direction
    x0 = -torch.ones(4, 2, 3, 4, 4)                                  # dark ground everywhere
    x0[:, :, :, 0, 0] = 1.0                                          # one bright blob pixel
    d = torch.zeros_like(x0)
    d[:, :, 0] = 1.0
    d[:, :, 0, 0, 0] = 5.0
    out = cfg_direction.background_mean(d, x0, torch.tensor([0, 1, 0, 1]), 2)
    assert out == [[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]]


# ---- The training step, by behaviour: what a learner trusts the DMD step to do --------------------

def _dmd_setup(smoke_run, cfg, name, **over):
    """A smoke DMD run with random teacher / ODE init and random ODE pairs; → (run, teacher,
    init, pairs), the run in its own folder with TrainConfig overrides `over`."""
    tc = train_toy.TrainConfig(**{**train_toy.TRAIN_PRESETS["smoke"], **over})
    run = train_toy.Run(smoke_run.path / name, cfg, tc, torch.device("cpu"), 0)
    M = 4
    pairs = {"states": torch.randn(M, cfg.K, cfg.frames, 3, cfg.size, cfg.size),
             "x0": torch.randn(M, cfg.frames, 3, cfg.size, cfg.size),
             "sigmas": torch.tensor(hiar.student_sigmas(cfg.K, cfg.shift)[:-1]),
             "label": torch.arange(M) % cfg.labels}
    return run, random_model(cfg, 1), random_model(cfg, 2), pairs


def _max_diff(a: dict, b: dict) -> float:
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def test_dmd_step_moves_the_ema_and_trains_the_critic(smoke_run, cfg):
    """After a DMD run the EMA has moved off the ODE init and lags the generator (it averages:
    nearer the generator than the init is), and the critic has left the teacher it started
    from (its optimiser steps)."""
    run, teacher, init, pairs = _dmd_setup(smoke_run, cfg, "ema", ema_start=2, ema=0.5)
    teacher_sd = copy.deepcopy(teacher.state_dict())
    train_toy.train_dmd(run, "s", teacher, init, pairs, "step", 0.0, "next")
    ck = sample.load_checkpoint(run.ckpt("s"))
    gen, ema, start = ck["model"], ck["ema"], init.state_dict()
    assert _max_diff(ema, start) > 1e-6                       # the EMA moved
    assert _max_diff(ema, gen) > 1e-9                         # … and averages, it is no copy
    dist = lambda a, b: sum((a[k] - b[k]).pow(2).sum() for k in a).item()   # noqa: E731
    assert dist(ema, gen) < dist(start, gen)
    assert _max_diff(ck["critic"], teacher_sd) > 1e-6         # the critic learned
    assert _max_diff(teacher.state_dict(), teacher_sd) == 0   # the teacher stays frozen


def test_dmd_step_draws_the_exit_step_and_rolls_out_with_it(smoke_run, cfg, monkeypatch):
    """The generator's exit step j* is drawn per update, shared by all blocks: over a run it
    takes several values in [0, K), the rollout with gradient uses the logged one, and the
    log (the training notebook's curve) records it every step."""
    run, teacher, init, pairs = _dmd_setup(smoke_run, cfg, "exit", dmd_steps=8, critic_ratio=1)
    used, real = [], train_toy.rollout

    def spy(student, run_, order, context_t, g, label, exit_step):
        if torch.is_grad_enabled():                           # the generator's rollout
            used.append(exit_step)
        return real(student, run_, order, context_t, g, label, exit_step)
    monkeypatch.setattr(train_toy, "rollout", spy)
    train_toy.train_dmd(run, "s", teacher, init, pairs, "block", 0.0, "clean")
    logs = [json.loads(line) for line in (run.path / "metrics.jsonl").read_text().splitlines()]
    logged = [r["exit_step"] for r in logs if r.get("stage") == "s" and "step" in r]
    assert logged == used and len(used) == 8
    assert set(used) == set(range(cfg.K))                     # every step is an exit step


def test_forward_kl_term_lowers_the_forward_kl_loss(smoke_run, cfg, monkeypatch):
    """λ·L_FKL is added, not subtracted: with the DMD gradient switched off, a few generator
    updates lower the FKL loss on the ODE pairs (the first step's regression, Eq. 10-11)."""
    run, teacher, init, pairs = _dmd_setup(smoke_run, cfg, "fkl", dmd_steps=5, critic_ratio=1,
                                           gen_lr=3e-3)
    monkeypatch.setattr(hiar, "dmd_loss", lambda x0, *a, **k: 0.0 * x0.sum())
    sig0, sig1 = float(pairs["sigmas"][0]), float(pairs["sigmas"][1])
    target = hiar.chord_x0(pairs["states"][:, 0], pairs["states"][:, 1], sig0, sig1)

    def fkl(model):
        with torch.no_grad():
            return hiar.fkl_loss(model, pairs["states"][:, 0], target, sig0,
                                 pairs["label"]).item()
    before = fkl(init)
    train_toy.train_dmd(run, "s", teacher, init, pairs, "step", 1.0, "next")
    after = fkl(sample.model_from_checkpoint(sample.load_checkpoint(run.ckpt("s")), "s"))
    assert after < 0.95 * before


def test_orders_figure_is_drawn_from_the_samplers_own_passes():
    """scripts/figure_orders.py records each sampler's denoising passes: block-major runs block
    by block with clean context (t_c = 0); step-major runs step by step, each block seeing its
    predecessors at the step's output level σ_{j+1} (Eq. 9; clean at the last step)."""
    sys.path.insert(0, str(HERE / "scripts"))
    import figure_orders
    cfg = hiar.Config.preset("smoke", K=3, frames=8, window=8)
    N, σ = 4, hiar.student_sigmas(3, cfg.shift)
    block = figure_orders.record_cells(hiar.sample_block_major, cfg, N * cfg.block)
    step = figure_orders.record_cells(hiar.sample_step_major, cfg, N * cfg.block)
    assert [(c["n"], c["j"]) for c in block] == [(n, j) for n in range(N) for j in range(3)]
    assert [(c["n"], c["j"]) for c in step] == [(n, j) for j in range(3) for n in range(N)]
    assert all(c["context"] == {m: 0.0 for m in range(c["n"])} for c in block)
    for c in step:
        level = σ[c["j"] + 1] if c["j"] + 1 < 3 else 0.0
        assert c["context"] == pytest.approx({m: level for m in range(c["n"])})


# ================================================================================================
# Nothing lost, nothing thrown: safe outputs, every CLI error before work starts.
# One table per CLI: command → exit status, the one line on stderr, the files before and after.
# ================================================================================================

sys.path[:0] = [str(HERE / "scripts"), str(HERE / "scripts" / "lab")]
BIG_SEED = str(2 ** 64)


def row_id(row: str) -> str:
    """A table row's test id: `row4` for the issue's row 4, else what it checks."""
    return f"row{row}" if row[:1].isdigit() else row or "flag"


def snapshot(folder: Path) -> dict:
    """Every file (its bytes) and folder (None) under `folder`."""
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None
            for p in sorted(folder.rglob("*"))}


def call_main(main, argv, capsys) -> tuple[int, list[str], str]:
    """A CLI's main(argv) in-process, as `python <script>` runs it (through sample.run_cli):
    → (exit status, stderr lines, stdout). The scripts' --threads is undone afterwards."""
    threads = torch.get_num_threads()
    try:
        sample.run_cli(lambda: main(argv))
        code = 0
    except SystemExit as e:
        code = e.code
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr()
    return code, out.err.strip().splitlines(), out.out


@pytest.fixture
def forwards(monkeypatch):
    """Counts the forward passes of every VideoDiT (a CLI that refuses runs none)."""
    calls = []
    real = hiar.VideoDiT.forward

    def counted(self, *a, **kw):
        calls.append(1)
        return real(self, *a, **kw)
    monkeypatch.setattr(hiar.VideoDiT, "forward", counted)
    return calls


def check_row(folder, before, code, lines, want_code, want_line, forwards):
    """The table's columns: the exit status, one line on stderr (None: none), and for a refusal
    no file touched and no forward pass run."""
    assert code == want_code, lines
    if want_line is None:
        assert lines == [] or want_code == 0, lines
    else:
        assert len(lines) == 1 and re.fullmatch(want_line + ".*", lines[0]), lines
    if want_code:
        assert snapshot(folder) == before, "a refused or stopped command changed files"
    if want_code == 2:
        assert not forwards, "work started before the refusal"


def smoke_files(folder: Path, **stages):
    """Smoke-config checkpoints: C.pt (a student: ode_init) and {name: stage} more."""
    folder.mkdir(parents=True, exist_ok=True)
    smoke_ckpt(folder).rename(folder / "C.pt")
    for name, stage in stages.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        smoke_ckpt(folder).rename(folder / name)
        ck = torch.load(folder / name, weights_only=True)
        torch.save({**ck, "stage": stage}, folder / name)


SAMPLE_ROWS = [   # (row, command, exit status, stderr line (regex prefix), condition)
    ("1", "--sampler step --frames 7 -n 1 --gif X --npy X", 2,
     "error: --npy X: is also --gif X; give each output its own file", None),
    ("2", "--sampler step --frames 3000 -n 2 --gif '' --npy v.npy", 1,
     "error: No space left on device while writing v.npy; no output was written and no file "
     "changed", "a full disk"),
    ("3", f"-n 1 --seed {BIG_SEED} --frames 6 --sampler step --gif old.gif --npy v.npy", 2,
     rf"error: --seed {BIG_SEED}: must be an integer in \[0, 2\*\*63 - 1\]", None),
    ("4", "--frames 3000 -n 1 --sampler step --gif keep.gif --npy keep.npy", 130,
     "interrupted at frame 4 of 3000; no output was written and no file changed", "Ctrl-C"),
    ("5", "--npy C.pt --sampler step", 2, "error: --npy C.pt: would overwrite the input", None),
    ("6", "--sampler pipelined --frames 6 -n 1 --gif '' --npy five.npy", 2,
     r"error: torchrun --nproc_per_node=5: must be in \[1, K=2\]", "torchrun, rank 0 of 5"),
    ("6", "--sampler pipelined --frames 6 -n 1 --gif '' --npy five.npy", 2, None,
     "torchrun, rank 3 of 5"),
    ("8", "--sampler pipelined --streams 1 --frames 3000 -n 1 --gif keep.gif", 130,
     "interrupted at frame 4 of 3000", "Ctrl-C"),
    ("--npy DIR", "--frames 6 --npy D", 2, "error: --npy D: is a directory; give a file", None),
    ("--frames 15", "--frames 15 -n 1 --gif ''", 0, None, None),
    ("writes", "--sampler step --frames 7 -n 1 --gif X --npy v.npy", 0, None, None),
    ("", "--ckpt missing.pt", 2, "error: --ckpt missing.pt: no such file", None),
    ("", "--ckpt no_such_name", 2, "error: --ckpt no_such_name: not a file", None),
    ("", "--ckpt junk.pt", 2, "error: checkpoint junk.pt could not be read", None),
    ("", "--ckpt T.pt", 2, "error: --ckpt T.pt: is the teacher", None),
    ("", "--sampler sideways", 2, "error: --sampler 'sideways': choose one of", None),
    ("", "--frames 0", 2, "error: --frames 0: must be an integer >= 1", None),
    ("", "--frames -6", 2, "error: --frames -6: must be", None),
    ("", "--frames abc", 2, "error: argument --frames: invalid int value", None),
    ("", "--context-t t_j", 2, "error: --context-t 't_j': choose one of", None),
    ("", "--num 0", 2, "error: --num 0: must be", None),
    ("", "--seed -1", 2, r"error: --seed -1: must be an integer in \[0, 2\*\*63 - 1\]", None),
    ("", "--device cuda:7", 2, "error: --device cuda:7", None),
    ("", "--device toaster", 2, "error: --device 'toaster' is not a device", None),
    ("", "--sampler pipelined --streams 5", 2, r"error: --streams 5: must be in \[1, K=2\]", None),
    ("", "--label 9", 2, "error: --label 9: must be 0..1 or 'none'", None),
    ("", "--label red", 2, "error: --label red: must be", None),
    ("", "--bias nan", 2, "error: --bias nan: must be a finite number", None),
    ("", "--bias 3", 2, "error: --bias 3.0: must be a finite number >= -1 and <= 1", None),
    ("", "--npy junk.pt/x.npy", 2, r"error: --npy junk.pt/x.npy \(x_block.npy\): cannot write",
     None),
    ("", "--sampler step --npy /proc/x.npy", 2, "error: --npy /proc/x.npy: cannot write there",
     None),
    ("", "--gif D", 2, "error: --gif D: is a directory; give a file name", None),
]


@pytest.mark.parametrize("row,command,want_code,want_line,condition", SAMPLE_ROWS,
                         ids=[f"{row_id(r[0])}: {r[1]}" for r in SAMPLE_ROWS])
def test_sample_cli_table(tmp_path, monkeypatch, capsys, forwards, row, command, want_code,
                          want_line, condition):
    """sample.py, rows 1-6 and 8, the silent answers (--npy DIR, --frames 15) and every
    flag check. Emulated: the full disk (posix_fallocate raises ENOSPC, as a 1 MB tmpfs
    does), Ctrl-C (a KeyboardInterrupt after the second block), torchrun's 5 processes (its
    environment; the check comes before the processes meet)."""
    import shlex
    smoke_files(tmp_path, **{"T.pt": "teacher"})
    for name, data in (("X", b"old X"), ("old.gif", b"old gif"), ("keep.gif", b"old keep gif"),
                       ("keep.npy", b"old keep npy"), ("junk.pt", b"not a checkpoint")):
        (tmp_path / name).write_bytes(data)
    (tmp_path / "D").mkdir()
    monkeypatch.chdir(tmp_path)
    at_interrupt = []
    if condition == "a full disk":
        def full(fd, offset, length):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        monkeypatch.setattr(os, "posix_fallocate", full, raising=False)
    if condition == "Ctrl-C":
        real = sample.to_uint8

        def to_uint8(x):
            if len(at_interrupt) == 0 and sample.to_uint8.calls == 4:  # 2 blocks of 2 rows
                at_interrupt.append(len(forwards))
                raise KeyboardInterrupt
            sample.to_uint8.calls += 1
            return real(x)
        to_uint8.calls = 0
        monkeypatch.setattr(sample, "to_uint8", to_uint8)
    if condition and condition.startswith("torchrun"):
        monkeypatch.setenv("WORLD_SIZE", "5")
        monkeypatch.setenv("RANK", condition.split()[2])
    argv = shlex.split(command)
    argv = argv if "--ckpt" in argv else ["--ckpt", "C.pt", *argv]
    before = snapshot(tmp_path)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*degrees of freedom")   # std of one video
        code, lines, out = call_main(sample.main, argv, capsys)
    check_row(tmp_path, before, code, lines, want_code, want_line, forwards)
    if row == "8":          # the pipeline's stage stops within the block it is on
        assert len(forwards) - at_interrupt[0] <= 2 * hiar.Config.preset("smoke").K
    if row == "--frames 15":     # the drift score needs two data videos: said, not NaN
        assert "– (needs -n >= 2)" in out and "nan" not in out
    if row == "writes":
        assert (tmp_path / "X").read_bytes()[:6] == b"GIF89a"
        assert np.load(tmp_path / "v.npy").shape == (1, 7, 8, 8, 3)
        assert not list(tmp_path.glob("*.tmp"))


TRAIN_ROWS = [    # (row, command, exit status, stderr line (regex prefix), condition)
    ("7", "--init-from R --order step --name teacher --ship D", 2,
     "error: --name teacher: is the name of a stage; choose another", None),
    ("7", "--name ode_init", 2, "error: --name ode_init: is the name of a stage", None),
    ("7", "--name ../escaped", 2, "error: --name ../escaped: must be a plain name", None),
    ("9", "--set frames=2", 2,
     "error: --set: Config.frames=2 is invalid: must hold two blocks or more", None),
    ("9", "--set frames=4 block=4", 2, "error: --set: Config.frames=4 is invalid", None),
    ("9", "--set rollout_frames=3", 2,
     "error: --set: TrainConfig.rollout_frames=3 is invalid: must be 0 .* multiple of block=2",
     None),
    ("9", f"--seed {BIG_SEED}", 2, f"error: --seed {BIG_SEED}: must be an integer in", None),
    ("9", "--ship F", 2, "error: --ship F: is a file; give a directory", None),
    ("9", "--ship /proc/x", 2, "error: --ship /proc/x: cannot write there", None),
    ("9", "--ship r", 2, "error: --ship r: is the run directory", None),
    ("9", "--set shift=Infinity", 2, "error: --set: Config.shift=inf is invalid: must be a "
     "finite number > 0", None),
    ("9", "--set speed=[0.4,Infinity]", 2, r"error: --set: Config.speed=\[0.4, inf\] is invalid",
     None),
    ("9", "--set guidance=Infinity", 2, "error: --set: TrainConfig.guidance=inf is invalid",
     None),
    ("--teacher", "--teacher C.pt", 2,
     "error: --teacher C.pt: is a checkpoint of stage ode_init; give one of stage teacher", None),
    ("--teacher", "--teacher T.pt", 2,
     "error: r/ode_pairs.pt came from another teacher than T.pt", "pairs of another teacher"),
    ("--name", "--students hiar", 2, "error: r/hiar.pt holds another student .order: 'block' vs "
     "'step'", "a block-major hiar.pt"),
    ("", "--set frames=7", 2, "error: --set: Config.frames=7 is invalid", None),
    ("", "--set nope=1", 2, "error: --set nope: unknown field", None),
    ("", "--set shift=abc", 2, "error: --set shift=abc: must be a float", None),
    ("", "--set batch=2.5", 2, "error: --set batch=2.5: must be a int", None),
    ("", "--set amp=1", 2, "error: --set amp=1: must be a bool", None),
    ("", "--set dmd_steps", 2, "error: --set 'dmd_steps': expected FIELD=VALUE", None),
    ("", "--students mystery", 2, "error: --students: unknown student 'mystery'", None),
    ("", "--teacher none.pt", 2, "error: --teacher none.pt: no such file", None),
    ("", "--preset huge", 2, "error: --preset 'huge': choose one of", None),
    ("", "--fkl-weight -1", 2, "error: --fkl-weight -1.0: must be a finite number >= 0", None),
    ("", "--device cuda:3", 2, "error: --device cuda:3", None),
    ("", "--init-from none", 2, "error: --init-from none: no ode_pairs.pt there", None),
    ("", "--order block --context-t next", 2, "error: --context-t next: the block-major", None),
    ("", "--run-dir /proc/x", 2, "error: --run-dir /proc/x: cannot write there", None),
]


@pytest.mark.parametrize("row,command,want_code,want_line,condition", TRAIN_ROWS,
                         ids=[f"{row_id(r[0])}: {r[1]}" for r in TRAIN_ROWS])
def test_train_cli_table(tmp_path, monkeypatch, capsys, forwards, row, command, want_code,
                         want_line, condition):
    """train_toy.py (--preset smoke --run-dir r), rows 7 and 9, --teacher (a student; a
    teacher other than the one the run's ODE pairs came from), a stage name taken by another
    student, and every flag check: refused before a file is written or a stage trained.
    Emulated: a read-only --ship (root writes anywhere here; /proc/x cannot be made)."""
    import shlex
    smoke_files(tmp_path, **{"T.pt": "teacher"})
    (tmp_path / "F").write_bytes(b"a file")
    (tmp_path / "R").mkdir()
    monkeypatch.chdir(tmp_path)
    if condition:                          # a run directory that holds something already
        cfg, tc = hiar.Config.preset("smoke"), train_toy.TrainConfig(**train_toy.TRAIN_PRESETS[
            "smoke"])
        run = train_toy.Run(Path("r"), cfg, tc, torch.device("cpu"), 0)
        if condition == "pairs of another teacher":
            train_toy.save_atomic({**run.stamp("ode_pairs", {"teacher": "0" * 16}),
                                   "done": True}, run.ckpt("ode_pairs"))
        else:
            train_toy.save_atomic({**run.stamp("hiar", {"order": "block", "fkl_weight": 0.1,
                                                        "context_t": "next"}), "done": True},
                                  run.ckpt("hiar"))
    for name in ("train_loop", "make_ode_pairs", "stage_gif"):       # no stage may start
        monkeypatch.setattr(train_toy, name, lambda *a, **k: pytest.fail("work started"))
    argv = shlex.split(command)
    argv = ["--preset", "smoke", *([] if "--run-dir" in argv else ["--run-dir", "r"]), *argv]
    before = snapshot(tmp_path)
    code, lines, _ = call_main(train_toy.main, argv, capsys)
    check_row(tmp_path, before, code, lines, want_code, want_line, forwards)


QUALITY_ROWS = [  # (silent answer, command, exit status, stderr line (regex prefix))
    ("--long 1", "--long 1 --ckpt hiar_s0:step --guidance 3", 0, None),
    ("a run-dir checkpoint", "--ckpt r/hiar.pt:step", 2,
     "error: --ckpt r/hiar.pt was made with a different config"),
    ("a 2**64 seed", f"--seeds {BIG_SEED}", 2, f"error: --seeds {BIG_SEED}: must be an integer"),
    ("--out q.json", "--ckpt hiar_s0:step --out q.json", 2,
     "error: --out's numbers q.json: is also --out q.json"),
    ("--guidance inf", "--guidance inf", 2, "error: --guidance inf: must be a finite number > 0"),
    ("", "--ckpt none.pt:block", 2, "error: --ckpt none.pt: no such file"),
    ("", "--ckpt ode_init", 2, "error: --ckpt ode_init: expected PATH:ORDER"),
    ("", "--ckpt ode_init:sideways", 2, "error: --ckpt ode_init:sideways: expected PATH:ORDER"),
    ("", "--ckpt", 2, "error: --ckpt: give at least one PATH:ORDER"),
    ("", "--num 0", 2, "error: --num 0: must be an integer >= 1"),
    ("", "--long 0", 2, "error: --long 0: must be an integer >= 1"),
    ("", "--guidance 0", 2, "error: --guidance 0.0: must be a finite number > 0"),
    ("", "--out D", 2, "error: --out D: is a directory"),
    ("", "--out /proc/x/q.md", 2, "error: --out /proc/x/q.md: cannot write there"),
    ("", "--seeds -1", 2, "error: --seeds -1: must be an integer in"),
    ("", "--out hiar.pt --ckpt hiar.pt:step", 2, "error: --out hiar.pt: would overwrite the input"),
]


@pytest.mark.parametrize("row,command,want_code,want_line", QUALITY_ROWS,
                         ids=[f"{r[0] or 'flag'}: {r[1]}" for r in QUALITY_ROWS])
def test_quality_cli_table(tmp_path, monkeypatch, capsys, forwards, row, command, want_code,
                           want_line):
    """scripts/quality.py (--num 2 --threads 1): `--long 1` measures (its long columns are the
    1× clip's), a smoke run's checkpoint is refused (not the shipped teacher's network), a
    2**64 seed, a table and its numbers on one path, an infinite guidance."""
    import shlex
    import quality
    smoke_files(tmp_path, **{"r/hiar.pt": "hiar"})
    (tmp_path / "D").mkdir()
    (tmp_path / "hiar.pt").write_bytes((HERE / "checkpoints" / "hiar_s0.pt").read_bytes())
    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path)
    code, lines, out = call_main(quality.main, ["--num", "2", "--threads", "1",
                                                *shlex.split(command)], capsys)
    check_row(tmp_path, before, code, lines, want_code, want_line, forwards)
    if row == "--long 1":
        assert re.search(r"\| hiar_s0, step-major \| (\d\.\d{3} \| ){8}", out)


PROBE_ROWS = [    # (silent answer, command, exit status, stderr line (regex prefix))
    ("a run-dir checkpoint", "--ckpt r/hiar.pt", 2,
     "error: --ckpt r/hiar.pt was made with a different config"),
    ("--ar-teacher: a run dir's teacher", "--ckpt hiar_s0 --ar-teacher r/teacher.pt", 2,
     "error: --ar-teacher r/teacher.pt: is a checkpoint of stage teacher; give one of stage "
     "ar_teacher"),
    ("--ar-teacher: a smoke one", "--ckpt hiar_s0 --ar-teacher r/ar_teacher.pt", 2,
     "error: --ar-teacher r/ar_teacher.pt was made with a different config"),
    ("", "--num 0", 2, "error: --num 0: must be an integer >= 1"),
    ("", "--ckpt nothing_here", 2, "error: --ckpt nothing_here: not a file"),
    ("trained at t_j", "--ckpt tj.pt", 0, None),
]


@pytest.mark.parametrize("row,command,want_code,want_line", PROBE_ROWS,
                         ids=[f"{r[0] or 'flag'}: {r[1]}" for r in PROBE_ROWS])
def test_context_probe_cli_table(tmp_path, monkeypatch, capsys, forwards, row, command,
                                 want_code, want_line):
    """scripts/lab/context_probe.py (--num 1 --threads 1): a smoke run's checkpoints refused in
    one line; a student trained at t_j rolls out at t_j (as quality.py and sample.py)."""
    import shlex
    import context_probe
    smoke_files(tmp_path, **{"r/hiar.pt": "hiar", "r/teacher.pt": "teacher",
                             "r/ar_teacher.pt": "ar_teacher"})
    ck = torch.load(HERE / "checkpoints" / "hiar_s0.pt", weights_only=True)
    torch.save({**ck, "context_t": "current", "config": {**ck["config"], "context_t": "current"}},
               tmp_path / "tj.pt")
    levels = []
    real = context_probe.student_video
    monkeypatch.setattr(context_probe, "student_video", lambda *a, context_t="next": (
        levels.append(context_t), real(*a, context_t=context_t))[1])
    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path)
    code, lines, _ = call_main(context_probe.main, ["--num", "1", "--threads", "1",
                                                    *shlex.split(command)], capsys)
    check_row(tmp_path, before, code, lines, want_code, want_line, forwards)
    if want_code == 0:
        assert levels == ["current"]


SCRIPT_ROWS = [   # (script, command, stderr line (regex prefix)): each refused, exit status 2
    ("long_levers", "C.pt:step --out C.pt", "error: --out C.pt: would overwrite the input"),
    ("long_levers", "C.pt:step --num 0", "error: --num 0: must be an integer >= 1"),
    ("long_levers", "C.pt:sideways", "error: C.pt:sideways: expected PATH:ORDER"),
    ("evidence", f"--seeds {BIG_SEED}", f"error: --seeds {BIG_SEED}: must be an integer in"),
    ("evidence", "--rows 99", "error: --rows 99: indices into ROWS"),
    ("evidence", "--out F", "error: --out F: is a file; give a directory"),
    ("evidence", "--short 1 --out out", "error: --short 1: too short for 5 segments"),
    ("evidence", "--table-only --out out", "error: --table-only: no out/evidence.json"),
    ("toy_report", "--teacher C.pt", "error: --teacher C.pt: is a checkpoint of stage ode_init"),
    ("toy_report", "--num 1", "error: --num 1: must be an integer >= 2"),
    ("cfg_direction", "--guidance nan", "error: --guidance nan: must be a finite number > 0"),
    ("cfg_direction", "--sigmas 2", "error: --sigmas 2.0: must be a finite number >= 0 and <= 1"),
    ("levers", "", "error: give quality.json files"),
    ("levers", "none.json", "error: none.json: no such file"),
    ("bench", "--batch 0", "error: --batch 0: must be an integer >= 1"),
    ("bench", "--preset huge", "error: --preset huge: choose one of"),
    ("figure_orders", "--blocks 1", r"error: --blocks 1: must be an integer in \[2, 12\]"),
    ("figure_orders", "--out F/x.png", "error: --out F/x.png: cannot write there"),
]


@pytest.mark.parametrize("script,command,want_line", SCRIPT_ROWS,
                         ids=[f"{r[0]}: {r[1]}" for r in SCRIPT_ROWS])
def test_scripts_cli_table(tmp_path, monkeypatch, capsys, forwards, script, command, want_line):
    """The other scripts: the shared checks (sample.check_*) refuse in one line, exit 2, before
    any work or write."""
    import importlib
    import shlex
    module = importlib.import_module(script)
    smoke_files(tmp_path)
    (tmp_path / "F").write_bytes(b"a file")
    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path)
    argv = shlex.split(command)
    main = (lambda _: module.main(argv)) if script == "levers" else module.main
    code, lines, _ = call_main(main, argv, capsys)
    check_row(tmp_path, before, code, lines, 2, want_line, forwards)


def test_an_interrupted_stream_leaves_the_old_files(tmp_path):
    """Row 4 of the table for real: SIGINT (Ctrl-C) to `python sample.py` while it streams a long
    video: one line, exit 130, the old GIF and npy byte for byte, no temporary file left."""
    ck = smoke_ckpt(tmp_path)
    (tmp_path / "keep.gif").write_bytes(b"old gif")
    (tmp_path / "keep.npy").write_bytes(b"old npy")
    before = snapshot(tmp_path)
    p = subprocess.Popen([sys.executable, "sample.py", "--ckpt", str(ck), "--frames", "300000",
                          "-n", "1", "--sampler", "step", "--gif", str(tmp_path / "keep.gif"),
                          "--npy", str(tmp_path / "keep.npy")], cwd=HERE, text=True,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    tmp, deadline = tmp_path / "keep.gif.tmp", time.time() + 120
    while not (tmp.exists() and tmp.stat().st_size > 2000) and time.time() < deadline:
        time.sleep(0.05)                               # streaming: frames are in the GIF
    assert tmp.exists(), "the stream did not start"
    p.send_signal(signal.SIGINT)
    err = p.communicate(timeout=60)[1].strip().splitlines()
    assert p.returncode == 130 and len(err) == 1, err
    assert re.fullmatch(r"interrupted at frame \d+ of 300000; no output was written and no file "
                        r"changed", err[0]), err
    assert snapshot(tmp_path) == before


@pytest.mark.slow
def test_a_run_killed_mid_gif_is_repaired_by_the_rerun(tmp_path, capsys):
    """Row 10: SIGKILL (no cleanup) while a smoke run writes its teacher GIF, after the
    teacher's checkpoint is done. The GIF is written beside its name, so the kill leaves no
    teacher.gif that looks whole; the rerun sees the stage done and the GIF missing, and makes
    it: every frame, no temporary file left."""
    args = ["--preset", "smoke", "--run-dir", str(tmp_path), "--teacher-only"]
    killer = ("import os, signal, sample, train_toy\n"
              "real = sample.GifWriter.append\n"
              "def append(self, frame):\n"
              "    real(self, frame)\n"
              "    if self.f.tell() > 1000:\n"
              "        self.f.flush()\n"
              "        os.kill(os.getpid(), signal.SIGKILL)\n"
              "sample.GifWriter.append = append\n"
              f"train_toy.main({args!r})\n")
    r = subprocess.run([sys.executable, "-c", killer], cwd=HERE, capture_output=True,
                       timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert torch.load(tmp_path / "teacher.pt", weights_only=True)["done"]
    assert not (tmp_path / "teacher.gif").exists()
    assert (tmp_path / "teacher.gif.tmp").stat().st_size > 1000           # killed mid-GIF
    code, lines, _ = call_main(train_toy.main, args, capsys)
    assert code == 0, lines
    import imageio.v3 as iio
    frames = iio.imread(tmp_path / "teacher.gif", index=None)
    assert frames.shape[0] == hiar.Config.preset("smoke").frames               # whole
    assert not list(tmp_path.glob("*.tmp"))


def test_a_failed_write_leaves_the_old_file(tmp_path, monkeypatch):
    """sample.atomic, which every writer uses: a GIF whose write fails half-way leaves the old
    file as it was and no temporary file; a whole one replaces it."""
    path = tmp_path / "a.gif"
    path.write_bytes(b"old")
    real = sample.GifWriter.append

    def failing(self, frame):
        real(self, frame)
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(sample.GifWriter, "append", failing)
    with pytest.raises(OSError):
        sample.save_gif(path, np.zeros((3, 4, 4, 3), np.uint8))
    assert snapshot(tmp_path) == {"a.gif": b"old"}
    monkeypatch.setattr(sample.GifWriter, "append", real)
    sample.save_gif(path, np.zeros((3, 4, 4, 3), np.uint8))
    assert path.read_bytes()[:6] == b"GIF89a" and sorted(snapshot(tmp_path)) == ["a.gif"]


def test_closing_a_pipeline_stops_its_stages_within_a_block(cfg, model, monkeypatch):
    """Row 8: after close() (or Ctrl-C in the caller) a stage finishes at most the block
    it is on — not every block left (here 299)."""
    calls, real = [], model.forward
    monkeypatch.setattr(model, "forward", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    gen = hiar.pipelined(model, noise(cfg), 300 * cfg.block, streams=1)
    next(gen)
    at_close = len(calls)
    gen.close()
    assert len(calls) - at_close <= 2 * cfg.K                # a block: K denoise + K writes


def test_ctrl_c_in_a_pipelined_sample_stops_its_stages(tmp_path, monkeypatch, forwards):
    """Ctrl-C in `sample.py --sampler pipelined` closes the pipeline as the interrupt passes
    (not when the interrupt's traceback is freed, which a notebook keeps): its stage finishes
    the block it is on and is gone when main() has raised."""
    ck = smoke_ckpt(tmp_path)
    calls = []
    real = sample.to_uint8

    def to_uint8(x):
        calls.append(len(forwards))
        if len(calls) == 5:                                  # the third block's first row
            raise KeyboardInterrupt
        return real(x)
    monkeypatch.setattr(sample, "to_uint8", to_uint8)
    with pytest.raises(KeyboardInterrupt) as held:           # its traceback held, as a notebook
        sample.main(["--ckpt", str(ck), "--sampler", "pipelined", "--streams", "1", "--frames",
                     "3000", "-n", "1", "--gif", "", "--no-metrics"])
    assert not [t for t in threading.enumerate() if "stage" in t.name and t.is_alive()]
    assert len(forwards) - calls[-1] <= 2 * hiar.Config.preset("smoke").K
    del held


def test_named_students_are_honoured_beside_a_custom_one(cfg):
    """--students names the named students; --order / --fkl-weight / --context-t / --name add
    one custom student to them (alone when --students is not given)."""
    tc = train_toy.TrainConfig(**train_toy.TRAIN_PRESETS["smoke"])

    def names(**kw):
        args = SimpleNamespace(**{"students": None, "order": None, "fkl_weight": None,
                                  "context_t": None, "name": None, **kw})
        return [s[0] for s in train_toy.resolve_students(args, cfg, tc)]
    assert names() == ["hiar", "self_forcing"]
    assert names(students="self_forcing", fkl_weight=0.0) == ["self_forcing",
                                                              "student_step_fkl0_next"]
    assert names(fkl_weight=0.0) == ["student_step_fkl0_next"]
    assert names(students="", name="mine") == ["mine"]


def test_a_nan_before_the_first_checkpoint_names_none(smoke_run):
    with pytest.raises(sample.CLIError, match=r"loss=nan at step 0; stopped, no checkpoint of "
                                              r"it was saved"):
        train_toy.train_loop(smoke_run, "toy", 3, {"model": torch.nn.Linear(2, 2)},
                             lambda step: {"loss": float("nan")}, every=2)


@pytest.mark.parametrize("frames", [15, 17, 19, 30])
def test_jump_on_the_data_is_seamless_at_any_length(frames):
    """The data has no seams: its jump is 1 and level at any length, also where a segment holds
    no block boundary (15-19 frames: segment 0's only boundary is frame 0, which has no
    predecessor; it counted as a jump of 0)."""
    cfg = hiar.Config()
    label = torch.arange(32) % cfg.labels
    video = torch.cat(list(sample.data_stream(cfg, 32, 0, 30, label)), 1)[:, :frames]
    level, drift = sample.drift_metrics(video, cfg.block, cfg.shapes)["jump"]
    assert abs(level.mean() - 1) < 0.03 and abs(drift.mean()) < 0.03


def test_a_finished_run_makes_only_its_missing_gifs(tmp_path, capsys, monkeypatch):
    """A rerun of a finished run whose ODE-init and hiar GIFs were lost (a kill between a
    stage's checkpoint and its GIF) makes those two, touches the others and trains nothing."""
    cfg = hiar.Config.preset("smoke")
    tc = train_toy.TrainConfig(**train_toy.TRAIN_PRESETS["smoke"])
    run = train_toy.Run(tmp_path, cfg, tc, torch.device("cpu"), 0)
    weights = random_model(cfg).state_dict()
    for stage, extra in (("teacher", {}), ("ode_pairs", {}), ("ode_init", {}),
                         ("hiar", dict(order="step", fkl_weight=0.1, context_t="next")),
                         ("self_forcing", dict(order="block", fkl_weight=0.0,
                                               context_t="clean"))):
        train_toy.save_atomic({**run.stamp(stage, extra), "model": weights, "done": True},
                              run.ckpt(stage))
    for name in ("teacher", "self_forcing"):
        (tmp_path / f"{name}.gif").write_bytes(b"kept")
    for name in ("train_loop", "make_ode_pairs"):                   # no stage may start
        monkeypatch.setattr(train_toy, name, lambda *a, **k: pytest.fail("work started"))
    code, lines, out = call_main(train_toy.main, ["--preset", "smoke", "--run-dir",
                                                  str(tmp_path)], capsys)
    assert code == 0, lines
    assert "every stage was finished; made the missing ode_init.gif, hiar.gif" in out
    for name in ("ode_init", "hiar"):
        assert (tmp_path / f"{name}.gif").read_bytes()[:6] == b"GIF89a"
    assert (tmp_path / "teacher.gif").read_bytes() == b"kept" == (
        tmp_path / "self_forcing.gif").read_bytes()
# ------------------------------------------------------------------------------------------------
# One device: the fused pass with the sink, the option grid against Alg. 1, the wavefront
# ------------------------------------------------------------------------------------------------

@pytest.fixture
def one_rank(tmp_path):
    """A torch.distributed group of one process (gloo), so sample.distributed runs in-process."""
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def streamed(fn, *a, **kw):
    return torch.cat(list(fn(*a, **kw)), 1)


@pytest.mark.parametrize("context_t", hiar.CONTEXT_LEVELS)
def test_fused_pass_with_the_sink_is_alg1_past_the_window(cfg, context_t, one_rank, one_thread):
    """In a fused pass block n − 1 is written and block n denoised; block n must see the cache
    after that write, whose window has dropped block n − W and shows the sink in its slot, not
    the cache before it (block n − W in the window and the sink outside it: the old bug). Two
    layers against the literal loop; one layer against the no-cache oracle too."""
    F, lab = 4 * cfg.frames, torch.tensor([0, 1])
    for depth in (1, 2):
        m = random_model(dataclasses.replace(cfg, depth=depth), depth)
        with torch.no_grad():
            alg1 = hiar.sample_step_major(m, noise(cfg), F, lab, context_t=context_t, sink=True)
            runs = [streamed(hiar.step_major, m, noise(cfg), F, lab, context_t, fused=True,
                             sink=True),
                    hiar.sample_pipelined(m, noise(cfg), F, lab, context_t=context_t,
                                          fused=True, sink=True),
                    streamed(sample.distributed, m, noise(cfg), F, lab, context_t, fused=True,
                             sink=True)]
            if depth == 1:
                runs.append(reference_sample(m, noise(cfg), F, lab, context_t=context_t,
                                             sink=True))
            plain = hiar.sample_step_major(m, noise(cfg), F, lab, context_t=context_t)
        assert not torch.allclose(alg1, plain, atol=1e-3)          # the sink matters here
        for video in runs:
            assert torch.allclose(video, alg1, atol=1e-5), (depth, (video - alg1).abs().max())


def test_every_streamed_sampler_and_option_pair_is_the_literal_alg1_loop(cfg, one_rank,
                                                                         one_thread):
    """The whole grid, past the window (the sink moved), against sample_step_major: every
    streamed sampler × context level × sink × fused × bias × exit step × streams, so that no
    pair of options can drift apart unseen (the pipelines take no bias and no exit step)."""
    import itertools
    m, F, lab = random_model(cfg, 5), 2 * cfg.frames, torch.tensor([1, 0])
    for ctx, sink, bias, J in itertools.product(hiar.CONTEXT_LEVELS, (False, True), (0.0, 0.05),
                                                range(cfg.K)):
        kw = dict(context_t=ctx, sink=sink)
        with torch.no_grad():
            alg1 = hiar.sample_step_major(m, noise(cfg), F, lab, exit_step=J, x0_bias=bias, **kw)
            runs = {f"step_major fused={f}": streamed(hiar.step_major, m, noise(cfg), F, lab,
                                                      fused=f, exit_step=J, x0_bias=bias, **kw)
                    for f in (False, True)}
            if bias == 0 and J == cfg.K - 1:
                for f, S in itertools.product((False, True), range(1, cfg.K + 1)):
                    runs[f"pipelined fused={f} streams={S}"] = hiar.sample_pipelined(
                        m, noise(cfg), F, lab, streams=S, fused=f, **kw)
                for f in (False, True):
                    runs[f"distributed fused={f}"] = streamed(
                        sample.distributed, m, noise(cfg), F, lab, fused=f, **kw)
            runs["wavefront"] = streamed(hiar.wavefront, m, noise(cfg), F, lab, exit_step=J,
                                         x0_bias=bias, **kw)
        for name, video in runs.items():                    # bitwise: one thread, one video
            assert torch.equal(video, alg1), (name, ctx, sink, bias, J)   # per product


def test_a_blocks_output_does_not_depend_on_its_absolute_position(cfg, model):
    """RoPE counts frames from the first frame of the part being computed, and the cache holds no
    frame numbers, so a block at frame 10^5 gets the output it gets at frame 4b, bitwise (there,
    absolute angles would have lost float32 precision): a denoise, a fused and a no-cache pass."""
    b, lab = cfg.block, torch.tensor([0, 1])
    x = [noise(cfg)(0, n) for n in range(6)]
    outs = []
    for first in (0, 50_000):                                       # the first block's index
        cache = model.new_cache(sink=True)
        with torch.no_grad():
            for n in range(4):
                hiar.write(model, cache, x[n], 0.5, first + n, lab)
            denoised = model(x[4], 1.0, lab, frame0=(first + 4) * b, cache=cache)
            fused = hiar.fused_pass(model, cache, x[4], 0.5, x[5], 1.0, first + 5, lab)
            whole = model(torch.cat(x, 1), 0.5, lab, frame0=first * b)
        outs.append(torch.cat([denoised, fused, whole], 1))
    assert torch.equal(*outs)


def test_adaln_modulation_is_per_frame(cfg):
    """The condition is computed once per frame and broadcast to that frame's tokens: with the
    attention silenced (no token sees another), a new σ for frame t changes every token of frame
    t and nothing else, bitwise."""
    m = random_model(cfg, 6)
    for blk in m.blocks:
        torch.nn.init.zeros_(blk.proj.weight), torch.nn.init.zeros_(blk.proj.bias)
    x = torch.randn(2, cfg.frames, 3, cfg.size, cfg.size)
    s = torch.rand(2, cfg.frames)
    t = 3
    s2 = s.clone()
    s2[:, t] += 0.3
    with torch.no_grad():
        a, b = m(x, s, torch.tensor([0, 1])), m(x, s2, torch.tensor([0, 1]))
    same = (a == b).flatten(2).all(-1)                                # (B, T): frame unchanged
    assert same[:, :t].all() and same[:, t + 1:].all() and not same[:, t].any()
    p = cfg.patch                                    # every token (patch) of frame t changed
    patches = (a[:, t] != b[:, t]).unflatten(2, (-1, p)).unflatten(-1, (-1, p)).any(-1).any(-2)
    assert patches.all()


def test_fused_pass_is_bitwise_the_write_and_the_denoise_pass(cfg, model, one_thread):
    """A fused pass computes each of its two blocks as its own pass would (the condition of each
    block its own product, attention in two parts), so the fused samplers give the literal loop's
    video bitwise, with and without the sink, and leave the cache the unfused passes leave."""
    F, lab = 3 * cfg.frames, torch.tensor([0, 1])
    with torch.no_grad():
        for context_t, sink in [(c, s) for c in hiar.CONTEXT_LEVELS for s in (False, True)]:
            alg1 = hiar.sample_step_major(model, noise(cfg), F, lab, context_t=context_t,
                                          sink=sink)
            assert torch.equal(alg1, fused_step_major(model, noise(cfg), F, lab,
                                                      context_t=context_t, sink=sink))
        x = [noise(cfg)(0, n) for n in range(5)]
        one, two = model.new_cache(sink=True), model.new_cache(sink=True)
        for n in range(4):
            hiar.write(model, one, x[n], 0.5, n, lab)
        v_one = model(x[4], 1.0, lab, frame0=4 * cfg.block, cache=one)
        for n in range(3):
            hiar.write(model, two, x[n], 0.5, n, lab)
        v_two = hiar.fused_pass(model, two, x[3], 0.5, x[4], 1.0, 4, lab)
    assert torch.equal(v_one, v_two)
    assert all(torch.equal(a, b) for a, b in zip(one.k + one.v, two.k + two.v))


def test_context_tj_needs_no_write_pass(cfg, model, monkeypatch):
    """With context at t_j the write of block n into step j's cache is cell (n, j)'s own pass
    (same input, same cache): step_major runs K passes a block, not 2K, and leaves the video and
    every cache the literal loop's write passes leave, bitwise (past the window, ± the sink)."""
    made, orig = [], hiar.VideoDiT.new_cache
    monkeypatch.setattr(hiar.VideoDiT, "new_cache", lambda *a: made.append(orig(*a)) or made[-1])
    N, lab = 7, torch.tensor([1, 0])
    calls, handle = count_passes(model)
    try:
        with torch.no_grad():
            for sink, fused in ((False, False), (True, False), (True, True)):
                made.clear()
                alg1 = hiar.sample_step_major(model, noise(cfg), N * cfg.block, lab,
                                              context_t="current", sink=sink)
                literal, made[:] = list(made), []
                calls.clear()
                video = streamed(hiar.step_major, model, noise(cfg), N * cfg.block, lab,
                                 "current", fused=fused, sink=sink)
                assert len(calls) == cfg.K * N and torch.equal(video, alg1)
                assert len(made) == len(literal) == cfg.K
                for a, b in zip(literal, made):
                    assert torch.equal(torch.stack(a.k + a.v), torch.stack(b.k + b.v))
    finally:
        handle.remove()



def test_wavefront_is_the_literal_loop_in_one_pass_per_diagonal(cfg, monkeypatch, one_thread):
    """The one-device wavefront: Alg. 1's video bitwise (every context level, ± the sink, across
    the rolling window, batch 1 and 4, K = 4); per diagonal one pass for the cells whose caches
    are full (K rows of the batch), one per cell before; K caches, none past the window."""
    m, N, W = random_model(cfg, 7), 9, cfg.window_frames // cfg.block - 1     # W context blocks
    rows, held, append = [], [], hiar.KVCache.store

    def spy(self, layer, k, v):
        append(self, layer, k, v)
        held.append(self.k[layer].shape[-2] // cfg.tokens_per_frame)
    monkeypatch.setattr(hiar.KVCache, "store", spy)
    handle = m.register_forward_hook(lambda mod, a, out: rows.append(len(a[0])))
    for B, ctx, sink in [(B, c, s) for B in (1, 4) for c in hiar.CONTEXT_LEVELS
                         for s in (False, True)]:
        n, lab = hiar.Noise(cfg, range(30, 30 + B), K=4), torch.arange(B) % cfg.labels
        with torch.no_grad():
            alg1 = hiar.sample_step_major(m, n, N * cfg.block, lab, context_t=ctx, sink=sink)
            rows.clear()
            wave = streamed(hiar.wavefront, m, n, N * cfg.block, lab, ctx, sink=sink)
        assert torch.equal(wave, alg1), (B, ctx, sink)
        first = W + (ctx != "current")       # a cell's cache is full from block W + 1 (t_j: W)
        assert len(rows) == 4 * first + (N + 4 - 1 - first), (B, ctx, rows)
        assert max(rows) == 4 * B and rows.count(4 * B) == N - first - 4 + 1
    handle.remove()
    assert max(held) == cfg.window_frames - cfg.block


def test_wavefront_streams_prefixes_in_bounded_memory(cfg, model, one_thread):
    """A generator of finished blocks: a shorter video is a prefix of a longer one, and what it
    holds (block-sized tensors: K inputs, K held writes, the block in flight) does not grow with
    the video's length."""
    lab = torch.tensor([1, 0])
    with torch.no_grad():
        long = streamed(hiar.wavefront, model, noise(cfg), 4 * cfg.frames, lab)
        short = streamed(hiar.wavefront, model, noise(cfg), cfg.frames + cfg.block, lab)
    assert torch.equal(long[:, :short.shape[1]], short)
    shape, peaks = (2, cfg.block, 3, cfg.size, cfg.size), []
    for N in (6, 14):
        counts = []
        with torch.no_grad():
            for x in hiar.wavefront(model, noise(cfg), N * cfg.block, lab):
                del x
                counts.append(_live_blocks(shape))
        peaks.append(max(counts))
    assert peaks[0] == peaks[1] <= 3 * cfg.K + 1, peaks


def test_sample_cli_wavefront_gives_the_literal_loops_videos(tmp_path):
    """`sample.py --sampler wavefront` streams hiar.wavefront: the literal loop's videos, with the
    sink, a context level and the bias passed through."""
    ck = smoke_ckpt(tmp_path)
    sample.main(["--ckpt", str(ck), "--frames", "20", "--num", "2", "--sink", "--sampler",
                 "wavefront", "--context-t", "clean", "--bias", "0.05", "--gif", "",
                 "--no-metrics", "--npy", str(tmp_path / "w.npy"), "--device", "cpu"])
    model, _ = sample.load_student(str(ck), "cpu")
    with torch.no_grad():
        v = hiar.sample_step_major(model, hiar.Noise(model.cfg, [0, 1]), 20, torch.tensor([0, 1]),
                                   context_t="clean", x0_bias=0.05, sink=True)
    assert np.array_equal(sample.to_uint8(v), np.load(tmp_path / "w.npy"))
