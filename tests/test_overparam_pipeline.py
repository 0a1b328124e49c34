"""Over-parameterized fine-tuning (Qian et al. 2022) of structurally pruned, compacted networks through the
pipeline: method=l2_norm schedule=oneshot -> compact model -> finetune=overparam / overparam_spkd (expand,
fine-tune, SP-KD from the dense teacher, merge) -> a final model with exactly the compact architecture.
Also: every conf/experiment/overparam_*.yaml composes and its sweep instantiates."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import get_class, instantiate

from prunelab.cli import CONFIG_DIR
from prunelab.finetune.overparam import EXPANDED_TYPES, count_params
from prunelab.finetune.overparam_strategy import OverParam, OverParamSPKD
from prunelab.pipeline.run import run_pipeline, validate
from tests.conftest import compose_config

MEASURE = ["measure.latency=false"]
OVERLAYS = sorted(p.stem for p in Path(CONFIG_DIR, "experiment").glob("overparam_*.yaml"))


def _shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("strategy", ["overparam", "overparam_spkd"])
def test_structured_oneshot_then_overparam_finetune(make_cfg, monkeypatch, strategy):
    """The merged model has the compact model's architecture and parameter count, and computes (eval mode)
    what the expanded model computed at the end of fine-tuning; with SP-KD the dense teacher is untouched."""
    seen: dict[str, object] = {}
    original_finish = OverParam.finish

    def spy_finish(self, prepared):
        model = prepared.model
        assert sum(isinstance(m, EXPANDED_TYPES) for m in model.modules()) == len(prepared.info["expanded_layers"])
        seen["params_expanded"] = count_params(model)
        model.eval()
        x = torch.randn(16, 1, 28, 28, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            seen["y_expanded"] = model(x.to(next(model.parameters()).device)).cpu()
        out = original_finish(self, prepared)
        merged = out[0]
        assert not any(isinstance(m, EXPANDED_TYPES) for m in merged.modules())
        merged.eval()
        with torch.no_grad():
            seen["y_merged"] = merged(x.to(next(merged.parameters()).device)).cpu()
        return out

    original_spkd_finish = OverParamSPKD.finish

    def spy_spkd_finish(self, prepared):
        spkd = prepared.info["_spkd"]
        seen["teacher"] = {k: v.detach().clone() for k, v in spkd.teacher.state_dict().items()}
        seen["teacher_grads"] = [p.grad for p in spkd.teacher.parameters()]
        seen["teacher_trainable"] = any(p.requires_grad for p in spkd.teacher.parameters())
        return original_spkd_finish(self, prepared)

    monkeypatch.setattr(OverParam, "finish", spy_finish)
    monkeypatch.setattr(OverParamSPKD, "finish", spy_spkd_finish)
    cfg = make_cfg("model=resnet20", "+model.width=8", "method=l2_norm", "schedule=oneshot", "method.amount=0.5",
                   "method.target_kind=flops", f"finetune={strategy}", "finetune.expand_ratio=2",
                   *(["finetune.positions=expanded"] if strategy == "overparam_spkd" else []), *MEASURE)
    res = run_pipeline(cfg)
    run_dir = Path(cfg.paths.output_dir)
    compact = torch.load(run_dir / "stages" / "prune.pt", weights_only=False)["module"]  # before fine-tuning
    final = torch.load(run_dir / "model_compact.pt", weights_only=False)  # after fine-tuning and merge
    strat = res["stages"]["finetune"]["strategy"]

    # exactly the compact architecture and parameter count (not the dense, not the expanded one)
    assert [type(m).__name__ for m in final.modules()] == [type(m).__name__ for m in compact.modules()]
    assert _shapes(final) == _shapes(compact)
    n_compact = count_params(compact)
    assert count_params(final) == n_compact == res["final"]["params_after"] < res["final"]["params_before"]
    assert strat["params_compact"] == strat["params_after_merge"] == n_compact
    assert strat["params_expanded"] == seen["params_expanded"] > n_compact
    assert len(strat["expanded_layers"]) > 10  # every conv of the residual blocks (and shortcuts), not the fc
    assert "fc" not in strat["expanded_layers"]
    # fine-tuning changed the weights, and the merge reproduces the expanded network
    changed = [k for k, v in final.state_dict().items() if v.is_floating_point()
               and not torch.allclose(v, compact.state_dict()[k])]
    assert any(k.endswith("conv1.weight") for k in changed)
    y_exp, y_merged = seen["y_expanded"], seen["y_merged"]
    assert torch.isfinite(y_exp).all()
    assert (y_merged - y_exp).abs().max().item() <= 1e-5 * max(1.0, y_exp.abs().max().item())
    final.eval()
    with torch.no_grad():
        y_saved = final(torch.randn(16, 1, 28, 28, generator=torch.Generator().manual_seed(1)))
    assert torch.allclose(y_saved, y_merged, atol=1e-6)

    if strategy == "overparam_spkd":
        assert strat["spkd"]["gamma"] == 3000.0
        assert strat["spkd"]["positions"] == strat["expanded_layers"]
        # the teacher is the cached dense model, frozen: no gradient, weights unchanged by fine-tuning
        dense = torch.load(Path(res["stages"]["pretrain"]["dir"]) / "model.pt", weights_only=True)
        assert all(g is None for g in seen["teacher_grads"]) and not seen["teacher_trainable"]
        for k, v in dense.items():
            assert torch.equal(seen["teacher"][k].cpu(), v), k
    else:
        assert "spkd" not in strat


def test_overparam_spkd_needs_the_dense_teacher():
    s = OverParamSPKD(epochs=1)
    with pytest.raises(ValueError, match="dense teacher"):
        s.prepare(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2)), None, None)


def _compose_with_hydra(overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("config", overrides=overrides, return_hydra_config=True)


def test_overlays_exist():
    assert {"overparam_resnet56_cifar10", "overparam_vgg19_cifar10", "overparam_resnet50_imagenet"} <= set(OVERLAYS)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_composes_and_every_sweep_arm_instantiates(overlay, tmp_path):
    params = _compose_with_hydra([f"experiment={overlay}"]).hydra.sweeper.params
    arms = [a.strip() for a in str(params["finetune"]).split(",")]
    assert arms == ["vanilla", "overparam", "overparam_spkd_last"]  # SP-KD on one feature, as the reference
    ratios = [float(a) for a in str(params["method.amount"]).split(",")]
    assert len(ratios) >= 2 and all(0 < r < 1 for r in ratios)
    expected = {"vanilla": "prunelab.finetune.base.Finetune",
                "overparam": "prunelab.finetune.overparam_strategy.OverParam",
                "overparam_spkd_last": "prunelab.finetune.overparam_strategy.OverParamSPKD"}
    recipes = set()
    for arm in arms:
        for ratio in (ratios[0], ratios[-1]):
            over = [f"experiment={overlay}", f"finetune={arm}", f"method.amount={ratio}"]
            if "imagenet" in overlay:
                over.append("model.weights=/nonexistent/resnet50.pth")  # composing only; never loaded
            cfg = compose_config(tmp_path, over)
            validate(cfg)  # option names/values of every group, as the CLI checks them before training
            assert cfg.finetune._target_ == expected[arm]
            assert arm != "overparam_spkd_last" or cfg.finetune.positions == "last"
            assert cfg.schedule._target_.endswith("OneShot")
            assert cfg.method.criterion == "l2_norm" and cfg.method.target_kind == "flops"
            assert cfg.method.amount == ratio
            ft = instantiate(cfg.finetune)
            assert isinstance(ft, get_class(expected[arm]))
            method = instantiate(cfg.method)
            assert method.structured is True
            recipes.add((ft.epochs, repr(ft.optimizer), repr(ft.scheduler)))
    assert len(recipes) == 1  # the three strategies share epochs, optimiser and LR schedule
