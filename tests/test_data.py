"""The built-in shapes dataset and the folder loader."""
import json
import re
import time

import numpy as np
import pytest
import torch
from PIL import Image

from training.data import (COLOURS, HELDOUT_COMBOS, KINDS, PALETTE, DatasetError, FolderDataset,
                           ShapesDataset, caption_corpus, collate, to_tensor, to_uint8)

# An independent reading of the captions: every word the templates may use for an attribute.
SIZE_WORDS = {"small": "small", "little": "small", "large": "large", "big": "large"}
CELL_WORDS = {
    "top left corner": (0, 0), "top left": (0, 0), "top right corner": (0, 2), "top right": (0, 2),
    "bottom left corner": (2, 0), "bottom left": (2, 0), "bottom right corner": (2, 2),
    "bottom right": (2, 2), "top middle": (0, 1), "top center": (0, 1), "top": (0, 1),
    "bottom middle": (2, 1), "bottom center": (2, 1), "bottom": (2, 1), "left side": (1, 0),
    "left": (1, 0), "right side": (1, 2), "right": (1, 2), "center": (1, 1), "centre": (1, 1),
    "middle": (1, 1),
}
_CELL_ALT = "|".join(sorted(CELL_WORDS, key=len, reverse=True))
OBJ_RE = re.compile(rf"\b({'|'.join(SIZE_WORDS)}) ({'|'.join(COLOURS)}) ({'|'.join(KINDS)})\b")
POS_RE = re.compile(rf"(?:in|at|on) the ({_CELL_ALT})\b")


def parse_caption(caption: str) -> tuple[str, list[tuple[str, str, str, tuple[int, int]]]]:
    """caption -> (background, [(size, colour, kind, cell), ...]) in order of mention."""
    objs = list(OBJ_RE.finditer(caption))
    out = []
    for j, m in enumerate(objs):
        rest = caption[m.end():objs[j + 1].start() if j + 1 < len(objs) else len(caption)]
        pos = POS_RE.search(rest)
        out.append((SIZE_WORDS[m[1]], m[2], m[3], CELL_WORDS[pos[1]]))
    leftover = OBJ_RE.sub("", caption)
    bgs = re.findall(rf"\b({'|'.join(COLOURS)})\b", leftover)
    assert len(bgs) == 1, f"expected one background colour in {caption!r}, found {bgs}"
    return bgs[0], out


def test_same_index_same_sample_in_any_order():
    a = ShapesDataset("train", size=32, length=50, seed=3)
    b = ShapesDataset("train", size=32, length=50, seed=3)
    forward = [a[i] for i in range(20)]
    backward = [b[i] for i in reversed(range(20))][::-1]
    for (xa, ca, ta), (xb, cb, tb) in zip(forward, backward):
        assert torch.equal(xa, xb) and ca == cb and ta == tb
    assert torch.equal(a[7][0], a[-43][0])  # negative indices wrap like a list
    other = ShapesDataset("train", size=32, length=50, seed=4)
    differ = sum(not torch.equal(a[i][0], other[i][0]) for i in range(20))
    print(f"seed 3 vs seed 4: {differ}/20 images differ")
    assert differ >= 18
    with pytest.raises(IndexError):
        a[50]


def test_images_shape_range_and_round_trip():
    ds = ShapesDataset("val", size=32, length=10)
    x, caption, attrs = ds[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    img = ds.sample(0)[0]
    assert img.shape == (32, 32, 3) and img.dtype == np.uint8
    assert np.array_equal(to_uint8(to_tensor(img)), img)
    for o in attrs.objects:  # the object's colour sits at its centre, the background in a corner
        cx, cy = (int(v) for v in o.center)
        assert tuple(img[cy, cx]) == PALETTE[o.colour], (caption, o)
    assert tuple(img[0, 0]) == PALETTE[attrs.background]


def test_generation_speed():
    ds = ShapesDataset("train", size=64, length=1000)
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(1000):
        ds.sample(i)
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    print(f"1000 images at 64 px: {dt:.2f} s wall, {cpu:.2f} s CPU")
    assert cpu < 5  # about 0.75 s CPU on the 2-core dev machine; loose for slow CI hosts


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_caption_names_exactly_the_drawn_attributes(split):
    ds = ShapesDataset(split, size=64, length=600, seed=1)
    templates = set()
    for i in range(600):
        attrs, caption = ds.attrs(i)
        bg, objs = parse_caption(caption)
        want = [(o.size, o.colour, o.kind, o.cell) for o in attrs.objects]
        assert (bg, objs) == (attrs.background, want), caption
        if caption.startswith(("one ", "two ")):
            assert {"one": 1, "two": 2}[caption.split()[0]] == len(want), caption
        templates.add(OBJ_RE.sub("O", POS_RE.sub("P", caption)).replace(bg, "B"))
    print(f"{split}: {len(templates)} distinct caption templates in 600 samples")
    assert len(templates) >= 10


def test_heldout_combinations_only_in_heldout_split():
    train = ShapesDataset("train", length=5000)
    seen = {(o.colour, o.kind) for i in range(5000) for o in train.attrs(i)[0].objects}
    assert not seen & HELDOUT_COMBOS
    assert len(seen) == len(COLOURS) * len(KINDS) - len(HELDOUT_COMBOS)  # all the others occur
    val = ShapesDataset("val", length=1000)
    assert not {(o.colour, o.kind) for i in range(1000) for o in val.attrs(i)[0].objects} & HELDOUT_COMBOS
    held = ShapesDataset("heldout", length=500)
    found = set()
    for i in range(500):
        combos = {(o.colour, o.kind) for o in held.attrs(i)[0].objects}
        assert combos & HELDOUT_COMBOS, f"held-out sample {i} has no held-out object: {combos}"
        found |= combos & HELDOUT_COMBOS
    assert found == HELDOUT_COMBOS


def test_objects_are_apart_inside_and_not_background_coloured():
    ds = ShapesDataset("train", size=64, length=2000)
    n_two = 0
    for i in range(2000):
        attrs, _ = ds.attrs(i)
        for o in attrs.objects:
            x0, y0, x1, y1 = o.bbox
            assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64 and o.colour != attrs.background
        if len(attrs.objects) == 2:
            n_two += 1
            a, b = (o.bbox for o in attrs.objects)
            gap = max(b[0] - a[2], a[0] - b[2], b[1] - a[3], a[1] - b[3])
            assert gap >= 1 and attrs.objects[0].cell != attrs.objects[1].cell
    print(f"{n_two}/2000 samples have two objects")
    assert 850 < n_two < 1150


def test_caption_corpus_and_collate():
    corpus = caption_corpus(200)
    assert corpus == ShapesDataset("train", length=200).caption_corpus()
    loader = torch.utils.data.DataLoader(ShapesDataset("train", size=32, length=8), batch_size=4,
                                         collate_fn=collate)
    x, captions, attrs = next(iter(loader))
    assert x.shape == (4, 3, 32, 32) and captions == corpus[:4] and len(attrs) == 4


# ---- the folder loader ----

def _png(path, size=(24, 16), colour=(0, 0, 255)):
    Image.new("RGB", size, colour).save(path)


@pytest.fixture
def messy_folder(tmp_path):
    _png(tmp_path / "good.png", (60, 30), (255, 0, 0))
    Image.new("RGB", (30, 30), (0, 0, 255)).save(tmp_path / "centre.png")
    (tmp_path / "good.txt").write_text("a red thing\n")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    (tmp_path / "broken.txt").write_text("never seen")
    _png(tmp_path / "uncaptioned.png")
    _png(tmp_path / "blank.png")
    (tmp_path / "blank.txt").write_text("  \n")
    (tmp_path / "sub").mkdir()
    _png(tmp_path / "sub" / "deep.jpg")
    (tmp_path / "sub" / "deep.txt").write_text("a blue thing")
    (tmp_path / "notes.md").write_text("not an image")
    return tmp_path


def test_folder_sidecars_skip_and_count(messy_folder):
    ds = FolderDataset(messy_folder, size=16)
    print("skipped:", dict(ds.skipped))
    assert dict(ds.skipped) == {"unreadable_image": 1, "missing_caption": 2, "empty_caption": 1}
    assert [c for _, c in ds.items] == ["a red thing", "a blue thing"]
    x, caption, attrs = ds[0]
    assert x.shape == (3, 16, 16) and caption == "a red thing" and attrs is None
    assert torch.allclose(x, to_tensor(np.full((16, 16, 3), (255, 0, 0), np.uint8)))


def test_folder_center_crops(tmp_path):
    img = np.zeros((20, 60, 3), np.uint8)
    img[:, :20] = (255, 0, 0)
    img[:, 20:40] = (0, 255, 0)  # the central square
    img[:, 40:] = (0, 0, 255)
    Image.fromarray(img).save(tmp_path / "wide.png")
    (tmp_path / "wide.txt").write_text("green in the middle")
    rgba = Image.new("RGBA", (10, 10), (0, 0, 0, 0))  # transparent -> composited over white
    rgba.save(tmp_path / "clear.png")
    (tmp_path / "clear.txt").write_text("nothing")
    ds = FolderDataset(tmp_path, size=8)
    by_caption = {c: to_uint8(ds[i][0]) for i, (_, c) in enumerate(ds.items)}
    d = np.abs(by_caption["green in the middle"][1:-1, 1:-1].astype(int) - (0, 255, 0)).max()
    print(f"centre crop: max abs diff from pure green {d}")
    assert d <= 2
    assert (by_caption["nothing"] == 255).all()


def test_folder_jsonl_captions(messy_folder):
    lines = [{"file": "good.png", "caption": "red from jsonl"},
             {"file": "broken.png", "caption": "x"},
             {"file": "gone.png", "caption": "no such file"},
             {"file": "sub/deep.jpg", "caption": "deep from jsonl"}]
    (messy_folder / "captions.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    ds = FolderDataset(messy_folder, size=16)
    print("skipped:", dict(ds.skipped))
    assert dict(ds.skipped) == {"unreadable_image": 1, "missing_caption": 3, "missing_image": 1}
    assert [c for _, c in ds.items] == ["red from jsonl", "deep from jsonl"]


@pytest.mark.parametrize("bad, line", [
    ('{"file": "good.png", "caption": "ok"}\n{"file": "a.png", caption: 1}\n', 2),
    ('{"file": "good.png", "caption": "ok"}\n\n{"file": "a.png"}\n', 3),
    ('["good.png", "ok"]\n', 1),
    ('{"file": "good.png", "caption": "a"}\n{"file": "good.png", "caption": "b"}\n', 2),
])
def test_folder_bad_jsonl_line_names_file_and_line(messy_folder, bad, line):
    (messy_folder / "captions.jsonl").write_text(bad)
    with pytest.raises(DatasetError, match=rf"captions\.jsonl:{line}: "):
        FolderDataset(messy_folder)


def test_folder_errors(tmp_path):
    with pytest.raises(DatasetError, match="not a directory"):
        FolderDataset(tmp_path / "nope")
    with pytest.raises(DatasetError, match="no usable image/caption pairs among 0 images"):
        FolderDataset(tmp_path)
    _png(tmp_path / "a.png")
    (tmp_path / "b.png").write_bytes(b"garbage")
    (tmp_path / "b.txt").write_text("caption")
    with pytest.raises(DatasetError, match=r"among 2 images \(skipped: .*missing_caption.*unreadable_image"):
        FolderDataset(tmp_path)


def test_folder_file_broken_after_scan_does_not_stop_an_epoch(messy_folder):
    ds = FolderDataset(messy_folder, size=16)
    (messy_folder / "good.png").write_bytes(b"\x89PNG truncated")
    captions = [c for _, c, _ in ds]
    assert captions == ["a blue thing", "a blue thing"]  # item 0 fell through to item 1
    assert ds.skipped["unreadable_image"] == 2
