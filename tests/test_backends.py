"""Backend selection: the runtime without an onnxruntime build says which one to install."""
from __future__ import annotations

import sys
import types

import pytest

from ldm_runtime.backends import OnnxRuntimeUnavailable, load_engine


@pytest.mark.parametrize("installed", [None, types.ModuleType("onnxruntime")])
def test_missing_or_half_removed_onnxruntime_names_both_extras(monkeypatch, installed):
    # None: neither build installed; an empty module: both were installed and one uninstalled,
    # which leaves an onnxruntime/ folder without the package's contents
    monkeypatch.setitem(sys.modules, "onnxruntime", installed)
    with pytest.raises(OnnxRuntimeUnavailable) as e:
        load_engine(None, "unet", backend="onnxruntime", device="cpu")
    print(e.value)
    assert "pip install 'ldm-runtime[cpu]' (CPU) or 'ldm-runtime[gpu]' (CUDA)" in str(e.value)
    assert "exactly one" in str(e.value) and isinstance(e.value, RuntimeError)  # `ldm generate`: one line, exit 1

