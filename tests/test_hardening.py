"""Bad input and interrupted work on the CLI: named one-line errors, nothing lost or mixed up."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from mmpeft.cli.main import main
from test_cli import one_thread  # noqa: F401  (fixture)

FAST = ["data.sizes={train: 64, val: 32, test: 32}", "train.epochs=1", "train.tensorboard=false"]


def read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def test_output_holding_a_run_is_refused_unless_resume_or_overwrite(tmp_path, capsys):
    out = str(tmp_path / "run")
    train = ["train", "--config", "toy", "method=linear", *FAST, "--output", out]
    assert main(train) == 0
    before = read_json(os.path.join(out, "metrics.json"))
    adapter = sorted(os.listdir(os.path.join(out, "adapter")))
    assert main([*train, "train.lr=0.5"]) == 2  # the same folder, another run: refused, nothing touched
    err = capsys.readouterr().err
    assert out in err and "--resume" in err and "--overwrite" in err and "metrics.json" in err
    assert read_json(os.path.join(out, "metrics.json")) == before
    assert sorted(os.listdir(os.path.join(out, "adapter"))) == adapter
    assert main([*train, "train.lr=0.5", "--overwrite", "--resume"]) == 2
    assert main([*train, "train.lr=0.5", "--overwrite"]) == 0  # replaced as a whole
    with open(os.path.join(out, "config.yaml")) as f:
        assert "lr: 0.5" in f.read()
    after = read_json(os.path.join(out, "metrics.json"))
    assert after["history"] != before["history"]
    capsys.readouterr()
    assert main(["eval", "--run", out]) == 0  # the saved adapter is the new run's
    assert json.loads(capsys.readouterr().out)["test"]["accuracy"] == after["test"]["accuracy"]


def write_rows(path, labels: dict[str, list]) -> str:
    """A manifest of inline 2-d vectors with the given labels per split."""
    with open(path, "w") as f:
        for split, ys in labels.items():
            for i, y in enumerate(ys):
                f.write(json.dumps({"x": [float(i), 1.0], "label": y, "split": split}) + "\n")
    return str(path)


def manifest(path, **options):
    from mmpeft.data.base import build_reader

    return build_reader("manifest", {"root": path, "columns": {"x": "x"}, "kinds": {"x": "value"}, **options})


def test_a_label_outside_the_class_set_is_named_before_training(tmp_path):
    from mmpeft.data.base import DataError

    typo = write_rows(tmp_path / "a.jsonl", {"train": ["a", "b"] * 5, "val": ["a", "c"], "test": ["b"]})
    with pytest.raises(
        DataError, match=r"a\.jsonl, line 12, column 'label': unknown label 'c'.*'a': 5, 'b': 5"
    ):
        manifest(typo).info()
    stray = write_rows(tmp_path / "b.jsonl", {"train": [0, 1] * 5 + [7], "test": [1]})
    with pytest.raises(DataError, match=r"skip \[2, 3, 4, 5, 6\].*'7': 1"):
        manifest(stray).info()
    declared = manifest(stray, label_names=[str(k) for k in range(8)])  # the classes are declared: fine
    assert declared.info()["num_classes"] == 8
    late = write_rows(tmp_path / "c.jsonl", {"train": [0, 1] * 5, "test": [1, 7]})
    with pytest.raises(DataError, match=r"line 12, column 'label': unknown label 7"):
        manifest(late).info()
    clean = write_rows(tmp_path / "d.jsonl", {"train": ["a", "b"] * 5, "val": ["b"], "test": ["a"]})
    assert manifest(clean).info()["label_names"] == ["a", "b"]


def feature_run(tmp_path, missing_in: str) -> list[str]:
    """A manifest of .npy feature files for two modalities; one test file is left unwritten."""
    rng = np.random.default_rng(0)
    rows = []
    for split, n in (("train", 16), ("val", 8), ("test", 8)):
        for i in range(n):
            cells = {}
            for m in ("a", "b"):
                name = f"{split}-{m}-{i}.npy"
                if not (split == missing_in and m == "b" and i == 5):
                    np.save(tmp_path / name, rng.normal(size=(4, 3)).astype(np.float32))
                cells[m] = name
            rows.append({**cells, "label": i % 2, "split": split})
    write_jsonl(tmp_path / "m.jsonl", rows)
    enc = "{type: features, config: {input_dim: 3, dim: 8, depth: 1, heads: 2, max_len: 8}}"
    return [
        f"model.encoders={{a: {enc}, b: {enc}}}",
        f"data={{name: manifest, root: {tmp_path / 'm.jsonl'}, columns: {{a: a, b: b}}}}",
        "method=late_fusion",
        "train.epochs=1",
        "train.tensorboard=false",
    ]


def write_jsonl(path, rows) -> None:
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def test_a_missing_test_file_stops_the_run_before_training(tmp_path, capsys):
    out = str(tmp_path / "run")
    overrides = feature_run(tmp_path, missing_in="test")
    assert main(["train", "--config", "toy", *overrides, "--output", out]) == 2
    err = capsys.readouterr().err
    assert "m.jsonl, line 30, column 'b'" in err and "test-b-5.npy" in err and "not found" in err
    assert not os.path.exists(os.path.join(out, "checkpoints"))  # no step ran
    (tmp_path / "ok").mkdir()
    assert main(["train", "--config", "toy", *feature_run(tmp_path / "ok", "none"), "--output", out]) == 0


def test_a_missing_local_encoder_path_is_named_as_a_path(tmp_path, capsys):
    spec = "{type: hf_bert, path: ../nowhere/minilm}"
    assert (
        main(["train", "--config", "toy", f"model.encoders.text={spec}", "--output", str(tmp_path / "r")])
        == 2
    )
    err = capsys.readouterr().err
    assert "model.encoders.text.path '../nowhere/minilm': no such file or folder" in err
    assert "repo" not in err.lower()  # not reported as a bad hub repo id


def test_an_adapter_of_another_method_or_size_is_a_named_error(tmp_path, capsys):
    runs = {r: str(tmp_path / f"r{r}") for r in (2, 4)}
    for r, out in runs.items():
        assert (
            main(
                ["train", "--config", "toy", "method=lora", f"model.methods.0.r={r}", *FAST, "--output", out]
            )
            == 0
        )
    weights = os.path.join(runs[4], "adapter", "adapter_model.safetensors")
    shutil.copy(os.path.join(runs[2], "adapter", "adapter_model.safetensors"), weights)
    capsys.readouterr()
    assert main(["eval", "--run", runs[4]]) == 2
    err = capsys.readouterr().err
    assert "adapter_model.safetensors" in err and "shape" in err and "Traceback" not in err
    with open(weights, "wb") as f:
        f.write(b"not safetensors")
    assert main(["eval", "--run", runs[4]]) == 2
    assert "cannot read adapter weights" in capsys.readouterr().err


def test_a_damaged_checkpoint_on_resume_is_a_named_error_without_unsafe_advice(tmp_path, capsys):
    from mmpeft.train.checkpointing import STATE_NAME, checkpoint_folders

    out = str(tmp_path / "run")
    assert (
        main(
            [
                "train",
                "--config",
                "toy",
                *FAST,
                "train.stop_after_steps=2",
                "train.checkpoint_every_steps=1",
                "--output",
                out,
            ]
        )
        == 3
    )
    _, folder = checkpoint_folders(os.path.join(out, "checkpoints"))[-1]
    with open(os.path.join(folder, STATE_NAME), "wb") as f:
        f.write(b"\x80\x02garbage")
    capsys.readouterr()
    assert main(["train", "--output", out, "--resume"]) == 2
    err = capsys.readouterr().err
    assert STATE_NAME in err and "--overwrite" in err and "weights_only" not in err


def test_ctrl_c_exits_130_with_how_to_resume(tmp_path, capsys, monkeypatch):
    from mmpeft.train.trainer import Trainer

    out = str(tmp_path / "run")
    original = Trainer._after_step

    def interrupt_at_step_3(self, st, started):
        original(self, st, started)
        if st.step == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "_after_step", interrupt_at_step_3)
    args = [
        "train",
        "--config",
        "toy",
        *FAST,
        "train.epochs=3",
        "train.checkpoint_every_steps=2",
        "--output",
        out,
    ]
    assert main(args) == 130
    assert f"mmpeft train --output {out} --resume" in capsys.readouterr().err
    monkeypatch.setattr(Trainer, "_after_step", original)
    assert main(["train", "--output", out, "--resume"]) == 0


def test_relative_paths_of_a_config_file_work_from_any_directory(tmp_path, monkeypatch):
    from mmpeft.run_config import load_run_config

    (tmp_path / "project" / "data").mkdir(parents=True)
    (tmp_path / "project" / "data" / "m.jsonl").write_text("")
    config = tmp_path / "project" / "run.yaml"
    config.write_text(
        "data: {name: manifest, root: data/m.jsonl}\nmodel: {encoders: {t: {type: hf_bert, path: bert-base-uncased}}}\n"
    )
    monkeypatch.chdir(tmp_path)
    loaded = load_run_config(str(config))
    assert loaded["data"]["root"] == str(tmp_path / "project" / "data" / "m.jsonl")
    assert loaded["model"]["encoders"]["t"]["path"] == "bert-base-uncased"  # a hub name stays as written
    overridden = load_run_config(str(config), ["data.root=other.jsonl"])  # what the user types is theirs
    assert overridden["data"]["root"] == "other.jsonl"
    shipped = load_run_config("flickr8k-effnet-minilm")  # "../shared/..." from the repository root
    if os.path.isdir(os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "flickr8k_1k")):
        assert os.path.isdir(shipped["data"]["root"])


def test_run_files_follow_the_umask_not_tempfiles_private_modes(tmp_path):
    old = os.umask(0o022)
    try:
        out = str(tmp_path / "run")
        assert (
            main(["train", "--config", "toy", *FAST, "train.checkpoint_every_steps=1", "--output", out]) == 0
        )
    finally:
        os.umask(old)
    for root, dirs, files in os.walk(out):
        for d in dirs:
            assert os.stat(os.path.join(root, d)).st_mode & 0o777 == 0o755, d
        for f in files:
            assert os.stat(os.path.join(root, f)).st_mode & 0o777 == 0o644, f


def test_only_the_main_process_logs_info(tmp_path, monkeypatch, capsys):
    import logging

    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(logging.root, "handlers", [])
    assert main(["train", "--config", "toy", *FAST, "--output", str(tmp_path / "r")]) == 0
    assert logging.root.level == logging.WARNING
