"""Attention-based early-exit adapters ("Federated Learning for Inference at Anytime
and Anywhere", arXiv 2212.04084; formulas from ReeFL, ICML 2024, arXiv 2405.14791).

After every transformer block i (0-based) of a frozen encoder, an adapter attends over the history of
the blocks' sentence states and does two things: it makes an early prediction through exit head i, and
it modulates the forward pass by moving the first token fed into block i+1. With z_j the sentence state
after block j (the mean of its unpadded token states; see "Pooling" below) and x_i block i's output:

    Z   = [c_meta ; z_0 … z_i] + P            # [B, i+2, d]; c_meta and P belong to adapter i
    Z   = Z + MHSA(LN(Z))
    Z   = Z + FFN(LN(Z))
    ŷ_i = exits.i(LN(Z[:, 0] + z_i))           # exit head: LayerNorm + Linear(d → num_labels)
    x_i[:, 0] ← x_i[:, 0] + (Z[:, -1] − z_i)   # with `modulation`: the first token block i+1 sees

The choices that the paper leaves open, as made here:

- Parameters: one adapter and one exit head per block (the paper's "at each block"; ReeFL shares one
  module). Everything adapter i owns is under `adapters.{i}.`, its head under `exits.{i}.`, so a client
  that runs only blocks < e trains and sends exactly the tensors with i < e.
- Pooling: the paper and ReeFL read the first-token ("CLS") state, which works for encoders trained
  with a CLS objective. all-MiniLM-L6-v2, the model edgefed ships, was trained with mean pooling, and
  its lower blocks' first-token states carry almost nothing of the sentence: with them, exits 1–4 stayed
  at the majority class on SST-2 while mean pooling lifted every exit above it and made accuracy rise
  with depth (benchmarks/results/early_exits.md, measured side by side). So z_j is the mean over the
  unpadded tokens (`EarlyExitModel.pooling = "first"` restores the CLS reading). The modulation moves
  the first token by the adapter's refinement of z_i (with first-token pooling this is ReeFL's
  replacement x_i[:, 0] ← Z[:, -1] exactly).
- Attention: over the history of sentence states only (not over all tokens), as in ReeFL. The
  history holds the block outputs before modulation (ReeFL appends the CLS before replacing it).
- Widths from `--rank` r: attention width 2r (ReeFL: 16, i.e. r = 8) in 2 heads with the usual
  head_dim^-0.5 scale (ReeFL: 8 heads, scale attn_dim^-0.5); fused q/k/v Linear with bias; FFN hidden 8r
  with GELU (ReeFL: 2d, far heavier than the bottleneck this project wants on edge devices); one
  pre-norm attention + FFN layer (ReeFL depth 1); no dropout inside the adapter.
- Init: c_meta trunc-normal(0.02) and Linear weights trunc-normal(0.02) with zero bias, as ReeFL; but
  the MHSA and FFN output projections and P start at zero (ReeFL: P trunc-normal), so at init
  Z[:, -1] == z_i exactly and the modulated backbone computes what the pre-trained one does.
  Exit heads: LayerNorm (1, 0) + Linear trunc-normal(0.02), zero bias.
- Backbone: `model.base_model` (embeddings + encoder blocks), frozen; its dropout follows the module's
  train/eval mode, as with the other methods. The checkpoint's classification head and pooler are
  dropped (the exits predict from the adapters' states), so `save` never needs them. `--head-modules`
  does not apply: the exits always train.
- Modulation: off by default (`EarlyExitModel.modulation = False`): the adapters read the blocks and
  leave them as the pre-trained model computes them. Measured (benchmarks/results/early_exits.md):
  modulating exits drift under label skew (the last exit 4 points under FeDeRA), the reading ones do
  not; and backward then never runs through the frozen backbone, so a local step is the forward pass
  plus the adapters' own backward (the cost model's `backward_through_blocks`). `modulation = True`
  is the paper's design, kept for comparison.
- Loss: the mean of the cross-entropies of the exits that ran (ReeFL sums; the mean keeps the loss's
  scale, and so the learning rate, independent of the client's depth), each on balanced-softmax logits
  (`balanced`: shifted by the log of the batch's label frequencies; Ren et al., "Balanced Meta-Softmax",
  NeurIPS 2020), so that a client with skewed labels does not train its prior into the exits' biases:
  without it an exit fell to the majority class under Dirichlet 0.5. Evaluation and inference use the
  plain logits (and report the plain cross-entropy as the evaluation loss). ReeFL's self-distillation
  from the best exit (`distillation` > 0) and losses weighted by depth (`depth_weighted`) are
  implemented and off: neither helped consistently in the same measurements.
- Answers: exit i answers with the mean log-probabilities of exits 1..i (a cumulative ensemble, as
  in "Zero Time Waste", Wołczyk et al., NeurIPS 2021: the shallower exits' answers are computed
  anyway). Each exit trains on its own logits; measured, the ensemble makes accuracy rise with depth
  on IID data and wander far less under skew (benchmarks/results/early_exits.md).
  `EarlyExitModel.ensemble = False` reports each exit's own logits.
- Inference stop rule: `EarlyExitModel.exit_layer = e` runs blocks 0..e-1 only and reports the deepest
  exit that ran as `.logits` (all of them in `.exit_logits`); by default every block runs. A deadline or
  confidence rule picks from `.exit_logits` or sets `exit_layer`. Earlier exits do not depend on later
  blocks, so exit i's prediction is the same whatever `exit_layer` (≥ i+1) is.

Saved like `adapter`: the trainable tensors (safetensors) plus `adapter.json`, which records the method,
the widths, the block count and num_labels; `load` rebuilds from the pre-trained model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F
from transformers.masking_utils import create_bidirectional_mask
from transformers.utils import ModelOutput

from edgefed.errors import EdgefedError
from edgefed.methods.base import (
    METHODS,
    AdapterSpec,
    Method,
    SetupState,
    load_trainable_state,
    trainable_state,
)
from edgefed.methods.settings import BottleneckSettings

STATE_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter.json"
ATTENTION_HEADS = 2
INIT_STD = 0.02


@dataclass(frozen=True)
class EarlyExitWidths:
    attention: int
    ffn: int
    heads: int = ATTENTION_HEADS

    @classmethod
    def from_rank(cls, rank: int) -> EarlyExitWidths:
        if rank < 1:
            raise EdgefedError(f"ee-adapter needs --rank >= 1, got {rank}")
        return cls(attention=2 * rank, ffn=8 * rank)


@dataclass
class EarlyExitOutput(ModelOutput):
    """`logits` is the deepest exit that ran; `exit_logits` has one [batch, num_labels] tensor per exit."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    exit_logits: tuple[torch.Tensor, ...] | None = None


def _trunc_normal(linear: nn.Linear) -> nn.Linear:
    nn.init.trunc_normal_(linear.weight, std=INIT_STD)
    nn.init.zeros_(linear.bias)
    return linear


class HistoryAttention(nn.Module):
    """Multi-head self-attention over a short sequence of first-token states (no padding there)."""

    def __init__(self, dim: int, width: int, heads: int) -> None:
        super().__init__()
        if width % heads:
            raise EdgefedError(f"attention width {width} is not divisible by {heads} heads")
        self.heads = heads
        self.qkv = _trunc_normal(nn.Linear(dim, 3 * width))
        self.out = nn.Linear(width, dim)
        # Zero output: the residual branch adds nothing at init.
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        q, k, v = (
            t.view(batch, length, self.heads, -1).transpose(1, 2) for t in self.qkv(x).chunk(3, dim=-1)
        )
        attended = F.scaled_dot_product_attention(q, k, v)
        return self.out(attended.transpose(1, 2).reshape(batch, length, -1))


class EarlyExitAdapter(nn.Module):
    """The adapter after block `index`: one pre-norm transformer layer over [c_meta ; z_0 … z_index]."""

    def __init__(self, index: int, dim: int, widths: EarlyExitWidths) -> None:
        super().__init__()
        self.c_meta = nn.Parameter(torch.empty(1, 1, dim))
        nn.init.trunc_normal_(self.c_meta, std=INIT_STD)
        # One position per history entry plus c_meta; zero so that Z[:, -1] == z_index at init.
        self.pos_embedding = nn.Parameter(torch.zeros(1, index + 2, dim))
        self.attn_norm = nn.LayerNorm(dim)
        self.attn = HistoryAttention(dim, widths.attention, widths.heads)
        self.ffn_norm = nn.LayerNorm(dim)
        self.ffn_in = _trunc_normal(nn.Linear(dim, widths.ffn))
        self.ffn_out = nn.Linear(widths.ffn, dim)
        nn.init.zeros_(self.ffn_out.weight)
        nn.init.zeros_(self.ffn_out.bias)

    def forward(self, history: torch.Tensor) -> torch.Tensor:
        """history [B, index+1, d] → Z [B, index+2, d]."""
        tokens = torch.cat((self.c_meta.expand(history.shape[0], -1, -1), history), dim=1)
        z = tokens + self.pos_embedding
        z = z + self.attn(self.attn_norm(z))
        return z + self.ffn_out(F.gelu(self.ffn_in(self.ffn_norm(z))))


class ExitHead(nn.Module):
    def __init__(self, dim: int, num_labels: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.linear = _trunc_normal(nn.Linear(dim, num_labels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.norm(x))


class EarlyExitModel(nn.Module):
    """A frozen encoder with an early-exit adapter and exit head after every block.

    `exit_layer` is how many blocks run (1..num_layers); blocks beyond it are never called.
    """

    def __init__(self, backbone: nn.Module, num_labels: int, widths: EarlyExitWidths) -> None:
        super().__init__()
        config = backbone.config
        if getattr(config, "is_decoder", False):
            raise EdgefedError("ee-adapter needs a bidirectional encoder; the model is a decoder")
        self.backbone = backbone
        self.config = config
        self.num_labels = num_labels
        self.widths = widths
        dim = config.hidden_size
        num_layers = len(self.blocks)
        self.adapters = nn.ModuleList(EarlyExitAdapter(i, dim, widths) for i in range(num_layers))
        self.exits = nn.ModuleList(ExitHead(dim, num_labels) for _ in range(num_layers))
        reference = next(backbone.parameters())
        self.adapters.to(device=reference.device, dtype=reference.dtype)
        self.exits.to(device=reference.device, dtype=reference.dtype)
        for param in backbone.parameters():
            param.requires_grad = False
        self._exit_layer = num_layers

    # What the adapters read from each block and how the exits' losses combine (see the module docstring).
    pooling = "mean"
    distillation = 0.0
    modulation = False
    balanced = True
    depth_weighted = False
    ensemble = True

    @property
    def blocks(self) -> nn.ModuleList:
        return self.backbone.encoder.layer

    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    @property
    def exit_layer(self) -> int:
        return self._exit_layer

    @exit_layer.setter
    def exit_layer(self, value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= self.num_layers:
            raise ValueError(
                f"exit_layer must be an int from 1 to {self.num_layers} (the blocks to run), got {value!r}"
            )
        self._exit_layer = value

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        **ignored: object,
    ) -> EarlyExitOutput:
        hidden = self.backbone.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)
        # As BertModel does for a non-decoder: a mask in the form its attention implementation expects.
        mask = create_bidirectional_mask(
            config=self.config, inputs_embeds=hidden, attention_mask=attention_mask
        )
        history: list[torch.Tensor] = []
        exit_logits: list[torch.Tensor] = []
        for i in range(self.exit_layer):
            hidden = self.blocks[i](hidden, mask)
            if isinstance(hidden, tuple):  # BertLayer returns a tensor in transformers 5; older ones a tuple
                hidden = hidden[0]
            z_i = pooled(hidden, attention_mask) if self.pooling == "mean" else hidden[:, 0]
            history.append(z_i)
            refined = self.adapters[i](torch.stack(history, dim=1))
            exit_logits.append(self.exits[i](refined[:, 0] + z_i))
            if self.modulation and i + 1 < self.exit_layer:  # only a block that runs sees it
                first = hidden[:, :1] + (refined[:, -1:] - z_i.unsqueeze(1)).to(hidden.dtype)
                hidden = torch.cat((first, hidden[:, 1:]), dim=1)
        loss = None
        if labels is not None:
            # Balanced softmax is a training device: evaluation's loss is the plain cross-entropy.
            balanced = self.balanced and self.training
            loss = exits_loss(exit_logits, labels.view(-1), self.distillation, balanced, self.depth_weighted)
        if self.ensemble:  # what exit i answers: the mean log-probabilities of exits 1..i
            log_probabilities = [F.log_softmax(logits.float(), dim=-1) for logits in exit_logits]
            exit_logits = [
                torch.stack(log_probabilities[: i + 1]).mean(dim=0) for i in range(len(exit_logits))
            ]
        return EarlyExitOutput(loss=loss, logits=exit_logits[-1], exit_logits=tuple(exit_logits))


def pooled(hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """The mean of the states of the real (unpadded) tokens: what sentence-transformers models pool."""
    if attention_mask is None:
        return hidden.mean(dim=1)
    weights = attention_mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)


def exits_loss(
    exit_logits: list[torch.Tensor],
    labels: torch.Tensor,
    distillation: float,
    balanced: bool = False,
    depth_weighted: bool = False,
) -> torch.Tensor:
    """The exits' mean cross-entropy, plus `distillation` × the mean KL divergence of every other exit
    from the batch's best exit (the lowest cross-entropy; detached: a teacher, as ReeFL's). `balanced`:
    the cross-entropy of logits shifted by the log of the batch's label frequencies (balanced softmax),
    so that a client's skewed labels do not train their prior into the exits' biases."""
    shift = 0.0
    if balanced:
        counts = torch.bincount(labels, minlength=exit_logits[0].shape[-1]).float() + 1.0
        shift = (counts / counts.sum()).log()
    losses = torch.stack([F.cross_entropy(logits.float() + shift, labels) for logits in exit_logits])
    if depth_weighted:  # exit i's loss weighs i+1: the deeper exits, which see more, lead
        weights = torch.arange(1, len(exit_logits) + 1, dtype=losses.dtype, device=losses.device)
        losses = losses * (len(exit_logits) * weights / weights.sum())
    if not distillation or len(exit_logits) == 1:
        return losses.mean()
    best = int(losses.argmin())
    teacher = F.log_softmax(exit_logits[best].detach().float(), dim=-1)
    kl = [
        F.kl_div(F.log_softmax(logits.float(), dim=-1), teacher, log_target=True, reduction="batchmean")
        for i, logits in enumerate(exit_logits)
        if i != best
    ]
    return losses.mean() + distillation * torch.stack(kl).mean()


def _early_exit_model(model: nn.Module, num_labels: int, widths: EarlyExitWidths) -> EarlyExitModel:
    backbone = getattr(model, "base_model", model)
    if not hasattr(backbone, "embeddings") or not isinstance(
        getattr(getattr(backbone, "encoder", None), "layer", None), nn.ModuleList
    ):
        raise EdgefedError("ee-adapter needs a BERT-family encoder (base_model.embeddings, encoder.layer)")
    if getattr(backbone, "pooler", None) is not None:
        backbone.pooler = None  # unused: the exits predict from first-token states
    return EarlyExitModel(backbone, num_labels, widths)


@METHODS.register("ee-adapter")
class EarlyExitAdapters(Method):
    name = "ee-adapter"
    default_lr = 2e-3
    settings_type = BottleneckSettings
    own_head_prefix = "exits"
    adapters_see_all_tokens = False  # the adapters attend over one state per block
    backward_through_blocks = EarlyExitModel.modulation
    early_exits = True

    def adapt(self, model: nn.Module, spec: AdapterSpec, setup: SetupState) -> nn.Module:
        return _early_exit_model(model, model.config.num_labels, EarlyExitWidths.from_rank(spec.rank))

    def save(self, model: nn.Module, spec: AdapterSpec, setup: SetupState, out_dir: Path) -> None:
        if not isinstance(model, EarlyExitModel):
            raise TypeError(f"ee-adapter saves an EarlyExitModel, got {type(model).__name__}")
        out_dir.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in trainable_state(model).items()}, out_dir / STATE_FILE)
        (out_dir / CONFIG_FILE).write_text(
            json.dumps(
                {
                    "method": self.name,
                    "rank": spec.rank,
                    "attention_width": model.widths.attention,
                    "attention_heads": model.widths.heads,
                    "ffn_width": model.widths.ffn,
                    "num_layers": model.num_layers,
                    "num_labels": model.num_labels,
                }
            )
        )

    def load(self, out_dir: Path, base: nn.Module, spec: AdapterSpec) -> nn.Module:
        saved = json.loads((out_dir / CONFIG_FILE).read_text(encoding="utf-8"))
        if saved.get("method") != self.name:
            raise EdgefedError(f"{out_dir}: saved by method {saved.get('method')!r}, not {self.name!r}")
        num_labels = base.config.num_labels
        if saved["num_labels"] != num_labels:
            raise EdgefedError(f"{out_dir}: saved with {saved['num_labels']} labels, not {num_labels}")
        # The saved widths, not the spec's, describe the tensors.
        widths = EarlyExitWidths(saved["attention_width"], saved["ffn_width"], saved["attention_heads"])
        model = _early_exit_model(base, num_labels, widths)
        if model.num_layers != saved["num_layers"]:
            raise EdgefedError(
                f"{out_dir}: saved for {saved['num_layers']} blocks; the pre-trained model has "
                f"{model.num_layers}"
            )
        load_trainable_state(model, load_file(out_dir / STATE_FILE))
        return model
