"""Portable exports: a structured run's compacted network loads in a Python process that cannot import
prunelab (plain PyTorch: the torch.export program and the state dict) and gives the same outputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from prunelab.export import PROGRAM_FILE, STATE_FILE, export_program
from prunelab.pipeline.run import run_pipeline
from tests.conftest import FAST, compose_config

ROOT = Path(__file__).resolve().parent.parent

# Runs under `python -I` (no PYTHONPATH, no user site, no script dir) from a folder outside the repository,
# with prunelab made unimportable (the venv's editable install would otherwise provide it).
PLAIN_TORCH = '''
import sys

class NoPrunelab:
    def find_spec(self, name, path=None, target=None):
        if name == "prunelab" or name.startswith("prunelab."):
            raise ModuleNotFoundError(f"No module named {name!r}")

sys.meta_path.insert(0, NoPrunelab())
import torch

try:
    import prunelab  # noqa: F401
except ImportError:
    print("no prunelab")
try:
    torch.load("model_compact.pt", weights_only=False)
except ImportError:
    print("pickled module needs prunelab")
x = torch.load("batch.pt", weights_only=True)
program = torch.export.load("model_compact.pt2").module()
state = torch.load("model_compact_state_dict.pt", weights_only=True)
with torch.no_grad():
    torch.save({"program": program(x), "state_keys": sorted(state)}, "plain_out.pt")
print("ok")
'''


@pytest.fixture(scope="module")
def structured_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("export")
    cfg = compose_config(root, FAST + ["model=lenet5", "method=l2_norm", "method.amount=0.5",
                                       "measure.latency=false"])
    run_pipeline(cfg)
    return Path(cfg.paths.output_dir)


def test_compact_exports_load_without_prunelab(structured_run, tmp_path):
    for name in ("model_compact.pt", PROGRAM_FILE, STATE_FILE):
        assert (structured_run / name).is_file(), name
    model = torch.load(structured_run / "model_compact.pt", weights_only=False).eval()  # the in-process model
    x = torch.randn(5, 1, 28, 28, generator=torch.Generator().manual_seed(3))  # another batch size than traced
    with torch.no_grad():
        want = model(x)
    work = tmp_path / "elsewhere"
    work.mkdir()
    for name in ("model_compact.pt", PROGRAM_FILE, STATE_FILE):
        (work / name).write_bytes((structured_run / name).read_bytes())
    torch.save(x, work / "batch.pt")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    out = subprocess.run([sys.executable, "-I", "-c", PLAIN_TORCH], cwd=work, env=env, text=True,
                         capture_output=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["no", "prunelab", "pickled", "module", "needs", "prunelab", "ok"], out.stdout
    got = torch.load(work / "plain_out.pt", weights_only=True)
    torch.testing.assert_close(got["program"], want, rtol=0, atol=1e-6)
    assert got["state_keys"] == sorted(model.state_dict())
    # the state dict is the compacted network's: its parameters are the run's params_after, fewer than before
    state = torch.load(structured_run / STATE_FILE, weights_only=True)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    final = json.loads((structured_run / "results.json").read_text())["final"]
    assert sum(p.numel() for p in model.parameters()) == final["params_after"] < final["params_before"]


class DataDependent(nn.Module):
    """A network torch.export cannot trace (Python control flow on a tensor's value)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(x) if x.sum() > 0 else -self.fc(x)


def test_export_failure_keeps_the_other_files(tmp_path, caplog):
    from prunelab.export import export_compact

    with pytest.raises(Exception):  # noqa: B017 - whichever error torch.export raises
        export_program(DataDependent(), tmp_path / "x.pt2", (4,))
    assert not (tmp_path / "x.pt2").exists()
    written = export_compact(DataDependent(), tmp_path, (4,))
    assert written == ["model_compact.pt", STATE_FILE]
    assert (tmp_path / "model_compact.pt").is_file() and not (tmp_path / PROGRAM_FILE).exists()
    assert "model_compact.pt2 not written" in caplog.text
