"""The prompt-adherence scorer, checked on ground-truth renders of the shapes data, and the model evaluation over it."""
import dataclasses

import numpy as np
import pytest

from training.data import PALETTE, Attrs, ShapesDataset, render
from training.data.shapes import make_object
from training.scorer import (corrupt, detect_objects, evaluate_dataset_self, evaluate_images,
                             label_components)

SUMMARY = ("colour", "shape", "position", "size", "count", "background", "all")


def _fmt(res: dict) -> str:
    return " ".join(f"{k} {res[k]:.3f}" for k in SUMMARY)


def test_accuracy_on_ground_truth_renders():
    ds = ShapesDataset("val", size=64, length=300, seed=5)
    samples = [ds.sample(i) for i in range(300)]
    res = evaluate_images([s[0] for s in samples], [s[2] for s in samples])
    print(f"300 clean renders ({res['n_objects']} objects): {_fmt(res)}")
    assert res["colour"] >= 0.98 and res["shape"] >= 0.95
    assert res["position"] >= 0.95 and res["count"] >= 0.98
    assert len(res["per_image"]) == 300


def test_accuracy_under_noise_and_blur():
    out = evaluate_dataset_self(n=40, size=64, seed=7)
    for split, by_condition in out.items():
        for condition, res in by_condition.items():
            print(f"{split:8s} {condition:10s} {_fmt(res)}")
            assert res["colour"] >= 0.97 and res["count"] >= 0.95 and res["position"] >= 0.97
            assert res["shape"] >= (0.95 if condition == "clean" else 0.9)


def _one(kind="circle", colour="red", size="large", cell=(1, 1), bg="blue"):
    return Attrs(bg, (make_object(kind, colour, size, cell, 64),), 64)


@pytest.mark.parametrize("kind", ["circle", "square", "triangle", "star", "cross"])
def test_wrong_images_are_scored_wrong(kind):
    truth = _one(kind=kind, colour="yellow", cell=(0, 2))
    o = truth.objects[0]

    def score(attrs):
        r = evaluate_images([render(attrs)], [truth])["per_image"][0]
        return {k: r[k][0] for k in ("colour", "shape", "position", "size")} | {"count": r["count"]}

    assert score(truth) == dict(colour=True, shape=True, position=True, size=True, count=True)
    recoloured = dataclasses.replace(truth, objects=(dataclasses.replace(o, colour="white"),))
    assert score(recoloured) == dict(colour=False, shape=True, position=True, size=True, count=True)
    other_kind = {"circle": "square", "square": "triangle", "triangle": "star", "star": "cross",
                  "cross": "circle"}[kind]
    reshaped = _one(kind=other_kind, colour="yellow", cell=(0, 2))
    assert score(reshaped) == dict(colour=True, shape=False, position=True, size=True, count=True)
    moved = _one(kind=kind, colour="yellow", cell=(2, 0))
    assert score(moved)["position"] is False and score(moved)["shape"] is True
    shrunk = _one(kind=kind, colour="yellow", size="small", cell=(0, 2))
    assert score(shrunk)["size"] is False and score(shrunk)["shape"] is True
    extra = Attrs("blue", (o, make_object("square", "red", "small", (2, 0), 64)), 64)
    assert score(extra)["count"] is False and score(extra)["colour"] is True
    empty = Attrs("blue", (), 64)
    assert score(empty) == dict(colour=False, shape=False, position=False, size=False, count=False)


def test_two_objects_of_swapped_colours():
    a = make_object("circle", "red", "large", (0, 0), 64)
    b = make_object("square", "green", "large", (2, 2), 64)
    truth = Attrs("white", (a, b), 64)
    swapped = Attrs("white", (dataclasses.replace(a, colour="green"),
                              dataclasses.replace(b, colour="red")), 64)
    r = evaluate_images([render(truth), render(swapped)], [truth, truth])
    first, second = r["per_image"]
    assert first["all"] and not second["all"]
    # matching pairs each object with the detection of its colour, which has the wrong shape
    # and cell, so the swap shows up as shape and position errors, never as a double success
    assert second["colour"] == [True, True] and second["shape"] == [False, False]
    assert second["position"] == [False, False]


def test_float_inputs_and_background():
    ds = ShapesDataset("heldout", size=64, length=4)
    img, _, attrs = ds.sample(0)
    bg, dets = detect_objects(img)
    assert bg == attrs.background
    as01 = img.astype(np.float32) / 255
    for kw, x in [({}, as01), ({"value_range": (-1.0, 1.0)}, as01 * 2 - 1)]:
        bg2, dets2 = detect_objects(x, **kw)
        assert bg2 == bg and dets2 == dets
    with pytest.raises(ValueError, match=r"expected an \(H, W, 3\) image"):
        detect_objects(img.transpose(2, 0, 1))
    with pytest.raises(ValueError, match="2 images but 1 attrs"):
        evaluate_images([img, img], [attrs])


def test_touching_objects_are_counted_as_two():
    # a generator may let objects touch: two solid colour regions in one component are split
    img = np.full((64, 64, 3), PALETTE["black"], np.uint8)
    img[20:40, 10:30] = PALETTE["red"]
    img[20:40, 30:50] = PALETTE["white"]
    _, dets = detect_objects(img)
    print([(d.colour, d.kind, d.area) for d in dets])
    assert sorted(d.colour for d in dets) == ["red", "white"]
    assert all(d.kind == "square" and d.area == 400 for d in dets)


def _bfs_components(mask):
    h, w = mask.shape
    lab, k = np.zeros((h, w), int), 0
    for y0, x0 in zip(*np.nonzero(mask)):
        if lab[y0, x0]:
            continue
        k += 1
        lab[y0, x0], stack = k, [(y0, x0)]
        while stack:
            y, x = stack.pop()
            for v in range(max(y - 1, 0), min(y + 2, h)):
                for u in range(max(x - 1, 0), min(x + 2, w)):
                    if mask[v, u] and not lab[v, u]:
                        lab[v, u] = k
                        stack.append((v, u))
    return lab, k


def test_label_components_matches_bfs():
    rng = np.random.default_rng(0)
    for trial in range(25):
        mask = rng.random((23, 37)) < rng.uniform(0.2, 0.65)
        got, k = label_components(mask)
        ref, k_ref = _bfs_components(mask)
        assert k == k_ref and np.array_equal(got > 0, mask)
        assert len(set(zip(got[mask], ref[mask]))) == k  # the same partition, labels aside
    spiral = np.zeros((15, 15), bool)  # one long thin component: propagation must converge
    spiral[1, 1:14] = spiral[1:14, 13] = spiral[13, 1:14] = spiral[3:14, 1] = True
    spiral[3, 1:11] = spiral[3:11, 11] = spiral[11, 3:12] = spiral[5:12, 3] = True
    assert label_components(spiral)[1] == _bfs_components(spiral)[1] == 1


def test_corrupt_is_mild():
    img = ShapesDataset("val", size=64, length=1).sample(0)[0]
    noisy = corrupt(img, noise=0.04, rng=np.random.default_rng(0)).astype(float)
    blurred = corrupt(img, blur=True).astype(float)
    print(f"noise rms {np.sqrt(((noisy - img) ** 2).mean()):.1f}, "
          f"blur max change {np.abs(blurred - img).max():.0f}")
    assert 8 < np.sqrt(((noisy - img) ** 2).mean()) < 12  # std 0.04 * 255 = 10.2
    assert np.array_equal(corrupt(np.full((8, 8, 3), 77, np.uint8), blur=True),
                          np.full((8, 8, 3), 77, np.uint8))


def test_vae_reconstruction_ceiling():
    """`vae_reconstruction_scores` scores what a VAE gives back: an exact autoencoder scores 1.0 everywhere,
    one that blurs away the shapes loses shape (and only shape) accuracy."""
    torch = pytest.importorskip("torch")
    from training.evaluate import vae_reconstruction_scores

    class Exact(torch.nn.Module):
        def encode(self, x):
            return x, torch.zeros_like(x)

        def decode(self, z):
            return z

    class Blurry(Exact):
        def decode(self, z):  # a 7x7 box blur at 64 px: circles, squares and stars become alike
            k = torch.full((3, 1, 7, 7), 1 / 49)
            return torch.nn.functional.conv2d(torch.nn.functional.pad(z, (3, 3, 3, 3), mode="replicate"), k, groups=3)

    exact = vae_reconstruction_scores(Exact(), 64, n=24)
    blurry = vae_reconstruction_scores(Blurry(), 64, n=24)
    print(f"exact {exact}\nblurry {blurry}")
    assert all(v == 1.0 for v in exact.values())
    assert blurry["shape"] < 0.8 and blurry["colour"] >= 0.9 and blurry["position"] == 1.0


def test_vae_study_rows_agree_with_the_ceiling_and_add_up(tmp_path):
    """`training.vae_study.study` on a (random) autoencoder folder: its reconstruction scores are
    `vae_reconstruction_scores`' on the same images, the per-kind and per-size shape accuracies average
    back to the overall shape score (weighted by object counts), and the PSNR is `ldm train vae`'s metric."""
    torch = pytest.importorskip("torch")
    from training.checkpoint import save_vae
    from training.data.shapes import KINDS
    from training.evaluate import vae_reconstruction_scores
    from training.models.vae import AutoencoderKL, VAEConfig
    from training.train_vae import ImageSource, evaluate
    from training.vae_study import study, table

    torch.manual_seed(0)
    vae = AutoencoderKL(VAEConfig(block_out_channels=(8, 8, 8), layers_per_block=1, latent_channels=4,
                                  norm_num_groups=4, sample_size=64)).eval()
    folder = save_vae(vae, tmp_path / "vae")
    n = 16
    row = study(folder, n=n)
    ceiling = vae_reconstruction_scores(vae, 64, n=n)
    assert row["recon"] == {k: round(ceiling[k], 3) for k in row["recon"]}
    ds = ShapesDataset("val", size=64, length=n, seed=0)
    objects = [o for i in range(n) for o in ds.attrs(i)[0].objects]
    assert row["n_objects"] == len(objects) and row["latent_shape"] == [4, 16, 16]
    for key, groups in (("shape_by_kind", KINDS), ("shape_by_size", ("small", "large"))):
        attr = "kind" if key == "shape_by_kind" else "size"
        counts = {g: sum(getattr(o, attr) == g for o in objects) for g in groups}
        total = sum(row[key][g] * c for g, c in counts.items() if c)
        assert abs(total / len(objects) - ceiling["shape"]) <= 2e-3 * len(groups)  # each rounded to 3 places
    assert abs(row["psnr"] - evaluate(vae, ImageSource("shapes", 64, n, 0, "val"), n)["psnr"]) <= 0.005
    assert row["params"] == sum(p.numel() for p in vae.parameters())
    assert str(folder) in table([row])


def test_denoise_scores_with_an_oracle_unet():
    """`denoise_scores` noises real images' latents and denoises them with their captions. With an identity
    autoencoder and a U-Net that knows the clean latents (it returns the exact noise), DDIM gives the images
    back and every score is 1.0; an oracle that blurs the clean latents loses shape accuracy, and only
    that. Scores are the evaluator's, so this checks the noising, the scheduler and the batching."""
    torch = pytest.importorskip("torch")
    from conftest import tiny_latent_diffusion
    from training.data.shapes import ShapesDataset
    from training.evaluate import denoise_scores
    from training.models.vae import VAEConfig

    n, size = 16, 64
    ds = ShapesDataset("val", size=size, length=n, seed=0)
    clean = torch.from_numpy(np.stack([ds.sample(i)[0] for i in range(n)])).permute(0, 3, 1, 2).float() / 127.5 - 1

    class Identity(torch.nn.Module):
        config = VAEConfig(block_out_channels=(16,), latent_channels=3, norm_num_groups=8, scaling_factor=1.0)

        def encode(self, x):
            return x, torch.full_like(x, -80.0)  # posterior std e^-40: the draw is the mean

        def decode(self, z):
            return z

    class Oracle(torch.nn.Module):
        def __init__(self, x0, alphas_cumprod):
            super().__init__()
            self.x0, self.ac, self.calls = x0, alphas_cumprod, 0

        def forward(self, x, t, ctx):  # epsilon for the true clean latents of this batch
            ab = self.ac[int(t[0])]
            x0 = self.x0[self.calls // self.steps * 4:][:4].repeat(x.shape[0] // 4, 1, 1, 1)
            self.calls += 1
            return (x - ab.sqrt() * x0) / (1 - ab).sqrt()

    from ldm_runtime.noise_schedule import alphas_cumprod_from_betas, make_betas
    ld = tiny_latent_diffusion()
    ld.scheduler_config = {**ld.scheduler_config, "_class_name": "DDIMScheduler"}
    ac = torch.from_numpy(alphas_cumprod_from_betas(make_betas(1000, 0.00085, 0.012, "scaled_linear"))).float()
    ld.vae = Identity()
    box = torch.full((3, 1, 7, 7), 1 / 49)
    blurred = torch.nn.functional.conv2d(torch.nn.functional.pad(clean, (3, 3, 3, 3), mode="replicate"), box, groups=3)
    results = {}
    for name, x0 in (("exact", clean), ("blurred", blurred)):
        ld.unet = Oracle(x0, ac)
        ld.unet.steps = 4  # strength 0.4 of 10 steps: 4 U-Net calls per batch of 4
        results[name] = denoise_scores(ld, 0.4, n=n, guidance_scale=3.0, steps=10, batch=4)
    print(results)
    assert all(v == 1.0 for v in results["exact"].values())
    assert results["blurred"]["shape"] < 0.8 and results["blurred"]["colour"] >= 0.9
    assert results["blurred"]["position"] == 1.0


@pytest.mark.slow
def test_evaluate_main_writes_what_evaluate_checkpoint_returns(tiny_checkpoint_dir, tmp_path, capsys):
    """`python -m training.evaluate`: eval.json and stdout hold exactly `evaluate_checkpoint`'s results for the
    same arguments (sampling is seeded), every score is a fraction; a folder that is no checkpoint exits 2."""
    pytest.importorskip("torch")
    import json

    from training.evaluate import SCORE_KEYS, evaluate_checkpoint, main

    assert main([str(tiny_checkpoint_dir), "--n", "4", "--steps", "2", "--guidance", "1,3", "--strengths", "0.5",
                 "--batch", "2", "--out", str(tmp_path)]) == 0
    printed = json.loads(capsys.readouterr().out)
    written = json.loads((tmp_path / "eval.json").read_text())
    direct = evaluate_checkpoint(tiny_checkpoint_dir, n=4, guidance_scales=(1.0, 3.0), steps=2, batch=2,
                                 denoise_strengths=(0.5,))
    assert printed == written == json.loads(json.dumps(direct))
    assert set(written) == {"vae_reconstruction", "val", "heldout", "denoise"}
    assert set(written["val"]) == set(written["denoise"]["0.5"]) == {"1.0", "3.0"}
    assert all(0.0 <= written[s]["3.0"][k] <= 1.0 for s in ("val", "heldout") for k in SCORE_KEYS)
    assert (tmp_path / "eval_heldout_g3.png").is_file()
    assert main([str(tmp_path)]) == 2
    assert "neither an ldm checkpoint folder" in capsys.readouterr().err


def test_evaluate_bundle_generates_the_torch_models_images(tiny_checkpoint_dir, tiny_fp32_bundle, capsys):
    """A bundle is evaluated as it deploys (ldm_runtime, same seeds): the fp32 bundle's images are the torch
    models' to the parity gate (max abs <= 2e-3 on [0, 1] images), so their scores agree; the command line
    takes the bundle folder, and engine options only with a bundle."""
    pytest.importorskip("torch")
    import json

    from training.checkpoint import load_models
    from training.evaluate import bundle_generator, evaluate_bundle, main
    from training.sample import sample

    ld = load_models(tiny_checkpoint_dir)
    generate, size = bundle_generator(tiny_fp32_bundle, threads=1)
    prompts = ["a red circle", "a blue square on the left"]
    ours = generate(prompts, 3, 3.0, 7)
    ref = sample(ld, prompts, num_inference_steps=3, guidance_scale=3.0, seed=7)
    assert size == ld.default_size[0] and ours.shape == ref.shape
    assert float(np.abs(ours - ref).max()) <= 2e-3
    r = evaluate_bundle(tiny_fp32_bundle, n=4, guidance_scales=(3.0,), steps=2, batch=2, threads=1)
    assert main([str(tiny_fp32_bundle), "--n", "4", "--steps", "2", "--guidance", "3", "--batch", "2",
                 "--engine-option", "threads=1"]) == 0
    assert json.loads(capsys.readouterr().out)["val"] == json.loads(json.dumps(r["val"]))
    with pytest.raises(SystemExit):
        main([str(tiny_checkpoint_dir), "--engine-option", "threads=1"])
    assert "are for bundles" in capsys.readouterr().err


def test_text_gain_with_an_oracle_unet():
    """`text_gain` noises real latents and scores the U-Net's prediction under three captions. A U-Net that
    returns the exact noise when (and only when) it is given the true caption embeddings has loss 0 with
    them, and with the wrong or empty captions (where it returns zeros) the loss is the mean square of unit
    Gaussian noise: 1 within 0.05 over 64 x 4 x 8 x 8 draws. Out-of-schedule timesteps are refused."""
    torch = pytest.importorskip("torch")
    from conftest import tiny_latent_diffusion
    from training.evaluate import _alphas_cumprod, text_gain
    from training.sample import tokenizer_for

    n = 64
    ld = tiny_latent_diffusion()
    ac = _alphas_cumprod(ld.scheduler_config)
    ds = ShapesDataset("val", size=64, length=n, seed=0)
    with torch.no_grad():
        x = torch.stack([torch.as_tensor(np.asarray(ds[i][0])) for i in range(n)])
        z0 = ld.vae.encode(x)[0] * ld.vae.config.scaling_factor
        true_ctx = ld.text_encoder(torch.from_numpy(tokenizer_for(ld)([ds[i][1] for i in range(n)])))

    class Oracle(torch.nn.Module):
        def forward(self, z_t, t, ctx):
            if ctx.shape == true_ctx.shape and torch.equal(ctx, true_ctx):
                ab = ac[int(t[0])]
                return (z_t - ab.sqrt() * z0) / (1 - ab).sqrt()
            return torch.zeros_like(z_t)

    ld.unet = Oracle()
    r = text_gain(ld, (100, 900), n=n)
    for t in ("100", "900"):
        assert r[t]["cond"] < 1e-8
        assert abs(r[t]["empty"] - 1.0) < 0.05 and abs(r[t]["wrong"] - 1.0) < 0.05
        assert r[t]["gain"] == pytest.approx(r[t]["empty"] - r[t]["cond"])
    with pytest.raises(ValueError, match=r"timestep 1000 is outside"):
        text_gain(ld, (1000,), n=4)
