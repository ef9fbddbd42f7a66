"""simcot: training LLMs that reason in continuous latent tokens.

The package is assembled from the repository's top-level folders (see setup.cfg):
``simcot.train`` (config, data, loop, methods), ``simcot.models`` (presets, latent rollout,
step decoder), ``simcot.kernels`` (Triton ops with PyTorch references) and
``simcot.launchers`` (the ``simcot`` CLI, DeepSpeed configs, recipes).
"""

__version__ = "0.1.0"
