"""The training-hook protocol shared by the training loop (``prunelab.pipeline``) and the methods that prune
while training (``prunelab.pruning``): it sits below both, so neither imports the other for it."""
