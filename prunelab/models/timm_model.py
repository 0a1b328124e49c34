"""Any timm model by name: ``model=timm model.arch=resnet26d``, randomly initialised (timm's own init) or
with timm's pretrained weights: ``model.pretrained=true`` (``model.arch=resnet18.a1_in1k`` picks a weight tag;
without a tag timm's default one), or a local checkpoint in timm's format: ``model.pretrained_file=<file>``
(``.safetensors`` or a torch state dict; its own number of classes and input channels are read from it).

Pretrained weights come through timm's own loader (``timm.create_model(pretrained=True)``), so its adaptation
rules hold: when ``num_classes`` differs from the checkpoint's (1000 for ImageNet weights) the checkpoint's
classifier is discarded and the new head keeps timm's random initialisation (every other layer is loaded);
when the data has another number of channels than the checkpoint (``in_chans``, e.g. 1 for MNIST) the first
convolution's weights are adapted (summed over the RGB filters for 1 channel, repeated and rescaled for more).

Offline, the weights must already be in the cache timm reads: the Hugging Face hub cache (``HF_HUB_CACHE``,
default ``~/.cache/huggingface/hub``) for hub-hosted weights, torch hub's ``$TORCH_HOME/hub/checkpoints`` for
URL-hosted ones; otherwise a FileNotFoundError names the folder and how to fill it.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from prunelab.models.registry import register_model


def weights_location(arch: str) -> str:
    """Where timm looks for the pretrained weights of ``arch`` (the default tag when none is given), and how
    to put them there without network access."""
    import os

    import torch
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(arch)
    how = (f"on a machine with internet run `python -c \"import timm; timm.create_model('{arch}', "
           "pretrained=True)\"` and copy that cache entry to the same path here, or download the weights "
           "file yourself and pass model.pretrained_file=<path>")
    if cfg is not None and cfg.hf_hub_id:
        from huggingface_hub import constants

        repo = cfg.hf_hub_id.split("@")[0]
        folder = Path(constants.HF_HUB_CACHE) / ("models--" + repo.replace("/", "--"))
        return (f"timm reads them from the Hugging Face hub repo {repo}, cached in {folder} (the cache root is "
                f"HF_HUB_CACHE or HF_HOME/hub; HF_HUB_OFFLINE=1 skips the network); {how}")
    if cfg is not None and cfg.url:
        file = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(cfg.url)
        return f"timm reads them from {cfg.url}, cached as {file} (TORCH_HOME moves it); {how}"
    return how


def file_overlay(arch: str, file: str, overlay: dict | None) -> dict:
    """timm's ``pretrained_cfg_overlay`` for a local checkpoint: its tensors, and the number of classes and
    input channels *of the file* (read from its classifier and first convolution), so that timm's adaptation
    rules compare the data with the checkpoint rather than with the ImageNet one (a checkpoint already
    fine-tuned for 10 classes keeps its head)."""
    from timm.models import get_pretrained_cfg, load_state_dict

    if not Path(file).is_file():
        raise FileNotFoundError(f"model.pretrained_file={file}: no such file")
    cfg = get_pretrained_cfg(arch)
    if cfg is None:  # no pretrained config to adapt against: timm loads the file as it is
        return dict(overlay or {}, file=str(file))
    state = load_state_dict(str(file))
    out = dict(overlay or {}, state_dict=state)
    classifiers = (cfg.classifier,) if isinstance(cfg.classifier, str) else tuple(cfg.classifier or ())
    heads = [state[f"{c}.weight"] for c in classifiers if f"{c}.weight" in state]
    if heads:
        out["num_classes"] = int(heads[0].shape[0])
    convs = (cfg.first_conv,) if isinstance(cfg.first_conv, str) else tuple(cfg.first_conv or ())
    stems = [state[f"{c}.weight"] for c in convs if f"{c}.weight" in state]
    if stems and stems[0].ndim == 4 and cfg.input_size:
        out["input_size"] = (int(stems[0].shape[1]), *cfg.input_size[1:])
    return out


@register_model(name="timm")
def timm_model(input_shape, num_classes, arch: str = "resnet18", pretrained: bool = False,
               pretrained_file: str | None = None, **kwargs) -> nn.Module:
    """``timm.create_model(arch, num_classes=..., in_chans=C)``; see the module docstring for ``pretrained``
    and ``pretrained_file`` (a local checkpoint: loaded with timm's adaptation rules, implies pretrained).
    Other options are passed to ``timm.create_model`` (e.g. ``+model.drop_rate=0.1``)."""
    import timm

    if not timm.is_model(arch):
        raise ValueError(f"model.arch={arch!r} is not a timm model; see timm.list_models() for allowed values")
    overlay = kwargs.pop("pretrained_cfg_overlay", None)
    if pretrained_file:
        overlay = file_overlay(arch, pretrained_file, overlay)
        pretrained = True
    elif pretrained and not timm.list_pretrained(arch if "." in arch else f"{arch}.*"):
        raise ValueError(f"model.arch={arch!r} has no pretrained weights in timm; allowed values: "
                         "timm.list_pretrained() (e.g. resnet18.a1_in1k), or model.pretrained_file=<file>")
    try:
        return timm.create_model(arch, pretrained=bool(pretrained), num_classes=num_classes,
                                 in_chans=input_shape[0], pretrained_cfg_overlay=overlay, **kwargs)
    except OSError as e:  # not cached and no network: huggingface_hub's LocalEntryNotFoundError, URLError
        if not pretrained or pretrained_file:
            raise
        raise FileNotFoundError(f"model=timm model.arch={arch} model.pretrained=true: the pretrained weights are "
                                f"not available ({str(e).splitlines()[0]}). {weights_location(arch)}") from e
