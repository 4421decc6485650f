"""End-to-end runs of the trainer on tiny settings (digits, and ResNet-50 on a fixture CUB tree)."""
import json

import pytest
import torch

from metrix_kernels.train import Config, Trainer
from metrix_kernels.train.cli import main, parser, resolve

from train_fixtures import make_cub

# The reference backend keeps these tests independent of which fused backends are built here.
TINY = ["--no-progress", "--max-steps-per-epoch", "2", "--reservoir-size", "50", "--positivity-batches", "1",
        "--backend", "reference"]


def _run(tmp_path, *args):
    out = tmp_path / "run"
    assert main(["--out", str(out), *TINY, *args]) == 0
    return out, json.loads((out / "results.json").read_text())


def test_digits_end_to_end_writes_every_output(tmp_path):
    out, results = _run(tmp_path, "--epochs", "2")
    for name in ("results.md", "train.log", "checkpoint.pt", "recall.png", "positivity.png", "utilization.png"):
        assert (out / name).is_file(), name
    assert not list(out.glob("*.tmp"))
    final = results["final"]
    assert results["method"] == "metrix/feature" and len(results["history"]) == 2
    assert set(final["recall"]) == {"1", "2", "4", "8"} and 0 <= final["recall"]["1"] <= 100
    assert final["mixed_recorded"] == 50 and final["utilization_mixed"] <= final["utilization"] + 1e-6
    assert all(0 <= p["empirical"] <= 1 and 0 <= p["cdf"] <= 1 for p in final["positivity"])
    assert "| digits | multi_similarity | metrix/feature |" in (out / "results.md").read_text()


@pytest.mark.parametrize(
    "args",
    [
        ["--backend", "auto"],  # the default path, on whichever backend this machine has
        ["--loss", "contrastive", "--mixup", "input"],
        ["--loss", "proxy_anchor", "--mixup", "embedding"],
        ["--loss", "proxy_nca_pp", "--method", "baseline"],
        ["--loss", "contrastive", "--method", "mochi-neg-neg"],
        ["--loss", "multi_similarity", "--method", "i-mix", "--hard-negatives", "1"],
    ],
)
def test_losses_mixups_and_methods(tmp_path, args):
    _, results = _run(tmp_path, "--epochs", "1", *args)
    assert results["final"]["recall"]["1"] >= 0
    if "baseline" in args:
        assert results["final"]["utilization_mixed"] is None


def test_resume_reproduces_an_uninterrupted_run(tmp_path):
    common = ["--epochs", "3", "--loss", "proxy_anchor", "--seed", "7"]
    _, straight = _run(tmp_path / "a", *common)
    resumed_out = tmp_path / "b" / "run"
    assert main(["--out", str(resumed_out), *TINY, *common, "--stop-after-epoch", "1"]) == 0
    assert not (resumed_out / "results.json").exists()
    assert main(["--out", str(resumed_out), "--resume", "--no-progress"]) == 0
    resumed = json.loads((resumed_out / "results.json").read_text())
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in straight["history"]]
    for key in ("recall", "alignment", "uniformity", "utilization", "utilization_mixed", "positivity"):
        assert resumed["final"][key] == straight["final"][key], key
    a = torch.load(tmp_path / "a/run/checkpoint.pt", weights_only=False)["model"]
    b = torch.load(resumed_out / "checkpoint.pt", weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resnet50_path_with_random_weights(tmp_path):
    make_cub(tmp_path / "data", per_class=4)
    config = Config(dataset="cub200", data_root=str(tmp_path / "data"), out=str(tmp_path / "run"),
                    backbone="resnet50", pretrained="none", embedding_size=16, image_size=32, batch_size=6,
                    lr=1e-4, epochs=2, warmup_epochs=1, freeze_bn=True, max_steps_per_epoch=1,
                    reservoir_size=8, positivity_batches=1, progress=False, backend="reference")
    trainer = Trainer(config)
    before = {k: v.clone() for k, v in trainer.model.backbone.state_dict().items()}
    trainer.sampler.set_epoch(0)
    trainer.model.freeze_backbone(True)
    trainer._train_epoch(0)  # warm-up: only the embedding layer moves; frozen BN keeps its statistics
    after = trainer.model.backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    results = trainer.fit()
    assert len(results["history"]) == 2 and results["final"]["recall"]["1"] >= 0
    bn = trainer.model.backbone[1]
    assert not bn.training and not bn.weight.requires_grad


def test_missing_data_root_is_a_clear_error(tmp_path, capsys):
    assert main(["--dataset", "sop", "--data-root", str(tmp_path), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    assert "Ebay_train.txt" in capsys.readouterr().err


def test_presets_resolve():
    cub = resolve(parser().parse_args(["--dataset", "cub200", "--loss", "contrastive"]))
    assert (cub.backbone, cub.embedding_size, cub.batch_size, cub.lr, cub.mixup) == ("resnet50", 512, 100, 1e-4, "feature")
    assert cub.loss_params == {"pos_margin": 0.0, "neg_margin": 0.5} and cub.freeze_bn and cub.warmup_epochs == 1
    sop = resolve(parser().parse_args(["--dataset", "sop", "--method", "mochi-anc-neg", "--loss-param", "neg_margin=0.7",
                                       "--loss", "contrastive"]))
    assert (sop.sampler, sop.mixup, sop.label_mode, sop.pairs) == ("balanced", "embedding", "negative", "anc-neg")
    assert sop.loss_params["neg_margin"] == 0.7
    base = resolve(parser().parse_args(["--mixup", "none"]))
    assert base.mixup is None and base.method == "baseline"


def test_resnet50_weights_from_a_local_file_and_no_download(tmp_path, monkeypatch):
    from torchvision.models import resnet50

    from metrix_kernels.train.model import build_model

    state = resnet50(weights=None).state_dict()
    torch.save(state, tmp_path / "r50.pth")
    model = build_model("resnet50", 8, str(tmp_path / "r50.pth"), freeze_bn=True)
    assert torch.equal(model.backbone[0].weight, state["conv1.weight"])
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "empty-cache"))
    with pytest.raises(FileNotFoundError, match="does not\\s+download"):
        build_model("resnet50", 8, "imagenet")
