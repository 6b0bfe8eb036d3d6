"""ldm_runtime never imports torch, transformers, diffusers, training or export (ARCHITECTURE.md)."""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import ldm_runtime

PKG = Path(ldm_runtime.__file__).parent
FORBIDDEN_LOADED = ("torch", "transformers", "diffusers", "training", "export")
FORBIDDEN_IMPORTS = ("torch", "training", "export", "transformers", "diffusers")
# the TensorRT backend needs tensorrt / cuda-python, absent here; it is type-checked instead
SKIP_MODULES = {"ldm_runtime.backends.tensorrt"}


def runtime_modules() -> list[str]:
    mods = []
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        name = ".".join(parts)
        if name not in SKIP_MODULES and parts[-1] != "__main__":
            mods.append(name)
    return mods


def test_import_pulls_no_torch():
    mods = runtime_modules()
    assert "ldm_runtime.pipeline" in mods and "ldm_runtime.generate" in mods, mods
    code = f"""
import importlib, json, sys
import ldm_runtime
from ldm_runtime import Pipeline, Img2ImgPipeline, CLIPTokenizer, make_scheduler
for m in {mods!r}:
    importlib.import_module(m)
print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {FORBIDDEN_LOADED!r})))
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    loaded = json.loads(res.stdout.strip().splitlines()[-1])
    print(f"imported {len(mods)} runtime modules; forbidden modules loaded: {loaded}")
    assert loaded == []


def _imported_names(tree: ast.AST) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.lineno, node.module))
        elif isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) in (
                "import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant):
            out.append((node.lineno, str(node.args[0].value)))
    return out


def test_no_forbidden_imports_in_source():
    bad = []
    files = sorted(PKG.rglob("*.py"))
    for path in files:
        for lineno, name in _imported_names(ast.parse(path.read_text(), str(path))):
            if name.split(".")[0] in FORBIDDEN_IMPORTS:
                bad.append(f"{path.relative_to(PKG.parent)}:{lineno} imports {name}")
    print(f"checked {len(files)} files under ldm_runtime/")
    assert not bad, "\n".join(bad)


def test_static_check_catches_a_torch_import():
    # the checker itself must see every import form it is meant to refuse
    src = "import torch\nfrom training.checkpoint import x\nimport importlib\nimportlib.import_module('export.cli')\n"
    names = [n for _, n in _imported_names(ast.parse(src))]
    assert {"torch", "training.checkpoint", "export.cli"} <= set(names)
