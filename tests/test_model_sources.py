"""Where models come from: discovery of the package's model modules, timm's and torchvision's pretrained
weights through their own loaders (from a local cache, never the network), and a model from the user's own
package with its YAML in a searchpath folder, run through the real CLI."""

from __future__ import annotations

import json
import math
import os
import pkgutil
import subprocess
import sys
import urllib.error
from pathlib import Path

import pytest
import torch

import prunelab.models as models
from prunelab.models import MODELS, load_all
from prunelab.pipeline.run import _instantiate as instantiate  # unwraps Hydra's InstantiationException
from prunelab.pipeline.run import validate
from tests.test_cli import FAST

ROOT = Path(__file__).resolve().parent.parent


# discovery ----------------------------------------------------------------------------------------------
def test_every_model_module_is_discovered():
    load_all()
    registered_by = {fn.__module__ for fn in MODELS._items.values()}
    modules = {f"prunelab.models.{m.name}" for m in pkgutil.iter_modules(models.__path__) if m.name != "registry"}
    assert modules == registered_by, modules ^ registered_by
    assert {"timm", "torchvision", "lenet5", "resnet50", "vgg19"} <= set(models.list_models())


def test_new_model_file_needs_no_edit(tmp_path):
    """A new file in the models package registers its architecture without touching ``__init__.py``."""
    (tmp_path / "zz_extra_net.py").write_text(
        "from torch import nn\nfrom prunelab.models.registry import register_model\n\n"
        "@register_model(name='zz_extra_net')\ndef zz_extra_net(input_shape, num_classes):\n"
        "    return nn.Sequential(nn.Flatten(), nn.LazyLinear(num_classes))\n")
    models.__path__.append(str(tmp_path))
    try:
        assert "zz_extra_net" in load_all()
        net = models.build_model("zz_extra_net", (1, 4, 4), 3)
        assert net(torch.zeros(2, 1, 4, 4)).shape == (2, 3)
    finally:
        models.__path__.remove(str(tmp_path))
        MODELS._items.pop("zz_extra_net", None)
        sys.modules.pop("prunelab.models.zz_extra_net", None)


# timm ---------------------------------------------------------------------------------------------------
TIMM_ARCH = "test_resnet.r160_in1k"  # a tiny network with real pretrained weights on the hub (0.5M params)


def _random_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {k: torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone()
            for k, v in model.state_dict().items()}


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """An empty Hugging Face hub cache in tmp_path, offline: nothing can be downloaded."""
    from huggingface_hub import constants

    cache = tmp_path / "hf_hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def _cache_timm_checkpoint(cache: Path, arch: str) -> dict[str, torch.Tensor]:
    """A random checkpoint of ``arch`` (1000 classes, RGB) where timm's hub loader looks for it:
    ``models--timm--<arch>/snapshots/<commit>/model.safetensors`` with ``refs/main`` naming the commit."""
    import safetensors.torch
    import timm

    state = _random_state(timm.create_model(arch, pretrained=False))
    repo, commit = cache / f"models--timm--{arch}", "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    safetensors.torch.save_file(state, repo / "snapshots" / commit / "model.safetensors")
    return state


def test_timm_pretrained_loads_the_cached_checkpoint(make_cfg, hf_cache):
    state = _cache_timm_checkpoint(hf_cache, TIMM_ARCH)
    cfg = make_cfg("model=timm", f"model.arch={TIMM_ARCH}", "model.pretrained=true")  # data: 1x28x28, 10 classes
    model = instantiate(cfg.model, input_shape=(1, 28, 28), num_classes=10)
    got = model.state_dict()
    assert got.keys() == state.keys()
    for k, v in got.items():
        if k.startswith("fc."):  # 10 classes instead of 1000: timm discards the checkpoint's classifier
            assert v.shape[0] == 10
        elif k == "conv1.0.weight":  # 1 input channel: the RGB filters summed
            torch.testing.assert_close(v, state[k].sum(dim=1, keepdim=True))
        else:
            assert torch.equal(v, state[k]), k
    random = instantiate(make_cfg("model=timm", f"model.arch={TIMM_ARCH}").model, input_shape=(1, 28, 28),
                         num_classes=10)
    assert not torch.equal(random.state_dict()["conv1.1.weight"], state["conv1.1.weight"])


def test_timm_pretrained_missing_names_the_cache(make_cfg, hf_cache):
    cfg = make_cfg("model=timm", f"model.arch={TIMM_ARCH}", "model.pretrained=true")
    with pytest.raises(FileNotFoundError) as err:
        instantiate(cfg.model, input_shape=(1, 28, 28), num_classes=10)
    msg = str(err.value)
    assert str(hf_cache / f"models--timm--{TIMM_ARCH}") in msg and "model.pretrained_file" in msg


def test_timm_pretrained_file(tmp_path, make_cfg, hf_cache):
    import timm

    state = _random_state(timm.create_model(TIMM_ARCH, pretrained=False, num_classes=10, in_chans=1))
    file = tmp_path / "mine.pth"
    torch.save(state, file)
    cfg = make_cfg("model=timm", f"model.arch={TIMM_ARCH}", f"model.pretrained_file={file}")
    model = instantiate(cfg.model, input_shape=(1, 28, 28), num_classes=10)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_timm_arch_without_weights_is_an_option_error(make_cfg):
    cfg = make_cfg("model=timm", "model.arch=test_mambaout", "model.pretrained=true")
    with pytest.raises(ValueError, match=r"^model.arch='test_mambaout' has no pretrained weights"):
        instantiate(cfg.model, input_shape=(1, 28, 28), num_classes=10)


# torchvision --------------------------------------------------------------------------------------------
TV_ARCH = "shufflenet_v2_x0_5"  # 1.4M parameters


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    """An empty TORCH_HOME; downloads fail as they do offline."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))

    def offline(url, *args, **kwargs):
        raise urllib.error.URLError("network unreachable (test)")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    return tmp_path / "torch_home"


def test_torchvision_weights_enum_loads_the_cached_file(make_cfg, torch_home):
    from torchvision import models as tvm

    weights = tvm.get_model_weights(TV_ARCH).DEFAULT
    state = _random_state(tvm.get_model(TV_ARCH))
    file = torch_home / "hub" / "checkpoints" / os.path.basename(weights.url)
    file.parent.mkdir(parents=True)
    torch.save(state, file)
    cfg = make_cfg("model=torchvision", f"model.arch={TV_ARCH}", "model.weights_name=DEFAULT")
    model = instantiate(cfg.model, input_shape=(1, 28, 28), num_classes=10)
    got = model.state_dict()
    assert got.keys() == state.keys()
    for k, v in got.items():
        if k.startswith("fc."):  # new head for 10 classes
            assert v.shape[0] == 10
        elif k == "conv1.0.weight":  # 1 input channel: the RGB filters summed, as timm adapts them
            torch.testing.assert_close(v, state[k].sum(dim=1, keepdim=True))
        else:
            assert torch.equal(v, state[k]), k
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def test_torchvision_weights_missing_names_the_file(make_cfg, torch_home):
    cfg = make_cfg("model=torchvision", f"model.arch={TV_ARCH}", "model.weights_name=IMAGENET1K_V1")
    with pytest.raises(FileNotFoundError, match="shufflenetv2_x0.5-f707e7126e.pth") as err:
        instantiate(cfg.model, input_shape=(1, 28, 28), num_classes=10)
    assert str(torch_home / "hub" / "checkpoints") in str(err.value)


def test_torchvision_bad_options(make_cfg):
    cfg = make_cfg("model=torchvision", f"model.arch={TV_ARCH}", "model.weights_name=IMAGENET9K")
    with pytest.raises(ValueError, match=r"model.weights_name='IMAGENET9K' .* allowed values: IMAGENET1K_V1, DEFAULT"):
        instantiate(cfg.model, input_shape=(1, 28, 28), num_classes=10)
    cfg = make_cfg("model=torchvision", "model.arch=nope")
    with pytest.raises(ValueError, match=r"model.arch='nope' is not a torchvision classification model; allowed"):
        instantiate(cfg.model, input_shape=(1, 28, 28), num_classes=10)


def test_torchvision_random_init_fits_the_data(make_cfg):
    cfg = make_cfg("model=torchvision", "model.arch=mobilenet_v3_small")
    model = instantiate(cfg.model, input_shape=(1, 28, 28), num_classes=7)
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 7)


# the user's own package -----------------------------------------------------------------------------------
USER_NETS = '''
import math
from torch import nn


def make_net(input_shape, num_classes, hidden=16):
    """A factory function."""
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), hidden), nn.ReLU(),
                         nn.Linear(hidden, num_classes))


class Net(nn.Sequential):
    def __init__(self, input_shape, num_classes, hidden=16):
        super().__init__(*make_net(input_shape, num_classes, hidden))
'''


@pytest.mark.slow
def test_user_package_model_and_searchpath_yaml_through_the_cli(tmp_path):
    (tmp_path / "userpkg").mkdir()
    (tmp_path / "userpkg" / "__init__.py").write_text("")
    (tmp_path / "userpkg" / "nets.py").write_text(USER_NETS)
    (tmp_path / "myconf" / "model").mkdir(parents=True)
    (tmp_path / "myconf" / "model" / "usernet.yaml").write_text("_target_: userpkg.nets.make_net\nhidden: 12\n")
    env = dict(os.environ, WANDB_MODE="offline", PYTHONWARNINGS="ignore",
               PYTHONPATH=os.pathsep.join([str(tmp_path), str(ROOT)]))
    out = subprocess.run([sys.executable, "-m", "prunelab.cli", *FAST, "logger=none",
                          f"hydra.searchpath=[file://{tmp_path / 'myconf'}]", "model=usernet"],
                         cwd=tmp_path, env=env, text=True, capture_output=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    (results,) = tmp_path.glob("outputs/runs/**/results.json")
    res = json.loads(results.read_text())
    assert res["config"]["model"] == {"_target_": "userpkg.nets.make_net", "hidden": 12}
    assert res["final"]["params_total"] == 784 * 12 + 12 + 12 * 10 + 10  # the factory's network, hidden=12
    assert res["final"]["sparsity_direct"] == pytest.approx(0.9, abs=1e-3)


def test_user_class_and_function_targets_pass_the_option_check(tmp_path, make_cfg, monkeypatch):
    (tmp_path / "userpkg2").mkdir()
    (tmp_path / "userpkg2" / "__init__.py").write_text("")
    (tmp_path / "userpkg2" / "nets.py").write_text(USER_NETS)
    monkeypatch.syspath_prepend(str(tmp_path))
    for target in ("userpkg2.nets.make_net", "userpkg2.nets.Net"):
        cfg = make_cfg("model=mlp", f"model._target_={target}", "~model.name", "~model.activation", "model.hidden=5")
        validate(cfg)
        net = instantiate(cfg.model, input_shape=(1, 4, 4), num_classes=3)
        assert math.prod(net[1].weight.shape) == 16 * 5
        cfg = make_cfg("model=mlp", f"model._target_={target}", "~model.name", "~model.activation", "~model.hidden", "+model.width=5")
        with pytest.raises(ValueError, match=f"model.width is not an option of .*{target}.*; allowed options: "
                                             "input_shape, num_classes, hidden"):
            validate(cfg)
