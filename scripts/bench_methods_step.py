"""Training-step cost of each training-time family (structured Taylor, BMRS, DLLP) against the plain step.

One step is what the pipeline's training loop does with a method's hook: ``hook.loss``, zero_grad, backward,
``hook.after_backward``, optimiser step, ``hook.after_step`` (no pruning step falls due: the Taylor pruning
interval is longer than the measurement). The method is attached through its public protocol
(``TrainingMethod.attach``), so the same script times two source trees:

    python scripts/bench_methods_step.py                        # this tree
    python scripts/bench_methods_step.py --compare /path/other  # other tree vs this one, rounds interleaved

With ``--compare`` every round runs one worker process per tree (other first, then this one), and the table
reports, per family and model, the median over rounds of each worker's median step time. Prints a Markdown
table; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

CASES = {"lenet5": ((1, 28, 28), 64), "resnet20": ((3, 32, 32), 32)}
FAMILIES = ("plain", "taylor_fo", "bmrs_n", "dllp")


class _Module:
    """What a hook sees of the training module in a single process."""

    def __init__(self, model):
        import torch

        self.model, self.device, self.trainer, self.current_epoch = model, torch.device("cpu"), None, 0

    def all_reduce_mean(self, t):
        return t

    def check_ranks_agree(self, signature, what):
        return True


def _method(family: str):
    if family == "taylor_fo":
        from prunelab.pruning.structured.method import StructuredMethod

        return StructuredMethod(criterion="taylor_fo", amount=0.5, target_kind="flops")
    if family == "bmrs_n":
        from prunelab.pruning.bayes.bmrs_method import BMRSMethod

        return BMRSMethod(rule="bmrs_n")
    from prunelab.pruning.bayes.dllp_method import DLLPMethod

    return DLLPMethod(particles=4, sparsity=0.5)


def _step_fn(family: str, name: str):
    import torch
    import torch.nn.functional as F

    from prunelab.models import build_model

    shape, batch = CASES[name]
    torch.manual_seed(0)
    model = build_model(name, shape, 10).train()
    x, y = torch.randn(batch, *shape), torch.randint(0, 10, (batch,))
    if family == "plain":
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

        def plain():
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()

        return plain
    dm = SimpleNamespace(_train=range(50_000))
    ctx = SimpleNamespace(input_shape=shape, datamodule=dm, sparsity=0.5)
    schedule = SimpleNamespace(epochs=1, pretrained=True, frequency=10**9, k=1)
    train_model, hook = _method(family).attach(ctx, model, schedule)
    module = _Module(train_model)
    hook.on_train_start(module)
    groups = hook.param_groups(train_model) or [p for p in train_model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(groups, lr=1e-3, momentum=0.9)

    def step():
        loss, _ = hook.loss(module, x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        hook.after_backward(module, 0)
        opt.step()
        hook.after_step(module, 0)

    return step


def worker(repeats: int, threads: int) -> dict[str, float]:
    import torch

    torch.set_num_threads(threads)
    out = {}
    for name in CASES:
        fns = {f: _step_fn(f, name) for f in FAMILIES}
        for fn in fns.values():  # warm-up
            fn()
            fn()
        times: dict[str, list[float]] = {f: [] for f in fns}
        for _ in range(repeats):  # interleaved: drifts of a shared machine hit every family alike
            for f, fn in fns.items():
                t = time.perf_counter()
                fn()
                times[f].append(time.perf_counter() - t)
        out.update({f"{f}/{name}": statistics.median(v) * 1e3 for f, v in times.items()})
    return out


def _run(tree: Path, repeats: int, threads: int) -> dict[str, float]:
    env = dict(os.environ, PYTHONPATH=str(tree))
    cmd = [sys.executable, __file__, "--worker", "--repeats", str(repeats), "--threads", str(threads)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--compare", type=Path, default=None, help="another source tree (its PYTHONPATH root)")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.repeats, args.threads)))
        return
    here = Path(__file__).resolve().parent.parent
    trees = {"before": args.compare, "after": here} if args.compare else {"this tree": here}
    runs: dict[str, list[dict[str, float]]] = {k: [] for k in trees}
    for _ in range(args.rounds):
        for label, tree in trees.items():
            runs[label].append(_run(tree, args.repeats, args.threads))
    med = {label: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for label, rs in runs.items()}
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _bench import machine

    print(f"# training step per family (CPU, {args.threads} thread(s), median of {args.rounds} rounds x "
          f"{args.repeats} steps)\nmachine: {machine()}\n")
    labels = list(trees)
    head = " | ".join(f"{lab} ms | {lab} / plain" for lab in labels)
    print(f"| family | model | {head} |")
    print("|---|---|" + "---|---|" * len(labels))
    for name in CASES:
        for f in FAMILIES[1:]:
            cells = " | ".join(f"{med[lab][f'{f}/{name}']:.2f} | {med[lab][f'{f}/{name}'] / med[lab][f'plain/{name}']:.2f}"
                               for lab in labels)
            print(f"| {f} | {name} | {cells} |")
        cells = " | ".join(f"{med[lab][f'plain/{name}']:.2f} | 1.00" for lab in labels)
        print(f"| plain | {name} | {cells} |")


if __name__ == "__main__":
    main()
