"""UniAdapter's faithful BLIP route through the trainer and the CLI: ITC + ITM training, ITM re-ranking.

A tiny random ``BlipForImageTextRetrieval`` is saved with a tiny tokenizer and image processor, so
the shipped ``uniadapter-blip`` preset runs unchanged except for paths and sizes (overrides) on a
Karpathy-format dataset of small PIL images.
"""

from __future__ import annotations

import json
import os
from contextlib import nullcontext

import numpy as np
import pytest
import torch

from cases import BACKBONES
from mmpeft.run_config import load_run_config
from mmpeft.tasks.base import build_task

pytest.importorskip("transformers")
pytest.importorskip("PIL")

WORDS = "a the dog cat bird red blue green small big runs sits on grass road tree car".split()
TINY_BLIP = {
    "vision_config": {
        "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "image_size": 32, "patch_size": 16, "initializer_range": 0.02,
    },
    "text_config": {
        "vocab_size": 40, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "max_position_embeddings": 64,
        "bos_token_id": 2, "eos_token_id": 3, "sep_token_id": 3, "pad_token_id": 0,
    },
    "image_text_hidden_size": 16,
}  # fmt: skip


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def blip_dir(tmp_path_factory) -> str:
    """A tiny random BLIP with its own tokenizer and image processor, loadable offline."""
    tf = pytest.importorskip("transformers")
    path = str(tmp_path_factory.mktemp("tiny-blip"))
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS])}
    tf.BertTokenizer(vocab=vocab).save_pretrained(path)
    tf.BlipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(path)
    torch.manual_seed(0)
    tf.BlipForImageTextRetrieval(tf.BlipConfig(**TINY_BLIP)).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def karpathy_json(tmp_path_factory) -> str:
    """Karpathy-format captions: 4 train, 3 val, 3 test images, 2 captions each."""
    from PIL import Image

    root = tmp_path_factory.mktemp("captions")
    rng = np.random.default_rng(0)
    images = []
    for n, split in enumerate(["train"] * 4 + ["val"] * 3 + ["test"] * 3):
        name = f"img{n}.png"
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(root / name)
        captions = [" ".join(rng.choice(WORDS, size=int(rng.integers(3, 7)))) for _ in range(2)]
        images.append(
            {"filename": name, "imgid": n, "split": split, "sentences": [{"raw": c} for c in captions]}
        )
    path = root / "dataset_tiny.json"
    path.write_text(json.dumps({"images": images}))
    return str(path)


def overrides(blip_dir: str, data: str, *extra: str) -> list[str]:
    return [
        f"model.encoders.image.path={blip_dir}",
        f"model.encoders.text.path={blip_dir}",
        "model.methods=[{name: uniadapter, r: 8}]",
        f"data.root={data}",
        f"data.image_root={os.path.dirname(data)}",
        "train.epochs=1",
        "train.batch_size=4",
        "train.lr=1.0e-3",
        "train.tensorboard=false",
        "train.progress=false",
        *extra,
    ]


def preset(blip_dir: str, data: str, *extra: str) -> dict:
    return load_run_config("uniadapter-blip", overrides(blip_dir, data, *extra))


def itm_only_params(model) -> dict[str, torch.Tensor]:
    """Parameters that only the ITM loss reaches: the cross-modal branch and the ITM head."""
    out = {f"cross{k}": m.cross_up.weight for k, m in model.peft["uniadapter"]["shared"].items()}
    out["itm_head"] = model.peft["head"].itm_head.weight
    return {k: v.detach().clone() for k, v in out.items()}


@pytest.mark.parametrize("itm", ["null", "false"])
def test_trainer_step_trains_itm_parts_only_with_itm(blip_dir, karpathy_json, itm):
    from mmpeft.train import Trainer

    trainer = Trainer(preset(blip_dir, karpathy_json, "train.checkpoint=false", f"task.itm={itm}"))
    before = itm_only_params(trainer.model)
    assert trainer.model.peft["head"].itm is (itm == "null")  # null: on, since the head has an ITM head
    trainer.fit()
    after = itm_only_params(trainer.model)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed == (list(before) if itm == "null" else []), changed


def test_itm_loss_is_added_to_itc(blip_dir, karpathy_json):
    from mmpeft.train.setup import build_components

    comps = build_components(preset(blip_dir, karpathy_json, "task.itm_weight=0.5"))
    model, task = comps.model.train(), comps.task
    examples = [comps.reader.split("train")[i] for i in range(4)]
    from mmpeft.data.base import collate_examples

    batch = collate_examples(examples, model.backbone.encoders)
    torch.manual_seed(0)
    outputs = model(batch["inputs"], ids=batch["ids"])
    emb = outputs["logits"]
    assert batch["ids"] == ["0", "0", "1", "1"]  # two images, two captions each
    n = 4 + 4 + 4  # the positive pairs, a negative text per image and a negative image per text
    assert emb["itm_logits"].shape == (n, 2) and emb["itm_labels"].tolist() == [1] * 4 + [0] * (n - 4)
    itc_only = build_task("retrieval", {"itm": False})
    want = itc_only.loss(outputs, batch) + 0.5 * torch.nn.functional.cross_entropy(
        emb["itm_logits"], emb["itm_labels"]
    )
    torch.testing.assert_close(task.loss(outputs, batch), want)
    with torch.no_grad():
        assert "itm_logits" not in model.eval()(batch["inputs"], ids=batch["ids"])["logits"]


def all_pairs_itm_metrics(model, dataset, ks) -> dict[str, float]:
    """Oracle: rank every gallery image / every caption by the ITM match logit alone."""
    from mmpeft.data.base import collate_examples
    from mmpeft.methods.uniadapter_blip import itm_logits

    batch = collate_examples([dataset[i] for i in range(len(dataset))], model.backbone.encoders)
    ids = batch["ids"]
    first = [ids.index(i) for i in dict.fromkeys(ids)]  # one gallery image per id
    with torch.no_grad():
        images = model.backbone(batch["inputs"])["image"].tokens[first]  # (I, N, D)
        texts = batch["inputs"]["text"]
        scores = torch.stack(
            [
                itm_logits(model, images[i : i + 1].expand(len(ids), -1, -1), texts)[:, 1]
                for i in range(len(first))
            ]
        )  # (I, T)
    img_ids, out = [ids[j] for j in first], {}
    for name, s, q_ids, g_ids in (
        ("image_to_text", scores, img_ids, ids),
        ("text_to_image", scores.t(), ids, img_ids),
    ):
        for k in ks:
            hits = [{g_ids[j] for j in row.argsort(descending=True)[:k].tolist()} for row in s]
            out[f"{name}_r{k}"] = float(np.mean([q in h for q, h in zip(q_ids, hits, strict=True)]))
    return out


def test_rerank_changes_metrics_by_itm_and_k0_is_itc(blip_dir, karpathy_json):
    from mmpeft.train.cache import TrainModule
    from mmpeft.train.evaluation import evaluate
    from mmpeft.train.setup import build_components

    comps = build_components(preset(blip_dir, karpathy_json, "task.ks=[1, 2]"))
    model = comps.model.eval()
    torch.manual_seed(1)
    with torch.no_grad():  # adapters and ITM head that disagree with the ITC ranking
        for name, p in model.peft.named_parameters():
            if ".up." in name or "cross_up" in name or "itm_head" in name:
                p.normal_(0, 1.0)
    test = comps.reader.split("test")  # 3 images x 2 captions

    def metrics(**options):
        task = build_task("retrieval", {"ks": [1, 2], **options})
        task.prepare(model, comps.info)
        return evaluate(TrainModule(model), task, test, 4, "cpu", nullcontext)

    itc, full = metrics(rerank_k=0), metrics(rerank_k=6)
    assert itc == metrics(itm=False)  # rerank_k=0: ITC ranking, with or without ITM training
    assert metrics(rerank_k=1) == itc  # only the top candidate re-scored: the same order as ITC
    oracle = all_pairs_itm_metrics(model, test, [1, 2])
    assert {k: full[k] for k in oracle} == oracle  # k covers the gallery: ITM alone ranks
    head = model.peft["head"]
    with torch.no_grad():  # constant ITC embeddings: every candidate ties, every query hits at ITC
        for proj in (head.vision_proj, head.text_proj):
            proj.weight.zero_()
            proj.bias.fill_(1.0)
    tied, reranked = metrics(rerank_k=0), metrics(rerank_k=6)
    assert tied["rsum"] == 400.0  # 4 recalls of 100%
    assert {k: reranked[k] for k in oracle} == oracle  # ITM breaks the ties, and it is not perfect
    assert reranked["rsum"] < 400.0


def test_train_then_eval_run_reproduces_reranked_test_metrics(blip_dir, karpathy_json, tmp_path, capsys):
    from mmpeft.cli.main import main

    out = str(tmp_path / "run")
    args = overrides(blip_dir, karpathy_json, "task.rerank_k=2")
    assert main(["train", "--config", "uniadapter-blip", *args, "--output", out]) == 0
    with open(os.path.join(out, "metrics.json")) as f:
        metrics = json.load(f)
    assert metrics["test"]["rsum"] >= 0 and "image_to_text_r1" in metrics["test"]
    capsys.readouterr()
    assert main(["eval", "--run", out]) == 0
    assert json.loads(capsys.readouterr().out)["test"] == metrics["test"]  # exactly


def test_itm_options_need_an_itm_head():
    from mmpeft.model import build_model

    model = build_model({"encoders": BACKBONES["pair"], "head": {"num_outputs": 0}})
    for options in ({"itm": True}, {"rerank_k": 4}):
        with pytest.raises(ValueError, match="ITM cross-encoder"):
            build_task("retrieval", options).prepare(model, {})
    build_task("retrieval").prepare(model, {})  # itm=None: ITC only, no error
    with pytest.raises(ValueError, match="rerank_k"):
        build_task("retrieval", {"rerank_k": -1})
