"""``ldm verify BUNDLE [--backend NAME [--device DEV]]``: check a bundle, one line per problem; exit 0 only if clean.

What it checks, with no ``--backend``: the manifest (everything ``Manifest.load`` validates); every
file in ``files`` (inside the bundle, size, sha256); that every file a field names (graphs of every
component and variant, their external data, the tokenizers, TensorRT plans) is listed there; that
the tokenizers parse; and that each ONNX graph (portable and CPU variant) opens on onnxruntime's CPU
with the inputs and outputs the manifest declares (names, dtypes, ranks: the checks an engine makes
when it opens). TensorRT plans are checked as files only (they need their GPU to open).

With ``--backend``: the manifest, then only the files that backend reads on ``--device``
(``pipeline.files_in_use``, the list ``Pipeline.load`` hashes): onnxruntime's graphs (on the CPU
the variants where there are any) and their weights, or TensorRT's plans; and for onnxruntime
those graphs opened as above.
"""
from __future__ import annotations

import sys
from typing import Any, Callable, Iterable

from .backends import BACKENDS, require_onnxruntime
from .backends.onnxruntime import OrtOptions, check_graph, open_session, read_external_data, session_options
from .cliargs import ArgumentParser, UsageError, one_line
from .manifest import COMPONENTS, BundleError, Manifest
from .pipeline import files_in_use, graph_files, load_tokenizer

DEFAULT_DEVICE = {"onnxruntime": "cpu", "tensorrt": "cuda", "openvino": "cpu"}


def verify_bundle(bundle: str, backend: str | None = None, device: str | None = None) -> list[str]:
    """Every problem found in ``bundle``, one message each; empty when it is clean.

    ``backend`` (and ``device``, default: cpu for onnxruntime, cuda for tensorrt): check only what that
    backend reads there; None: every file of the bundle.
    """
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    try:
        manifest = Manifest.load(bundle, verify=False)
    except BundleError as e:
        return [one_line(e)]
    graphs = _all_graphs(manifest)
    if backend is None:
        problems = [*_file_problems(manifest), *_reference_problems(manifest)]
    else:
        try:
            in_use = files_in_use(manifest, tuple(manifest.data["components"]), backend, device or DEFAULT_DEVICE[backend])
        except BundleError as e:
            return [one_line(e)]
        problems = _checks(lambda rel=rel: manifest.verify_files([rel]) for rel in in_use)
        graphs = [g for g in graphs if g[1] in in_use]  # none for tensorrt: it reads plans only
    if not problems:  # parsing and opening read only files that passed above
        problems += [*_tokenizer_problems(manifest), *_graph_problems(manifest, graphs)]
    return list(dict.fromkeys(problems))


def _checks(checks: Iterable[Callable[[], Any]]) -> list[str]:
    """Run each check; the errors it raises (``BundleError``, a tokenizer's ``ValueError``), one line each."""
    out = []
    for check in checks:
        try:
            check()
        except (BundleError, ValueError) as e:
            out.append(one_line(e))
    return out


def _file_problems(m: Manifest) -> list[str]:
    files = m.data.get("files")
    if not isinstance(files, dict):
        return [f"{m.root}: manifest field files: expected an object file -> {{sha256, bytes}}"]
    return _checks(lambda rel=rel: m.verify_files([rel]) for rel in files)


def _referenced(m: Manifest) -> list[tuple[Any, str]]:
    """(file, manifest field) of every file a field of the manifest names."""
    refs = [(m.data[field].get(k), f"{field}.{k}") for field in _tokenizer_fields(m) for k in ("vocab", "merges")]
    for comp in m.data["components"]:
        refs += graph_files(m, comp, cpu_variant=False) + graph_files(m, comp, cpu_variant=True)
        if "lora_map" in m.data["components"][comp]:
            refs.append((m.data["components"][comp]["lora_map"], f"components.{comp}.lora_map"))
    for key, rec in (m.data.get("engines") or {}).items():
        refs.append((rec.get("file") if isinstance(rec, dict) else None, f"engines.{key}.file"))
    return list(dict.fromkeys(refs))


def _reference_problems(m: Manifest) -> list[str]:
    def check(rel: Any, field: str) -> None:
        m.path(rel, field=field)
        m.file_record(rel)

    return _checks(lambda rel=rel, field=field: check(rel, field) for rel, field in _referenced(m))


def _tokenizer_fields(m: Manifest) -> list[str]:
    """The tokenizers the manifest names: ``tokenizer`` and SDXL's ``tokenizer_2`` (a refiner has only that one)."""
    return [field for field in ("tokenizer", "tokenizer_2") if isinstance(m.data.get(field), dict)]


def _tokenizer_problems(m: Manifest) -> list[str]:
    return _checks(lambda field=field: load_tokenizer(m, field) for field in _tokenizer_fields(m))


Graph = tuple[str, Any, dict, str]  # (component, file, its manifest entry, the entry's field)


def _all_graphs(m: Manifest) -> list[Graph]:
    """Every ONNX graph of the bundle: each component's portable graph and its CPU variant."""
    out = []
    for comp in (c for c in COMPONENTS if c in m.data["components"]):
        info = m.component(comp)
        out.append((comp, info.file, info.extra, f"components.{comp}"))
        variant = info.extra.get("cpu_variant") or {}
        if variant.get("file"):
            out.append((comp, variant["file"], variant, f"components.{comp}.cpu_variant"))
    return out


def _graph_problems(m: Manifest, graphs: list[Graph]) -> list[str]:
    """Each of ``graphs`` opened on onnxruntime CPU from its verified bytes and checked against the manifest
    as an engine open checks it (``onnxruntime.check_graph``)."""
    problems = []
    for comp, rel, entry, where in graphs:
        info = m.component(comp)
        try:
            check_graph(comp, _session(m, rel, entry, where, comp), info.inputs, info.outputs)
        except BundleError as e:
            problems.append(f"{m.root}: {where}.file {rel!r}: {one_line(e)}")
    return problems


def _session(m: Manifest, rel: str, entry: dict, where: str, component: str) -> Any:
    require_onnxruntime()
    model = m.read_verified(rel, field=f"{where}.file")
    data = read_external_data(m, model, entry.get("external_data") or [], where)
    try:
        return open_session(model, session_options(OrtOptions(threads=1, opt_level="disable"), component), "cpu",
                            external_data=data)
    except Exception as e:  # onnxruntime's own errors (its exception types are not exported)
        raise BundleError(f"onnxruntime cannot open it: {one_line(e)[:300]}") from None


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="ldm verify", description="Check the files of a bundle, its manifest and graphs.")
    parser.add_argument("bundle", help="bundle folder (with manifest.json)")
    parser.add_argument("--backend", choices=BACKENDS, default=None,
                        help="check only the files this backend reads (default: every file of the bundle)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="with --backend: the device it reads them for (default: cpu for onnxruntime, "
                             "cuda for tensorrt)")
    try:
        args = parser.parse_args(argv)
        if args.device is not None and args.backend is None:
            raise UsageError("--device needs --backend")
        if args.backend == "tensorrt" and args.device not in (None, "cuda"):
            raise UsageError(f"backend tensorrt runs on device cuda, got --device {args.device}")
    except UsageError as e:
        print(f"ldm verify: {e}", file=sys.stderr)
        return 2
    problems = verify_bundle(args.bundle, args.backend, args.device)
    for line in problems:
        print(line)
    if problems:
        print(f"ldm verify: {len(problems)} problem(s) in {args.bundle}", file=sys.stderr)
        return 2
    print(f"{args.bundle}: ok")
    return 0
