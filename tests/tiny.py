"""The tiny random models the tests build: BERTs 32 wide, 2 layers, 2 heads, unless a test asks otherwise;
a Llama as small."""

from pathlib import Path

import torch
from transformers import BertConfig, LlamaConfig, LlamaForCausalLM


def tiny_bert_config(**changes) -> BertConfig:
    values = dict(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    return BertConfig(**{**values, **changes})


# The inner size of the tiny models' products: the roundings along one output's chain, for tolerances.
HIDDEN = tiny_bert_config().hidden_size


CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} [SEP] {% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def tiny_llama(folder: Path, tokenizer, chat: bool) -> Path:
    """A 2-layer, 32-wide random Llama with MiniLM's tokenizer (its [SEP] ends an answer)."""
    torch.manual_seed(1234)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.cls_token_id,
        eos_token_id=tokenizer.sep_token_id,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.chat_template = CHAT_TEMPLATE if chat else None
    tokenizer.save_pretrained(folder)
    return folder
