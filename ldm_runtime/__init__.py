"""ldm_runtime: a torch-free text-to-image runtime for latent diffusion bundles.

``from ldm_runtime import Pipeline`` is resolved lazily so that ``import ldm_runtime`` costs
almost nothing and never imports torch.
"""
__version__ = "0.1.0"

_LAZY = {
    "Pipeline": "ldm_runtime.pipeline",
    "Img2ImgPipeline": "ldm_runtime.pipeline",
    "PipelineOutput": "ldm_runtime.pipeline",
    "CancelToken": "ldm_runtime.cancel",
    "Cancelled": "ldm_runtime.cancel",
    "CLIPTokenizer": "ldm_runtime.tokenizer",
    "Manifest": "ldm_runtime.manifest",
    "BundleError": "ldm_runtime.manifest",
    "make_scheduler": "ldm_runtime.schedulers",
    "SCHEDULERS": "ldm_runtime.schedulers",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        from importlib import import_module

        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ldm_runtime' has no attribute {name!r}")
