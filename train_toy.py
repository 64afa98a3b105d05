"""Train HiAR on the moving-shapes toy: teacher → ODE pairs → ODE init → DMD students.

    python train_toy.py                       # distil from the shipped teacher (checkpoints/)
    python train_toy.py --from-scratch        # train the teacher too
    python train_toy.py --preset smoke        # every stage end to end in under a minute

Every stage writes its checkpoint into the run directory; rerunning the same command after an
interruption skips finished stages and resumes the interrupted one from its last checkpoint.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

import hiar

HERE = Path(__file__).resolve().parent
SHIPPED = HERE / "checkpoints"
# Config fields that define the data and the network: a teacher or student checkpoint can be
# reused by any run that agrees on these (the training budget may differ).
MODEL_FIELDS = ("size", "frames", "block", "shapes", "blob_sigma", "speed", "patch", "dim",
                "depth", "heads")


class TrainingError(RuntimeError):
    """A failure the user should see as one line (NaN loss, config mismatch, missing file)."""


def pick_device(name: str | None = None) -> torch.device:
    """cuda > mps > cpu unless `name` says otherwise."""
    if name:
        try:
            dev = torch.device(name)
        except RuntimeError as e:
            raise TrainingError(f"--device={name!r} is not a device ({e})") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise TrainingError("--device=cuda but CUDA is not available here")
        return dev
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


# ------------------------------------------------------------------------------------------------
# Checkpoints: atomic writes, weights_only loads, config checks
# ------------------------------------------------------------------------------------------------

def save_atomic(obj, path: Path):
    """torch.save to a temp file in the same folder, then rename: a kill never leaves half a
    file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_ckpt(path: Path) -> dict:
    if not Path(path).is_file():
        raise TrainingError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file
        raise TrainingError(f"checkpoint {path} could not be read: {e}") from None


def config_diff(a: dict, b: dict, keys=None) -> list[str]:
    keys = keys or sorted(set(a) | set(b))
    return [f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in keys
            if _norm(a.get(k)) != _norm(b.get(k))]


def _norm(v):
    return list(v) if isinstance(v, (tuple, list)) else v


def check_config(ckpt: dict, cfg: hiar.Config, path, keys=MODEL_FIELDS):
    diff = config_diff(ckpt["config"], cfg.to_dict(), keys)
    if diff:
        raise TrainingError(f"{path} was made with a different config ({'; '.join(diff)})")


def load_model(path, cfg: hiar.Config | None = None, key: str = "model") -> hiar.VideoDiT:
    """A model from a checkpoint; its config comes from the checkpoint unless `cfg` is given, in
    which case the model fields must agree."""
    ckpt = load_ckpt(Path(path))
    if cfg is None:
        cfg = hiar.Config.from_dict(ckpt["config"])
    else:
        check_config(ckpt, cfg, path)
    model = hiar.VideoDiT(cfg)
    model.load_state_dict(ckpt[key] if key in ckpt else ckpt["model"])
    return model


# ------------------------------------------------------------------------------------------------
# One resumable training loop for every stage
# ------------------------------------------------------------------------------------------------

class Run:
    """A run directory: config.json, metrics.jsonl, one checkpoint per stage, GIFs."""

    def __init__(self, path: Path, cfg: hiar.Config, device: torch.device, seed: int):
        self.path, self.cfg, self.device, self.seed = Path(path), cfg, device, seed
        self.path.mkdir(parents=True, exist_ok=True)
        resolved = {"config": cfg.to_dict(), "seed": seed}
        cfg_file = self.path / "config.json"
        if cfg_file.exists():
            old = json.loads(cfg_file.read_text())
            diff = config_diff(old["config"], resolved["config"])
            if old.get("seed") != seed:
                diff.append(f"seed: {old.get('seed')} vs {seed}")
            if diff:
                raise TrainingError(f"run directory {self.path} holds a run with a different "
                                    f"config ({'; '.join(diff)}); use another --run-dir")
        else:
            cfg_file.write_text(json.dumps(resolved, indent=1))

    def ckpt(self, stage: str) -> Path:
        return self.path / f"{stage}.pt"

    def done(self, stage: str) -> bool:
        p = self.ckpt(stage)
        return p.exists() and load_ckpt(p).get("done", False)

    def log(self, record: dict):
        with open(self.path / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")


def train_loop(run: Run, stage: str, steps: int, modules: dict, step_fn, every: int = 100,
               extra: dict | None = None):
    """Run `step_fn(step) -> {name: float}` for `steps` steps, resuming from the stage's checkpoint.

    `modules` maps names to things with state_dict()/load_state_dict() (models, optimisers, EMA
    copies); they are saved every `every` steps and at the end, atomically. A non-finite loss stops
    the run with a message, leaving the last good checkpoint in place."""
    path, start = run.ckpt(stage), 0
    if path.exists():
        ck = load_ckpt(path)
        check_config(ck, run.cfg, path, keys=None)
        for name, m in modules.items():
            m.load_state_dict(ck[name])
        start = ck["step"]
        torch.set_rng_state(ck["rng"])
        print(f"[{stage}] resuming from step {start}/{steps}")

    def save(step, done):
        state = {name: m.state_dict() for name, m in modules.items()}
        save_atomic({**state, **(extra or {}), "config": run.cfg.to_dict(), "stage": stage,
                     "step": step, "done": done, "rng": torch.get_rng_state()}, path)

    t0, last = time.time(), {}
    bar = tqdm(range(start, steps), desc=stage, initial=start, total=steps, dynamic_ncols=True,
               disable=None)
    for step in bar:
        last = step_fn(step)
        bad = [k for k, v in last.items() if not math.isfinite(v)]
        if bad:
            bar.close()
            raise TrainingError(f"stage {stage}: {bad[0]}={last[bad[0]]} at step {step}; "
                                f"stopped, the last good checkpoint is {path}")
        bar.set_postfix({k: f"{v:.4f}" for k, v in last.items()})
        if step % 10 == 0 or step == steps - 1:
            run.log({"stage": stage, "step": step, **last})
        if (step + 1) % every == 0 and step + 1 < steps:
            save(step + 1, False)
    save(steps, True)
    took = time.time() - t0
    summary = ", ".join(f"{k} {v:.4f}" for k, v in last.items())
    print(f"[{stage}] done: {steps - start} steps in {took / 60:.1f} min; last {summary}")
    run.log({"stage": stage, "event": "done", "seconds": took, "steps": steps - start})
    return took


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


def set_lr(opt, base: float, step: int, total: int, warmup: int = 100):
    """Linear warmup, then cosine decay to 10 % of `base` at `total` steps."""
    progress = min(1.0, step / max(1, total))
    lr = base * min(1.0, (step + 1) / warmup) * (0.55 + 0.45 * math.cos(math.pi * progress))
    for group in opt.param_groups:
        group["lr"] = lr


# ------------------------------------------------------------------------------------------------
# Stage 1: the bidirectional teacher
# ------------------------------------------------------------------------------------------------

def train_teacher(run: Run) -> float:
    cfg, dev = run.cfg, run.device
    model = hiar.VideoDiT(cfg).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.teacher_lr, weight_decay=0.0)
    ema = EMA(model, 0.999)
    data_gen = torch.Generator().manual_seed(run.seed)

    def step_fn(step):
        set_lr(opt, cfg.teacher_lr, step, cfg.teacher_steps)
        x0, _ = hiar.moving_shapes(cfg, cfg.batch, data_gen)
        x0 = x0.to(dev)
        sigma = hiar.sample_train_sigma(cfg.batch, device=dev)
        loss = hiar.flow_loss(model, x0, sigma, torch.randn_like(x0), causal=False)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema.update(model, min(0.999, (1 + step) / (10 + step)))
        return {"loss": loss.item()}

    # the data generator's state must survive a resume too: store it with the modules
    gen_state = _GenState(data_gen)
    return train_loop(run, "teacher", cfg.teacher_steps,
                      {"model": model, "ema": ema, "opt": opt, "data_rng": gen_state}, step_fn,
                      every=cfg.ckpt_every)


class _GenState:
    """Adapter so a torch.Generator is checkpointed like a module."""

    def __init__(self, g):
        self.g = g

    def state_dict(self):
        return {"state": self.g.get_state()}

    def load_state_dict(self, sd):
        self.g.set_state(sd["state"])


# ------------------------------------------------------------------------------------------------
# Stage 2: ODE pairs — teacher trajectories kept at the student's σ levels
# ------------------------------------------------------------------------------------------------

def make_ode_pairs(run: Run, teacher: hiar.VideoDiT) -> float:
    cfg, t0 = run.cfg, time.time()
    g = torch.Generator().manual_seed(run.seed + 1)
    sig = hiar.student_sigmas(cfg.K, cfg.shift)[:-1]
    states, finals = [], []
    for i in tqdm(range(0, cfg.ode_pairs, cfg.batch), desc="ode_pairs", disable=None):
        eps = torch.randn(min(cfg.batch, cfg.ode_pairs - i), cfg.frames, 3, cfg.size, cfg.size,
                          generator=g).to(run.device)
        st, x0 = hiar.teacher_ode(teacher, eps, sig, cfg.ode_steps, cfg.ode_shift)
        states.append(st.cpu())
        finals.append(x0.cpu())
    states, finals = torch.cat(states), torch.cat(finals)     # (M, K, T, 3, H, W), (M, T, …)
    bad_check(states, "ode_pairs", 0, run.ckpt("ode_pairs"))
    save_atomic({"states": states, "x0": finals, "sigmas": torch.tensor(sig),
                 "config": cfg.to_dict(), "done": True}, run.ckpt("ode_pairs"))
    took = time.time() - t0
    print(f"[ode_pairs] done: {len(finals)} trajectories in {took / 60:.1f} min")
    run.log({"stage": "ode_pairs", "event": "done", "seconds": took})
    return took


def bad_check(t, stage, step, path):
    if not torch.isfinite(t).all():
        raise TrainingError(f"stage {stage}: non-finite values at step {step}; "
                            f"stopped, the last good checkpoint is {path}")


# ------------------------------------------------------------------------------------------------
# Stage 3: ODE init — the block-causal student regressed onto the teacher's trajectories
# ------------------------------------------------------------------------------------------------

def train_ode_init(run: Run, teacher: hiar.VideoDiT, pairs: dict) -> float:
    """CausVid / Self-Forcing initialisation: from x at the student's level σ_j (all blocks at the
    same level, block-causal mask), predict the teacher ODE's endpoint x0."""
    cfg, dev = run.cfg, run.device
    student = copy.deepcopy(teacher).requires_grad_(True)
    opt = torch.optim.AdamW(student.parameters(), lr=cfg.init_lr, weight_decay=0.0)
    states, x0s = pairs["states"], pairs["x0"]
    sig = pairs["sigmas"]
    g = torch.Generator().manual_seed(run.seed + 2)

    def step_fn(step):
        set_lr(opt, cfg.init_lr, step, cfg.init_steps)
        idx = torch.randint(len(x0s), (cfg.batch,), generator=g)
        j = torch.randint(len(sig), (cfg.batch,), generator=g)
        x, target = states[idx, j].to(dev), x0s[idx].to(dev)
        loss = torch.nn.functional.mse_loss(student.x0(x, sig[j].to(dev), causal=True), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        return {"loss": loss.item()}

    return train_loop(run, "ode_init", cfg.init_steps,
                      {"model": student, "opt": opt, "data_rng": _GenState(g)}, step_fn,
                      every=cfg.ckpt_every)


# ------------------------------------------------------------------------------------------------
# Stage 4-6: self-rollout DMD (+ forward KL), in either order, with an EMA
# ------------------------------------------------------------------------------------------------

SAMPLERS = {"block": hiar.sample_block_major, "step": hiar.sample_step_major}


def rollout(student, cfg: hiar.Config, order: str, context_t: str, g, dev, exit_step=None):
    """A self-rollout of a training-length video with the student's own sampler."""
    noise = hiar.noise_bank(cfg, cfg.dmd_batch, cfg.frames, g, dev)
    return SAMPLERS[order](student, noise, context_t=context_t, exit_step=exit_step)


def train_dmd(run: Run, stage: str, teacher, init: hiar.VideoDiT, pairs: dict, order: str,
              fkl_weight: float, context_t: str) -> float:
    """Self-rollout distillation (the paper's training recipe): each generator update rolls out
    a video with the student's own sampler, exits every block at one random step j* (no gradient
    before it, gradient only through step j*'s prediction), and follows the DMD gradient; the
    critic (fake score) learns the student's current distribution with the flow loss,
    `critic_ratio` updates per generator update. FKL adds λ·L_FKL on the first step."""
    cfg, dev = run.cfg, run.device
    gen = copy.deepcopy(init).requires_grad_(True)
    critic = copy.deepcopy(teacher).requires_grad_(True)
    teacher.requires_grad_(False)
    opt_g = torch.optim.Adam(gen.parameters(), lr=cfg.gen_lr, betas=(0.0, 0.999))
    opt_c = torch.optim.Adam(critic.parameters(), lr=cfg.critic_lr, betas=(0.0, 0.999))
    ema = EMA(gen, cfg.ema)
    g = torch.Generator().manual_seed(run.seed + 3)
    sig0 = float(pairs["sigmas"][0])
    fkl_target = hiar.chord_x0(pairs["states"][:, 0], pairs["states"][:, 1], sig0,
                               float(pairs["sigmas"][1])) if cfg.K > 1 else pairs["x0"]

    def step_fn(step):
        for _ in range(cfg.critic_ratio):                           # fake score: flow loss
            with torch.no_grad():
                x0 = rollout(gen, cfg, order, context_t, g, dev,
                             int(torch.randint(cfg.K, (1,), generator=g)))
            sigma = hiar.sample_train_sigma(cfg.dmd_batch, g).to(dev)
            c_loss = hiar.flow_loss(critic, x0, sigma, torch.randn(x0.shape, generator=g).to(dev))
            opt_c.zero_grad(set_to_none=True)
            c_loss.backward()
            torch.nn.utils.clip_grad_norm_(critic.parameters(), 1.0)
            opt_c.step()
        exit_step = int(torch.randint(cfg.K, (1,), generator=g))   # shared by all blocks
        x0 = rollout(gen, cfg, order, context_t, g, dev, exit_step)
        loss = d_loss = hiar.dmd_loss(x0, teacher, critic, generator=g)
        logs = {"dmd": d_loss.item(), "critic": c_loss.item()}
        if fkl_weight > 0:
            idx = torch.randint(len(fkl_target), (cfg.dmd_batch,), generator=g)
            f_loss = hiar.fkl_loss(gen, pairs["states"][idx, 0].to(dev), fkl_target[idx].to(dev),
                                   sig0, bidirectional=cfg.fkl_mode == "bidirectional")
            loss = loss + fkl_weight * f_loss
            logs["fkl"] = f_loss.item()
        opt_g.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(gen.parameters(), 1.0)
        opt_g.step()
        ema.update(gen, 0.0 if step < cfg.ema_start else None)   # EMA follows from ema_start
        return logs

    return train_loop(run, stage, cfg.dmd_steps,
                      {"model": gen, "ema": ema, "critic": critic, "opt_g": opt_g, "opt_c": opt_c,
                       "data_rng": _GenState(g)}, step_fn, every=max(1, cfg.ckpt_every // 5),
                      extra={"order": order, "fkl_weight": fkl_weight, "context_t": context_t})


# ------------------------------------------------------------------------------------------------
# GIFs after each stage
# ------------------------------------------------------------------------------------------------

@torch.no_grad()
def stage_gif(run: Run, name: str, model: hiar.VideoDiT, teacher: bool = False, num: int = 4):
    """Data next to samples: teacher samples at the training length (ODE, 24 Euler steps), or a
    student's long rollouts (cfg.sample_frames) with both samplers on the same noise."""
    from sample import grid_frames, save_gif, to_uint8
    cfg, dev = run.cfg, run.device
    g = torch.Generator().manual_seed(1234)
    frames = cfg.frames if teacher else cfg.sample_frames
    data, _ = hiar.moving_shapes(cfg, num, g, frames)
    rows = {"data": to_uint8(data)}
    model.eval()
    if teacher:
        eps = torch.randn(num, frames, 3, cfg.size, cfg.size, generator=g).to(dev)
        rows["teacher"] = to_uint8(hiar.teacher_ode(model, eps, [], 24, cfg.ode_shift)[1])
    else:
        noise = hiar.noise_bank(cfg, num, frames, g, dev)
        rows[f"{name}: block-major"] = to_uint8(hiar.sample_block_major(model, noise))
        rows[f"{name}: step-major"] = to_uint8(hiar.sample_step_major(model, noise))
    path = run.path / f"{name}.gif"
    save_gif(path, grid_frames(rows, per_row=num))
    return path


# ------------------------------------------------------------------------------------------------
# The whole pipeline
# ------------------------------------------------------------------------------------------------

# Named students: (sampler order, forward-KL weight (None = the config's λ), context level)
VARIANTS = {"hiar": ("step", None, None), "self_forcing": ("block", 0.0, "clean"),
            "hiar_no_fkl": ("step", 0.0, None)}


def resolve_students(args, cfg: hiar.Config) -> list[tuple]:
    """[(stage name, order, fkl weight, context level)] from --students / --order / … flags."""
    if args.order or args.fkl_weight is not None or args.context_t:
        order = args.order or "step"
        lam = cfg.fkl_weight if args.fkl_weight is None else args.fkl_weight
        ctx = args.context_t or (cfg.context_t if order == "step" else "clean")
        return [(args.name or f"student_{order}_fkl{lam:g}_{ctx}", order, lam, ctx)]
    out = []
    for name in filter(None, args.students.split(",")):
        if name not in VARIANTS:
            raise TrainingError(f"--students: unknown student {name!r}; known: {sorted(VARIANTS)}")
        order, lam, ctx = VARIANTS[name]
        out.append((name, order, cfg.fkl_weight if lam is None else lam, ctx or cfg.context_t))
    return out


def load_teacher(run: Run, from_scratch: bool, path) -> hiar.VideoDiT:
    if from_scratch:
        if not run.done("teacher"):
            train_teacher(run)
            model = load_model(run.ckpt("teacher"), run.cfg, "ema").to(run.device)
            stage_gif(run, "teacher", model, teacher=True)
        path = run.ckpt("teacher")
    teacher = load_model(path, run.cfg, key="ema").to(run.device)
    return teacher.eval().requires_grad_(False)


def ship(run: Run, stage: str, dest: Path, command: str):
    """A small, self-contained copy of a finished stage for checkpoints/: config, sampling weights
    (the EMA where there is one) in float16, and how it was made. About 2.5 MB."""
    ck = load_ckpt(run.ckpt(stage))
    if not ck.get("done"):
        raise TrainingError(f"stage {stage} of {run.path} is not finished; nothing shipped")
    weights = ck["ema"] if "ema" in ck else ck["model"]
    small = {"config": ck["config"], "model": {k: v.half() for k, v in weights.items()},
             "stage": stage, "note": f"{command} (seed {run.seed}; weights stored in float16)"}
    small.update({k: ck[k] for k in ("order", "fkl_weight", "context_t") if k in ck})
    save_atomic(small, dest / f"{stage}.pt")
    print(f"shipped {dest / f'{stage}.pt'}")


def run_all(args) -> Run:
    cfg = hiar.Config.preset(args.preset, **parse_overrides(args.set))
    dev = pick_device(args.device)
    torch.manual_seed(args.seed)
    run = Run(Path(args.run_dir or f"runs/{args.preset}_s{args.seed}"), cfg, dev, args.seed)
    students = resolve_students(args, cfg)
    print(f"run {run.path} on {dev}, preset {args.preset}, seed {args.seed}, "
          f"students {[s[0] for s in students]}")
    teacher_path = Path(args.teacher or SHIPPED / "teacher.pt")
    if not args.from_scratch and not teacher_path.exists():
        raise TrainingError(f"teacher checkpoint {teacher_path} is missing; pass --teacher PATH "
                            "or --from-scratch")
    times = {}
    teacher = load_teacher(run, args.from_scratch, teacher_path)
    if args.teacher_only:
        return run
    if not run.done("ode_pairs"):
        times["ode_pairs"] = make_ode_pairs(run, teacher)
    pairs = load_ckpt(run.ckpt("ode_pairs"))
    if not run.done("ode_init"):
        times["ode_init"] = train_ode_init(run, teacher, pairs)
        stage_gif(run, "ode_init", load_model(run.ckpt("ode_init"), cfg).to(dev))
    init = load_model(run.ckpt("ode_init"), cfg).to(dev)
    for name, order, lam, ctx in students:
        if not run.done(name):
            times[name] = train_dmd(run, name, teacher, init, pairs, order, lam, ctx)
            stage_gif(run, name, load_model(run.ckpt(name), cfg, "ema").to(dev))
    if times:
        print("stage times (min): " + ", ".join(f"{k} {v / 60:.1f}" for k, v in times.items()))
    if args.ship:
        command = "python train_toy.py " + " ".join(sys.argv[1:])
        for stage in ["ode_init"] + [s[0] for s in students]:
            ship(run, stage, Path(args.ship), command)
    return run


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", default="toy", help=f"config preset: {sorted(hiar.PRESETS)}")
    p.add_argument("--run-dir", default=None, help="run directory (default runs/<preset>_s<seed>)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cuda, mps or cpu (default: autodetect)")
    p.add_argument("--from-scratch", action="store_true",
                   help="train the teacher too instead of using checkpoints/teacher.pt")
    p.add_argument("--teacher", default=None,
                   help="teacher checkpoint to distil from (default checkpoints/teacher.pt)")
    p.add_argument("--teacher-only", action="store_true",
                   help="with --from-scratch: stop after the teacher")
    p.add_argument("--students", default="hiar,self_forcing",
                   help=f"named students to train, comma-separated: {sorted(VARIANTS)}")
    p.add_argument("--order", choices=["block", "step"], default=None,
                   help="train one custom student with this sampler order (ablations)")
    p.add_argument("--fkl-weight", type=float, default=None,
                   help="forward-KL weight λ of the custom student (0 = off)")
    p.add_argument("--context-t", choices=list(hiar.CONTEXT_LEVELS), default=None,
                   help="context level of the custom student: current=t_j, next=t_{j+1}, clean")
    p.add_argument("--name", default=None, help="stage name of the custom student")
    p.add_argument("--ship", default=None, metavar="DIR",
                   help="afterwards, write small sampling checkpoints of the students to DIR")
    p.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE",
                   help="override Config fields, e.g. --set dmd_steps=200 gen_lr=1e-5")
    return p.parse_args(argv)


def parse_overrides(items):
    out = {}
    known = {f.name: f for f in dataclasses.fields(hiar.Config)}
    for item in items:
        if "=" not in item:
            raise TrainingError(f"--set {item!r}: expected FIELD=VALUE")
        k, v = item.split("=", 1)
        if k not in known:
            raise TrainingError(f"--set {k}: unknown Config field; known: {sorted(known)}")
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


def main(argv=None):
    args = parse_args(argv)
    run_all(args)


if __name__ == "__main__":
    try:
        main()
    except (TrainingError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        sys.exit(130)
