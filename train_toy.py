"""Train HiAR on the moving-shapes toy: teacher → ODE pairs → ODE init → DMD students.

    python train_toy.py                       # distil from the shipped teacher (checkpoints/)
    python train_toy.py --from-scratch        # train the teacher too
    python train_toy.py --preset smoke        # every stage end to end in under a minute
    python train_toy.py --seed 1 --init-from runs/toy_s0 --run-dir runs/s1   # another DMD seed
    python train_toy.py --set init_teacher=causal --run-dir runs/causal  # Causal Forcing's init

Every stage writes its checkpoint into the run directory; rerunning the same command after an
interruption skips finished stages and resumes the interrupted one from its last checkpoint.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import math
import os
import re
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

import hiar
from sample import (SHIPPED, ArgumentParser, CLIError, atomic, check_checkpoint, check_dir,
                    check_network, check_number, check_seed, config_diff, grid_frames,
                    load_checkpoint, make_config, model_from_checkpoint, pick_device, repo_path,
                    run_cli, same_file, save_gif, to_uint8, write_text)

# ------------------------------------------------------------------------------------------------
# The training budget and recipe (hiar.Config holds the data, the network and the sampler)
# ------------------------------------------------------------------------------------------------


ZERO_OK = ("rollout_frames", "snapshot_every", "ema_start")   # integer fields where 0 is allowed


@dataclass
class TrainConfig:
    """The training budget and recipe. First the paper's recipe (official values in the comments,
    scaled to the toy where it says so), then the options this toy measured (each off by default;
    what it did: docs/results.md and docs/lab/). The students differ only in VARIANTS below."""
    # ---- the paper's recipe ----------------------------------------------------------------
    # 1. teacher: bidirectional flow matching, conditional with label dropout (for CFG)
    batch: int = 32
    teacher_steps: int = 6000
    teacher_lr: float = 1e-3
    teacher_shift: float = 3.0   # the shifted half of the teacher's σ draws (sample_train_sigma)
    label_dropout: float = 0.1   # CFG training: a tenth of the clips see 'no label'
    amp: bool = True             # bfloat16 autocast for the teacher (1.6× on this CPU)
    # 2.-3. ODE pairs (teacher trajectories with CFG; also the forward-KL targets) and ODE init
    guidance: float = 3.0        # CFG of the teacher's ODE trajectories
    ode_pairs: int = 512
    ode_steps: int = 48          # teacher Euler steps for ODE pairs (official: 48, shift 8)
    ode_shift: float = 8.0
    init_steps: int = 1500
    init_lr: float = 3e-4
    # 4. self-rollout DMD with a critic, + forward KL (Eq. 11)
    dmd_steps: int = 100         # with the EMA below the students peak here (lab/distillation.md)
    dmd_batch: int = 8
    dmd_shift: float = 5.0       # σ-shift of the DMD queries and the critic's levels (official 5)
    dmd_guidance: float = 3.0    # the real score's CFG w in DMD (official 3.0 = s; w = s + 1)
    gen_lr: float = 2e-5         # official 2e-6 for a 1.3B model; the toy's 10× larger
    critic_lr: float = 3e-6      # the official critic : generator lr ratio, 3e-7 : 2e-6 = 0.15
    critic_ratio: int = 5        # critic updates per generator update (official: 5)
    weight_decay: float = 0.01   # AdamW (official: 0.01)
    grad_clip: float = 10.0      # gradient-norm clip (official: 10)
    fkl_weight: float = 0.1      # λ of Eq. 11 (paper: 0.1); 0 turns the forward-KL term off
    fkl_mode: str = "bidirectional"  # student attention in the FKL term: bidirectional (paper)
    #                              | causal (official code)
    ema: float = 0.95            # official 0.99 from step 200; a 100-step run needs a short one
    ema_start: int = 1           # generator steps before the EMA starts to average (0: at once)
    ckpt_every: int = 100        # training steps between checkpoints (DMD: a fifth of it)
    # ---- options: measured here, off by default -----------------------------------------------
    init_teacher: str = "bidirectional"  # causal: Causal Forcing's ODE init from an AR teacher
    #                              (arXiv 2602.02214); no long-video gain here (docs/results.md)
    init_context: str = "clean"  # the past a causal ODE init sees: clean (Causal Forcing), or
    #                              mixed (each past block at a student level or clean, per block)
    ar_steps: int = 2000         # the AR teacher: the bidirectional one fine-tuned block-causally
    ar_lr: float = 3e-4          # by teacher forcing on the toy's data (Causal Forcing: >= 2K)
    rollout_frames: int = 0      # self-rollout length (0: frames; official num_rollout_frames);
    #                              gradient on the last `frames`; 24 with the sink: within seed
    #                              spread at 40×, 2× the time (docs/results.md)
    sink: bool = False           # rollouts keep block 0 in the window (attention sink; acts only
    #                              in rollouts longer than the window; docs/long_videos.md)
    cache_grad: bool = False     # the exit step's context writes keep their gradient, as the
    #                              official causal model's cache (docs/lab/distillation.md)
    reg_weight: float = 0.0      # regression anchor (DMD's regression loss): + weight · the ODE-
    #                              init loss on the teacher's pairs (docs/lab/distillation.md)
    guidance_min_sigma: float = 0.0  # real-score CFG only at σ in [min, max] (Kynkäänniemi et al.
    guidance_max_sigma: float = 1.0  # 2024's interval; 0, 1: every level; lab/distillation.md)
    snapshot_every: int = 0      # keep the EMA weights every N generator steps (0: off)

    def __post_init__(self):
        def need(ok, name, allowed):
            if not ok:
                raise ValueError(f"TrainConfig.{name}={getattr(self, name)!r} is invalid: "
                                 f"{allowed}")
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.type == "bool":
                need(isinstance(v, bool), f.name, "must be true or false")
            elif f.type == "int":
                need(isinstance(v, int) and not isinstance(v, bool)
                     and v >= (0 if f.name in ZERO_OK else 1), f.name,
                     "must be an integer >= " + ("0" if f.name in ZERO_OK else "1"))
            elif f.type == "float":
                need(isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0
                     and math.isfinite(v), f.name, "must be a number >= 0")
                setattr(self, f.name, float(v))
        for name in ("teacher_lr", "init_lr", "gen_lr", "critic_lr", "guidance", "teacher_shift",
                     "ode_shift", "dmd_shift", "grad_clip"):
            need(getattr(self, name) > 0, name, "must be > 0")
        need(self.label_dropout < 1, "label_dropout", "must be in [0, 1)")
        need(self.ema < 1, "ema", "must be in [0, 1)")
        need(self.guidance_min_sigma <= self.guidance_max_sigma, "guidance_min_sigma",
             f"must be <= guidance_max_sigma={self.guidance_max_sigma}")
        for name in ("fkl_mode", "init_teacher"):
            need(getattr(self, name) in ("bidirectional", "causal"), name,
                 "must be 'bidirectional' or 'causal'")
        need(self.init_context in ("clean", "mixed"), "init_context", "must be 'clean' or 'mixed'")


TRAIN_PRESETS = {
    "smoke": dict(batch=4, teacher_steps=30, ode_pairs=8, ode_steps=6, init_steps=10,
                  dmd_steps=4, dmd_batch=2, critic_ratio=2, ema_start=2, ckpt_every=5,
                  ar_steps=10),
    "toy": dict(),
}


# The named students, matched: one teacher, ODE init and recipe; they differ in one thing at a
# time. (sampler order, forward-KL weight λ (None: TrainConfig.fkl_weight), context level (None:
# hiar.Config.context_t, HiAR's t_{j+1}))
VARIANTS = {"self_forcing": ("block", 0.0, "clean"),   # Self-Forcing-style: block-major, λ = 0
            "hiar_no_fkl": ("step", 0.0, None),        # the order alone: step-major, λ = 0
            "hiar": ("step", None, None)}              # + the forward-KL term alone: λ = 0.1


def parse_overrides(items) -> tuple[dict, dict]:
    """--set FIELD=VALUE items → (hiar.Config overrides, TrainConfig overrides), each value
    parsed as JSON and checked against the field's type."""
    model_f = {f.name: f for f in dataclasses.fields(hiar.Config)}
    train_f = {f.name: f for f in dataclasses.fields(TrainConfig)}
    out = ({}, {})
    for item in items:
        if "=" not in item:
            raise CLIError(f"--set {item!r}: expected FIELD=VALUE")
        k, raw = item.split("=", 1)
        if k not in model_f and k not in train_f:
            raise CLIError(f"--set {k}: unknown field; known: {sorted({**model_f, **train_f})}")
        f = model_f.get(k) or train_f[k]
        try:
            v = json.loads(raw)
        except json.JSONDecodeError:
            v = raw
        want = {"int": int, "float": (int, float), "bool": bool, "str": str, "tuple": list}[f.type]
        if isinstance(v, bool) and f.type != "bool" or not isinstance(v, want):
            kind = {"tuple": "a [low, high] pair"}.get(f.type, f"a {f.type}")
            raise CLIError(f"--set {k}={raw}: must be {kind}")
        out[0 if k in model_f else 1][k] = v
    return out


# ------------------------------------------------------------------------------------------------
# Checkpoints: atomic writes, config checks
# ------------------------------------------------------------------------------------------------

def save_atomic(obj, path: Path):
    """torch.save through sample.atomic: a kill never leaves half a file."""
    with atomic(path) as tmp:
        torch.save(obj, tmp)


def copy_atomic(src: Path, dest: Path):
    with atomic(dest) as tmp:
        shutil.copyfile(src, tmp)


def fingerprint(model: hiar.VideoDiT) -> str:
    """A short hash of a model's weights: which teacher a run's ODE pairs came from."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode() + v.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


# The stages of a run directory besides its students (a student's --name may not take one)
STAGES = ("teacher", "ar_teacher", "ode_pairs", "ar_ode_pairs", "ode_init")

# What the ODE pairs and the ODE init depend on besides the data and network (--init-from).
ODE_FIELDS = ["batch", "guidance", "ode_pairs", "ode_steps", "ode_shift", "init_steps", "init_lr",
              "init_teacher", "init_context", "ar_steps", "ar_lr"]


def train_diff(stamped: dict, tc: TrainConfig, keys=None) -> list[str]:
    """config_diff of a stamped TrainConfig dict against `tc`; fields added since it was written
    read as their defaults (each new field's default keeps the old behaviour, so older runs and
    checkpoints still match)."""
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    return config_diff({**defaults, **stamped}, asdict(tc), keys)


def check_recipe(cfg: hiar.Config, tc: TrainConfig):
    """What TrainConfig alone cannot check: its lengths against the data's blocks."""
    r = tc.rollout_frames
    if r and (r % cfg.block or r < cfg.frames):
        raise ValueError(f"TrainConfig.rollout_frames={r} is invalid: must be 0 (= frames) or a "
                         f"multiple of block={cfg.block} >= frames={cfg.frames}")


# ------------------------------------------------------------------------------------------------
# One resumable training loop for every stage
# ------------------------------------------------------------------------------------------------

class Run:
    """A run directory: config.json, metrics.jsonl, one checkpoint per stage, GIFs."""

    def __init__(self, path: Path, cfg: hiar.Config, tc: TrainConfig, device: torch.device,
                 seed: int):
        self.path, self.cfg, self.tc, self.device, self.seed = Path(path), cfg, tc, device, seed
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            probe = self.path / ".write_test"
            probe.write_text("")
            probe.unlink()
        except OSError as e:
            raise CLIError(f"--run-dir {self.path}: cannot write there ({e.strerror})") from None
        resolved = {"config": cfg.to_dict(), "train": asdict(tc), "seed": seed}
        cfg_file = self.path / "config.json"
        if cfg_file.exists():
            old = json.loads(cfg_file.read_text())
            diff = (config_diff(old.get("config", {}), resolved["config"])
                    + train_diff(old.get("train", {}), tc))
            if old.get("seed") != seed:
                diff.append(f"seed: {old.get('seed')} vs {seed}")
            if diff:
                raise CLIError(f"run directory {self.path} holds a run with a different "
                               f"config ({'; '.join(diff)}); use another --run-dir")
        else:
            write_text(cfg_file, json.dumps(resolved, indent=1))

    def ckpt(self, stage: str) -> Path:
        return self.path / f"{stage}.pt"

    def done(self, stage: str) -> bool:
        p = self.ckpt(stage)
        return p.exists() and load_checkpoint(p).get("done", False)

    def log(self, record: dict):
        with open(self.path / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    def stamp(self, stage: str, extra: dict | None = None) -> dict:
        """What every checkpoint of this run records about how it was made. A student's config
        holds the context level it was trained with (block-major: clean)."""
        config = {**self.cfg.to_dict(), **{k: v for k, v in (extra or {}).items()
                                            if k == "context_t"}}
        return {"config": config, "train": asdict(self.tc), "seed": self.seed, "stage": stage,
                **(extra or {})}


def train_loop(run: Run, stage: str, steps: int, modules: dict, step_fn, every: int = 100,
               extra: dict | None = None):
    """Run `step_fn(step) -> {name: float}` for `steps` steps, resuming from the stage's checkpoint.

    `modules` maps names to things with state_dict()/load_state_dict() (models, optimisers, EMA
    copies); they are saved every `every` steps and at the end, atomically. A non-finite loss stops
    the run with a message, leaving the last good checkpoint in place."""
    path, start = run.ckpt(stage), 0
    if path.exists():
        ck = load_checkpoint(path)
        diff = (config_diff(ck["config"], run.stamp(stage, extra)["config"])
                + train_diff(ck.get("train", {}), run.tc))
        if diff:
            raise CLIError(f"{path} was made with a different config ({'; '.join(diff)})")
        for name, m in modules.items():
            m.load_state_dict(ck[name])
        start = ck["step"]
        torch.set_rng_state(ck["rng"])
        print(f"[{stage}] resuming from step {start}/{steps}")

    def save(step, done):
        state = {name: m.state_dict() for name, m in modules.items()}
        save_atomic({**state, **run.stamp(stage, extra), "step": step, "done": done,
                     "rng": torch.get_rng_state()}, path)

    t0, last = time.time(), {}
    bar = Progress(stage, steps, start)
    for step in range(start, steps):
        last = step_fn(step)
        bad = [k for k, v in last.items() if not math.isfinite(v)]
        if bad:
            bar.close()
            kept = (f"the last good checkpoint is {path}" if path.exists() else
                    "no checkpoint of it was saved")
            raise CLIError(f"stage {stage}: {bad[0]}={last[bad[0]]} at step {step}; stopped, "
                           + kept)
        bar.update({k: f"{v:.4g}" for k, v in last.items()})
        run.log({"stage": stage, "step": step, **last})              # every step: the curves
        if (step + 1) % every == 0 and step + 1 < steps:
            save(step + 1, False)
    bar.close()
    save(steps, True)
    took = time.time() - t0
    summary = ", ".join(f"{k} {v:.4g}" for k, v in last.items())
    print(f"[{stage}] done: {steps - start} steps in {took / 60:.1f} min; last {summary}")
    run.log({"stage": stage, "event": "done", "seconds": took, "steps": steps - start})
    return took


class Progress:
    """A tqdm bar on a terminal; without one (`python train_toy.py > log`, tqdm stays silent) a
    plain line when the stage starts and at every 5 % of it, so a log shows the run moving."""

    def __init__(self, desc: str, total: int, initial: int = 0):
        self.desc, self.total, self.n, self.t0 = desc, total, initial, time.time()
        self.every = max(1, total // 20)
        self.bar = (tqdm(desc=desc, total=total, initial=initial, dynamic_ncols=True)
                    if sys.stderr.isatty() else None)
        if self.bar is None:
            print(f"[{desc}] {initial}/{total}", flush=True)

    def update(self, postfix: dict | None = None, n: int = 1):
        self.n += n
        if self.bar is not None:
            self.bar.set_postfix(postfix or {}, refresh=False)
            self.bar.update(n)
        elif self.n // self.every > (self.n - n) // self.every or self.n == self.total:
            extra = "".join(f", {k} {v}" for k, v in (postfix or {}).items())
            print(f"[{self.desc}] {self.n}/{self.total} ({100 * self.n // self.total} %, "
                  f"{(time.time() - self.t0) / 60:.1f} min{extra})", flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


class EMA:
    """Exponential moving average of a model's weights (used for sampling)."""

    def __init__(self, model, decay: float):
        self.decay, self.model = decay, copy.deepcopy(model).requires_grad_(False)

    @torch.no_grad()
    def update(self, model, decay: float | None = None):
        d = self.decay if decay is None else decay
        for e, p in zip(self.model.parameters(), model.parameters()):
            e.lerp_(p, 1 - d)

    def state_dict(self):
        return self.model.state_dict()

    def load_state_dict(self, sd):
        self.model.load_state_dict(sd)


class GenState:
    """Adapter so a torch.Generator is checkpointed like a module."""

    def __init__(self, g):
        self.g = g

    def state_dict(self):
        return {"state": self.g.get_state()}

    def load_state_dict(self, sd):
        self.g.set_state(sd["state"])


def set_lr(opt, base: float, step: int, total: int, warmup: int = 100):
    """Linear warmup, then cosine decay to 10 % of `base` at `total` steps."""
    progress = min(1.0, step / max(1, total))
    lr = base * min(1.0, (step + 1) / warmup) * (0.55 + 0.45 * math.cos(math.pi * progress))
    for group in opt.param_groups:
        group["lr"] = lr


def autocast(run: Run):
    """bfloat16 autocast where TrainConfig.amp asks for it (CPU and CUDA)."""
    on = run.tc.amp and run.device.type in ("cpu", "cuda")
    return torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=on)


# ------------------------------------------------------------------------------------------------
# Stage 1: the bidirectional, conditional teacher
# ------------------------------------------------------------------------------------------------

def sample_train_sigma(B: int, generator=None, device=None, shift: float = 3.0):
    """σ for training the teacher: half logit-normal(0, 1) (SD3), half uniform t warped by a
    σ-shift. Logit-normal alone puts ~1.4 % of its draws above σ = 0.9, where the few-step
    student starts, the DMD loss sends many of its queries and the forward-KL target lives;
    the shifted half puts 25 % there (shift 3). (B,)"""
    logit_normal = torch.sigmoid(torch.randn(B, generator=generator))
    shifted = hiar.shift_sigma(torch.rand(B, generator=generator), shift)
    use_shifted = torch.rand(B, generator=generator) < 0.5
    return torch.where(use_shifted, shifted, logit_normal).to(device)


def drop_labels(label, p: float, generator=None):
    """Classifier-free guidance training: replace each label by -1 ('no label') with prob. p."""
    if label is None or p <= 0:
        return label
    drop = torch.rand(label.shape, generator=generator) < p
    return torch.where(drop, torch.full_like(label, -1), label)


def train_teacher(run: Run, start: hiar.VideoDiT | None = None) -> float:
    """Flow matching with full attention on labelled clips; a `label_dropout` share of the clips
    is shown 'no label', so one network gives both scores that CFG needs. σ is drawn half
    logit-normal, half shifted-uniform, so the levels near σ = 1 — where the student starts and
    DMD queries — are trained too (sample_train_sigma).

    From `start` (the bidirectional teacher): Causal Forcing's AR teacher, stage ar_teacher
    (init_teacher=causal), fine-tuned block-causally by teacher forcing on the toy's data — each
    clip's block n (drawn per clip) noised, the blocks before it clean, the loss on block n
    (hiar.flow_loss with n). Its ODE maps a block's noise to one clean block given the past,
    which a causal student can learn; the bidirectional ODE, which sees the future, is not."""
    cfg, tc, dev, ar = run.cfg, run.tc, run.device, start is not None
    model = copy.deepcopy(start).requires_grad_(True) if ar else hiar.VideoDiT(cfg).to(dev)
    steps, lr = (tc.ar_steps, tc.ar_lr) if ar else (tc.teacher_steps, tc.teacher_lr)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    ema = EMA(model, 0.999)
    g = torch.Generator().manual_seed(run.seed + (4 if ar else 0))

    def step_fn(step):
        set_lr(opt, lr, step, steps)
        x0, state = hiar.moving_shapes(cfg, tc.batch, g)
        label = drop_labels(state["label"], tc.label_dropout, g) if cfg.labels else None
        sigma = sample_train_sigma(tc.batch, g, dev, tc.teacher_shift)
        n = torch.randint(cfg.frames // cfg.block, (tc.batch,), generator=g).to(dev) if ar else None
        eps = torch.randn(x0.shape, generator=g).to(dev)
        with autocast(run):
            loss = hiar.flow_loss(model, x0.to(dev), sigma, eps, label, causal=False, n=n)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema.update(model, min(0.999, (1 + step) / (10 + step)))
        return {"loss": loss.item()}

    return train_loop(run, "ar_teacher" if ar else "teacher", steps,
                      {"model": model, "ema": ema, "opt": opt, "data_rng": GenState(g)}, step_fn,
                      every=tc.ckpt_every)


# ------------------------------------------------------------------------------------------------
# Stage 2: ODE pairs — teacher trajectories (with CFG) kept at the student's σ levels
# ------------------------------------------------------------------------------------------------

def make_ode_pairs(run: Run, teacher: hiar.VideoDiT, stage: str = "ode_pairs") -> float:
    """The teacher's ODE from noise, kept at the student's levels. Stage ar_ode_pairs (Causal
    Forcing): the AR teacher solves each block teacher-forced on a data clip's earlier blocks
    (the data is stored too: the ODE init sees the same past)."""
    cfg, tc, t0 = run.cfg, run.tc, time.time()
    causal = stage == "ar_ode_pairs"
    g = torch.Generator().manual_seed(run.seed + (5 if causal else 1))
    sig = hiar.student_sigmas(cfg.K, cfg.shift)[:-1]
    states, finals, labels, data = [], [], [], []
    bar = Progress(stage, tc.ode_pairs)
    for i in range(0, tc.ode_pairs, tc.batch):
        B, past = min(tc.batch, tc.ode_pairs - i), None
        if causal:
            past, state = hiar.moving_shapes(cfg, B, g)
            data.append(past)
        eps = torch.randn(B, cfg.frames, 3, cfg.size, cfg.size, generator=g).to(run.device)
        label = state["label"] if causal and cfg.labels else (
            torch.randint(cfg.labels, (B,), generator=g) if cfg.labels else None)
        st, x0 = hiar.teacher_ode(teacher, eps, sig, tc.ode_steps, tc.ode_shift, label,
                                  tc.guidance, context=None if past is None else past.to(eps))
        states.append(st.cpu())
        finals.append(x0.cpu())
        labels.append(label if label is not None else torch.full((B,), -1))
        bar.update(n=B)
    bar.close()
    states, finals = torch.cat(states), torch.cat(finals)     # (M, K, T, 3, H, W), (M, T, …)
    if not (torch.isfinite(states).all() and torch.isfinite(finals).all()):
        raise CLIError(f"stage {stage}: the teacher produced non-finite values; nothing saved")
    save_atomic({"states": states, "x0": finals, "label": torch.cat(labels),
                 "sigmas": torch.tensor(sig), **({"data": torch.cat(data)} if causal else {}),
                 **run.stamp(stage, {"teacher": fingerprint(teacher)}), "done": True},
                run.ckpt(stage))
    took = time.time() - t0
    print(f"[{stage}] done: {len(finals)} trajectories in {took / 60:.1f} min")
    run.log({"stage": stage, "event": "done", "seconds": took})
    return took


# ------------------------------------------------------------------------------------------------
# Stage 3: ODE init — the block-causal student regressed onto the teacher's trajectories
# ------------------------------------------------------------------------------------------------

def ode_levels(pairs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The ODE pairs as regression inputs: every trajectory at each of the student's σ_j and
    clean. → (levels (M, K + 1, T, 3, H, W), their σ (K + 1,))."""
    levels = torch.cat([pairs["states"], pairs["x0"][:, None]], 1)
    return levels, torch.cat([pairs["sigmas"], torch.zeros(1)])


def ode_regression(student, levels, sig, pairs: dict, B: int, cfg: hiar.Config, g, device,
                   noisy_past: bool = False):
    """The ODE-init objective on one batch: B trajectories, each block at its own level — one
    of the student's σ_j or clean (σ = 0), drawn per block as Self-Forcing does — and the
    block-causal student predicts the teacher ODE's endpoint x0. Trains the ODE init; in DMD it
    is the regression anchor (`reg_weight`, DMD's regression loss on teacher outputs). Pairs
    with `data` (ar_ode_pairs): each clip's block n alone, after the data's clean blocks (with
    `noisy_past`, each past block at a level drawn as above: the contexts step-major shows)."""
    idx = torch.randint(len(levels), (B,), generator=g)
    if "data" in pairs:      # teacher-forced pairs (Causal Forcing): block n at σ_j, a clean past
        n, j = torch.randint(cfg.frames // cfg.block, (B,), generator=g), torch.randint(
            len(sig) - 1, (B,), generator=g)
        x, s, on = hiar.teacher_forced(pairs["data"][idx], levels[idx, j], sig[j], n, cfg.block)
        if noisy_past:                                      # past block i at level σ_lv[i]
            lv = torch.randint(len(sig), (B, cfg.frames // cfg.block), generator=g)
            lv = sig[lv.repeat_interleave(cfg.block, 1)]                            # (B, T)
            past = (torch.arange(cfg.frames) // cfg.block)[None] < n[:, None]
            s = torch.where(past, lv, s)
            x = torch.where(past[..., None, None, None], hiar.add_noise(
                x, torch.randn(x.shape, generator=g), lv[..., None, None, None]), x)
        lab = pairs["label"][idx] if cfg.labels else None
        pred = student.x0(x.to(device), s.to(device), lab, causal=True)
        return (pred.float() - pairs["x0"][idx].to(device)).pow(2).mean((2, 3, 4))[on].mean()
    j = torch.randint(len(sig), (B, cfg.frames // cfg.block), generator=g)
    j = j.repeat_interleave(cfg.block, 1)                               # (B, T): level per frame
    x = levels[idx[:, None], j, torch.arange(cfg.frames)]               # (B, T, 3, H, W)
    lab = pairs["label"][idx] if cfg.labels else None
    pred = student.x0(x.to(device), sig[j].to(device), lab, causal=True)
    return torch.nn.functional.mse_loss(pred.float(), pairs["x0"][idx].to(device))


def train_ode_init(run: Run, teacher: hiar.VideoDiT, pairs: dict) -> float:
    """CausVid / Self-Forcing initialisation: regress the block-causal student, started from
    `teacher`'s weights, onto its trajectories (`ode_regression`). Per-block levels show the
    student the mixed contexts of both samplers (clean for block-major, noisy for step-major);
    Causal Forcing's teacher-forced pairs show it a clean past."""
    cfg, tc, dev = run.cfg, run.tc, run.device
    student = copy.deepcopy(teacher).requires_grad_(True)
    opt = torch.optim.AdamW(student.parameters(), lr=tc.init_lr, weight_decay=0.0)
    levels, sig = ode_levels(pairs)
    g = torch.Generator().manual_seed(run.seed + 2)

    def step_fn(step):
        set_lr(opt, tc.init_lr, step, tc.init_steps)
        with autocast(run):
            loss = ode_regression(student, levels, sig, pairs, tc.batch, cfg, g, dev,
                                  tc.init_context == "mixed")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        return {"loss": loss.item()}

    return train_loop(run, "ode_init", tc.init_steps,
                      {"model": student, "opt": opt, "data_rng": GenState(g)}, step_fn,
                      every=tc.ckpt_every)


# ------------------------------------------------------------------------------------------------
# Stage 4-6: self-rollout DMD (+ forward KL), in either order, with an EMA
# ------------------------------------------------------------------------------------------------

def rollout(student, run: Run, order: str, context_t: str, g, label, exit_step: int):
    """A self-rollout with the student's own sampler, `rollout_frames` long, every block exiting
    at `exit_step`; returns the last `frames` (one attention window). Earlier blocks are generated
    but dropped, so the loss — and the gradient — sees only the last window (the official
    `num_rollout_frames` option), while that window's context came from the student itself."""
    cfg, tc = run.cfg, run.tc
    frames = tc.rollout_frames or cfg.frames
    noise = hiar.Noise(cfg, torch.randint(2 ** 62, (tc.dmd_batch,), generator=g), run.device)
    keep = cfg.frames // cfg.block
    level = {} if order == "block" else {"context_t": context_t}    # block-major: always clean
    sampler = hiar.block_major if order == "block" else hiar.step_major
    blocks = sampler(student, noise, frames, label, exit_step=exit_step, cache_grad=tc.cache_grad,
                     sink=tc.sink, **level)
    last = []
    for x0_hat in blocks:                       # streaming: hold one window, drop the rest
        last = (last + [x0_hat])[-keep:]
    return torch.cat(last, 1)                   # (B, frames, 3, H, W)


def train_dmd(run: Run, stage: str, teacher, init: hiar.VideoDiT, pairs: dict, order: str,
              fkl_weight: float, context_t: str) -> float:
    """Self-rollout distillation (the paper's training recipe): each generator update rolls out
    a video with the student's own sampler, exits every block at one random step j* (no gradient
    before it, gradient only through step j*'s prediction), and follows the DMD gradient against
    the teacher with CFG; the critic (fake score) learns the student's current distribution with
    the flow loss on the DMD query levels, `critic_ratio` updates per generator update. FKL adds
    λ·L_FKL on the first step."""
    if order == "block" and context_t != "clean":
        raise ValueError(f"context_t={context_t!r}: the block-major order's context is always "
                         "clean (context levels are a step-major choice)")
    cfg, tc, dev = run.cfg, run.tc, run.device
    extra = {"order": order, "fkl_weight": fkl_weight, "context_t": context_t}
    gen = copy.deepcopy(init).requires_grad_(True)
    critic = copy.deepcopy(teacher).requires_grad_(True)
    teacher.requires_grad_(False)
    adam = dict(betas=(0.0, 0.999), weight_decay=tc.weight_decay)
    opt_g = torch.optim.AdamW(gen.parameters(), lr=tc.gen_lr, **adam)
    opt_c = torch.optim.AdamW(critic.parameters(), lr=tc.critic_lr, **adam)
    ema = EMA(gen, tc.ema)
    g = torch.Generator().manual_seed(run.seed + 3)
    sig0 = float(pairs["sigmas"][0])
    fkl_target = hiar.chord_x0(pairs["states"][:, 0], pairs["states"][:, 1], sig0,
                               float(pairs["sigmas"][1])) if cfg.K > 1 else pairs["x0"]
    levels, sig = ode_levels(pairs) if tc.reg_weight > 0 else (None, None)   # option: anchor

    def labels():
        return torch.randint(cfg.labels, (tc.dmd_batch,), generator=g) if cfg.labels else None

    def step_fn(step):
        for _ in range(tc.critic_ratio):     # 1. the critic (fake score): flow loss on rollouts
            label = labels()
            with torch.no_grad():
                x0 = rollout(gen, run, order, context_t, g, label,
                             int(torch.randint(cfg.K, (1,), generator=g)))
            sigma = hiar.dmd_sigma(tc.dmd_batch, tc.dmd_shift, g, dev)
            eps = torch.randn(x0.shape, generator=g).to(dev)
            c_loss = hiar.flow_loss(critic, x0, sigma, eps, label)
            opt_c.zero_grad(set_to_none=True)
            c_loss.backward()
            torch.nn.utils.clip_grad_norm_(critic.parameters(), tc.grad_clip)
            opt_c.step()
        label = labels()                     # 2. a self-rollout, every block exits at step j*
        exit_step = int(torch.randint(cfg.K, (1,), generator=g))   # shared by all blocks
        x0 = rollout(gen, run, order, context_t, g, label, exit_step)
        loss = d_loss = hiar.dmd_loss(       # 3. reverse KL: DMD against the teacher with CFG
            x0, teacher, critic, tc.dmd_shift, label, tc.dmd_guidance, g,
            (tc.guidance_min_sigma, tc.guidance_max_sigma))
        logs = {"dmd": d_loss.item(), "critic": c_loss.item(), "exit_step": exit_step}
        if fkl_weight > 0:                   # 4. + λ·L_FKL on the first step (Eq. 11)
            idx = torch.randint(len(fkl_target), (tc.dmd_batch,), generator=g)
            lab = pairs["label"][idx] if cfg.labels else None
            f_loss = hiar.fkl_loss(gen, pairs["states"][idx, 0].to(dev), fkl_target[idx].to(dev),
                                   sig0, lab, bidirectional=tc.fkl_mode == "bidirectional")
            loss = loss + fkl_weight * f_loss
            logs["fkl"] = f_loss.item()
        if tc.reg_weight > 0:                        # option (off): the regression anchor
            r_loss = ode_regression(gen, levels, sig, pairs, tc.dmd_batch, cfg, g, dev)
            loss = loss + tc.reg_weight * r_loss
            logs["reg"] = r_loss.item()
        opt_g.zero_grad(set_to_none=True)    # 5. the generator's update, then its EMA
        loss.backward()
        torch.nn.utils.clip_grad_norm_(gen.parameters(), tc.grad_clip)
        opt_g.step()
        ema.update(gen, 0.0 if step < tc.ema_start else None)    # EMA follows from ema_start
        if tc.snapshot_every and (step + 1) % tc.snapshot_every == 0:   # option: snapshots
            save_atomic({**run.stamp(stage, extra), "step": step + 1,
                         "model": {k: v.half() for k, v in ema.state_dict().items()}},
                        run.path / f"{stage}_ema{step + 1}.pt")
        return logs

    return train_loop(run, stage, tc.dmd_steps,
                      {"model": gen, "ema": ema, "critic": critic, "opt_g": opt_g, "opt_c": opt_c,
                       "data_rng": GenState(g)}, step_fn, every=max(1, tc.ckpt_every // 5),
                      extra=extra)


# ------------------------------------------------------------------------------------------------
# GIFs after each stage
# ------------------------------------------------------------------------------------------------

@torch.no_grad()
def stage_gif(run: Run, name: str, model: hiar.VideoDiT, teacher: bool = False, num: int = 4):
    """Data next to samples: teacher samples at the training length (ODE, 24 Euler steps, without
    and with CFG), or a student's long rollouts (8× the training length) with both samplers on
    the same noise. One video per label."""
    cfg, dev = run.cfg, run.device
    g = torch.Generator().manual_seed(1234)
    frames = cfg.frames if teacher else 8 * cfg.frames
    label = torch.arange(num) % cfg.labels if cfg.labels else None
    data, _ = hiar.moving_shapes(cfg, num, g, frames, label)
    rows = {"data": to_uint8(data)}
    model.eval()
    if teacher:
        eps = torch.randn(num, frames, 3, cfg.size, cfg.size, generator=g).to(dev)
        for w in (1.0, run.tc.guidance):
            rows[f"teacher, CFG {w:g}"] = to_uint8(
                hiar.teacher_ode(model, eps, [], 24, run.tc.ode_shift, label, w)[1])
    else:
        noise = hiar.Noise(cfg, range(num), dev)
        rows[f"{name}: block-major"] = to_uint8(hiar.sample_block_major(model, noise, frames,
                                                                         label))
        rows[f"{name}: step-major"] = to_uint8(hiar.sample_step_major(model, noise, frames,
                                                                       label))
    path = run.path / f"{name}.gif"
    save_gif(path, grid_frames(rows, per_row=num))
    return path


# ------------------------------------------------------------------------------------------------
# The whole pipeline
# ------------------------------------------------------------------------------------------------

def resolve_students(args, cfg: hiar.Config, tc: TrainConfig) -> list[tuple]:
    """[(stage name, order, fkl weight, context level)]: the named --students (default
    hiar,self_forcing unless a custom student is asked for), then the custom student of
    --order / --fkl-weight / --context-t / --name, if any."""
    custom = args.order or args.fkl_weight is not None or args.context_t or args.name
    names = args.students if args.students is not None else "" if custom else "hiar,self_forcing"
    out = []
    for name in filter(None, names.split(",")):
        if name not in VARIANTS:
            raise CLIError(f"--students: unknown student {name!r}; known: {sorted(VARIANTS)}")
        order, lam, ctx = VARIANTS[name]
        out.append((name, order, tc.fkl_weight if lam is None else lam, ctx or cfg.context_t))
    if custom:
        order = args.order or "step"
        lam = tc.fkl_weight if args.fkl_weight is None else args.fkl_weight
        check_number("--fkl-weight", lam, 0)
        if order == "block" and args.context_t not in (None, "clean"):
            raise CLIError(f"--context-t {args.context_t}: the block-major order's context is "
                           "always clean; drop --context-t or use --order step")
        ctx = args.context_t or (cfg.context_t if order == "step" else "clean")
        name = args.name or f"student_{order}_fkl{lam:g}_{ctx}"
        if not re.fullmatch(r"[A-Za-z0-9][\w-]*", name) or re.search(r"_ema\d+$", name):
            raise CLIError(f"--name {name}: must be a plain name (letters, digits, _ and -; "
                           "not ending in _ema<step>, the snapshots' names)")
        if name in STAGES or name in VARIANTS:
            raise CLIError(f"--name {name}: is the name of a stage; choose another "
                           f"(taken: {', '.join(STAGES + tuple(VARIANTS))})")
        out.append((name, order, lam, ctx))
    return out


def check_students(run_dir: Path, students: list[tuple]):
    """A student already in the run directory must be the one asked for (its stage would be
    taken as done)."""
    for name, order, lam, ctx in students:
        path = run_dir / f"{name}.pt"
        if path.exists():
            ck = load_checkpoint(path)
            diff = config_diff({k: ck.get(k) for k in ("order", "fkl_weight", "context_t")},
                               dict(order=order, fkl_weight=lam, context_t=ctx))
            if diff:
                raise CLIError(f"{path} holds another student ({'; '.join(diff)}); use another "
                               "--name or --run-dir")


def init_diff(ck: dict, cfg: hiar.Config, tc: TrainConfig) -> list[str]:
    """How an ODE-pairs / ODE-init checkpoint differs from what a run of `cfg`, `tc` makes."""
    return config_diff(ck["config"], cfg.to_dict()) + train_diff(ck.get("train", {}), tc,
                                                                  ODE_FIELDS)


def init_from(src: Path, cfg: hiar.Config, tc: TrainConfig, run_dir: Path) -> list[tuple]:
    """--init-from: the finished ODE pairs and ODE init of another run directory (same data,
    network, sampler and ODE settings), so students of several seeds or DMD recipes start from
    one ODE init; checked → [(its file, the run's)] for share_init to link."""
    files = []
    for stage in ("ode_pairs", "ode_init"):
        s_path, d_path = src / f"{stage}.pt", run_dir / f"{stage}.pt"
        if not s_path.is_file():
            raise CLIError(f"--init-from {src}: no {stage}.pt there")
        ck = load_checkpoint(s_path)
        diff = init_diff(ck, cfg, tc)
        if not ck.get("done") or diff:
            why = "is not finished" if not ck.get("done") else f"differs ({'; '.join(diff)})"
            raise CLIError(f"--init-from {src}: its {stage}.pt {why}")
        if d_path.exists() and not d_path.samefile(s_path):
            raise CLIError(f"--init-from {src}: {d_path} exists already; use another --run-dir")
        files.append((s_path, d_path))
    return files


def share_init(files: list[tuple]):
    """init_from's files hard-linked into the run (copied where links are impossible)."""
    for s_path, d_path in files:
        if d_path.exists():
            continue
        try:
            os.link(s_path, d_path)
        except OSError:
            copy_atomic(s_path, d_path)


def adopt_shipped_init(run: Run) -> bool:
    """The default run starts from the shipped ODE init (checkpoints/ode_init.pt) when it was made
    with this run's config, ODE settings and seed, as it starts from the shipped teacher: its
    float16 weights become the run's finished ode_init stage (10.9 min saved here). The ODE
    pairs are still made, for the forward-KL targets."""
    path = SHIPPED / "ode_init.pt"
    if not path.is_file() or run.ckpt("ode_init").exists():
        return False
    ck = load_checkpoint(path)
    if init_diff(ck, run.cfg, run.tc) or ck.get("seed") != run.seed:
        return False
    save_atomic({**ck, "model": {k: v.float() for k, v in ck["model"].items()}, "done": True,
                 "shipped": repo_path(path)}, run.ckpt("ode_init"))
    print(f"ode_init: the shipped {repo_path(path)} (same config and seed; --from-scratch "
          "retrains it)")
    return True


def check_teacher(path: Path, cfg: hiar.Config, pairs: Path | None):
    """--teacher: a teacher of the run's network and, where the run has ODE pairs already (its
    own or --init-from's), the teacher they came from."""
    ck = load_checkpoint(path)
    check_checkpoint(ck, path, "--teacher", ("teacher",), cfg)
    made_by = load_checkpoint(pairs).get("teacher") if pairs else None
    if made_by not in (None, fingerprint(model_from_checkpoint(ck, path, "ema"))):
        raise CLIError(f"{pairs} came from another teacher than {path}; distil from that one "
                       "or use another --run-dir")


def load_teacher(run: Run, from_scratch: bool, path) -> hiar.VideoDiT:
    """The teacher to distil from: --teacher's, or (from scratch) the run's own, trained and
    shown in a GIF (made again if a kill lost it)."""
    if from_scratch:
        if not run.done("teacher"):
            train_teacher(run)
        path = run.ckpt("teacher")
    ck = load_checkpoint(path)
    check_network(ck, run.cfg, path)
    teacher = model_from_checkpoint(ck, path, "ema").to(run.device)
    if from_scratch and not path.with_suffix(".gif").exists():
        stage_gif(run, "teacher", teacher, teacher=True)
    return teacher.eval().requires_grad_(False)


def ship(run: Run, stage: str, dest: Path, command: str):
    """A small, self-contained copy of a finished stage for checkpoints/: its configs, sampling
    weights (the EMA where there is one; float16 for students, 2.5 MB, float32 for the teacher)
    and how it was made."""
    ck = load_checkpoint(run.ckpt(stage))
    if not ck.get("done"):
        raise CLIError(f"stage {stage} of {run.path} is not finished; nothing shipped")
    weights = ck["ema"] if "ema" in ck else ck["model"]
    keep = ("config", "train", "seed", "stage", "order", "fkl_weight", "context_t", "step")
    small = {k: ck[k] for k in keep if k in ck}
    dtype = torch.float32 if "teacher" in stage else torch.float16   # teachers score DMD or
    #                                                                   make ODE pairs
    small.update(model={k: v.to(dtype) for k, v in weights.items()},
                 note=f"{command} (seed {run.seed}; weights stored in "
                      f"{str(dtype).replace('torch.', '')})")
    # students of several training seeds side by side: <name>_s<seed>.pt
    name = stage if stage in ("teacher", "ar_teacher", "ode_init") else f"{stage}_s{run.seed}"
    save_atomic(small, Path(dest) / f"{name}.pt")
    print(f"shipped {Path(dest) / f'{name}.pt'}")
    if stage == "teacher" and run.ckpt("teacher").with_suffix(".gif").exists():
        copy_atomic(run.ckpt("teacher").with_suffix(".gif"), Path(dest) / "teacher.gif")


def run_all(args) -> Run:
    # every argument is checked before a file is written or a stage trained
    if args.preset not in hiar.PRESETS:
        raise CLIError(f"--preset {args.preset!r}: choose one of {sorted(hiar.PRESETS)}")
    check_seed("--seed", args.seed)
    model_over, train_over = parse_overrides(args.set)
    try:
        cfg = make_config(args.preset, **model_over)
        tc = TrainConfig(**{**TRAIN_PRESETS[args.preset], **train_over})
        check_recipe(cfg, tc)
    except ValueError as e:
        raise CLIError(f"--set: {e}") from None
    dev = pick_device(args.device)
    run_dir = Path(args.run_dir or f"runs/{args.preset}_s{args.seed}")
    students = resolve_students(args, cfg, tc)
    check_students(run_dir, students)
    init_files = []
    if args.init_from:
        src = Path(args.init_from)
        if args.from_scratch:
            raise CLIError("--init-from: the shared ODE init comes with its teacher; "
                           "drop --from-scratch")
        init_files = init_from(src, cfg, tc, run_dir)
        if not args.teacher and (src / "teacher.pt").is_file():
            args.teacher = str(src / "teacher.pt")     # the teacher that ODE init came from
    teacher_path = Path(args.teacher) if args.teacher else SHIPPED / "teacher.pt"
    if not args.from_scratch and not args.teacher and args.preset != "toy":
        args.from_scratch = True         # no shipped teacher for other presets: train one
    if not args.from_scratch:
        if not teacher_path.exists():
            raise CLIError(f"--teacher {teacher_path}: no such file; pass --teacher PATH or "
                           "--from-scratch")
        pairs = run_dir / "ode_pairs.pt"                # the run's, else --init-from's, if any
        if not pairs.exists():
            pairs = init_files[0][0] if init_files else None
        check_teacher(teacher_path, cfg, pairs)
    if args.ship:
        if same_file(args.ship, run_dir):
            raise CLIError(f"--ship {args.ship}: is the run directory; ship to another")
        check_dir("--ship", args.ship)
    torch.manual_seed(args.seed)
    run = Run(run_dir, cfg, tc, dev, args.seed)
    share_init(init_files)
    print(f"run {run.path} on {dev}, preset {args.preset}, seed {args.seed}, "
          f"students {[s[0] for s in students]}")
    times, gifs = {}, []
    teacher = load_teacher(run, args.from_scratch, teacher_path)
    if not args.from_scratch and not args.init_from and not args.teacher:
        adopt_shipped_init(run)
    if args.teacher_only:
        if args.ship and args.from_scratch:
            ship(run, "teacher", Path(args.ship), "python train_toy.py " + " ".join(sys.argv[1:]))
        return run
    if not run.done("ode_pairs"):
        times["ode_pairs"] = make_ode_pairs(run, teacher)
    pairs = load_checkpoint(run.ckpt("ode_pairs"))
    if not run.done("ode_init"):
        start, init_pairs = teacher, pairs
        if tc.init_teacher == "causal":              # Causal Forcing: AR teacher, its own pairs
            if not run.done("ar_teacher"):
                times["ar_teacher"] = train_teacher(run, start=teacher)
            start = model_from_checkpoint(load_checkpoint(run.ckpt("ar_teacher")),
                                          run.ckpt("ar_teacher"), "ema").to(dev)
            if not run.done("ar_ode_pairs"):
                times["ar_ode_pairs"] = make_ode_pairs(run, start, "ar_ode_pairs")
            init_pairs = load_checkpoint(run.ckpt("ar_ode_pairs"))
        times["ode_init"] = train_ode_init(run, start, init_pairs)
    init_ck = load_checkpoint(run.ckpt("ode_init"))
    init = model_from_checkpoint(init_ck, run.ckpt("ode_init")).to(dev)
    own_init = not args.init_from and not init_ck.get("shipped")   # a shared or shipped one
    #                                                                 is shown and shipped there
    if own_init and not (run.path / "ode_init.gif").exists():       # also after a kill mid-GIF
        gifs.append(stage_gif(run, "ode_init", init))
    for name, order, lam, ctx in students:
        if not run.done(name):
            times[name] = train_dmd(run, name, teacher, init, pairs, order, lam, ctx)
        if not (run.path / f"{name}.gif").exists():
            gifs.append(stage_gif(run, name, model_from_checkpoint(
                load_checkpoint(run.ckpt(name)), run.ckpt(name), "ema").to(dev)))
    if times:
        print("stage times (min): " + ", ".join(f"{k} {v / 60:.1f}" for k, v in times.items()))
    elif gifs:
        print(f"every stage was finished; made the missing {', '.join(p.name for p in gifs)}")
    else:
        print(f"nothing to do: every stage of {run.path} is finished")
    if args.ship:
        command = "python train_toy.py " + " ".join(sys.argv[1:])
        shared = ["ode_init"] if own_init else []   # a shared or shipped one is not shipped again
        if own_init and tc.init_teacher == "causal":
            shared.insert(0, "ar_teacher")
        for stage in shared + [s[0] for s in students]:
            ship(run, stage, Path(args.ship), command)
    return run


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n")[0],
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", default="toy", help=f"config preset: {sorted(hiar.PRESETS)}")
    p.add_argument("--run-dir", default=None, help="run directory (default runs/<preset>_s<seed>)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cuda, mps or cpu (default: autodetect)")
    p.add_argument("--from-scratch", action="store_true",
                   help="train the teacher too instead of using checkpoints/teacher.pt "
                        "(presets other than toy always do)")
    p.add_argument("--teacher", default=None,
                   help="teacher checkpoint to distil from (default checkpoints/teacher.pt)")
    p.add_argument("--teacher-only", action="store_true", help="stop after the teacher")
    p.add_argument("--students", default=None,
                   help=f"named students to train, comma-separated: {sorted(VARIANTS)} (default "
                        "hiar,self_forcing; none when a custom student is asked for alone)")
    p.add_argument("--order", choices=["block", "step"], default=None,
                   help="train one custom student with this sampler order (ablations), after "
                        "the --students named")
    p.add_argument("--fkl-weight", type=float, default=None,
                   help="forward-KL weight λ of the custom student (0 = off)")
    p.add_argument("--context-t", choices=list(hiar.CONTEXT_LEVELS), default=None,
                   help="context level of the custom student: current=t_j, next=t_{j+1}, clean")
    p.add_argument("--name", default=None, help="stage name of the custom student (not a "
                   "stage's or a named student's)")
    p.add_argument("--init-from", default=None, metavar="DIR",
                   help="reuse the finished ODE pairs and ODE init of this run directory (and "
                        "its teacher.pt if it has one): students of several seeds share one init")
    p.add_argument("--ship", default=None, metavar="DIR",
                   help="afterwards, write small sampling checkpoints of the students to DIR")
    p.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE",
                   help="override hiar.Config or TrainConfig fields, e.g. --set dmd_steps=200")
    return p.parse_args(argv)


def main(argv=None):
    run_all(parse_args(argv))


if __name__ == "__main__":
    run_cli(main, "rerun the same command to resume")
