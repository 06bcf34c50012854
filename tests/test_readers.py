"""Dataset readers on tiny fixtures written in each published format, plus one test per class of
bad input. Tests marked slow read the real sets in ../shared/data and skip when they are absent."""

from __future__ import annotations

import csv
import json
import os
import pickle
import wave

import numpy as np
import pytest

from cases import BACKBONES
from mmpeft.config import ConfigError
from mmpeft.data.base import DataError, build_reader, collate_examples, load_numpy_pickle
from mmpeft.model import build_model
from mmpeft.registry import DATASETS

Image = pytest.importorskip("PIL.Image")
SHARED = os.environ.get(
    "MMPEFT_SHARED_DATA", os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")
)


def test_registry_has_the_readers():
    assert set(DATASETS.names()) >= {
        "mmsa",
        "karpathy",
        "jsonl_images",
        "avmnist",
        "flickr8k",
        "manifest",
        "synthetic",
    }


def test_unknown_reader_option_is_a_config_error():
    with pytest.raises(ConfigError, match="label_column"):
        build_reader("manifest", {"columns": {"text": "t"}, "label_colum": "y"})
    with pytest.raises(ConfigError, match="unknown dataset"):
        build_reader("manifests", {})


# --- fixture writers --------------------------------------------------------------------------
def write_image(path, color=(200, 30, 30), size=(6, 4)):
    Image.new("RGB", size, color).save(path)
    return path


def write_wav(path, rate=8000, n=800, width=2):
    t = np.arange(n) / rate
    x = (0.5 * np.sin(2 * np.pi * 440 * t) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(width)
        w.setframerate(rate)
        w.writeframes(x.tobytes())
    return x.astype(np.float32) / 32768.0


def mmsa_part(n, rng, **extra):
    part = {
        "raw_text": np.array([f"sentence {i}" for i in range(n)], dtype=object),
        "text": rng.standard_normal((n, 5, 4)).astype(np.float32),
        "audio": rng.standard_normal((n, 7, 3)).astype(np.float32),
        "vision": rng.standard_normal((n, 6, 2)).astype(np.float32),
        "regression_labels": rng.uniform(-3, 3, n).astype(np.float32),
        "id": np.array([f"vid{i}$_$0" for i in range(n)]),
        "audio_lengths": [7, 3, 5][:n],
        "vision_lengths": np.array([6, 2, 4][:n]),
    }
    part["audio"][0, 1, 0] = -np.inf  # COVAREP's -inf values
    part.update(extra)
    return part


def write_mmsa(path, protocol=4, **extra):
    rng = np.random.default_rng(0)
    data = {s: mmsa_part(3, rng, **extra) for s in ("train", "valid", "test")}
    with open(path, "wb") as f:
        pickle.dump(data, f, protocol=protocol)
    return data


# --- mmsa -------------------------------------------------------------------------------------
@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_mmsa_reads_the_pickle(tmp_path, protocol):
    data = write_mmsa(tmp_path / "unaligned.pkl", protocol)
    reader = build_reader("mmsa", {"root": str(tmp_path / "unaligned.pkl")})
    assert reader.modalities == ["text", "audio", "vision"]
    assert reader.info() == {"num_targets": 1, "feature_dims": {"text": 4, "audio": 3, "vision": 2}}
    val = reader.split("valid")  # the pickle's name for val
    assert len(val) == 3 and len(reader.split("val")) == 3
    ex = val[1]
    assert ex["id"] == "vid1$_$0"
    assert ex["target"] == pytest.approx(float(data["valid"]["regression_labels"][1]))
    assert ex["inputs"]["audio"].shape == (3, 3) and ex["inputs"]["vision"].shape == (2, 2)  # cut to lengths
    np.testing.assert_array_equal(ex["inputs"]["text"], data["valid"]["text"][1])
    first = reader.split("train")[0]["inputs"]["audio"]
    assert first[1, 0] == 0.0 and np.isfinite(first).all()  # -inf zeroed as MMSA does


def test_mmsa_raw_text_bert_and_options(tmp_path):
    ids = np.stack([np.arange(6), [1, 1, 1, 1, 0, 0], np.zeros(6)])  # (3, T): ids, mask, segments
    extra = {"text_bert": np.stack([ids] * 3).astype(np.float32)}
    write_mmsa(tmp_path / "d.pkl", **extra)
    reader = build_reader(
        "mmsa",
        {
            "root": str(tmp_path / "d.pkl"),
            "modalities": {"text": "raw_text", "vision": "vision"},
            "max_steps": 1,
        },
    )
    ex = reader.split("test")[2]
    assert ex["inputs"]["text"] == "sentence 2" and ex["inputs"]["vision"].shape == (1, 2)
    bert = build_reader("mmsa", {"root": str(tmp_path / "d.pkl"), "modalities": {"text": "text_bert"}})
    tokens = bert.split("train")[0]["inputs"]["text"]
    assert tokens["input_ids"].tolist() == [0, 1, 2, 3] and tokens["attention_mask"].tolist() == [1, 1, 1, 1]


class Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class Evaluate:
    def __reduce__(self):
        return (eval, ("__import__('os').getcwd()",))


@pytest.mark.parametrize("payload", ["system", "eval", "class"])
def test_mmsa_malicious_pickle_is_an_error_not_execution(tmp_path, payload):
    marker = tmp_path / "pwned"
    obj = {"system": Exploit(marker), "eval": Evaluate(), "class": Exploit}[payload]
    path = tmp_path / "evil.pkl"
    with open(path, "wb") as f:
        pickle.dump({"train": {"regression_labels": obj}}, f)
    reader = build_reader("mmsa", {"root": str(path)})
    with pytest.raises(DataError, match="refusing to unpickle"):
        reader.split("train")
    assert not marker.exists()


def test_numpy_pickle_keeps_arrays_scalars_and_containers(tmp_path):
    value = {"a": np.arange(3, dtype=np.int16), "o": np.array(["x", 1], dtype=object), "s": np.float32(2.5)}
    value.update({"set": {1, 2}, "t": (1, "two"), "b": b"\x00\xff"})
    path = tmp_path / "ok.pkl"
    for protocol in (2, 3, 5):
        path.write_bytes(pickle.dumps(value, protocol=protocol))
        back = load_numpy_pickle(str(path))
        assert back["a"].dtype == np.int16 and back["a"].tolist() == [0, 1, 2]
        assert back["o"].tolist() == ["x", 1] and back["s"] == np.float32(2.5)
        assert back["set"] == {1, 2} and back["t"] == (1, "two") and back["b"] == b"\x00\xff"


def test_mmsa_bad_inputs(tmp_path):
    with pytest.raises(DataError, match="not found"):
        build_reader("mmsa", {"root": str(tmp_path / "missing.pkl")}).split("train")
    (tmp_path / "cut.pkl").write_bytes(pickle.dumps({"train": {}})[:-3])
    with pytest.raises(DataError, match="not a readable pickle"):
        build_reader("mmsa", {"root": str(tmp_path / "cut.pkl")}).split("train")
    rng = np.random.default_rng(0)
    bad_label = mmsa_part(3, rng)
    bad_label["regression_labels"][2] = np.nan
    (tmp_path / "nan.pkl").write_bytes(pickle.dumps({"train": bad_label}))
    with pytest.raises(DataError, match="row 2 has a missing"):
        build_reader("mmsa", {"root": str(tmp_path / "nan.pkl")}).split("train")
    flat = mmsa_part(3, rng, audio=np.zeros((3, 7)))
    (tmp_path / "flat.pkl").write_bytes(pickle.dumps({"train": flat}))
    with pytest.raises(DataError, match=r"'audio' has shape \(3, 7\)"):
        build_reader("mmsa", {"root": str(tmp_path / "flat.pkl")}).split("train")
    no_label = mmsa_part(3, rng)
    del no_label["regression_labels"]
    (tmp_path / "nolabel.pkl").write_bytes(pickle.dumps({"train": no_label}))
    with pytest.raises(DataError, match="no label key"):
        build_reader("mmsa", {"root": str(tmp_path / "nolabel.pkl")}).split("train")


# --- karpathy ---------------------------------------------------------------------------------
def write_karpathy(root):
    os.makedirs(root / "val2014")
    write_image(root / "val2014" / "a.png")
    write_image(root / "val2014" / "b.jpg", (10, 200, 10), (5, 7))
    images = [
        {"filepath": "val2014", "filename": "a.png", "imgid": 0, "cocoid": 101, "split": "test", "sentences": [
            {"raw": "A red box.", "tokens": ["a", "red", "box"]}, {"raw": " Red! ", "tokens": ["red"]}]},
        {"filepath": "val2014", "filename": "b.jpg", "imgid": 1, "cocoid": 202, "split": "restval", "sentences": [
            {"raw": "Green.", "tokens": ["green"]}]},
    ]  # fmt: skip
    path = root / "dataset_coco.json"
    path.write_text(json.dumps({"images": images, "dataset": "coco"}))
    return path


def test_karpathy_reads_pairs_with_image_ids(tmp_path):
    write_karpathy(tmp_path)
    reader = build_reader("karpathy", {"root": str(tmp_path)})
    test = reader.split("test")
    assert len(test) == 2 and len(reader.split("train")) == 1  # restval joins train
    ex = test[1]
    assert ex["id"] == "101" and ex["inputs"]["text"] == "Red!"
    img = ex["inputs"]["image"]
    assert img.mode == "RGB" and img.size == (6, 4) and img.getpixel((0, 0)) == (200, 30, 30)
    assert reader.split("train")[0]["inputs"]["image"].size == (5, 7)
    assert reader.info()["num_items"] == {"train": 1, "val": 0, "test": 1}
    tokens = build_reader("karpathy", {"root": str(tmp_path), "text_field": "tokens", "restval": False})
    assert tokens.split("test")[0]["inputs"]["text"] == "a red box" and len(tokens.split("train")) == 0


def test_karpathy_missing_and_corrupt_images(tmp_path):
    write_karpathy(tmp_path)
    os.remove(tmp_path / "val2014" / "a.png")
    (tmp_path / "val2014" / "b.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    reader = build_reader("karpathy", {"root": str(tmp_path / "dataset_coco.json")})
    with pytest.raises(DataError, match=r"a\.png.*not found"):
        reader.split("test")[0]
    with pytest.raises(DataError, match=r"cannot decode image .*b\.jpg"):
        reader.split("train")[0]
    paths = build_reader("karpathy", {"root": str(tmp_path), "load_images": False})
    assert paths.split("train")[0]["inputs"]["image"].endswith("b.jpg")


# --- jsonl_images -----------------------------------------------------------------------------
def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_jsonl_images_food101_layout(tmp_path):
    os.makedirs(tmp_path / "images")
    write_image(tmp_path / "images" / "1.png")
    write_image(tmp_path / "images" / "2.jpg", (0, 0, 255))
    rec = lambda i, label: {
        "img": f"images/{i}.{'png' if i == 1 else 'jpg'}",
        "text": f"recipe {i}",
        "label": label,
    }
    write_jsonl(tmp_path / "train.jsonl", [rec(1, "pizza"), rec(2, "apple_pie")])
    write_jsonl(tmp_path / "dev.jsonl", [rec(2, "pizza")])
    write_jsonl(tmp_path / "test.jsonl", [rec(1, "apple_pie")])
    reader = build_reader("jsonl_images", {"root": str(tmp_path)})
    assert reader.info() == {"num_classes": 2, "label_names": ["apple_pie", "pizza"]}
    ex = reader.split("train")[0]
    assert ex["target"] == 1 and ex["inputs"]["text"] == "recipe 1" and ex["id"] == "train.jsonl:1"
    assert (
        np.abs(np.subtract(reader.split("dev")[0]["inputs"]["image"].getpixel((0, 0)), (0, 0, 255))).max()
        <= 3
    )


def test_jsonl_images_mmimdb_multilabel(tmp_path):
    write_image(tmp_path / "p.png")
    rows = [
        {"id": "tt1", "img": "p.png", "text": "plot", "genre": ["Drama", "Comedy"]},
        {"id": "tt2", "img": "p.png", "text": "plot", "genre": ["Horror"]},
    ]
    write_jsonl(tmp_path / "train.jsonl", rows)
    opts = {
        "root": str(tmp_path),
        "files": {"train": "train.jsonl"},
        "label_field": "genre",
        "multilabel": True,
    }
    reader = build_reader("jsonl_images", {**opts, "id_field": "id"})
    assert reader.info()["num_labels"] == 3
    ex = reader.split("train")[0]
    assert ex["id"] == "tt1" and ex["target"] == [1.0, 1.0, 0.0]  # Comedy, Drama, Horror


def test_jsonl_images_missing_label_and_unknown_label(tmp_path):
    write_image(tmp_path / "p.png")
    write_jsonl(
        tmp_path / "train.jsonl", [{"img": "p.png", "text": "t", "label": "a"}, {"img": "p.png", "text": "t"}]
    )
    reader = build_reader("jsonl_images", {"root": str(tmp_path), "files": {"train": "train.jsonl"}})
    with pytest.raises(DataError, match=r"train\.jsonl, line 2: missing label 'label'"):
        reader.split("train")
    write_jsonl(tmp_path / "train.jsonl", [{"img": "p.png", "text": "t", "label": "a"}])
    write_jsonl(tmp_path / "dev.jsonl", [{"img": "p.png", "text": "t", "label": "zzz"}])
    opts = {
        "root": str(tmp_path),
        "files": {"train": "train.jsonl", "val": "dev.jsonl"},
        "label_names": ["a"],
    }
    with pytest.raises(DataError, match=r"dev\.jsonl, line 1: unknown label 'zzz'"):
        build_reader("jsonl_images", opts).split("val")
    (tmp_path / "dev.jsonl").write_text('{"img": "p.png", "text": \n')
    with pytest.raises(DataError, match=r"dev\.jsonl, line 1: invalid JSON"):
        build_reader("jsonl_images", opts).split("val")


# --- avmnist ----------------------------------------------------------------------------------
def write_avmnist(path, n=6, **override):
    rng = np.random.default_rng(0)
    arrays = {
        "image": rng.integers(0, 256, (n, 28, 28)).astype(np.uint8),
        "audio": rng.integers(-3000, 3000, (n, 8000)).astype(np.int16),
        "audio_length": np.array([8000, 4000, 8000, 100, 8000, 8000][:n], np.int32),
        "orig_length": np.full(n, 8000, np.int32),
        "label": np.arange(n, dtype=np.int64) % 10,
        "speaker": np.array(["george", "theo", "yweweler", "george", "lucas", "jackson"][:n]),
        "fsdd_file": np.array([f"{i}_x_{i}.wav" for i in range(n)]),
        "split": np.array(["train", "test", "val", "train", "test", "train"][:n]),
        "noise_seed": np.int64(1),
        "noise_sigma": np.float32(1.0),
        "sample_rate": np.int32(8000),
    }
    arrays.update(override)
    np.savez_compressed(path, **arrays)
    return arrays


def test_avmnist_reads_npz_with_fixed_noise(tmp_path):
    arrays = write_avmnist(tmp_path / "avmnist.npz")
    reader = build_reader("avmnist", {"root": str(tmp_path)})
    assert [len(reader.split(s)) for s in ("train", "val", "test")] == [3, 1, 2]
    ex = reader.split("test")[1]  # row 4
    assert ex["target"] == 4 and ex["id"] == "4_x_4.wav"
    noise = np.random.RandomState(1).standard_normal((6, 28, 28)).astype(np.float32)
    np.testing.assert_array_equal(
        ex["inputs"]["image"], arrays["image"][4].astype(np.float32) / 255.0 + noise[4]
    )
    audio = ex["inputs"]["audio"]
    assert audio.shape == (16000,) and audio.dtype == np.float32  # 8 kHz -> 16 kHz
    native = build_reader("avmnist", {"root": str(tmp_path), "target_sampling_rate": 0, "trim_audio": True})
    np.testing.assert_array_equal(
        native.split("test")[0]["inputs"]["audio"], arrays["audio"][1][:4000] / 32768.0
    )
    frames = build_reader("avmnist", {"root": str(tmp_path), "audio_format": "frames", "frame_length": 500})
    assert frames.split("train")[0]["inputs"]["audio"].shape == (32, 500)
    pil = build_reader("avmnist", {"root": str(tmp_path), "image_format": "pil", "image_noise": False})
    img = pil.split("train")[0]["inputs"]["image"]
    assert img.size == (28, 28) and img.getpixel((3, 5))[0] == arrays["image"][0][5, 3]
    assert reader.info()["sampling_rate"] == {"audio": 16000}


def test_avmnist_bad_inputs(tmp_path):
    write_avmnist(tmp_path / "a.npz", image=np.zeros((6, 784), np.uint8))
    with pytest.raises(DataError, match=r"'image' has shape \(6, 784\)"):
        build_reader("avmnist", {"root": str(tmp_path / "a.npz")}).split("train")
    write_avmnist(tmp_path / "b.npz", label=np.array([0, 1, -1, 3, 4, 5]))
    with pytest.raises(DataError, match="row 2 has label -1"):
        build_reader("avmnist", {"root": str(tmp_path / "b.npz")}).split("train")
    (tmp_path / "c.npz").write_bytes(b"PK\x03\x04 broken")
    with pytest.raises(DataError, match="cannot read the npz"):
        build_reader("avmnist", {"root": str(tmp_path / "c.npz")}).split("train")
    with pytest.raises(DataError, match="not found"):
        build_reader("avmnist", {"root": str(tmp_path / "none")}).split("train")


# --- flickr8k ---------------------------------------------------------------------------------
def write_flickr(root):
    os.makedirs(root / "images")
    write_image(root / "images" / "1_a.jpg")
    write_image(root / "images" / "2_b.jpg", (0, 250, 0))
    (root / "splits.tsv").write_text(
        "image_id\tsplit\tofficial_flickr8k_split\n1_a.jpg\ttrain\ttrain\n2_b.jpg\ttest\tdev\n"
    )
    caps = ["image_id\tcaption_idx\tcaption"] + [
        f"{i}\t{k}\tcaption {k} of {i} ." for i in ("1_a.jpg", "2_b.jpg") for k in range(5)
    ]
    (root / "captions.tsv").write_text("\n".join(caps) + "\n")


def test_flickr8k_layout(tmp_path):
    write_flickr(tmp_path)
    reader = build_reader("flickr8k", {"root": str(tmp_path)})
    train, test = reader.split("train"), reader.split("test")
    assert len(train) == 5 and len(test) == 5 and len(reader.split("val")) == 0
    ex = test[3]
    assert ex["id"] == "2_b.jpg" and ex["inputs"]["text"] == "caption 3 of 2_b.jpg ."
    assert np.abs(np.subtract(ex["inputs"]["image"].getpixel((0, 0)), (0, 250, 0))).max() <= 3  # JPEG
    assert len(build_reader("flickr8k", {"root": str(tmp_path), "max_captions": 2}).split("train")) == 2
    assert (
        pickle.loads(pickle.dumps(test))[3]["inputs"]["text"] == ex["inputs"]["text"]
    )  # for worker processes


def test_flickr8k_bad_rows(tmp_path):
    write_flickr(tmp_path)
    with open(tmp_path / "captions.tsv", "a") as f:
        f.write("3_c.jpg\t0\tstray\n")
    with pytest.raises(DataError, match=r"captions\.tsv, line 12: image '3_c\.jpg' is not in"):
        build_reader("flickr8k", {"root": str(tmp_path)}).split("train")
    os.remove(tmp_path / "captions.tsv")
    with pytest.raises(DataError, match="not found"):
        build_reader("flickr8k", {"root": str(tmp_path)}).split("train")


# --- manifest ---------------------------------------------------------------------------------
def write_manifest_files(root):
    write_image(root / "img.png")
    wav = write_wav(root / "clip.wav")
    np.save(root / "feats.npy", np.arange(12, dtype=np.float32).reshape(3, 4))
    return wav


def test_manifest_csv_with_split_column(tmp_path):
    wav = write_manifest_files(tmp_path)
    rows = [
        {"image": "img.png", "audio": "clip.wav", "feats": "feats.npy", "caption": "a cat", "label": "cat", "split": "train"},
        {"image": "img.png", "audio": "clip.wav", "feats": "feats.npy", "caption": "a dog", "label": "dog", "split": "valid"},
        {"image": "img.png", "audio": "clip.wav", "feats": "feats.npy", "caption": "dogs", "label": "dog", "split": "train"},
    ]  # fmt: skip
    with open(tmp_path / "data.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    cols = {"image": "image", "audio": "audio", "feats": "feats", "text": "caption"}
    reader = build_reader("manifest", {"root": str(tmp_path / "data.csv"), "columns": cols})
    assert reader.info() == {
        "sampling_rate": {"audio": 16000},
        "num_classes": 2,
        "label_names": ["cat", "dog"],
    }
    ex = reader.split("val")[0]
    assert ex["target"] == 1 and ex["inputs"]["text"] == "a dog" and ex["id"] == "data.csv:3"
    assert ex["inputs"]["image"].size == (6, 4)
    assert ex["inputs"]["feats"].shape == (3, 4)
    audio = ex["inputs"]["audio"]
    assert audio.shape == (1600,)  # 800 samples at 8 kHz -> 16 kHz
    np.testing.assert_allclose(audio[::2][50:-50], wav[50:-50], atol=2e-2)  # the same tone, resampled
    native = build_reader(
        "manifest", {"root": str(tmp_path / "data.csv"), "columns": cols, "target_sampling_rate": 0}
    )
    np.testing.assert_array_equal(native.split("train")[0]["inputs"]["audio"], wav)


def test_read_wav_widths_and_channels(tmp_path):
    from mmpeft.data.base import read_wav

    left, right = np.array([0, 2**22, -(2**23)]), np.array([2**21, 0, 2**23 - 1])
    frames = np.stack([left, right], 1).reshape(-1)  # interleaved (L, R) samples
    raw = b"".join(int(v).to_bytes(3, "little", signed=True) for v in frames)
    with wave.open(str(tmp_path / "s24.wav"), "wb") as w:
        w.setnchannels(2)
        w.setsampwidth(3)
        w.setframerate(22050)
        w.writeframes(raw)
    x, rate = read_wav(str(tmp_path / "s24.wav"), "test")
    assert rate == 22050
    np.testing.assert_allclose(x, (left + right) / 2 / 2**23, rtol=1e-6)  # channels averaged
    (tmp_path / "junk.wav").write_bytes(b"RIFF\x00\x00junk")
    with pytest.raises(DataError, match="cannot read WAV"):
        read_wav(str(tmp_path / "junk.wav"), "test")


def test_manifest_jsonl_per_split_files_inline_values(tmp_path):
    write_manifest_files(tmp_path)
    write_jsonl(
        tmp_path / "tr.jsonl", [{"x": [[1, 2], [3, 4]], "t": "hi", "y": 0.5}, {"x": 3, "t": "yo", "y": -1}]
    )
    write_jsonl(tmp_path / "te.jsonl", [{"x": [[0, 0]], "t": "x", "y": [1, 2]}])
    opts = {"root": str(tmp_path), "files": {"train": "tr.jsonl", "test": "te.jsonl"}}
    cols = {"vec": "x", "text": "t"}
    reader = build_reader("manifest", {**opts, "columns": cols, "label_column": "y", "label_type": "float"})
    assert reader.info()["num_targets"] == 1
    train = reader.split("train")
    assert train[0]["inputs"]["vec"].tolist() == [[1, 2], [3, 4]] and train[0]["target"] == 0.5
    assert train[1]["inputs"]["vec"].shape == (1,)
    assert reader.split("test")[0]["target"] == [1.0, 2.0]
    with pytest.raises(DataError, match="has no split 'val'"):
        reader.split("val")


def test_manifest_bad_inputs(tmp_path):
    write_manifest_files(tmp_path)
    np.save(tmp_path / "cube.npy", np.zeros((2, 2, 2), np.float32))
    (tmp_path / "bad.png").write_bytes(b"\x89PNG broken")
    rows = [
        {"f": "feats.npy", "label": "a"},
        {"f": "missing.npy", "label": "a"},
        {"f": "cube.npy", "label": "b"},
        {"f": "bad.png", "label": "b"},
    ]
    write_jsonl(tmp_path / "m.jsonl", [{**r, "split": "train"} for r in rows])
    reader = build_reader("manifest", {"root": str(tmp_path / "m.jsonl"), "columns": {"x": "f"}})
    train = reader.split("train")
    assert train[0]["inputs"]["x"].shape == (3, 4)
    with pytest.raises(DataError, match=r"m\.jsonl, line 2, column 'f': file .*missing\.npy.* not found"):
        train[1]
    with pytest.raises(DataError, match=r"line 3, column 'f': 'x' array has shape \(2, 2, 2\)"):
        train[2]
    with pytest.raises(DataError, match=r"line 4, column 'f': cannot decode image"):
        train[3]
    width = build_reader(
        "manifest", {"root": str(tmp_path / "m.jsonl"), "columns": {"x": "f"}, "feature_dims": {"x": 5}}
    )
    with pytest.raises(DataError, match=r"expected \(T, 5\)"):
        width.split("train")[0]
    write_jsonl(
        tmp_path / "n.jsonl",
        [{"f": "feats.npy", "label": "a", "split": "train"}, {"f": "feats.npy", "split": "train"}],
    )
    with pytest.raises(DataError, match=r"n\.jsonl, line 2: missing label \(column 'label'\)"):
        build_reader("manifest", {"root": str(tmp_path / "n.jsonl"), "columns": {"x": "f"}}).split("train")
    (tmp_path / "w.csv").write_text("a,label,split\nclip.mp3,x,train\n")
    mp3 = build_reader(
        "manifest", {"root": str(tmp_path / "w.csv"), "columns": {"s": "a"}, "kinds": {"s": "audio"}}
    )
    with pytest.raises(DataError, match="only PCM .wav"):
        mp3.split("train")[0]


# --- synthetic --------------------------------------------------------------------------------
def pooled(ds, modalities):
    x = np.stack([np.concatenate([ds[i]["inputs"][m].mean(0) for m in modalities]) for i in range(len(ds))])
    return x, np.array([ds[i]["target"] for i in range(len(ds))])


def test_synthetic_is_deterministic_and_needs_both_modalities():
    from sklearn.linear_model import LogisticRegression

    opts = {"sizes": {"train": 300, "test": 200}, "signal": 2.0, "min_len": 8}
    a, b = build_reader("synthetic", opts), build_reader("synthetic", opts)
    np.testing.assert_array_equal(
        a.split("train")[5]["inputs"]["image"], b.split("train")[5]["inputs"]["image"]
    )
    other = build_reader("synthetic", {**opts, "seed": 1}).split("train")[5]["inputs"]["image"]
    assert other.shape != a.split("train")[5]["inputs"]["image"].shape or not np.allclose(
        other, a.split("train")[5]["inputs"]["image"]
    )
    scores = {}
    for mods in (["text"], ["image"], ["text", "image"]):
        xtr, ytr = pooled(a.split("train"), mods)
        xte, yte = pooled(a.split("test"), mods)
        scores[tuple(mods)] = LogisticRegression(max_iter=500).fit(xtr, ytr).score(xte, yte)
    both = scores[("text", "image")]
    assert both > 0.75 and both > scores[("text",)] + 0.1 and both > scores[("image",)] + 0.1


def test_synthetic_batches_run_through_toy_encoders():
    reader = build_reader("synthetic", {"task": "regression", "sizes": {"train": 4}})
    assert reader.info()["num_targets"] == 1
    model = build_model({"encoders": BACKBONES["pair"], "head": {"num_outputs": 1}})
    ds = reader.split("train")
    b = collate_examples([ds[i] for i in range(4)], dict(model.backbone.encoders))
    assert b["ids"] == ["train/0", "train/1", "train/2", "train/3"]
    assert all(isinstance(t, float) for t in b["targets"])
    assert model(b["inputs"])["logits"].shape == (4, 1)
    with pytest.raises(DataError, match="positive widths"):
        build_reader("synthetic", {"input_dims": {"text": 0}})
    # DataLoader workers started by spawn/forkserver receive the dataset pickled
    np.testing.assert_array_equal(
        pickle.loads(pickle.dumps(ds))[3]["inputs"]["text"], ds[3]["inputs"]["text"]
    )


# --- the real sets (slow; skipped when ../shared/data is absent) -------------------------------
@pytest.mark.slow
def test_real_avmnist_matches_build_py():
    root = os.path.join(SHARED, "avmnist")
    if not os.path.isfile(os.path.join(root, "avmnist.npz")):
        pytest.skip("shared AV-MNIST data not present")
    import importlib.util

    spec = importlib.util.spec_from_file_location("avmnist_build", os.path.join(root, "build.py"))
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    reader = build_reader("avmnist", {"root": root, "target_sampling_rate": 0})
    assert [len(reader.split(s)) for s in ("train", "val", "test")] == [1500, 500, 1000]
    d = np.load(os.path.join(root, "avmnist.npz"))
    reference = build.noisy_images(d)
    rows = np.flatnonzero(d["split"] == "test")
    ex = reader.split("test")[7]
    np.testing.assert_array_equal(ex["inputs"]["image"], reference[rows[7]])
    np.testing.assert_array_equal(ex["inputs"]["audio"], d["audio"][rows[7]].astype(np.float32) / 32768.0)
    assert ex["target"] == int(d["label"][rows[7]])


@pytest.mark.slow
def test_real_flickr8k_split_sizes():
    root = os.path.join(SHARED, "flickr8k_1k")
    if not os.path.isfile(os.path.join(root, "captions.tsv")):
        pytest.skip("shared Flickr8k data not present")
    reader = build_reader("flickr8k", {"root": root})
    assert reader.info()["num_items"] == {"train": 600, "val": 200, "test": 200}
    test = reader.split("test")
    assert len(test) == 1000
    ex = test[0]
    assert ex["inputs"]["image"].mode == "RGB" and isinstance(ex["inputs"]["text"], str)
    assert [test[i]["id"] for i in range(5)] == [ex["id"]] * 5
