"""edgefed: federated fine-tuning of pre-trained transformer language models across edge devices."""

import logging

__version__ = "0.1.0"

# torchao (which transformers imports when it is installed, as executorch's dependencies bring it) warns
# at import that its CUDA kernels do not load on a CPU build of torch, and makes torch warn about how it
# registers two enums: six lines before every command, about code edgefed never calls. Errors still show.
for _noisy in ("torchao", "torch.utils._pytree"):
    logging.getLogger(_noisy).setLevel(logging.ERROR)


def __getattr__(name: str):
    # Heavy imports (torch, transformers) only when the API is used, so `edgefed --help` is instant.
    if name == "run":
        from edgefed.federation.runner import run

        return run
    if name == "load_trained":
        from edgefed.setup import load_trained

        return load_trained
    if name == "AnytimePredictor":
        from edgefed.anytime import AnytimePredictor

        return AnytimePredictor
    if name == "RunConfig":
        from edgefed.config import RunConfig

        return RunConfig
    raise AttributeError(f"module 'edgefed' has no attribute {name!r}")
