"""Custom ops, each beside its plain PyTorch reference and a Triton kernel.

- :func:`fused_linear_cross_entropy`: ``CE(hidden @ weight.T, target)`` without materialising
  the (N x V) logits (``linear_cross_entropy.py``, kernel in ``linear_cross_entropy_triton.py``).
- :func:`latent_feedback`: the rollout's next input per sequence, the projected hidden state
  while thinking, else the token's embedding (``latent_feedback.py``, ``latent_feedback_triton.py``).
- :func:`gathered`: full ZeRO-3 parameters for an op that reads them outside their module.

Every op takes ``impl="auto"|"triton"|"torch"|"reference"``; ``set_default_impl`` or the
``SIMCOT_KERNELS`` environment variable choose what "auto" means (``dispatch.py``).
"""

if __name__ == "kernels":  # this folder imported as a top-level package: see `_hand_over`
    import importlib.machinery
    import importlib.util
    import os
    import sys

    def _hand_over() -> None:
        """With the repository root on sys.path (`python -m ...` or `python -c` run there, as a
        `deepspeed`/`torchrun` launch from a checkout does), `import kernels` finds this folder.
        transformers 5.25+ imports Hugging Face's `kernels` package (a dependency of it) as
        `kernels`, and fails on this one. This folder is `simcot.kernels` only, so the import is
        handed over to the `kernels` found on the rest of sys.path: sys.modules' entry is replaced
        while this module runs, and the import returns that entry."""
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        rest = [p for p in sys.path if os.path.abspath(p or os.curdir) != root]
        spec = importlib.machinery.PathFinder.find_spec("kernels", rest)
        if spec is None or spec.loader is None:
            raise ImportError("No module named 'kernels' outside the simcot repository (its kernels/ folder "
                              "is imported as simcot.kernels)", name="kernels")
        module = importlib.util.module_from_spec(spec)
        sys.modules["kernels"] = module
        spec.loader.exec_module(module)

    _hand_over()
else:
    from simcot.kernels.dispatch import default_impl, set_default_impl
    from simcot.kernels.latent_feedback import latent_feedback, latent_feedback_reference
    from simcot.kernels.linear_cross_entropy import fused_linear_cross_entropy, linear_cross_entropy_reference
    from simcot.kernels.zero3 import gathered

    __all__ = ["default_impl", "fused_linear_cross_entropy", "gathered", "latent_feedback", "latent_feedback_reference",
               "linear_cross_entropy_reference", "set_default_impl"]
