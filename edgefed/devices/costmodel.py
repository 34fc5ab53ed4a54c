"""The cost model of one local training step: FLOPs, memory traffic, time on a device, peak memory.

This is the one place where edgefed models device time and memory. The planner (edgefed/devices/planner.py)
uses it to choose what each client trains; the simulated device clock (edgefed/devices/clock.py) uses it to
scale compute measured on this machine to a device profile.

Shapes: a BERT-family encoder with L layers, hidden width d, FFN width f, h attention heads; a step
sees T = B·S tokens (batch B, sequence length S; the model assumes every sequence is S long, the
worst case a plan must fit). Per encoder layer that runs:

    forward GEMMs       G = 2·T·(4·d² + 2·d·f)        attention matmuls  A = 4·T·S·d
    backward, dx        G + 2·A   (every layer between the lowest trained layer and the exit)
    backward, dW        G         (only when the layer's own weights train: full fine-tuning)
    added modules       2·t·p forward, 4·t·p backward for p trainable added parameters (LoRA factors,
                        adapters) seeing t tokens (T, or B·(L+1) for adapters that read one state
                        per block); early exits that only read the blocks need no backward through them

A plan's lower rank changes what a client sends, not what it computes: it trains the leading
components of the run's factors (the others' gradients are masked), so compute and optimizer
memory are those of the run's rank.

Time on a device, per step (a roofline with one term per kind of work, added because
GEMMs and element-wise kernels run one after the other):

    t = FLOPs / (fp32_tflops·η_c) + bytes / (bandwidth·η_m) + launches · launch_us

with bytes = element-wise traffic (each saved activation written once and read once, twice as much
in backward) + the weights read by each pass + AdamW's 36 bytes per trained parameter.

Peak memory, bytes (fp32):

    4·(all parameters) + 12·(trained parameters: gradient and AdamW's two moments)
    + 4·T·(Σ saved(layer) over the layers backward passes through + transient) · (1.8 on a CPU)
    saved(layer) = 7·d + f + 3·h·S + 4 (frozen weights), 10·d + 2·f + 3·h·S + 4 (trained weights)
                   + the input widths of trainable added modules
    transient    = 2·h·S + f + 4·d  (the gradients of one layer's scores, FFN and hidden states)

The saved-activation coefficients are what torch 2.13 keeps for transformers 5's BertLayer in
training mode (counted with torch.autograd.graph.saved_tensors_hooks; the same for the eager and
SDPA attention paths); tests/test_planner.py checks the prediction against peak RSS measured in a
fresh process.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from torch import nn

from edgefed.devices.profiles import DeviceProfile
from edgefed.scope import EMBEDDINGS, layer_of

# Parameter names of encoder layer i (transformers' `layer.i.`, edgefed's early-exit `adapters.i.`
# and `exits.i.`); embeddings count as layer -1, anything else (the classifier) as the head.
FLOAT = 4  # bytes; edgefed trains in fp32
ADAMW_BYTES = 36  # per trained parameter: read p, g, m, v; write p, m, v; clip reads g twice
LAUNCHES_FORWARD = 30  # operators per encoder layer (eager PyTorch)
LAUNCHES_BACKWARD = 50
LAUNCHES_ADDED_BACKWARD = 20  # an early-exit adapter and its head, when backward stops there
LAUNCHES_FIXED = 60  # embeddings, head, loss, optimizer (foreach), zero_grad
LAUNCHES_INFERENCE_FIXED = 10  # embeddings, head, softmax
# Resident activation memory over live activation memory on a CPU with glibc's default malloc:
# 1.5–1.9 measured on MiniLM (fft, lora, federa; batch 16–32; length 64–256; 0 or 3 frozen layers),
# where the live-memory model is within 10 % of RSS once glibc's mmap threshold is pinned
# (MALLOC_MMAP_THRESHOLD_, which costs 50 % in step time, so edgefed does not set it).
CPU_HEAP_FACTOR = 1.8


@dataclass(frozen=True)
class ModelShape:
    """What the cost model needs to know about an adapted model (at the run's rank)."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    num_labels: int
    total_params: int
    rank: int  # the rank `rank_trainable` was counted at
    trainable: tuple[int, ...]  # per layer: trained parameters that do not scale with the rank
    rank_trainable: tuple[int, ...]  # per layer: parameters of low-rank factors (linear in the rank)
    added: tuple[int, ...]  # per layer: trained parameters of added modules (LoRA, adapters)
    added_inputs: tuple[int, ...]  # per layer: summed input widths of the trained added modules
    embedding_trainable: int
    head_trainable: int
    trains_base_weights: bool  # the layers' own GEMM weights train (full fine-tuning)
    adapters_see_all_tokens: bool  # False: added modules read one state per block
    backward_through_blocks: bool  # False: backward stops at the added modules (they only read blocks)

    @classmethod
    def of(
        cls,
        model: nn.Module,
        base_params: Iterable[nn.Parameter],
        rank_keys: Iterable[str],
        rank: int,
        adapters_see_all_tokens: bool = True,
        backward_through_blocks: bool = True,
    ) -> ModelShape:
        """Count an adapted model's parameters. `base_params` are the pre-trained model's own
        parameters (the objects, before adaptation); `rank_keys` name the low-rank factors."""
        config = model.config
        layers = config.num_hidden_layers
        base_ids = {id(param) for param in base_params}
        rank_keys = set(rank_keys)
        trainable, rank_trainable, added, added_inputs = ([0] * layers for _ in range(4))
        embedding = head = 0
        trains_base = False
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            layer = layer_of(name)
            if layer is None:
                head += param.numel()
            elif layer == EMBEDDINGS:
                embedding += param.numel()
            else:
                is_base = id(param) in base_ids
                (rank_trainable if name in rank_keys else trainable)[layer] += param.numel()
                if is_base:
                    trains_base = trains_base or param.dim() == 2
                else:
                    added[layer] += param.numel()
                    if param.dim() == 2:
                        added_inputs[layer] += param.shape[1]
        return cls(
            layers=layers,
            hidden=config.hidden_size,
            intermediate=config.intermediate_size,
            heads=config.num_attention_heads,
            num_labels=getattr(config, "num_labels", 2),
            total_params=sum(param.numel() for param in model.parameters()),
            rank=rank,
            trainable=tuple(trainable),
            rank_trainable=tuple(rank_trainable),
            added=tuple(added),
            added_inputs=tuple(added_inputs) if adapters_see_all_tokens else (0,) * layers,
            embedding_trainable=embedding,
            head_trainable=head,
            trains_base_weights=trains_base,
            adapters_see_all_tokens=adapters_see_all_tokens,
            backward_through_blocks=backward_through_blocks,
        )


@dataclass(frozen=True)
class Workload:
    """One client's local step: which layers run and train, at what rank, batch and length."""

    frozen_layers: int  # layers 0 .. frozen_layers-1 do not train (no backward through them)
    exit_layer: int  # layers 0 .. exit_layer-1 run
    rank: int
    batch_size: int
    seq_len: int

    @property
    def tokens(self) -> int:
        return self.batch_size * self.seq_len


def trained_layers(shape: ModelShape, work: Workload) -> range:
    return range(work.frozen_layers, work.exit_layer)


def layer_trainable(shape: ModelShape, layer: int, rank: int) -> int:
    return shape.trainable[layer] + shape.rank_trainable[layer] * rank // shape.rank


def trained_parameters(shape: ModelShape, work: Workload, rank: int | None = None) -> int:
    """Parameters the client optimises (at the run's rank), or sends (at `rank`, the plan's)."""
    rank = shape.rank if rank is None else rank
    total = shape.head_trainable + sum(layer_trainable(shape, i, rank) for i in trained_layers(shape, work))
    if work.frozen_layers == 0:
        total += shape.embedding_trainable
    return total


def sent_parameters(shape: ModelShape, work: Workload) -> int:
    return trained_parameters(shape, work, work.rank)


def backward_layers(shape: ModelShape, work: Workload) -> range:
    """Layers that backward passes through: from the lowest layer with anything to train to the exit
    (none when the trained modules only read the blocks)."""
    if not shape.backward_through_blocks:
        return range(0)
    trained = [i for i in trained_layers(shape, work) if layer_trainable(shape, i, shape.rank)]
    if work.frozen_layers == 0 and shape.embedding_trainable:
        return range(0, work.exit_layer)
    return range(min(trained), work.exit_layer) if trained else range(0)


def saved_floats_per_token(shape: ModelShape, work: Workload, layer: int) -> int:
    d, f, h, s = shape.hidden, shape.intermediate, shape.heads, work.seq_len
    trains_weights = shape.trains_base_weights and layer >= work.frozen_layers
    base = 10 * d + 2 * f if trains_weights else 7 * d + f
    return base + 3 * h * s + 4 + shape.added_inputs[layer]


def forward_flops(shape: ModelShape, work: Workload) -> float:
    """FLOPs of the forward pass through blocks 0..exit_layer-1, their added modules and the head."""
    d, f, t = shape.hidden, shape.intermediate, work.tokens
    gemm = 2 * t * (4 * d * d + 2 * d * f)
    attention = 4 * t * work.seq_len * d
    flops = work.exit_layer * (gemm + attention)
    flops += sum(2 * added_tokens(shape, work) * shape.added[i] for i in range(work.exit_layer))
    return float(flops + 2 * work.batch_size * d * max(shape.num_labels, 2))


def added_tokens(shape: ModelShape, work: Workload) -> int:
    """Tokens each added module sees: all of them, or one state per block for first-token adapters."""
    return work.tokens if shape.adapters_see_all_tokens else work.batch_size * (shape.layers + 1)


def step_flops(shape: ModelShape, work: Workload) -> float:
    d, f, t = shape.hidden, shape.intermediate, work.tokens
    gemm = 2 * t * (4 * d * d + 2 * d * f)
    attention = 4 * t * work.seq_len * d
    flops = forward_flops(shape, work)
    for i in backward_layers(shape, work):
        flops += gemm + 2 * attention
        if shape.trains_base_weights and i >= work.frozen_layers:
            flops += gemm
    flops += sum(4 * added_tokens(shape, work) * shape.added[i] for i in trained_layers(shape, work))
    return float(flops + 4 * work.batch_size * d * max(shape.num_labels, 2))


def layer_weights(shape: ModelShape) -> int:
    d, f = shape.hidden, shape.intermediate
    return 4 * d * d + 2 * d * f


def forward_bytes(shape: ModelShape, work: Workload) -> float:
    """Memory traffic of the forward pass: its activations written and read once, its weights read."""
    t = work.tokens
    activations = FLOAT * t * 2 * sum(saved_floats_per_token(shape, work, i) for i in range(work.exit_layer))
    return float(activations + FLOAT * layer_weights(shape) * work.exit_layer + FLOAT * 3 * t * shape.hidden)


def step_bytes(shape: ModelShape, work: Workload) -> float:
    """Memory traffic of the element-wise work, the weight reads and the optimizer."""
    backward = backward_layers(shape, work)
    activations = FLOAT * work.tokens * 4 * sum(saved_floats_per_token(shape, work, i) for i in backward)
    weights = FLOAT * layer_weights(shape) * 2 * len(backward)
    optimizer = ADAMW_BYTES * trained_parameters(shape, work)
    return forward_bytes(shape, work) + float(activations + weights + optimizer)


def step_launches(shape: ModelShape, work: Workload) -> int:
    if shape.backward_through_blocks:
        backward = LAUNCHES_BACKWARD * len(backward_layers(shape, work))
    else:  # only the trained added modules' backward
        backward = LAUNCHES_ADDED_BACKWARD * len(trained_layers(shape, work))
    return LAUNCHES_FORWARD * work.exit_layer + backward + LAUNCHES_FIXED


def step_seconds(shape: ModelShape, work: Workload, profile: DeviceProfile) -> float:
    """Predicted seconds of one local training step on the device."""
    return (
        step_flops(shape, work) / profile.flops_per_s
        + step_bytes(shape, work) / profile.bytes_per_s
        + step_launches(shape, work) * profile.launch_us * 1e-6
    )


def inference_seconds(
    shape: ModelShape, exit_layer: int, seq_len: int, profile: DeviceProfile, batch_size: int = 1
) -> float:
    """Predicted seconds of one forward pass that stops after block `exit_layer` (inference: eval mode,
    nothing saved for a backward pass, no optimizer)."""
    work = Workload(exit_layer, exit_layer, shape.rank, batch_size, seq_len)
    launches = LAUNCHES_FORWARD * exit_layer + LAUNCHES_INFERENCE_FIXED
    return (
        forward_flops(shape, work) / profile.flops_per_s
        + forward_bytes(shape, work) / profile.bytes_per_s
        + launches * profile.launch_us * 1e-6
    )


def peak_memory_bytes(shape: ModelShape, work: Workload, accelerator: str = "gpu") -> float:
    """Predicted peak of training memory (the framework's own footprint excluded: `runtime_gb`).

    On a GPU this is what the tensors occupy (`torch.cuda.max_memory_allocated`). On a CPU the
    process's resident memory is higher: glibc keeps the freed forward temporaries in its heap
    (its mmap threshold rises to the largest freed block), so activations count CPU_HEAP_FACTOR times.
    """
    d, f, h, s, t = shape.hidden, shape.intermediate, shape.heads, work.seq_len, work.tokens
    weights = FLOAT * shape.total_params
    optimizer = 3 * FLOAT * trained_parameters(shape, work)
    saved = sum(saved_floats_per_token(shape, work, i) for i in backward_layers(shape, work))
    saved += d + 6  # the head's inputs and the loss
    transient = 2 * h * s + f + 4 * d
    activations = FLOAT * t * (saved + transient)
    return float(weights + optimizer + activations * (CPU_HEAP_FACTOR if accelerator == "cpu" else 1.0))
