"""The `cmu_mfn` and `mnist` readers on tiny fixtures written in each published format (MFN
``.h5`` files with one ``d1`` dataset; gzip-compressed IDX files), one test per class of bad input,
and slow tests that read the real sets in ../shared/data (skipped when they are absent)."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

from mmpeft.data.base import DataError, build_reader
from mmpeft.data.mnist import pixel_noise

h5py = pytest.importorskip("h5py")
SHARED = Path(__file__).parents[1].parent / "shared" / "data"
SIZES = {"train": 4, "valid": 3, "test": 2}


# --- cmu_mfn fixtures -------------------------------------------------------------------------
def write_h5(path, array):
    with h5py.File(path, "w") as f:
        f.create_dataset("d1", data=array)


def features(n, width, seed, steps=5):
    """(n, steps, width) features: the first step of every row empty (MFN pads at the front),
    row 1 also empty in the middle, and row n-1 all empty."""
    x = np.random.default_rng(seed).normal(3.0 + seed, 2.0, (n, steps, width))
    x[:, 0] = 0.0
    x[1, 2] = 0.0
    x[n - 1] = 0.0
    return x


def write_cmu(root, labels="mmmo", text_train=False):
    """A set in the MFN layout: audio (F=3), video (F=2), text (F=4) for valid/test; labels
    ``mmmo`` (N,) scores, ``youtube`` (N, 3) one-hot or ``pom`` (N, 17) ratings."""
    root.mkdir(parents=True, exist_ok=True)
    data = {}
    for k, (split, n) in enumerate(SIZES.items()):
        data[f"audio_{split}"] = features(n, 3, seed=k)
        data[f"video_{split}"] = features(n, 2, seed=10 + k)
        if split != "train" or text_train:
            data[f"text_{split}_emb"] = features(n, 4, seed=20 + k)
        rows = np.arange(n)
        data[f"y_{split}"] = {
            "mmmo": 1.0 + rows * 0.5,
            "youtube": np.eye(3, dtype=np.float32)[rows % 3],
            "pom": 1.0 + rows[:, None] + np.arange(17) / 10,
        }[labels]
    for name, array in data.items():
        write_h5(root / f"{name}.h5", array)
    return data


def cmu(root, **options):
    return build_reader("cmu_mfn", {"root": str(root), **options})


def real_steps(x):
    return x[np.any(x != 0, axis=-1)]  # (n_steps, F)


# --- cmu_mfn ----------------------------------------------------------------------------------
def test_cmu_mfn_shapes_ids_targets_and_info(tmp_path):
    write_cmu(tmp_path / "mmmo")
    reader = cmu(tmp_path / "mmmo")
    assert reader.modalities == ["audio", "video"] and not reader.augments
    assert reader.info() == {"num_targets": 1, "feature_dims": {"audio": 3, "video": 2}}
    assert [len(reader.split(s)) for s in ("train", "valid", "val", "test")] == [4, 3, 3, 2]
    ex = reader.split("valid")[1]
    assert ex["id"] == "mmmo/val/1" and ex["target"] == 1.5
    # row 1 has 5 steps, the first and the third empty: three remain, in order
    assert ex["inputs"]["audio"].shape == (3, 3) and ex["inputs"]["audio"].dtype == np.float32
    assert ex["inputs"]["video"].shape == (3, 2)
    assert reader.split("train")[0]["inputs"]["audio"].shape == (4, 3)


def test_cmu_mfn_normalisation_is_fitted_on_train_only(tmp_path):
    data = write_cmu(tmp_path / "mmmo")
    reader = cmu(tmp_path / "mmmo", clip=0)
    mean, std = reader.stats("audio")
    train = real_steps(data["audio_train"])
    np.testing.assert_allclose(mean, train.mean(0))
    np.testing.assert_allclose(std, train.std(0))
    everything = np.concatenate([real_steps(data[f"audio_{s}"]) for s in SIZES])
    assert not np.allclose(mean, everything.mean(0))  # val / test do not leak into the statistics
    got = reader.split("test")[0]["inputs"]["audio"]
    raw = real_steps(data["audio_test"][0])
    np.testing.assert_allclose(got, (raw - train.mean(0)) / train.std(0), rtol=1e-5, atol=1e-5)
    train_z = np.concatenate([ex["inputs"]["audio"] for ex in reader.split("train")])
    np.testing.assert_allclose(train_z[np.any(train_z != 0, axis=-1)].mean(0), 0.0, atol=1e-5)
    raw_reader = cmu(tmp_path / "mmmo", normalize=False)
    np.testing.assert_allclose(raw_reader.split("test")[0]["inputs"]["audio"], raw.astype(np.float32))


def test_cmu_mfn_constant_features_clipping_and_nonfinite_values(tmp_path):
    data = write_cmu(tmp_path / "s")
    audio = data["audio_train"].copy()
    audio[:, 1:, 2] = np.where(np.any(audio[:, 1:] != 0, axis=-1), 7.0, 0.0)  # a constant feature
    audio[0, 1, 0] = 1e6  # an extreme value
    audio[0, 2, 1] = np.nan  # a non-finite value, zeroed
    audio[2, 1] = np.inf  # a step that is only inf (and zeros) becomes empty
    audio[2, 1, 0] = 0.0
    audio[2, 1, 1:] = [np.inf, np.nan]
    write_h5(tmp_path / "s" / "audio_train.h5", audio)
    reader = cmu(tmp_path / "s", clip=2.5)
    mean, std = reader.stats("audio")
    assert std[2] == 1.0 and mean[2] == pytest.approx(7.0)
    ex = reader.split("train")[0]["inputs"]["audio"]
    assert ex[0, 0] == 2.5 and np.isfinite(ex).all() and np.abs(ex).max() <= 2.5  # 1e6 is clipped
    assert ex[1, 1] == pytest.approx(np.clip(-mean[1] / std[1], -2.5, 2.5))  # NaN -> 0 before standardising
    assert len(reader.split("train")[2]["inputs"]["audio"]) == 4 - 1  # the inf step counts as empty


def test_cmu_mfn_empty_steps_and_the_feature_collate(tmp_path):
    from mmpeft.encoders.features import FeatureEncoder

    write_cmu(tmp_path / "s")
    dropped, kept = cmu(tmp_path / "s"), cmu(tmp_path / "s", drop_empty_steps=False)
    empty = dropped.split("train")[3]["inputs"]["audio"]  # an all-zero sequence keeps one step
    assert empty.shape == (1, 3) and not empty.any()
    full = kept.split("train")[1]["inputs"]["audio"]
    assert full.shape == (5, 3) and not full[0].any() and not full[2].any()  # empty steps stay zero
    np.testing.assert_array_equal(full[[1, 3, 4]], dropped.split("train")[1]["inputs"]["audio"])
    encoder = FeatureEncoder.from_config({"input_dim": 3, "dim": 8, "heads": 2, "depth": 1}, "audio")
    batch = encoder.collate([dropped.split("train")[i]["inputs"]["audio"] for i in range(4)])
    assert batch["values"].shape == (4, 4, 3)
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]]


def test_cmu_mfn_youtube_and_pom_labels(tmp_path):
    write_cmu(tmp_path / "youtube", labels="youtube")
    youtube = cmu(tmp_path / "youtube")
    assert youtube.info()["num_classes"] == 3 and youtube.info()["label_names"] == ["0", "1", "2"]
    assert [ex["target"] for ex in youtube.split("train")] == [0, 1, 2, 0]
    write_cmu(tmp_path / "pom", labels="pom")
    assert cmu(tmp_path / "pom").split("test")[1]["target"] == 2.0
    pom = cmu(tmp_path / "pom", target=[0, 16])
    assert pom.info()["num_targets"] == 2
    assert pom.split("val")[2]["target"] == pytest.approx([3.0, 4.6])


def test_cmu_mfn_text_only_where_its_files_exist(tmp_path):
    write_cmu(tmp_path / "s")
    with pytest.raises(DataError, match="text_train_emb.h5"):
        cmu(tmp_path / "s", modalities=["audio", "text"]).split("test")  # normalize needs train
    raw = cmu(tmp_path / "s", modalities=["text"], normalize=False)
    assert raw.split("test")[0]["inputs"]["text"].shape == (4, 4)
    with pytest.raises(DataError, match="no train file .*text_train_emb.h5"):
        raw.split("train")
    write_cmu(tmp_path / "t", text_train=True)
    assert cmu(tmp_path / "t", modalities=["text"]).info()["feature_dims"] == {"text": 4}


def test_cmu_mfn_bad_inputs(tmp_path):
    write_cmu(tmp_path / "s")
    (tmp_path / "s" / "y_test.h5").unlink()
    with pytest.raises(DataError, match="y_test.h5.* not found"):
        cmu(tmp_path / "s").split("test")
    write_h5(tmp_path / "s" / "video_valid.h5", features(5, 2, seed=0))
    with pytest.raises(DataError, match=r"video_valid.h5.*5 rows, but the label file .*y_valid.h5.* has 3"):
        cmu(tmp_path / "s").split("val")
    write_h5(tmp_path / "s" / "video_valid.h5", np.zeros((3, 5, 4)))
    with pytest.raises(DataError, match="video_valid.h5.*4 features per step.*video_train.h5"):
        cmu(tmp_path / "s").split("val")
    write_h5(tmp_path / "s" / "audio_train.h5", np.zeros((4, 15)))
    with pytest.raises(DataError, match=r"audio_train.h5: 'd1' has shape \(4, 15\)"):
        cmu(tmp_path / "s").split("train")
    with h5py.File(tmp_path / "s" / "audio_train.h5", "w") as f:
        f.create_dataset("features", data=np.zeros((4, 5, 3)))
    with pytest.raises(DataError, match="audio_train.h5: no dataset 'd1'"):
        cmu(tmp_path / "s").split("train")
    (tmp_path / "s" / "audio_train.h5").write_bytes(b"not hdf5")
    with pytest.raises(DataError, match="audio_train.h5: cannot read"):
        cmu(tmp_path / "s").split("train")
    with pytest.raises(DataError, match="modalities"):
        cmu(tmp_path / "s", modalities=["vision"])


def test_cmu_mfn_bad_labels(tmp_path):
    write_cmu(tmp_path / "y", labels="youtube")
    write_h5(tmp_path / "y" / "y_test.h5", np.array([[0.5, 0.5, 0.0], [1, 0, 0]]))
    with pytest.raises(DataError, match="y_test.h5: labels .* not one-hot"):
        cmu(tmp_path / "y").split("test")
    write_cmu(tmp_path / "m")
    write_h5(tmp_path / "m" / "y_valid.h5", np.array([1.0, np.nan, 2.0]))
    with pytest.raises(DataError, match="y_valid.h5: row 1 has a missing"):
        cmu(tmp_path / "m").split("val")
    with pytest.raises(DataError, match=r"y_train.h5: target column\(s\) 3 out of range for 1"):
        cmu(tmp_path / "m", target=3).split("train")


# --- mnist fixtures ---------------------------------------------------------------------------
def idx_bytes(array, magic):
    dims = b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return magic.to_bytes(4, "big") + dims + array.astype(np.uint8).tobytes()


def write_mnist(root, n=20):
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = np.arange(n, dtype=np.uint8) % 10
    (root / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(images, 0x803)))
    (root / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(labels, 0x801)))
    return images, labels


def mnist(root, **options):
    return build_reader("mnist", {"root": str(root), "test_start": 12, "val_size": 3, **options})


# --- mnist ------------------------------------------------------------------------------------
def test_mnist_fixed_pools_ids_targets_and_images(tmp_path):
    images, labels = write_mnist(tmp_path)
    reader = mnist(tmp_path)
    assert reader.modalities == ["image"] and not reader.augments
    assert reader.info() == {"num_classes": 10, "label_names": [str(k) for k in range(10)]}
    train, val, test = reader.split("train"), reader.split("valid"), reader.split("test")
    assert (len(train), len(val), len(test)) == (9, 3, 8)
    assert [ex["id"] for ex in val] == ["mnist/9", "mnist/10", "mnist/11"]  # the end of the pool
    assert test[0]["id"] == "mnist/12" and test[0]["target"] == 2
    x = val[2]["inputs"]["image"]
    assert x.dtype == np.float32 and x.shape == (28, 28)
    np.testing.assert_allclose(x, images[11] / 255.0, rtol=1e-6)
    pil = mnist(tmp_path, image_format="pil", modality="digit").split("train")[4]["inputs"]["digit"]
    assert pil.mode == "RGB" and pil.size == (28, 28)
    np.testing.assert_array_equal(np.asarray(pil)[..., 0], images[4])


def test_mnist_noise_is_fixed_per_index(tmp_path):
    images, _ = write_mnist(tmp_path)
    noisy = mnist(tmp_path, noise_sigma=0.5, noise_seed=7)
    x = noisy.split("val")[0]["inputs"]["image"]  # MNIST index 9
    expected = images[9] / 255.0 + 0.5 * np.random.RandomState(7).standard_normal((20, 28, 28))[9]
    np.testing.assert_allclose(x, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(x, noisy.split("val")[0]["inputs"]["image"])  # not redrawn
    other_val = mnist(tmp_path, noise_sigma=0.5, noise_seed=7, val_size=1)  # index 9 is now train
    np.testing.assert_array_equal(other_val.split("train")[9]["inputs"]["image"], x)
    np.testing.assert_array_equal(pixel_noise(7, (2, 3)), pixel_noise(7, (2, 3)))
    pil = mnist(tmp_path, noise_sigma=1.0, image_format="pil").split("test")[0]["inputs"]["image"]
    assert pil.mode == "RGB"  # noisy values clipped to [0, 1] before 8-bit conversion


def test_mnist_fresh_train_noise_is_redrawn_and_val_test_stay_fixed(tmp_path):
    images, _ = write_mnist(tmp_path)
    reader = mnist(tmp_path, noise_sigma=0.5, train_noise="fresh")
    assert reader.augments and not mnist(tmp_path, noise_sigma=0.5).augments
    train, val = reader.split("train"), reader.split("val")
    a, b = train[3]["inputs"]["image"], train[3]["inputs"]["image"]
    assert not np.array_equal(a, b)  # a new noise field on every read
    assert abs(float((a - images[3] / 255.0).std()) - 0.5) < 0.05  # of the configured strength
    np.testing.assert_array_equal(val[0]["inputs"]["image"], val[0]["inputs"]["image"])
    fixed = mnist(tmp_path, noise_sigma=0.5).split("val")[0]["inputs"]["image"]
    np.testing.assert_array_equal(val[0]["inputs"]["image"], fixed)


def test_mnist_bad_files(tmp_path):
    write_mnist(tmp_path)
    images = tmp_path / "t10k-images-idx3-ubyte.gz"
    labels = tmp_path / "t10k-labels-idx1-ubyte.gz"
    good_labels = labels.read_bytes()
    labels.write_bytes(images.read_bytes())
    with pytest.raises(DataError, match="labels-idx1-ubyte.gz: IDX magic number 2051, expected 0x00000801"):
        mnist(tmp_path).split("train")
    labels.write_bytes(gzip.compress(idx_bytes(np.arange(19) % 10, 0x801)))
    with pytest.raises(DataError, match="labels-idx1-ubyte.gz: 19 labels, but .*images-idx3.* has 20"):
        mnist(tmp_path).split("train")
    labels.write_bytes(gzip.compress(idx_bytes(np.arange(20), 0x801)))
    with pytest.raises(DataError, match="labels-idx1-ubyte.gz: row 10 has label 10"):
        mnist(tmp_path).split("train")
    labels.write_bytes(good_labels)
    raw = gzip.decompress(images.read_bytes())
    images.write_bytes(gzip.compress(raw[:-100]))  # a truncated body
    with pytest.raises(DataError, match="images-idx3-ubyte.gz: .* bytes, expected .*truncated"):
        mnist(tmp_path).split("train")
    images.write_bytes(gzip.compress(raw)[:-50])  # a truncated gzip stream
    with pytest.raises(DataError, match="images-idx3-ubyte.gz: not a readable gzip"):
        mnist(tmp_path).split("test")
    images.write_bytes(b"\x1f\x8b" + bytes(range(60)))  # corrupt
    with pytest.raises(DataError, match="images-idx3-ubyte.gz: not a readable gzip"):
        mnist(tmp_path).split("test")
    images.unlink()
    with pytest.raises(DataError, match="images-idx3-ubyte.gz.* not found"):
        mnist(tmp_path).split("test")


def test_mnist_bad_pools(tmp_path):
    write_mnist(tmp_path)
    with pytest.raises(DataError, match="val_size 13"):
        mnist(tmp_path, val_size=13)
    with pytest.raises(DataError, match="20 images, none left for test_start 20"):
        mnist(tmp_path, test_start=20).split("train")


# --- the real sets (slow) ---------------------------------------------------------------------
def real(folder):
    path = SHARED / folder
    if not path.is_dir():
        pytest.skip(f"{path} is absent")
    return path


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, sizes, info",
    [
        ("youtube", (173, 36, 60), {"num_classes": 3, "label_names": ["0", "1", "2"]}),
        ("mmmo", (220, 40, 80), {"num_targets": 1}),
        ("pom", (600, 100, 203), {"num_targets": 1}),
    ],
)
def test_cmu_mfn_real_sets(name, sizes, info):
    root = real("cmu_mfn") / name
    reader = cmu(root)
    dims = {"youtube": (74, 36), "mmmo": (74, 36), "pom": (43, 41)}[name]
    assert reader.info() == {**info, "feature_dims": dict(zip(("audio", "video"), dims, strict=True))}
    assert tuple(len(reader.split(s)) for s in ("train", "val", "test")) == sizes
    for split in ("train", "val", "test"):
        for ex in reader.split(split):
            for x in ex["inputs"].values():
                assert x.ndim == 2 and 1 <= len(x) <= 20 and np.isfinite(x).all() and np.abs(x).max() <= 10
    assert reader.split("test")[5]["id"] == f"{name}/test/5"
    if name == "youtube":
        counts = [
            np.bincount([ex["target"] for ex in reader.split(s)]).tolist() for s in ("train", "val", "test")
        ]
        assert counts == [[72, 43, 58], [9, 16, 11], [27, 21, 12]]
    if name == "mmmo":
        assert np.mean([ex["target"] for ex in reader.split("train")]) == pytest.approx(3.36, abs=0.005)
        text = cmu(root, modalities=["text"], normalize=False)
        assert len(text.split("val")) == 40 and text.split("test")[0]["inputs"]["text"].shape[1] == 300
    if name == "pom":
        assert cmu(root, target=list(range(17))).info()["num_targets"] == 17


@pytest.mark.slow
def test_mnist_real_pools():
    reader = build_reader("mnist", {"root": str(real("mnist")), "noise_sigma": 1.0})
    assert [len(reader.split(s)) for s in ("train", "val", "test")] == [4500, 500, 5000]
    _, labels = reader.arrays()
    assert np.bincount(labels[:5000]).tolist() == [460, 571, 530, 500, 500, 456, 462, 512, 489, 520]
    assert np.bincount(labels[5000:]).tolist() == [520, 564, 502, 510, 482, 436, 496, 516, 485, 489]
    assert reader.split("val")[0]["id"] == "mnist/4500" and reader.split("test")[0]["target"] == int(
        labels[5000]
    )
