"""edgefed: federated fine-tuning of pre-trained transformer language models across edge devices."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # Heavy imports (torch, transformers) only when the API is used, so `edgefed --help` is instant.
    if name in ("run", "load_trained"):
        from edgefed import recipe

        return getattr(recipe, name)
    if name == "RunConfig":
        from edgefed.config import RunConfig

        return RunConfig
    raise AttributeError(f"module 'edgefed' has no attribute {name!r}")
