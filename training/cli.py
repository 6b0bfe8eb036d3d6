"""`ldm train vae|unet|lcm --key=value ... [--resume]`: thin argument handling over train_vae / train_unet / train_lcm.

Works under torchrun too: `torchrun --nproc_per_node 2 -m training.cli train unet ...`.
"""
from __future__ import annotations

import logging
import sys
from collections.abc import Callable

from training.common import ConfigError

logger = logging.getLogger(__name__)

USAGE = """usage: ldm train {vae,unet,lcm} [--key=value ...] [--resume]
       ldm train set-vae CHECKPOINT VAE_FOLDER

  ldm train vae  --out_dir=runs/vae  --max_steps=3000
  ldm train unet --out_dir=runs/unet --vae=runs/vae/vae --max_steps=20000
  ldm train vae  --out_dir=runs/dec --init=runs/vae/vae --train_encoder=false   decoder fine-tune
  ldm train set-vae checkpoints/default runs/dec/vae   put that decoder into a trained checkpoint
  ldm train lcm  --teacher=checkpoints/default --out_dir=runs/lcm   distil a checkpoint into a 4-step LCM student
  ldm train vae|unet|lcm --help      list every option with its default

Every option is a field of VAETrainConfig (training/train_vae.py), UNetTrainConfig (training/train_unet.py)
or LCMTrainConfig (training/train_lcm.py); --resume continues from OUT_DIR/train_state.safetensors."""


def _help(cls: type) -> str:
    import dataclasses
    return "\n".join(f"  --{f.name}={f.default!r}" for f in dataclasses.fields(cls))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "train":  # `python -m training.cli train vae ...`
        argv = argv[1:]
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    stage, rest = argv[0], argv[1:]
    if stage not in ("vae", "unet", "lcm", "set-vae"):
        print(f"ldm train: unknown stage {stage!r}; expected 'vae', 'unet', 'lcm' or 'set-vae'", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    if stage == "set-vae":
        if len(rest) != 2:
            print(f"ldm train set-vae: expected CHECKPOINT VAE_FOLDER, got {len(rest)} arguments", file=sys.stderr)
            return 2
        from training.checkpoint import CheckpointError, set_checkpoint_vae
        try:
            print(set_checkpoint_vae(rest[0], rest[1]))
        except (ConfigError, CheckpointError) as e:
            print(f"ldm train set-vae: {e}", file=sys.stderr)
            return 2
        return 0
    from training.data import DatasetError
    cls: type
    train: Callable[..., dict]
    if stage == "vae":
        from training import train_vae
        cls, train = train_vae.VAETrainConfig, train_vae.train
    elif stage == "lcm":
        from training import train_lcm
        cls, train = train_lcm.LCMTrainConfig, train_lcm.train
    else:
        from training import train_unet
        cls, train = train_unet.UNetTrainConfig, train_unet.train
    if any(a in ("-h", "--help") for a in rest):
        print(f"ldm train {stage} options (defaults):\n{_help(cls)}\n  --resume")
        return 0
    try:
        from training.common import parse_config
        cfg, resume = parse_config(cls, rest)
        train(cfg, resume=resume)
    except (ConfigError, DatasetError) as e:
        print(f"ldm train {stage}: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
