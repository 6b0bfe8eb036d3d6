"""Shared pieces of the training loops (train_vae.py, train_unet.py): no trainer framework, just helpers.

- `parse_config`: a config dataclass plus type-checked `--key=value` overrides (and `--resume`).
- `save_state` / `load_state`: the resumable training state as ONE safetensors file whose
  metadata holds a JSON index (config, step, data position, RNG states, optimizer layout). It is
  written under a temporary name and renamed, so a crash leaves the previous state intact.
  Nothing is pickled: optimizer state tensors are flattened to `optim/<param>/<key>` tensors.
- `EMA`, `lr_at` (linear warm-up + cosine), `setup_distributed` (DDP under torchrun),
  `MetricsLog` (JSONL), `plot_curves` (loss-curve PNG), `progress` (a tqdm bar on stderr).
- The steps both loops share: `start_run`, `start_or_resume`, `save_run_state`, `scheduled_lr`,
  `LossWindow` (the logged means), `out_of_time` (--max_minutes), `end_run`.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import math
import os
import random
import sys
import time
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file

logger = logging.getLogger(__name__)

STATE_FILE = "train_state.safetensors"
STATE_VERSION = 1


class ConfigError(ValueError):
    """A bad `--key=value` override, config value or resume request; the message says what was expected."""


# ----------------------------------------------------------------------------------------------
# config: dataclass + --key=value overrides

def _parse_value(name: str, text: str, tp: Any) -> Any:
    """Parse `text` as type `tp` (int, float, bool, str, tuple[int, ...], X | None)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if text.lower() in ("none", "null", ""):
            if type(None) in args:
                return None
        for sub in (a for a in args if a is not type(None)):
            return _parse_value(name, text, sub)
    if origin is tuple:
        sub = args[0] if args else str
        return tuple(_parse_value(name, t.strip(), sub) for t in text.split(",") if t.strip())
    if tp is bool:
        low = text.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"--{name}: expected a boolean (true/false), got {text!r}")
    if tp in (int, float):
        try:
            return tp(text)
        except ValueError:
            raise ConfigError(f"--{name}: expected {tp.__name__}, got {text!r}") from None
    if tp is str:
        return text
    raise ConfigError(f"--{name}: cannot parse values of type {tp}")  # a config field type we do not support


def config_to_dict(cfg: Any) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def config_from_dict(cls: type, d: dict[str, Any]) -> Any:
    """Rebuild a config dataclass from its JSON dict (lists back to tuples); unknown keys are refused."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} keys {unknown}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def parse_config(cls: type, argv: list[str]) -> tuple[Any, bool]:
    """`--key=value` overrides of dataclass `cls` -> (config, resume). Raises ConfigError with the known keys."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    resume = False
    for arg in argv:
        if not arg.startswith("--"):
            raise ConfigError(f"expected --key=value arguments, got {arg!r}")
        key, sep, text = arg[2:].partition("=")
        key = key.replace("-", "_")
        if key == "resume" and (not sep or _parse_value("resume", text, bool)):
            resume = True
            continue
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=3)
            hint = f" (did you mean {', '.join('--' + c for c in close)}?)" if close else ""
            raise ConfigError(f"unknown option --{key}{hint}; known options: "
                              + ", ".join("--" + k for k in fields) + ", --resume")
        if not sep:
            if hints[key] is bool:
                text = "true"  # a bare --flag switches a boolean on
            else:
                raise ConfigError(f"--{key}: expected --{key}=VALUE ({_type_name(hints[key])})")
        values[key] = _parse_value(key, text, hints[key])
    try:
        cfg = cls(**values)
    except (TypeError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"invalid {cls.__name__}: {e}") from None
    cfg._explicit = frozenset(values)  # what the command line set: on --resume these override the saved config
    return cfg, resume


def resumed_config(index: dict, cfg: Any) -> Any:
    """The saved config of a run being resumed, with the fields the command line set (`parse_config`) on top.

    For a config built in Python (no `_explicit`), the fields that differ from their defaults count as set.
    """
    cls = type(cfg)
    if index.get("config_class") != cls.__name__:
        raise ConfigError(f"--resume: the training state holds a {index.get('config_class')}, not a {cls.__name__}")
    saved = config_from_dict(cls, index["config"])
    explicit = getattr(cfg, "_explicit", None)
    changed = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cls)
               if (f.name in explicit if explicit is not None else getattr(cfg, f.name) != _default(f))}
    return dataclasses.replace(saved, **changed)


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def check_choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(f"--{name}: expected one of {', '.join(map(str, choices))}, got {value!r}")


def check_positive(cfg: Any, *names: str) -> None:
    for name in names:
        v = getattr(cfg, name)
        if not v > 0:
            raise ConfigError(f"--{name}: expected a positive number, got {v!r}")


# ----------------------------------------------------------------------------------------------
# learning rate, EMA

def lr_at(step: int, base_lr: float, warmup_steps: int, max_steps: int, min_lr_ratio: float = 0.1) -> float:
    """Linear warm-up to base_lr, then cosine decay to base_lr * min_lr_ratio at max_steps."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return base_lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


class EMA:
    """Exponential moving average of a module's floating-point state (the weights that get exported).

    The decay ramps up as (1 + n) / (10 + n) so early averages are not dominated by the random init.
    """

    def __init__(self, module: torch.nn.Module, decay: float):
        self.decay = decay
        self.num_updates = 0
        self.shadow = {k: v.detach().clone().float() for k, v in module.state_dict().items()}

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        self.num_updates += 1
        d = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        for k, v in module.state_dict().items():
            if v.is_floating_point():
                self.shadow[k].lerp_(v.detach().float(), 1 - d)
            else:
                self.shadow[k].copy_(v)

    def copy_to(self, module: torch.nn.Module) -> None:
        module.load_state_dict({k: v.to(module.state_dict()[k].dtype) for k, v in self.shadow.items()})


# ----------------------------------------------------------------------------------------------
# distributed

@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup_distributed(device: str = "auto") -> Dist:
    """Read torchrun's RANK / WORLD_SIZE / LOCAL_RANK; init gloo (CPU) or nccl (CUDA) when world_size > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("--device=cuda: no CUDA device is available (use --device=cpu)")
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    elif device == "cpu":
        dev = torch.device("cpu")
    else:
        raise ConfigError(f"--device: expected auto, cpu or cuda, got {device!r}")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return Dist(rank, world, local, dev)


def cleanup_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def rank_mean(t: torch.Tensor, d: Dist) -> torch.Tensor:
    """``t`` averaged over the processes (itself without DDP): the logged losses are the global batch's."""
    if d.enabled:
        dist.all_reduce(t)
        t /= d.world_size
    return t


def shard(global_batch: int, d: Dist) -> slice:
    """This rank's rows of a global batch (the global batch must divide evenly)."""
    if global_batch % d.world_size:
        raise ConfigError(f"--batch_size={global_batch} must be divisible by the number of processes "
                          f"({d.world_size})")
    n = global_batch // d.world_size
    return slice(d.rank * n, (d.rank + 1) * n)


def epoch_order(n: int, epoch: int, seed: int) -> np.ndarray:
    """The sample order of one epoch: a pure function of (seed, epoch), identical on every rank."""
    return np.random.default_rng([seed, epoch, 7919]).permutation(n)


def batch_indices(n: int, batch: int, pos: tuple[int, int], seed: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Next `batch` dataset indices from data position (epoch, offset) -> (indices, new position)."""
    epoch, offset = pos
    out: list[int] = []
    while len(out) < batch:
        order = epoch_order(n, epoch, seed)
        take = order[offset:offset + batch - len(out)]
        out.extend(take.tolist())
        offset += len(take)
        if offset >= n:
            epoch, offset = epoch + 1, 0
    return np.asarray(out, dtype=np.int64), (epoch, offset)


# ----------------------------------------------------------------------------------------------
# training state: safetensors + JSON index, atomic

def _flatten_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], prefix: str) -> dict:
    sd = opt.state_dict()
    scalars: dict[str, dict[str, Any]] = {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{prefix}{pid}/{k}"] = v.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(pid), {})[k] = v
    return {"param_groups": sd["param_groups"], "scalars": scalars}


def _unflatten_optimizer(index: dict, tensors: dict[str, torch.Tensor], prefix: str) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for name, t in tensors.items():
        if name.startswith(prefix):
            pid, key = name[len(prefix):].split("/", 1)
            state.setdefault(int(pid), {})[key] = t
    for pid, d in index["scalars"].items():
        state.setdefault(int(pid), {}).update(d)
    return {"state": state, "param_groups": index["param_groups"]}


def rng_state_tensors(gens: dict[str, torch.Generator], tensors: dict[str, torch.Tensor]) -> dict:
    """Store torch (global and named generators), numpy and python RNG states; returns their JSON part."""
    tensors["rng/torch"] = torch.get_rng_state()
    for name, g in gens.items():
        tensors[f"rng/gen/{name}"] = g.get_state()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["rng/numpy"] = torch.from_numpy(np.asarray(keys).astype(np.int64))
    version, pystate, gauss = random.getstate()
    return {"numpy": [kind, int(pos), int(has_gauss), float(cached)], "python": [version, list(pystate), gauss]}


def restore_rng(index: dict, tensors: dict[str, torch.Tensor], gens: dict[str, torch.Generator]) -> None:
    torch.set_rng_state(tensors["rng/torch"])
    for name, g in gens.items():
        g.set_state(tensors[f"rng/gen/{name}"])
    kind, pos, has_gauss, cached = index["numpy"]
    np.random.set_state((kind, tensors["rng/numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))
    version, pystate, gauss = index["python"]
    random.setstate((version, tuple(pystate), gauss))


def save_state(path: Path, *, config: Any, step: int, data_pos: tuple[int, int],
               modules: dict[str, torch.nn.Module], emas: dict[str, EMA],
               optimizers: dict[str, torch.optim.Optimizer], generators: dict[str, torch.Generator],
               extra: dict | None = None) -> Path:
    """Write the whole training state to `path` atomically (temporary name in the same folder, then rename)."""
    tensors: dict[str, torch.Tensor] = {}
    for name, m in modules.items():
        for k, v in m.state_dict().items():
            tensors[f"model/{name}/{k}"] = v.detach().contiguous().cpu()
    for name, e in emas.items():
        for k, v in e.shadow.items():
            tensors[f"ema/{name}/{k}"] = v.contiguous().cpu()
    index = {
        "version": STATE_VERSION, "config_class": type(config).__name__, "config": config_to_dict(config),
        "step": step, "data_pos": list(data_pos),
        "ema_updates": {n: e.num_updates for n, e in emas.items()},
        "optimizers": {n: _flatten_optimizer(o, tensors, f"optim/{n}/") for n, o in optimizers.items()},
        "rng": rng_state_tensors(generators, tensors),
        "extra": extra or {},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file(tensors, str(tmp), metadata={"index": json.dumps(index)})
    with open(tmp, "rb+") as f:  # the bytes are on disk before the rename makes them the state
        os.fsync(f.fileno())
    os.replace(tmp, path)
    # a readable copy of the index for people; the safetensors metadata is the source of truth
    (path.with_suffix(".json")).write_text(json.dumps({k: v for k, v in index.items() if k != "rng"}, indent=1))
    return path


def read_state(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    if not path.is_file():
        raise ConfigError(f"--resume: no training state at {path} (train once without --resume first)")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if "index" not in meta:
            raise ConfigError(f"{path}: not a training state file (no JSON index in its metadata)")
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    index = json.loads(meta["index"])
    if index.get("version") != STATE_VERSION:
        raise ConfigError(f"{path}: training state version {index.get('version')!r}, this code reads {STATE_VERSION}")
    return index, tensors


def load_state(path: Path, *, modules: dict[str, torch.nn.Module], emas: dict[str, EMA],
               optimizers: dict[str, torch.optim.Optimizer], generators: dict[str, torch.Generator]) -> dict:
    """Restore what `save_state` wrote into the given objects; returns the JSON index (step, data_pos, ...)."""
    index, tensors = read_state(path)
    for name, m in modules.items():
        pre = f"model/{name}/"
        m.load_state_dict({k[len(pre):]: v for k, v in tensors.items() if k.startswith(pre)})
    for name, e in emas.items():
        pre = f"ema/{name}/"
        e.shadow = {k[len(pre):]: v.clone() for k, v in tensors.items() if k.startswith(pre)}
        e.num_updates = index["ema_updates"][name]
    for name, o in optimizers.items():
        o.load_state_dict(_unflatten_optimizer(index["optimizers"][name], tensors, f"optim/{name}/"))
    restore_rng(index["rng"], tensors, generators)
    return index


# ----------------------------------------------------------------------------------------------
# the steps both loops share: start or resume, learning rate, state, log window, time limit, end

def start_run(cfg: Any, resume: bool) -> tuple[Any, Dist]:
    """Threads and processes, the config (on resume: the run's resolved one with this command's
    explicit overrides on top), then the global seeds."""
    set_threads(cfg.threads)
    d = setup_distributed(cfg.device)
    if resume:
        cfg = resumed_config(read_state(Path(cfg.out_dir) / STATE_FILE)[0], cfg)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    return cfg, d


def start_or_resume(cfg: Any, resume: bool, d: Dist, metrics: MetricsLog, state: dict) -> tuple[int, tuple[int, int]]:
    """(step, data position). On resume the objects in `state` (the keyword arguments of `save_state`)
    are restored from OUT_DIR's training state; a fresh run writes OUT_DIR/config.json."""
    out = Path(cfg.out_dir)
    if resume:
        index = load_state(out / STATE_FILE, **state)
        metrics.truncate_after(index["step"])
        logger.info("resumed %s at step %d", out / STATE_FILE, index["step"])
        return index["step"], tuple(index["data_pos"])
    if d.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(config_to_dict(cfg), indent=2) + "\n")
    return 0, (0, 0)


def save_run_state(cfg: Any, step: int, pos: tuple[int, int], d: Dist, state: dict) -> None:
    """Rank 0 writes OUT_DIR's training state (see `start_or_resume` for `state`)."""
    if d.is_main:
        save_state(Path(cfg.out_dir) / STATE_FILE, config=cfg, step=step, data_pos=pos, **state)


def scheduled_lr(opt: torch.optim.Optimizer, step: int, cfg: Any) -> float:
    """Set this step's learning rate (`lr_at` with the config's lr, warmup_steps, max_steps, min_lr_ratio)."""
    lr = lr_at(step, cfg.lr, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio)
    for group in opt.param_groups:
        group["lr"] = lr
    return lr


class LossWindow:
    """Loss terms summed over the steps since the last log line: each line logs their means."""

    def __init__(self, names: tuple[str, ...]):
        self.names = names
        self._reset()

    def _reset(self) -> None:
        self.sums, self.n, self.since = torch.zeros(len(self.names)), 0, time.time()

    def add(self, *terms: torch.Tensor) -> None:
        self.sums += torch.stack([v.detach().float().cpu() for v in terms])
        self.n += 1

    def means(self, d: Dist) -> tuple[dict[str, float], float]:
        """({name: mean over the window and the processes}, seconds per step); starts a new window."""
        vals = rank_mean(self.sums / self.n, d)
        sec_per_step = (time.time() - self.since) / self.n
        self._reset()
        return dict(zip(self.names, map(float, vals))), sec_per_step


def out_of_time(cfg: Any, t0: float, step: int) -> bool:
    """True once --max_minutes have passed since `t0` (the loop then stops; state and export are still written)."""
    if cfg.max_minutes and time.time() - t0 > cfg.max_minutes * 60:
        logger.warning("stopping at step %d: --max_minutes=%g reached", step, cfg.max_minutes)
        return True
    return False


def end_run(d: Dist) -> None:
    """Wait for every process, then leave the process group."""
    if d.enabled:
        dist.barrier()
    cleanup_distributed()


# ----------------------------------------------------------------------------------------------
# what a user sees: metrics JSONL, loss-curve PNG, progress bar

class MetricsLog:
    """Append-only JSONL: one object per logged step or evaluation (rank 0 only writes)."""

    def __init__(self, path: Path, enabled: bool = True):
        self.path, self.enabled = path, enabled

    def write(self, **record: Any) -> None:
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def truncate_after(self, step: int) -> None:
        """On resume, drop records written after the state being resumed (they will be written again)."""
        if not (self.enabled and self.path.is_file()):
            return
        keep = [ln for ln in self.path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= step]
        self.path.write_text("".join(ln + "\n" for ln in keep))


def plot_curves(metrics_path: Path, out_png: Path, keys: tuple[str, ...]) -> Path | None:
    """Plot the given metric keys against step from the JSONL log into a PNG (matplotlib, Agg)."""
    if not metrics_path.is_file():
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(ln) for ln in metrics_path.read_text().splitlines() if ln.strip()]
    present = [k for k in keys if any(k in r for r in rows)]
    if not present:
        return None
    fig, axes = plt.subplots(1, len(present), figsize=(4 * len(present), 3), squeeze=False)
    for ax, k in zip(axes[0], present):
        pts = [(r["step"], r[k]) for r in rows if k in r and r[k] is not None]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], lw=1)
        ax.set_title(k)
        ax.set_xlabel("step")
        if k.startswith("loss") and all(p[1] > 0 for p in pts):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = out_png.with_name(f".{out_png.name}.tmp.png")
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    os.replace(tmp, out_png)
    return out_png


def progress(total: int, initial: int, enabled: bool, desc: str):
    """A tqdm bar on stderr (loss and speed go in its postfix); a no-op object when disabled."""
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, disable=not enabled, desc=desc, file=sys.stderr,
                dynamic_ncols=True, mininterval=2.0, unit="step")


def save_grid(images: np.ndarray, path: Path, ncols: int) -> Path:
    """float (N, H, W, 3) in [0, 1] -> one PNG grid, row-major."""
    from PIL import Image
    n, h, w, _ = images.shape
    rows = math.ceil(n / ncols)
    grid = np.ones((rows * (h + 2), ncols * (w + 2), 3), np.float32)
    for i, im in enumerate(images):
        r, c = divmod(i, ncols)
        grid[r * (h + 2) + 1:r * (h + 2) + 1 + h, c * (w + 2) + 1:c * (w + 2) + 1 + w] = im
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((grid.clip(0, 1) * 255).round().astype(np.uint8)).save(path)
    return path


def set_threads(n: int) -> None:
    """0 keeps torch's default. One thread per process is fastest on a shared, oversubscribed CPU."""
    if n > 0:
        torch.set_num_threads(n)
