"""Repair the published tensorrt-stubs so that mypy can read them (``make typecheck`` runs this, then mypy).

    python tools/tensorrt_stubs.py [DEST]    # default .mypy_cache/tensorrt-stubs-fixed; prints DEST

Then ``MYPYPATH=DEST python -m mypy`` checks the files that mypy.ini names against TensorRT
10.13's API. Plain mypy without that MYPYPATH fails on "import tensorrt" rather than treating it
as Any. A dev tool, not shipped: the TensorRT code's only machine check where TensorRT is absent.
"""
from __future__ import annotations

import ast
import importlib.util
import re
import sys
from pathlib import Path

DEFAULT_DEST = Path(__file__).resolve().parents[1] / ".mypy_cache" / "tensorrt-stubs-fixed"
STUB_FILES = ("tensorrt/__init__.pyi", "tensorrt_bindings/__init__.pyi", "tensorrt_bindings/tensorrt.pyi")


def _split_params(s: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in s:
        depth += ch in "([{"
        depth -= ch in ")]}"
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    return [*parts, cur]


def _fix_stub_line(line: str) -> str:
    """Repair the two kinds of syntax error in the generated stubs: a parameter named ``in``,
    and parameters without a default after ones with a default."""
    line = re.sub(r"([(,]\s*)in(\s*:)", r"\1in_\2", line)
    m = re.match(r"^(\s*def \w+\()(.*)(\)\s*->.*)$", line)
    if m:
        seen_default, params = False, []
        for p in _split_params(m.group(2)):
            if "=" in p:
                seen_default = True
            elif seen_default and p.strip() and not p.strip().startswith("*"):
                p += " = ..."
            params.append(p)
        line = m.group(1) + ",".join(params) + m.group(3)
    return line


def prepare_trt_stubs(dest: Path) -> Path:
    """A copy of the installed tensorrt-stubs that mypy can read, under ``dest``; returns ``dest``.

    As published (10.13.0.35.1) the stubs lack a py.typed marker (so mypy skips them), do not
    parse (see ``_fix_stub_line``) and declare a module variable ``bool`` (``trt.bool``, a
    DataType) that shadows the builtin in every ``-> bool`` annotation; the copy fixes the three.
    """
    found = {}
    for pkg in ("tensorrt", "tensorrt_bindings"):
        spec = importlib.util.find_spec(pkg)
        for loc in (spec.submodule_search_locations or []) if spec else []:
            for rel in STUB_FILES:
                if rel.startswith(pkg + "/") and (Path(loc) / Path(rel).name).is_file():
                    found.setdefault(rel, Path(loc) / Path(rel).name)
    missing = [rel for rel in STUB_FILES if rel not in found]
    if missing:
        raise FileNotFoundError(f"tensorrt-stubs are not installed (missing {missing}); "
                                "make install installs tensorrt-stubs==10.13.0.35.1")
    for rel, src in found.items():
        lines = [ln for ln in src.read_text().splitlines() if not ln.startswith("bool: ")]
        for _ in range(200):
            try:
                ast.parse("\n".join(lines))
                break
            except SyntaxError as e:
                i = (e.lineno or 1) - 1
                fixed = _fix_stub_line(lines[i])
                if fixed == lines[i]:
                    raise
                lines[i] = fixed
        out = dest / rel
        out.parent.mkdir(parents=True, exist_ok=True)
        text = "\n".join(lines) + "\n"
        if not out.is_file() or out.read_text() != text:  # keep mtimes stable for mypy's cache
            out.write_text(text)
    return dest


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    try:
        dest = prepare_trt_stubs(Path(args[0]) if args else DEFAULT_DEST)
    except FileNotFoundError as e:
        print(f"tensorrt_stubs: {e}", file=sys.stderr)
        return 2
    print(dest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
