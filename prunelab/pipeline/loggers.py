"""Experiment loggers that fit prunelab's resumable runs.

Lightning's ``CSVLogger`` deletes an existing ``metrics.csv`` when it starts; a re-run resumes an interrupted
run in the same folder, so the rows the interrupted attempt logged (its finished stages and epochs) would be
lost. :class:`CSVLogger` appends to the file instead (the header is widened when new metric names appear;
every earlier row is kept).
"""

from __future__ import annotations

import csv
import os

from lightning.pytorch.loggers import CSVLogger as _LightningCSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment


class AppendingExperimentWriter(ExperimentWriter):
    """Lightning's writer, keeping the rows of an existing ``metrics.csv``."""

    def _check_log_dir_exists(self) -> None:
        # Lightning warns and deletes metrics.csv here; the earlier attempt's rows are kept
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                header = next(csv.reader(f), [])
            self.metrics_keys = sorted(set(header))


class CSVLogger(_LightningCSVLogger):
    """``lightning.pytorch.loggers.CSVLogger`` that appends to ``<save_dir>/<name>/<version>/metrics.csv``."""

    @property
    @rank_zero_experiment
    def experiment(self) -> AppendingExperimentWriter:
        if self._experiment is not None:
            return self._experiment
        self._fs.makedirs(self.root_dir, exist_ok=True)
        os.makedirs(self.log_dir, exist_ok=True)
        self._experiment = AppendingExperimentWriter(log_dir=self.log_dir)
        return self._experiment
