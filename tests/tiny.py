"""The tiny random BERTs the tests build: 32 wide, 2 layers, 2 heads, unless a test asks otherwise."""

from transformers import BertConfig


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
