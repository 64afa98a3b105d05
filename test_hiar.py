"""Tests for hiar.py: known answers (causality, equivalence of fast paths and references,
determinism, pass counts, physics), on the tiny `smoke` preset."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import hiar
import sample
import train_toy

HERE = Path(__file__).resolve().parent
SAMPLERS = [hiar.sample_block_major, hiar.sample_step_major]


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


def bank(cfg, frames, batch=2, seed=1, K=None):
    return hiar.noise_bank(cfg, batch, frames, torch.Generator().manual_seed(seed), K=K)


# ------------------------------------------------------------------------------------------------
# Config
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("field,value,words", [
    ("frames", 7, "multiple of block"),
    ("patch", 3, "must divide size"),
    ("window", 3, "multiple of block"),
    ("window", -2, "multiple of block"),
    ("K", 0, "integer >= 1"),
    ("frames", 0, "integer >= 1"),
    ("context_t", "t_j", "must be one of"),
    ("fkl_mode", "both", "bidirectional"),
    ("heads", 3, "even head size"),
    ("shift", 0.0, "> 0"),
    ("ode_shift", -1.0, "> 0"),
    ("fkl_weight", -0.1, ">= 0"),
    ("ema", 1.0, "[0, 1)"),
    ("speed", (0.5, 0.1), "low <= high"),
    ("blob_sigma", (0.0, 1.0), "low <= high"),
    ("blob_sigma", (1.0, 5.0), "size/2"),
])
def test_config_validation_names_field_value_and_rule(field, value, words):
    with pytest.raises(ValueError) as e:
        hiar.Config.preset("smoke", **{field: value})
    msg = str(e.value)
    assert f"Config.{field}={value!r}" in msg and words in msg


def test_import_hiar_loads_only_torch_and_the_standard_library():
    code = ("import sys; import torch; before = set(sys.modules); import hiar; "
            "print(sorted({m.split('.')[0] for m in set(sys.modules) - before}))")
    new = eval(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              check=True, cwd=HERE).stdout)
    assert all(m == "hiar" or m in sys.stdlib_module_names or m == "torch" for m in new), new


def test_config_presets_roundtrip_and_unknowns():
    cfg = hiar.Config.preset("toy")
    assert hiar.Config.from_dict(cfg.to_dict()) == cfg
    assert cfg.window_frames == cfg.frames and cfg.tokens_per_frame == 16
    with pytest.raises(ValueError, match="preset='huge' is unknown"):
        hiar.Config.preset("huge")
    with pytest.raises(ValueError, match="unknown Config fields"):
        hiar.Config.from_dict({**cfg.to_dict(), "bogus": 1})


# ------------------------------------------------------------------------------------------------
# Toy data
# ------------------------------------------------------------------------------------------------

def test_moving_shapes_shapes_range_palette_determinism(cfg):
    toy = hiar.Config.preset("toy")
    v, st = hiar.moving_shapes(toy, 5, torch.Generator().manual_seed(3), frames=20)
    assert v.shape == (5, 20, 3, 16, 16) and v.dtype == torch.float32
    assert v.min() >= -1 and v.max() <= 1 and (v < -0.9).float().mean() > 0.5   # mostly black
    assert st["pos"].shape == st["vel"].shape == (5, 20, toy.shapes, 2)
    # colours come from the palette, distinct within a video
    assert torch.equal(st["colour"], hiar.PALETTE[st["colour_id"]])
    assert all(len(set(row.tolist())) == toy.shapes for row in st["colour_id"])
    v2, _ = hiar.moving_shapes(toy, 5, torch.Generator().manual_seed(3), frames=20)
    assert torch.equal(v, v2)
    with pytest.raises(ValueError, match="frames=0"):
        hiar.moving_shapes(toy, 1, frames=0)


def test_moving_shapes_physics():
    toy = hiar.Config.preset("toy", speed=(0.8, 0.9))
    _, st = hiar.moving_shapes(toy, 64, torch.Generator().manual_seed(0), frames=60)
    pos, vel, r = st["pos"], st["vel"], st["radius"][:, None, :, None]
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
    near = (pos[:, 1:][flips] - lo.expand_as(pos)[:, 1:][flips]).abs().minimum(
        (pos[:, 1:][flips] - hi.expand_as(pos)[:, 1:][flips]).abs())
    assert (near <= 0.9 + 1e-4).all()                                         # bounces at a wall


def test_moving_shapes_blob_is_where_the_state_says():
    toy = hiar.Config.preset("toy", shapes=1)
    v, st = hiar.moving_shapes(toy, 8, torch.Generator().manual_seed(0), frames=5)
    img = (v + 1).sum(2)                                                      # (B, T, H, W)
    ys, xs = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    w = img / img.sum((-1, -2), keepdim=True)
    centre = torch.stack([(w * xs).sum((-1, -2)), (w * ys).sum((-1, -2))], -1)
    assert torch.allclose(centre, st["pos"][:, :, 0], atol=0.35)


def test_moving_shapes_is_fast():
    toy = hiar.Config.preset("toy")
    import time
    t = time.perf_counter()
    hiar.moving_shapes(toy, 32)
    assert time.perf_counter() - t < 1.0     # generous: milliseconds in practice


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
        assert torch.allclose(hiar.x0_from_v(x_t, eps - x0, sigma), x0, atol=1e-6)


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
    noise = bank(cfg, 4 * cfg.block)
    changed = noise.clone()
    changed[:, 2] += 1.0                                                     # perturb block 2
    with torch.no_grad():
        a, b = sampler(model, noise), sampler(model, changed)
    cut = 2 * cfg.block
    assert torch.equal(a[:, :cut], b[:, :cut]) and not torch.allclose(a[:, cut:], b[:, cut:])


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("frames_x", [1, 4])          # inside the window, and 4× past it
def test_kv_cache_equals_full_recompute(cfg, model, sampler, frames_x):
    noise = bank(cfg, frames_x * cfg.frames)
    with torch.no_grad():
        fast = sampler(model, noise)
        slow = sampler(model, noise, use_cache=False)
    assert fast.shape == (2, frames_x * cfg.frames, 3, cfg.size, cfg.size)
    assert torch.allclose(fast, slow, atol=1e-5)


def test_k1_both_orders_give_the_same_video(cfg, model):
    noise = bank(cfg, 2 * cfg.frames, K=1)
    with torch.no_grad():
        assert torch.equal(hiar.sample_block_major(model, noise),
                           hiar.sample_step_major(model, noise))


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_same_seed_bitwise_same_video(cfg, model, sampler):
    with torch.no_grad():
        a = sampler(model, bank(cfg, cfg.frames, seed=5))
        b = sampler(model, bank(cfg, cfg.frames, seed=5))
        c = sampler(model, bank(cfg, cfg.frames, seed=6))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_orders_differ_for_k_above_1(cfg, model):
    noise = bank(cfg, cfg.frames)
    with torch.no_grad():
        assert not torch.allclose(hiar.sample_block_major(model, noise),
                                  hiar.sample_step_major(model, noise))


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_rolling_window_bounds_the_cache(cfg, model, sampler, monkeypatch):
    held, orig = [], hiar.KVCache.append

    def spy(self, layer, k, v, frame):
        orig(self, layer, k, v, frame)
        held.append(self.k[layer].shape[-2] // cfg.tokens_per_frame)
    monkeypatch.setattr(hiar.KVCache, "append", spy)
    long = 4 * cfg.frames
    noise = bank(cfg, long)
    with torch.no_grad():
        video = sampler(model, noise)
        windowed, held[:] = list(held), []
        unbounded = sampler(model, noise, window=long)
    assert video.shape[1] == long and torch.isfinite(video).all()
    assert max(windowed) == cfg.window_frames - cfg.block                   # never more
    assert max(held) == long - cfg.block                                     # (the spy works)
    w = cfg.window_frames
    assert torch.equal(video[:, :w], unbounded[:, :w])                      # first window: same
    assert not torch.allclose(video[:, w:], unbounded[:, w:])               # then it rolls


def test_first_window_equals_generating_the_training_length(cfg, model):
    with torch.no_grad():
        long = hiar.sample_step_major(model, bank(cfg, 4 * cfg.frames))
        first = bank(cfg, 4 * cfg.frames)[:, :cfg.frames // cfg.block]        # the same draws
        short = hiar.sample_step_major(model, first)
    assert torch.equal(long[:, :cfg.frames], short)


@pytest.mark.parametrize("K", [1, 2, 4])
def test_forward_passes_per_block(cfg, model, K):
    N = 5
    noise = bank(cfg, N * cfg.block, K=K)
    with torch.no_grad():
        model.calls = 0
        hiar.sample_block_major(model, noise)
        assert model.calls == N * (K + 1)                 # K denoising passes + 1 clean write
        model.calls = 0
        hiar.sample_step_major(model, noise)
        assert model.calls == N * 2 * K                   # per step: denoise + context write
        model.calls = 0
        hiar.sample_step_major(model, noise, fused=True)
        assert model.calls == K * N                       # fused: N passes a step
        model.calls = 0
        hiar.sample_pipelined(model, noise, streams=min(2, K), fused=True)
        assert model.calls == K * N


@pytest.mark.parametrize("context_t", hiar.CONTEXT_LEVELS)
def test_context_levels_differ_and_next_is_default(cfg, model, context_t):
    noise = bank(cfg, cfg.frames)
    with torch.no_grad():
        out = hiar.sample_step_major(model, noise, context_t=context_t)
        default = hiar.sample_step_major(model, noise)
        others = [hiar.sample_step_major(model, noise, context_t=c)
                  for c in hiar.CONTEXT_LEVELS if c != context_t]
    assert torch.equal(out, default) == (context_t == "next")
    assert all(not torch.allclose(out, o) for o in others)
    # the first block never has context, so it is the same for every context level
    assert all(torch.equal(out[:, :cfg.block], o[:, :cfg.block]) for o in others)


def test_sampler_rejects_bad_arguments(cfg, model):
    noise = bank(cfg, cfg.frames)
    with pytest.raises(ValueError, match="context_t='t_j'"):
        hiar.sample_step_major(model, noise, context_t="t_j")
    with pytest.raises(ValueError, match="exit_step=9"):
        hiar.sample_block_major(model, noise, exit_step=9)
    with pytest.raises(ValueError, match="noise has shape"):
        hiar.sample_step_major(model, noise[0])
    with pytest.raises(ValueError, match="frames=5"):
        hiar.noise_bank(cfg, 1, 5)
    with pytest.raises(ValueError, match="frame shape"):
        model(torch.zeros(1, 2, 3, cfg.size + 4, cfg.size + 4), 0.5)


# ------------------------------------------------------------------------------------------------
# Training rollouts: exit step and gradient flow
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sampler", SAMPLERS)
def test_exit_step_gradient_flows_only_through_the_exit_prediction(cfg, sampler):
    """Self-rollout training (§4): steps before the exit run without gradient, the context is
    detached, and only the exit step's prediction of each block carries gradient."""
    model = random_model(cfg).train()
    noise = bank(cfg, 3 * cfg.block).requires_grad_(True)
    out = sampler(model, noise, exit_step=1)                 # (B, 3b, …)
    out[:, cfg.block:2 * cfg.block].sum().backward()         # block 1 only
    g = noise.grad.abs().sum(dim=(2, 3, 4, 5, 6))            # (K, N)
    assert g[1, 1] > 0                                        # the exit step's input noise
    assert g[0].sum() == 0                                    # step 0 ran without gradient
    assert g[1, 0] == 0 and g[1, 2] == 0                      # no gradient through context
    assert all(p.grad is not None for p in model.parameters())
    with torch.no_grad():
        assert not sampler(model, noise, exit_step=0).requires_grad


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_exit_at_step_0_equals_a_one_step_sampler(cfg, model, sampler):
    noise = bank(cfg, cfg.frames)
    with torch.no_grad():
        early = sampler(model, noise, exit_step=0, context_t="clean")
        one_step = sampler(model, noise[:1], context_t="clean")
    assert torch.equal(early, one_step)


# ------------------------------------------------------------------------------------------------
# Pipelined sampler, fused pass, schedule, processes
# ------------------------------------------------------------------------------------------------

@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("blocks,K,S", [(6, 4, 2), (5, 4, 4), (4, 4, 1), (7, 3, 2), (3, 2, 2),
                                        (1, 4, 3)])
def test_pipelined_is_bitwise_step_major(cfg, blocks, K, S, one_thread):
    model = random_model(cfg)
    noise = bank(cfg, blocks * cfg.block, K=K)
    with torch.no_grad():
        ref = hiar.sample_step_major(model, noise)
        pipe = hiar.sample_pipelined(model, noise, streams=S, threads_per_stream=1)
    assert torch.equal(ref, pipe)


def test_pipelined_with_rolling_window_context_levels_and_fused(cfg, model, one_thread):
    noise = bank(cfg, 4 * cfg.frames)
    with torch.no_grad():
        for ctx in hiar.CONTEXT_LEVELS:
            assert torch.equal(hiar.sample_step_major(model, noise, context_t=ctx),
                               hiar.sample_pipelined(model, noise, context_t=ctx, streams=2))
            assert torch.equal(hiar.sample_step_major(model, noise, context_t=ctx, fused=True),
                               hiar.sample_pipelined(model, noise, context_t=ctx, streams=2,
                                                     fused=True))


def test_pipelined_rejects_bad_streams_and_surfaces_errors(cfg, model, monkeypatch):
    noise = bank(cfg, cfg.frames)
    with pytest.raises(ValueError, match="streams=3 is invalid"):
        hiar.sample_pipelined(model, noise, streams=3)          # smoke K = 2
    real_cell = hiar.cell

    def failing_cell(ctx, x, n, j, *a, **kw):
        if (n, j) == (1, 1):                                    # a cell of the second stream
            raise RuntimeError("boom in stage 1")
        return real_cell(ctx, x, n, j, *a, **kw)
    monkeypatch.setattr(hiar, "cell", failing_cell)
    with pytest.raises(RuntimeError, match="boom in stage 1"):  # raised, not hung or lost
        hiar.sample_pipelined(model, noise, streams=2)


@pytest.mark.parametrize("context_t", hiar.CONTEXT_LEVELS)
@pytest.mark.parametrize("frames_x", [1, 3])
def test_fused_pass_matches_unfused(cfg, model, context_t, frames_x):
    noise = bank(cfg, frames_x * cfg.frames)
    with torch.no_grad():
        a = hiar.sample_step_major(model, noise, context_t=context_t)
        b = hiar.sample_step_major(model, noise, context_t=context_t, fused=True)
    assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("N,K,S", [(8, 4, 2), (5, 4, 4), (3, 4, 1), (6, 3, 2)])
def test_pipeline_schedule_respects_dependencies(N, K, S):
    cells = hiar.pipeline_schedule(N, K, S)
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
    assert N * S / (N + S - 1) == pytest.approx(N * S / (max(s for s, _ in busy) + 1))


@pytest.mark.slow
def test_torchrun_two_processes_equal_single_process(tmp_path):
    cfg = hiar.Config.preset("smoke")
    ckpt = tmp_path / "m.pt"
    torch.save({"config": cfg.to_dict(), "model": random_model(cfg).state_dict()}, ckpt)
    # (torchrun takes "--num" for its own --numa-binding, so -n)
    common = [f"--ckpt={ckpt}", "--frames=12", "-n", "2", "--gif=", "--seed=3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "sample.py", *common, "--sampler", "step",
                    "--pt", str(tmp_path / "one.pt")], check=True, env=env, capture_output=True)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                    "sample.py", *common, "--sampler", "pipelined",
                    "--pt", str(tmp_path / "two.pt")],
                   check=True, env=env, capture_output=True, timeout=300)
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert one.shape == (2, 12, 3, cfg.size, cfg.size) and torch.allclose(one, two, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# Losses
# ------------------------------------------------------------------------------------------------

def test_dmd_loss_gradient_is_the_normalised_score_difference(cfg):
    """The DMD update, per video:
    dL/dx0 = (x0_fake − x0_real) / (mean|x0 − x0_real| · numel)."""
    teacher, critic = random_model(cfg, 1), random_model(cfg, 2)
    x0 = torch.randn(2, cfg.frames, 3, cfg.size, cfg.size, requires_grad=True)
    torch.manual_seed(7)                                   # ε comes from the global generator
    hiar.dmd_loss(x0, teacher, critic, generator=torch.Generator().manual_seed(0)).backward()
    # replay the same draws by hand
    t = 0.02 + 0.96 * torch.rand(2, generator=torch.Generator().manual_seed(0))
    sigma = hiar.shift_sigma(t, 5.0)
    torch.manual_seed(7)
    x0d = x0.detach()
    x_t = hiar.add_noise(x0d, torch.randn_like(x0d), sigma[:, None, None, None, None])
    with torch.no_grad():
        real = teacher.x0(x_t, sigma, causal=False)
        fake = critic.x0(x_t, sigma, causal=False)
    norm = (x0d - real).abs().mean(dim=(1, 2, 3, 4), keepdim=True)
    expected = (fake - real) / norm / x0d.numel()
    assert torch.allclose(x0.grad, expected, atol=1e-7, rtol=1e-4)


def test_dmd_loss_vanishes_when_critic_equals_teacher(cfg):
    teacher = random_model(cfg, 1)
    x0 = torch.randn(2, cfg.frames, 3, cfg.size, cfg.size, requires_grad=True)
    loss = hiar.dmd_loss(x0, teacher, teacher)
    loss.backward()
    assert loss.item() == 0 and x0.grad.abs().max() == 0


def test_fkl_loss_modes_and_target(cfg):
    student = random_model(cfg, 3)
    x = torch.randn(2, cfg.frames, 3, cfg.size, cfg.size)
    with torch.no_grad():
        target = student.x0(x, 1.0, causal=False)
        assert hiar.fkl_loss(student, x, target, bidirectional=True) == 0
        assert hiar.fkl_loss(student, x, target, bidirectional=False) > 0   # causal differs
    # the chord target carries x_a to x_b on a straight line
    xa, xb = torch.randn(3), torch.randn(3)
    x0 = hiar.chord_x0(xa, xb, 1.0, 0.9375)
    eps = xa                                           # at σ = 1 the state is the noise
    assert torch.allclose(hiar.add_noise(x0, eps, 0.9375), xb, atol=1e-5)


def test_flow_loss_is_zero_for_the_true_velocity(cfg, monkeypatch):
    model = random_model(cfg)
    x0 = torch.randn(2, cfg.frames, 3, cfg.size, cfg.size)
    eps = torch.randn_like(x0)
    monkeypatch.setattr(model, "forward", lambda x, s, **kw: eps - x0)
    assert hiar.flow_loss(model, x0, torch.rand(2), eps) == 0


def test_teacher_ode_keeps_states_at_requested_levels(cfg):
    teacher = random_model(cfg)
    eps = torch.randn(1, cfg.frames, 3, cfg.size, cfg.size)
    keep = hiar.student_sigmas(4, 5.0)[:-1]
    states, x0 = hiar.teacher_ode(teacher, eps, keep, steps=8, shift=8.0)
    assert states.shape == (1, 4) + eps.shape[1:] and torch.equal(states[:, 0], eps)
    assert not torch.allclose(states[:, 1], eps) and torch.isfinite(x0).all()


# ------------------------------------------------------------------------------------------------
# Drift metrics (sample.py): known answers
# ------------------------------------------------------------------------------------------------



@pytest.fixture(scope="module")
def long_data():
    toy = hiar.Config.preset("toy")
    return hiar.moving_shapes(toy, 16, torch.Generator().manual_seed(0), frames=100)


def test_drift_slope_of_a_line_is_its_slope():
    seg = torch.tensor([[1.0, 3, 5, 7, 9], [2, 2, 2, 2, 2]])
    assert torch.allclose(sample.drift_slope(seg), torch.tensor([2.0, 0.0]))
    per_frame = torch.arange(10.0)[None]                       # 5 segments of 2 frames
    expected = torch.tensor([[0.5, 2.5, 4.5, 6.5, 8.5]])
    assert torch.allclose(sample.segment_means(per_frame), expected)


def test_ground_truth_has_no_drift_and_the_true_speed(long_data):
    video, state = long_data
    m = sample.drift_metrics(video)
    for name, (level, slope) in m.items():      # per video the slopes are noisy; on average ~0
        assert slope.mean().abs() < 0.15 * level.mean().abs(), name
    true_speed = state["vel"].norm(dim=-1).mean()
    assert m["speed"][0].mean() == pytest.approx(true_speed.item(), rel=0.1)
    assert m["palette_err"][0].mean() < 0.08 and m["saturation"][0].mean() > 0.7


def _rescale(video, gain):
    """Multiply the colours (in [0, 1]) per frame by gain (T,)."""
    rgb = (video + 1) / 2 * gain[None, :, None, None, None]
    return rgb.clamp(0, 1) * 2 - 1


def test_brightening_video_drifts_up_in_brightness_and_area(long_data):
    video, _ = long_data
    T = video.shape[1]
    gain = torch.linspace(1.0, 3.0, T)
    m0, m1 = sample.drift_metrics(video), sample.drift_metrics(_rescale(video, gain))
    assert m1["brightness"][1].mean() > 0.01 > m0["brightness"][1].abs().mean()
    assert m1["foreground"][1].mean() > 0.01


def test_fading_video_loses_area(long_data):
    video, _ = long_data
    gain = torch.linspace(1.0, 0.0, video.shape[1])
    m = sample.drift_metrics(_rescale(video, gain))
    assert m["foreground"][1].mean() < -0.02 and m["brightness"][1].mean() < 0


def test_blurring_video_loses_sharpness(long_data):
    video, _ = long_data
    frames = []
    for t in range(video.shape[1]):                            # blur grows with t
        k = 1 + 2 * (t * 3 // video.shape[1])
        x = video[:, t]
        frames.append(torch.nn.functional.avg_pool2d(x, k, 1, k // 2) if k > 1 else x)
    m = sample.drift_metrics(torch.stack(frames, 1))
    assert m["sharpness"][1].mean() < -0.05 * m["sharpness"][0].mean()


def test_off_palette_colours_raise_palette_error_and_frozen_video_has_no_speed(long_data):
    video, _ = long_data
    grey = video.mean(2, keepdim=True).expand_as(video)        # colour collapses to grey
    assert sample.drift_metrics(grey)["palette_err"][0].mean() > 0.2
    assert sample.drift_metrics(grey)["saturation"][0].mean() < 0.05
    frozen = video[:, :1].expand_as(video)
    assert sample.drift_metrics(frozen)["speed"][0].abs().max() == 0


def test_flicker_sees_alternating_brightness(long_data):
    video, _ = long_data
    gain = 1 + 0.5 * (torch.arange(video.shape[1]) % 2)
    assert sample.drift_metrics(_rescale(video, gain))["flicker"][0].mean() > \
        5 * sample.drift_metrics(video)["flicker"][0].mean()


# ------------------------------------------------------------------------------------------------
# train_toy.py: run directory, resume, failures; sample.py command line
# ------------------------------------------------------------------------------------------------





def run_cli(*args, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    return subprocess.run([sys.executable, *args], cwd=HERE, capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_train_loop_stops_on_nan_and_keeps_the_last_good_checkpoint(tmp_path, cfg):
    run = train_toy.Run(tmp_path, cfg, torch.device("cpu"), 0)
    w = torch.nn.Linear(2, 2)
    losses = iter([1.0, 0.5, 0.25, float("nan"), 0.1])
    with pytest.raises(train_toy.TrainingError, match=r"stage toy: loss=nan at step 3"):
        train_toy.train_loop(run, "toy", 5, {"model": w}, lambda step: {"loss": next(losses)},
                             every=2)
    ck = train_toy.load_ckpt(run.ckpt("toy"))
    assert ck["step"] == 2 and not ck["done"]                       # the last good state stays


def test_train_loop_resumes_where_it_stopped(tmp_path, cfg):
    run = train_toy.Run(tmp_path, cfg, torch.device("cpu"), 0)
    seen = []

    def step_fn(step):
        seen.append(step)
        if step == 5 and len(seen) == 6:
            raise KeyboardInterrupt                                  # a kill mid-stage
        return {"loss": 1.0}
    w = torch.nn.Linear(2, 2)
    with pytest.raises(KeyboardInterrupt):
        train_toy.train_loop(run, "toy", 8, {"model": w}, step_fn, every=2)
    train_toy.train_loop(run, "toy", 8, {"model": w}, step_fn, every=2)
    assert seen == [0, 1, 2, 3, 4, 5, 4, 5, 6, 7] and run.done("toy")


def test_run_directory_refuses_a_different_config(tmp_path, cfg):
    train_toy.Run(tmp_path, cfg, torch.device("cpu"), 0)
    other = hiar.Config.preset("smoke", dmd_steps=99)
    with pytest.raises(train_toy.TrainingError, match=r"dmd_steps: 4 vs 99"):
        train_toy.Run(tmp_path, other, torch.device("cpu"), 0)
    ck = {"config": hiar.Config.preset("smoke", dim=64).to_dict()}
    with pytest.raises(train_toy.TrainingError, match=r"dim: 64 vs 32"):
        train_toy.check_config(ck, cfg, "teacher.pt")


def test_checkpoints_are_written_atomically(tmp_path, monkeypatch):
    path = tmp_path / "x.pt"
    train_toy.save_atomic({"a": 1}, path)

    def broken_save(obj, f):
        Path(f).write_bytes(b"half a fi")
        raise OSError("disk full")
    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        train_toy.save_atomic({"a": 2}, path)
    assert train_toy.load_ckpt(path) == {"a": 1}                    # the old file is intact


@pytest.mark.slow
def test_smoke_preset_runs_every_stage(tmp_path):
    t = time.time()
    r = run_cli("train_toy.py", "--preset", "smoke", "--from-scratch", "--run-dir", str(tmp_path),
                "--students", "hiar,self_forcing,hiar_no_fkl")
    assert r.returncode == 0, r.stderr
    took = time.time() - t
    for stage in ("teacher", "ode_pairs", "ode_init", "hiar", "self_forcing", "hiar_no_fkl"):
        assert torch.load(tmp_path / f"{stage}.pt", weights_only=True)["done"], stage
    for gif in ("teacher", "ode_init", "hiar", "self_forcing", "hiar_no_fkl"):
        assert (tmp_path / f"{gif}.gif").stat().st_size > 1000
    log = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert {"dmd", "critic", "fkl"} <= set(next(r for r in log if r["stage"] == "hiar"))
    assert "fkl" not in next(r for r in log if r["stage"] == "self_forcing")
    assert json.loads((tmp_path / "config.json").read_text())["config"]["dim"] == 32
    print(f"smoke run: {took:.0f} s")
    # rerunning the finished command does nothing and says so
    r = run_cli("train_toy.py", "--preset", "smoke", "--from-scratch", "--run-dir", str(tmp_path),
                "--students", "hiar,self_forcing,hiar_no_fkl")
    assert r.returncode == 0 and "done:" not in r.stdout


@pytest.mark.slow
def test_killed_run_resumes_when_rerun(tmp_path):
    cmd = [sys.executable, "train_toy.py", "--preset", "smoke", "--from-scratch", "--run-dir",
           str(tmp_path), "--set", "teacher_steps=400", "--students", "hiar"]
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


def smoke_ckpt(tmp_path):
    cfg = hiar.Config.preset("smoke")
    path = tmp_path / "smoke.pt"
    torch.save({"config": cfg.to_dict(), "model": random_model(cfg).state_dict()}, path)
    return path


def test_sample_cli_writes_gif_npy_and_table(tmp_path):
    ck = smoke_ckpt(tmp_path)
    r = run_cli("sample.py", "--ckpt", str(ck), "--frames", "10", "--num", "3",
                "--gif", str(tmp_path / "a.gif"), "--npy", str(tmp_path / "a.npy"))
    assert r.returncode == 0, r.stderr
    import numpy as np
    for s in ("block", "step"):                                         # one file per sampler
        arr = np.load(tmp_path / f"a_{s}.npy")
        assert arr.shape == (3, 10, 8, 8, 3) and arr.dtype == np.uint8
    assert (tmp_path / "a.gif").stat().st_size > 1000
    assert "| data |" in r.stdout and "block-major" in r.stdout and "step-major" in r.stdout


def test_sample_cli_errors_are_one_line(tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    ck = str(smoke_ckpt(tmp_path))
    cases = [("--ckpt", str(tmp_path / "missing.pt")), ("--ckpt", "no_such_name"),
             ("--ckpt", str(junk)), ("--ckpt", "teacher"), ("--ckpt", ck, "--sampler", "sideways"),
             ("--ckpt", ck, "--frames", "0"), ("--ckpt", ck, "--frames", "5"),
             ("--ckpt", ck, "--context-t", "t_j"), ("--ckpt", ck, "--num", "0"),
             ("--ckpt", ck, "--device", "cuda:7")]
    for case in cases:
        r = run_cli("sample.py", *case, "--gif", "")
        lines = r.stderr.strip().splitlines()
        assert r.returncode != 0 and len(lines) == 1 and lines[0].startswith("error:"), case


def test_train_cli_errors_are_one_line(tmp_path):
    for case in (["--set", "frames=7"], ["--set", "nope=1"], ["--students", "mystery"],
                 ["--teacher", str(tmp_path / "none.pt")]):
        r = run_cli("train_toy.py", "--preset", "smoke", "--run-dir", str(tmp_path / "r"), *case)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:"), case


def test_ci_runs_exactly_the_readme_test_command():
    readme = (HERE / "README.md").read_text()
    ci = (HERE / ".ci" / "run").read_text()
    cmd = 'python3 -m pytest -q -m "slow or not slow"'
    assert cmd in readme and cmd in ci


def test_colours_counts_distinct_palette_colours(long_data):
    video, state = long_data
    assert sample.colours(video).mean() == pytest.approx(hiar.Config.preset("toy").shapes, abs=0.1)
    rgb = (video + 1) / 2
    green = rgb.amax(2, keepdim=True) * hiar.PALETTE[1][None, None, :, None, None]
    assert sample.colours(green * 2 - 1).mean() == pytest.approx(1.0, abs=0.05)  # all one colour
    assert sample.colours(torch.full_like(video, -1)).max() == 0                 # black


# ------------------------------------------------------------------------------------------------
# Notebooks: executed top to bottom (a failing cell fails the test)
# ------------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("name", ["samplers", "drift", "losses"])
def test_notebook_runs_top_to_bottom(name):
    import nbclient                     # the notebook extra (requirements-notebooks.txt)
    import nbformat
    nb = nbformat.read(HERE / "notebooks" / f"{name}.ipynb", as_version=4)
    t = time.time()
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(HERE / "notebooks")}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if o.get("output_type") == "error"]
    assert not errors
    print(f"{name}.ipynb: {time.time() - t:.0f} s")
