"""The ``ldm`` command: a lazy dispatcher, so ``ldm generate`` never imports torch.

``ldm export`` / ``ldm build-engines`` / ``ldm quantize`` live in ``export.cli``, ``ldm train`` in
``training.cli``; ``ldm generate`` and ``ldm bench`` are torch-free and live here.
"""
from __future__ import annotations

import sys
from importlib import import_module

# subcommand -> (module, function); imported only when that subcommand runs
COMMANDS = {
    "export": ("export.cli", "export_main"),
    "build-engines": ("export.cli", "build_engines_main"),
    "quantize": ("export.cli", "quantize_main"),
    "train": ("training.cli", "main"),
    "generate": ("ldm_runtime.generate", "main"),
    "bench": ("bench.runtime", "main"),
    "verify": ("ldm_runtime.verify", "main"),
    "serve": ("ldm_runtime.serve.cli", "main"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: ldm {" + ",".join(COMMANDS) + "} ...\n\n" + (__doc__ or "").strip())
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        print(f"ldm: unknown command {cmd!r}; expected one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module, func = COMMANDS[cmd]
    try:
        fn = getattr(import_module(module), func)
    except ModuleNotFoundError as e:
        print(f"ldm {cmd}: needs the module {e.name!r}, which is not installed "
              f"(install the extra for it, e.g. pip install 'ldm-runtime[export,train]')", file=sys.stderr)
        return 2
    return int(fn(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
