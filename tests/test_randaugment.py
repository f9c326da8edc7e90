"""RandAugment / TrivialAugment: each op against Pillow called directly (and numpy where the op is simple enough
to write out), the magnitude tables against torchvision's formulas, uniform draws, the parser, and the
pipelines' contract: train batches only, after the crop, the same for any worker count, process count or
resume."""

import math

import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageOps

import fastgpu_jax as fg
from fastgpu_jax import data
from fastgpu_jax.builders import loader_kwargs
from fastgpu_jax.config import ConfigError
from fastgpu_jax.data import image_pipeline, randaugment as ra
from image_folders import write_image_folder

SIZE = 16
BLACK = (0, 0, 0)
MAGNITUDE_OPS = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color", "Contrast",
                 "Sharpness", "Posterize", "Solarize")
SIGNED = MAGNITUDE_OPS[:9]


def _image(h=24, w=40, seed=0, top=256):
    """Noise over a gradient: every op changes it, and edges and flat parts are both there."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, top - 1, w)[None, :, None] * np.ones((h, 1, 3))
    return np.clip(ramp + rng.normal(0, 40, (h, w, 3)), 0, top - 1).astype(np.uint8)


def _one(image, name, value):
    return ra.apply_plan(image, [(name, value)])


# --------------------------------------------------------------------------- the magnitude tables


def _torchvision_level(name, k, w, h, trivial):
    """torchvision's RandAugment (31 bins) / TrivialAugmentWide ``_augmentation_space`` at bin k, written out."""
    top = {"ShearX": 0.3, "ShearY": 0.3, "TranslateX": 150 / 331 * w, "TranslateY": 150 / 331 * h, "Rotate": 30.0,
           "Brightness": 0.9, "Color": 0.9, "Contrast": 0.9, "Sharpness": 0.9}
    if trivial:
        top = dict(top, ShearX=0.99, ShearY=0.99, TranslateX=32.0, TranslateY=32.0, Rotate=135.0)
        top.update({n: 0.99 for n in ("Brightness", "Color", "Contrast", "Sharpness")})
    if name in top:
        return top[name] * k / 30
    if name == "Posterize":
        return 8 - round(k / (30 / (6 if trivial else 4)))
    if name == "Solarize":
        return 255 - 8.5 * k
    return None


@pytest.mark.parametrize("trivial", [False, True])
def test_magnitudes_are_torchvisions_31_bins(trivial):
    ops = {op.name: op for op in ra.OPS}
    assert tuple(ops) == ("Identity",) + MAGNITUDE_OPS + ("AutoContrast", "Equalize")
    for name, op in ops.items():
        level = op.trivial if trivial else op.rand
        assert op.signed == (name in SIGNED)
        for k in range(ra.BINS):
            want = _torchvision_level(name, k, 40, 24, trivial)
            assert (level is None) == (want is None)
            if want is not None:
                assert level(k, 40, 24) == pytest.approx(want, rel=1e-12, abs=1e-12), (name, k)


# --------------------------------------------------------------------------- each op against Pillow


def _pil_reference(im, name, v):
    """The Pillow call torchvision's ``_apply_op`` makes for (name, v) on a PIL image (nearest, fill 0)."""
    geometric = {"ShearX": (1, v, 0, 0, 1, 0), "ShearY": (1, 0, 0, v, 1, 0),
                 "TranslateX": (1, 0, -math.trunc(v), 0, 1, 0), "TranslateY": (1, 0, 0, 0, 1, -math.trunc(v))}
    if name in geometric:
        return im.transform(im.size, Image.AFFINE, geometric[name], Image.NEAREST, fillcolor=BLACK)
    if name == "Rotate":
        return im.rotate(v, Image.NEAREST, expand=False, center=None, fillcolor=BLACK)
    if name in ("Brightness", "Color", "Contrast", "Sharpness"):
        return getattr(ImageEnhance, name)(im).enhance(1 + v)
    return {"Posterize": lambda: ImageOps.posterize(im, int(v)), "Solarize": lambda: ImageOps.solarize(im, v),
            "AutoContrast": lambda: ImageOps.autocontrast(im), "Equalize": lambda: ImageOps.equalize(im),
            "Identity": lambda: im}[name]()


@pytest.mark.parametrize("name", ra.OP_NAMES)
def test_each_op_is_the_pillow_call_torchvision_makes(name):
    image = _image()
    im = Image.fromarray(image)
    bins = (0, 1, 9, 17, 30)
    values = {_torchvision_level(name, k, 40, 24, t) or 0.0 for k in bins for t in (False, True)}
    values |= {-v for v in values} if name in SIGNED else set()
    for v in sorted(values):
        got = _one(image, name, v)
        assert got.dtype == np.uint8 and got.shape == image.shape
        np.testing.assert_array_equal(got, np.asarray(_pil_reference(im, name, v)), err_msg=f"{name} {v}")


def _nearest_affine(image, matrix):
    """Nearest-neighbour affine warp in numpy: output pixel centre (x+.5, y+.5) reads the input pixel under
    matrix @ centre, black outside. Also the pixels within 1e-6 of a pixel edge (where rounding decides)."""
    h, w, _ = image.shape
    y, x = np.mgrid[0:h, 0:w] + 0.5
    a, b, c, d, e, f = matrix
    xs, ys = a * x + b * y + c, d * x + e * y + f
    inside = (xs >= 0) & (xs < w) & (ys >= 0) & (ys < h)
    out = np.where(inside[..., None], image[np.clip(ys.astype(int), 0, h - 1), np.clip(xs.astype(int), 0, w - 1)], 0)
    edge = lambda t: np.abs(t - np.round(t)) < 1e-6  # noqa: E731
    return out.astype(np.uint8), edge(xs) | edge(ys)


@pytest.mark.parametrize("name", ["ShearX", "ShearY", "TranslateX", "TranslateY"])
def test_shears_and_translations_move_pixels_the_way_torchvision_says(name):
    """Independent of Pillow: ShearX reads x + v*y (origin at the top left), TranslateX moves right by int(v)."""
    image = _image()
    for v in (0.3, -0.17, 0.99, -14.5, 7.9, 31.0):
        if name.startswith("Shear") and abs(v) > 1:
            continue
        t = math.trunc(v)
        matrix = {"ShearX": (1, v, 0, 0, 1, 0), "ShearY": (1, 0, 0, v, 1, 0),
                  "TranslateX": (1, 0, -t, 0, 1, 0), "TranslateY": (1, 0, 0, 0, 1, -t)}[name]
        want, edge = _nearest_affine(image, matrix)
        got = _one(image, name, v)
        np.testing.assert_array_equal(got[~edge], want[~edge], err_msg=f"{name} {v}")
        assert edge.mean() < 0.1


def test_simple_ops_match_their_numpy_formulas():
    image = _image()
    for bits in (8, 6, 4, 2):
        np.testing.assert_array_equal(_one(image, "Posterize", bits), image & (0xFF << (8 - bits) & 0xFF))
    for threshold in (255.0, 178.5, 8.5, 0.0):
        np.testing.assert_array_equal(_one(image, "Solarize", threshold),
                                      np.where(image >= threshold, 255 - image, image))
    for v in (0.5, -0.5):  # brightness: a blend with black, within one level of rounding
        want = np.clip(image * (1 + v), 0, 255)
        assert np.abs(_one(image, "Brightness", v).astype(float) - want).max() <= 1


def test_magnitude_zero_is_the_identity_for_the_magnitude_ops():
    image = _image(top=255)  # no pure white: solarize's bin-0 threshold 255 then inverts nothing
    for name in MAGNITUDE_OPS:
        op = next(o for o in ra.OPS if o.name == name)
        for level in (op.rand, op.trivial):
            np.testing.assert_array_equal(_one(image, name, level(0, 40, 24)), image, err_msg=name)
    white = np.full((4, 4, 3), 255, np.uint8)  # as in torchvision: threshold 255 inverts pure white
    assert not _one(white, "Solarize", 255.0).any()
    changed = 0
    for seed in range(40):  # RandAugment at M=0: only AutoContrast and Equalize change anything
        rng = np.random.default_rng(seed)
        plan = ra.rand_augment_plan(np.random.default_rng(seed), 2, 0, 40, 24)
        got = ra.rand_augment(image, rng, 2, 0)
        if {n for n, _ in plan} & {"AutoContrast", "Equalize"}:
            changed += 1
        else:
            np.testing.assert_array_equal(got, image)
    assert 0 < changed < 40


# --------------------------------------------------------------------------- the draws


def _chi_square(counts):
    counts = np.asarray(counts, float)
    expected = counts.sum() / len(counts)
    return float(((counts - expected) ** 2 / expected).sum())


def test_ops_are_drawn_uniformly_with_random_signs():
    """7,000 draws: chi-square over 14 ops (13 degrees of freedom; 99.99% quantile ~39) and the signed ops'
    signs (binomial, 5 sigma)."""
    rng = np.random.default_rng(0)
    plan = ra.rand_augment_plan(rng, 7000, 9, 40, 24)
    names = [n for n, _ in plan]
    assert _chi_square([names.count(n) for n in ra.OP_NAMES]) < 39
    signs = np.array([v < 0 for n, v in plan if n in SIGNED])
    assert abs(signs.mean() - 0.5) < 5 * 0.5 / math.sqrt(len(signs))
    for name, v in plan:
        want = _torchvision_level(name, 9, 40, 24, False)
        assert abs(v) == pytest.approx(want or 0.0)


def test_trivial_augment_draws_uniform_ops_and_bins():
    rng = np.random.default_rng(1)
    plans = [ra.trivial_augment_plan(rng, 40, 24)[0] for _ in range(7000)]
    names = [n for n, _ in plans]
    assert _chi_square([names.count(n) for n in ra.OP_NAMES]) < 39
    bins = [round(abs(v) / 0.99 * 30) for n, v in plans if n in ("Brightness", "Color", "Contrast", "Sharpness")]
    assert len(bins) > 1500 and _chi_square(np.bincount(bins, minlength=31)) < 70  # 30 dof: 99.99% ~ 66


def test_rand_augment_applies_its_plan_in_order():
    image = _image()
    for seed in range(6):
        plan = ra.rand_augment_plan(np.random.default_rng(seed), 3, 12, 40, 24)
        im = Image.fromarray(image)
        for name, v in plan:
            im = _pil_reference(im, name, v)
        np.testing.assert_array_equal(ra.rand_augment(image, np.random.default_rng(seed), 3, 12), np.asarray(im))
        trivial = ra.trivial_augment_plan(np.random.default_rng(seed), 40, 24)
        np.testing.assert_array_equal(ra.trivial_augment(image, np.random.default_rng(seed)),
                                      np.asarray(_pil_reference(Image.fromarray(image), *trivial[0])))


# --------------------------------------------------------------------------- the key


def test_the_parser_agrees_with_the_config_and_names_the_key():
    assert ra.parse("") is None and ra.parse("trivial") is ra.trivial_augment
    policy = ra.parse(" 2 , 9 ")
    assert (policy.func, policy.keywords) == (ra.rand_augment, {"n": 2, "m": 9})
    for spec in ("", "trivial", "2,9", "1,0", "3,30", "02,09", "0,9", "2,31", "2", "2,9,1", "x", "Trivial", "-1,5",
                 "2.0,9", "2;9", " trivial"):
        try:
            fg.build_config({"data": {"name": "cifar10", "randaugment": spec}})
            config_ok = True
        except ConfigError:
            config_ok = False
        try:
            ra.parse(spec)
            parser_ok = True
        except ValueError as err:
            parser_ok = False
            assert "data.randaugment" in str(err) and repr(spec) in str(err) and "\n" not in str(err)
        assert parser_ok == config_ok, spec
    with pytest.raises(ValueError, match=r"data\.randaugment: M .* 0\.\.30, got '2,31'"):
        ra.parse("2,31")
    with pytest.raises(ValueError, match=r"data\.randaugment: N .* >= 1"):
        ra.parse("0,9")
    with pytest.raises(ValueError, match=r"data\.randaugment"):
        image_pipeline.ImageOptions(randaugment="2")


def test_grayscale_and_synthetic_sets_refuse_it():
    for name in ("digits", "mnist", "fashion_mnist", "synthetic"):
        with pytest.raises(ConfigError, match=rf"data\.randaugment='2,9' has no effect on data\.name='{name}'"):
            fg.build_config({"data": {"name": name, "randaugment": "2,9"}})
    with pytest.raises(ValueError, match=r"data\.randaugment='trivial' has no effect on data set 'digits'"):
        data.train_iterator("digits", batch_size=8, seed=0, randaugment="trivial")
    for name in ("cifar10", "cifar100", "folder", "arrayrecord", "tfds"):
        assert "randaugment" in data.DATASETS[name].options
    cfg = fg.build_config({"data": {"name": "cifar10", "randaugment": "2,9"}})
    assert loader_kwargs(cfg) == {"randaugment": "2,9"}
    cfg = fg.build_config({"data": {"name": "folder", "randaugment": "trivial"}})
    assert loader_kwargs(cfg)["image_options"].randaugment == "trivial"


# --------------------------------------------------------------------------- image folders


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("photos"), counts={"train": 8, "val": 3})


def _take(it, n):
    out = [next(it) for _ in range(n)]
    it.close()
    return out


def _opts(spec, augment=True):
    return image_pipeline.ImageOptions(size=SIZE, augment=augment, randaugment=spec)


@pytest.mark.parametrize("spec,augment", [("2,9", True), ("trivial", True), ("1,30", False)])
def test_folder_batches_are_augmented_crops_from_the_examples_own_generator(folder, spec, augment):
    """Row r of step s = the policy applied to the plain crop of row r, with example_rng(seed, s, r)."""
    kw = dict(batch_size=8, seed=4, data_dir=folder)
    plain = _take(data.train_iterator("folder", image_options=_opts("", augment), **kw), 3)
    aug = _take(data.train_iterator("folder", image_options=_opts(spec, augment), **kw), 3)
    policy = ra.parse(spec)
    for step, (p, a) in enumerate(zip(plain, aug)):
        np.testing.assert_array_equal(p["label"], a["label"])
        want = [policy(x, ra.example_rng(4, step, row)) for row, x in enumerate(p["image"])]
        np.testing.assert_array_equal(a["image"], np.stack(want))
    assert sum(not np.array_equal(p["image"][r], a["image"][r]) for p, a in zip(plain, aug) for r in range(8)) > 8


def test_folder_randaugment_does_not_depend_on_workers_processes_or_resumes(folder):
    kw = dict(batch_size=8, seed=1, data_dir=folder, image_options=_opts("2,9"))
    ref = _take(data.train_iterator("folder", **kw), 4)
    for a, b in zip(ref, _take(data.train_iterator("folder", workers=2, **kw), 4), strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
    halves = [_take(data.train_iterator("folder", process_index=p, process_count=2, **kw), 4) for p in (0, 1)]
    for a, b0, b1 in zip(ref, *halves):
        np.testing.assert_array_equal(a["image"], np.concatenate([b0["image"], b1["image"]]))
    it = data.train_iterator("folder", **kw)
    it.set_state({"next_index": 2})  # a resume
    for a, b in zip(ref[2:], _take(it, 2)):
        np.testing.assert_array_equal(a["image"], b["image"])


def test_eval_batches_are_never_augmented(folder):
    kw = dict(batch_size=4, data_dir=folder)
    plain = list(data.eval_batches("folder", "val", image_options=_opts(""), **kw))
    aug = list(data.eval_batches("folder", "val", image_options=_opts("2,9"), randaugment="2,9", **kw))
    for a, b in zip(plain, aug, strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])


# --------------------------------------------------------------------------- CIFAR


def _cifar_records(rng, n):
    """n CIFAR-10 binary records: a label byte, then the R, G and B planes of a 32x32 image."""
    x = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, (n, 1), dtype=np.uint8)
    return np.concatenate([labels, x.transpose(0, 3, 1, 2).reshape(n, -1)], axis=1).tobytes()


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    """CIFAR-10 binary files holding 10 train examples (the 5,000 after them are the val split)."""
    root = tmp_path_factory.mktemp("cifar")
    rng = np.random.default_rng(3)
    per_file = (data.VAL_SIZE + 10) // 5
    for i in range(5):
        (root / f"data_batch_{i + 1}.bin").write_bytes(_cifar_records(rng, per_file))
    (root / "test_batch.bin").write_bytes(_cifar_records(rng, 4))
    return root


@pytest.mark.parametrize("augment", [False, True])
def test_cifar_randaugment_follows_the_crop_and_flip(cifar, augment):
    """Each row = normalize(policy(the uint8 crop, example_rng)); the crop is the one drawn without RandAugment,
    padded with the mean rounded to uint8 (what the float crop's padding becomes when rounded back)."""
    info = data.info("cifar10", cifar)
    mean, std = np.float32(info.mean), np.float32(info.std)
    kw = dict(batch_size=8, seed=2, data_dir=cifar, augment=augment)
    plain = [data.train_dataset("cifar10", **kw)[s] for s in range(3)]
    aug = [data.train_dataset("cifar10", randaugment="2,9", **kw)[s] for s in range(3)]
    policy = ra.parse("2,9")
    for step, (p, a) in enumerate(zip(plain, aug)):
        raw = np.rint(p["image"] * std + mean).astype(np.uint8)
        want = np.stack([policy(x, ra.example_rng(2, step, row)) for row, x in enumerate(raw)])
        np.testing.assert_array_equal(a["image"], data.normalize(want, info))
        np.testing.assert_array_equal(a["label"], p["label"])
    assert not all(np.array_equal(p["image"], a["image"]) for p, a in zip(plain, aug))


@pytest.mark.parametrize("spec", ["2,9", "trivial"])
def test_cifar_randaugment_does_not_depend_on_processes_or_resumes(cifar, spec):
    kw = dict(batch_size=8, seed=5, data_dir=cifar, augment=True, randaugment=spec)
    whole = _take(data.train_iterator("cifar10", **kw), 4)
    parts = [_take(data.train_iterator("cifar10", process_index=p, process_count=2, **kw), 4) for p in (0, 1)]
    for s in range(4):
        np.testing.assert_array_equal(whole[s]["image"], np.concatenate([parts[0][s]["image"], parts[1][s]["image"]]))
    it = data.train_iterator("cifar10", **kw)
    it.set_state({"next_index": 3})
    np.testing.assert_array_equal(next(it)["image"], whole[3]["image"])
