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
    assert set(results["untrained_recall"]) == {"1", "2", "4", "8"}
    assert "The network before training: R@1" in (out / "results.md").read_text()


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
    assert resumed["untrained_recall"] == straight["untrained_recall"]
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
    assert sop.mix_hardest and not cub.mix_hardest  # MoCHi mixes the hardest negatives only
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


def test_a_folder_holding_a_run_is_not_overwritten(tmp_path, capsys):
    out, _ = _run(tmp_path, "--epochs", "1")
    stamp = (out / "checkpoint.pt").stat().st_mtime_ns
    assert main(["--out", str(out), *TINY, "--epochs", "1", "--loss", "contrastive"]) == 2
    assert "holds a run already" in capsys.readouterr().err
    assert (out / "checkpoint.pt").stat().st_mtime_ns == stamp
    assert main(["--out", str(out), *TINY, "--epochs", "1", "--loss", "contrastive", "--overwrite"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["loss"] == "contrastive"
    assert "multi_similarity" not in (out / "train.log").read_text()  # the old run's log went with it


def test_resume_refuses_settings_that_differ_from_the_run(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["--out", str(out), *TINY, "--epochs", "2", "--loss", "contrastive", "--stop-after-epoch", "1"]) == 0
    assert main(["--out", str(out), "--resume", "--no-progress", "--lr", "0.01", "--epochs", "4"]) == 2
    err = capsys.readouterr().err
    assert "these differ: epochs 4 (the run's: 2), lr 0.01 (the run's: 0.001)" in err
    # flags equal to the run's, and runtime ones, are fine; unset ones come from the run
    assert main(["--out", str(out), "--resume", "--no-progress", "--loss", "contrastive", "--workers", "0"]) == 0


@pytest.mark.parametrize("args, message", [
    (["--epochs", "0"], "argument --epochs: must be > 0, got 0"),
    (["--eval-every", "0"], "argument --eval-every: must be > 0"),
    (["--lr-step", "0"], "argument --lr-step: must be > 0"),
    (["--batch-size", "0"], "argument --batch-size: must be > 0"),
    (["--samples-per-class", "-5"], "argument --samples-per-class: must be > 0"),
    (["--grad-clip", "0"], "argument --grad-clip: must be > 0"),
    (["--lr", "nan"], "argument --lr: must be > 0"),
    (["--weight", "-1"], "argument --weight: must be >= 0"),
    (["--epochs", "1.5"], "argument --epochs: expected an integer, got '1.5'"),
])
def test_bad_values_are_refused_when_parsed(args, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([*TINY, *args])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--method", "baseline", "--mixup", "feature"], "--method baseline has mixup None: with --mixup feature"),
    (["--method", "mochi-anc-neg", "--label-mode", "interpolate"], "use --method metrix --label-mode interpolate"),
    (["--method", "mochi-neg-neg", "--no-mix-hardest"], "has mix_hardest True: with --no-mix-hardest"),
    (["--backbone", "resnet50"], "the digits are 8 x 8 grey arrays for --backbone digits"),
    (["--image-size", "32"], "--image-size applies to image datasets"),
    (["--loss-param", "margin"], "--loss-param expects NAME=NUMBER, got 'margin'"),
    (["--loss-param", "margin=0.2"], "loss 'multi_similarity' got unexpected parameter(s) ['margin']"),
    (["--sampler", "balanced", "--samples-per-class", "5", "--batch-size", "5"], "at least two classes per batch"),
    (["--sampler", "balanced", "--samples-per-class", "4", "--batch-size", "10"], "must be a multiple of 4"),
    (["--backend", "tpu"], "unknown backend 'tpu'"),
])
def test_settings_that_cannot_work_are_a_clear_error(tmp_path, args, message, capsys):
    assert main(["--out", str(tmp_path / "run"), *TINY, *args]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="the error is for a machine without a GPU")
def test_cuda_device_without_a_gpu_is_a_clear_error(tmp_path, capsys):
    assert main(["--out", str(tmp_path / "run"), *TINY, "--device", "cuda"]) == 2
    assert "torch sees no GPU here" in capsys.readouterr().err


def test_results_json_is_strict_json(tmp_path):
    """contrastive has no eq. 25 positivity estimate (NaN in memory): null in the file."""
    out, _ = _run(tmp_path, "--epochs", "1", "--loss", "contrastive")

    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    results = json.loads((out / "results.json").read_text(), parse_constant=refuse)
    assert all(p["cdf"] is None for p in results["final"]["positivity"])
