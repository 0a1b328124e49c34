"""The progress bar of every fit and evaluation: labelled with the stage (``pretrain: training``,
``prune: testing``, ...) instead of Lightning's bare ``Training`` / ``Testing``, and with metric names short
enough to read (the stage prefix, already in the label, is dropped: ``train/loss_step`` instead of a
truncated ``pretrain/train/l…``)."""

from __future__ import annotations

from lightning.pytorch.callbacks import RichProgressBar


def short_metric_name(name: str, stage: str | None) -> str:
    """``pretrain/train/loss_step`` -> ``train/loss_step`` when the bar is labelled ``pretrain``."""
    prefix = f"{stage}/" if stage else ""
    return name[len(prefix):] if prefix and name.startswith(prefix) else name


class StageProgressBar(RichProgressBar):
    def _stage(self) -> str | None:
        trainer = getattr(self, "_trainer", None)
        module = trainer.lightning_module if trainer is not None else None
        return getattr(module, "stage", None)

    def _label(self, what: str) -> str:
        stage = self._stage()
        return f"{stage}: {what}" if stage else what.capitalize()

    @property
    def train_description(self) -> str:
        return self._label("training")

    @property
    def validation_description(self) -> str:
        return self._label("validation")

    @property
    def test_description(self) -> str:
        return self._label("testing")

    @property
    def sanity_check_description(self) -> str:
        return self._label("sanity check")

    def get_metrics(self, trainer, pl_module):
        stage = getattr(pl_module, "stage", None)
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        return {short_metric_name(k, stage): v for k, v in items.items()}
