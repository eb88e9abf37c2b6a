"""Training throughput: a FLOP model of a LLaVA step, batch statistics, and the logged rates (MFU)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from transformers import TrainerCallback

from llava.constants import IGNORE_INDEX
from llava.model.projector import projector_reduction, split_projector_type
from llava.model.vision_tower import tower_geometry
from llava.train.stages import LORA, TRAINS, StagePlan

# Dense peak FLOP/s by (device name fragment, dtype). The CPU rows are this project's 2-core
# machines (REFERENCE.md; `measure_matmul_peak()` measures the one at hand); GPU rows are the
# vendors' dense tensor-core figures (no sparsity).
PEAK_FLOPS: dict[tuple[str, str], float] = {
    ("cpu", "float32"): 190e9,
    ("cpu", "bfloat16"): 55e9,
    ("H100", "bfloat16"): 989e12,
    ("H100", "float16"): 989e12,
    ("H100", "float32"): 495e12,  # TF32
    ("H200", "bfloat16"): 989e12,
    ("H200", "float16"): 989e12,
    ("A100", "bfloat16"): 312e12,
    ("A100", "float16"): 312e12,
    ("A100", "float32"): 156e12,  # TF32
    ("hpu", "bfloat16"): 432e12,  # Gaudi2 MME
}


def device_peak_flops(device: torch.device | str, dtype: torch.dtype) -> float | None:
    """The table's peak for a device and compute dtype, None when it is not in the table."""
    device = torch.device(device)
    dtype_name = str(dtype).removeprefix("torch.")
    name = device.type
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    for (fragment, table_dtype), peak in PEAK_FLOPS.items():
        if fragment in name and table_dtype == dtype_name:
            return peak
    return None


def measure_matmul_peak(size: int = 2048, repeats: int = 10, dtype=torch.float32) -> float:
    """Best-of-`repeats` FLOP/s of a square matrix multiply on the CPU."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b  # warm up the kernels and threads
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


# ---------------------------------------------------------------------------------------------
# The FLOP model.


@dataclass(frozen=True)
class FlopModel:
    """FLOPs of one training step from its batch statistics, as the stage runs it.

    Conventions (those of PaLM's and Megatron's MFU): a multiply-add is 2 FLOPs; only matrix
    products count (norms, activations, softmax and embedding lookups do not); attention
    counts the full S x S score and value products, causal or not. Backward costs one forward
    for the input gradients (needed wherever something upstream trains) plus one for the
    weight gradients (only for weights that train). The frozen tower runs forward only, all of
    its layers (the selected hidden state is not always the last). The LM head counts only at
    supervised positions, the work the loss needs; gradient-checkpointing recomputation is not
    counted (model FLOPs, not hardware FLOPs).
    """

    image_flops: float  # tower + projector, forward and backward, per image
    token_flops: float  # language-model linear layers (and LoRA), per real token
    attention_flops: float  # per squared sample length
    supervised_flops: float  # LM head, per supervised token
    cached_image_flops: float = 0.0  # projector only, per image read from a feature cache

    def step_flops(self, stats: dict[str, float]) -> float:
        return (
            stats["images"] * self.image_flops
            + stats.get("cached_images", 0) * self.cached_image_flops
            + stats["tokens"] * self.token_flops
            + stats["squared_lengths"] * self.attention_flops
            + stats["supervised"] * self.supervised_flops
        )


@dataclass(frozen=True)
class TowerShape:
    """A ViT: `positions` tokens per image (patches, plus CLS when it has one); `features`
    of them go on to the projector."""

    layers: int
    width: int
    intermediate: int
    patch_size: int
    num_patches: int
    positions: int
    features: int

    def forward_flops(self) -> float:
        """One image through the patch embedding and every layer."""
        patch_embedding = 2 * 3 * self.patch_size**2 * self.width * self.num_patches
        linear = 2 * self.positions * (4 * self.width**2 + 2 * self.width * self.intermediate)
        attention = 4 * self.positions**2 * self.width
        return patch_embedding + self.layers * (linear + attention)


@dataclass(frozen=True)
class TextShape:
    """A gated-MLP decoder (Llama, Mistral, Qwen2, Gemma)."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int

    def linears(self) -> list[tuple[int, int]]:
        """(in, out) of each linear layer of one decoder layer."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        d, i = self.hidden, self.intermediate
        return [(d, q), (d, kv), (d, kv), (q, d), (d, i), (d, i), (i, d)]

    def token_forward_flops(self) -> float:
        return 2 * self.layers * sum(a * b for a, b in self.linears())

    def lora_token_forward_flops(self, rank: int) -> float:
        return 2 * self.layers * sum(rank * (a + b) for a, b in self.linears())

    def attention_forward_flops(self) -> float:
        """Per squared sample length: QK^T and the weighted sum of V, every layer."""
        return 4 * self.layers * self.heads * self.head_dim


@dataclass(frozen=True)
class StageGrads:
    """Which parts get weight gradients in a stage (and the LoRA rank, 0 without LoRA); made
    from the stage plan by `stage_grads`."""

    tower: bool = False
    projector: bool = True
    language_model: bool = False
    head: bool = False
    lora_rank: int = 0


def projector_flops(layers: list[tuple[int, int]], tokens: int, grads: StageGrads) -> float:
    """Forward and backward FLOPs of the projector's linears over `tokens` image tokens."""
    total = 0.0
    for index, (fan_in, fan_out) in enumerate(layers):
        forward = 2 * fan_in * fan_out * tokens
        input_grads = grads.tower or (grads.projector and index > 0)
        total += forward * (1 + int(grads.projector) + int(input_grads))
    return total


def build_flop_model(
    tower: TowerShape,
    projector: list[tuple[int, int]],
    text: TextShape,
    grads: StageGrads,
    projector_tokens: int | None = None,
) -> FlopModel:
    """`projector_tokens`: the tokens the projector's linears run over (after a token
    reduction), default the tower's features."""
    tokens = tower.features if projector_tokens is None else projector_tokens
    tower_flops = tower.forward_flops() * (3 if grads.tower else 1)
    projector_work = projector_flops(projector, tokens, grads)
    # Input gradients run through the whole LM: something before its last layer trains in
    # every stage (the projector, the LM itself or LoRA adapters in its first layers).
    lm_multiplier = 2 + int(grads.language_model)
    lora = 3 * text.lora_token_forward_flops(grads.lora_rank) if grads.lora_rank else 0.0
    return FlopModel(
        image_flops=tower_flops + projector_work,
        token_flops=text.token_forward_flops() * lm_multiplier + lora,
        attention_flops=text.attention_forward_flops() * 3,
        supervised_flops=2 * text.hidden * text.vocab * (2 + int(grads.head)),
        cached_image_flops=projector_work,
    )


def projector_layers(projector_type: str, vision: int, text: int) -> list[tuple[int, int]]:
    """(in, out) of the projector's linears: linear, identity or mlp{N}x_gelu, after any token
    reduction (pixel_shuffle widens their input; pooling has no weights)."""
    reduction, head = split_projector_type(projector_type)
    if reduction is not None:
        vision *= reduction.width_factor
    if head == "identity":
        return []
    if head == "linear":
        return [(vision, text)]
    depth = int(head.removeprefix("mlp").split("x", 1)[0])
    return [(vision, text)] + [(text, text)] * (depth - 1)


def tower_shape(tower_config: dict[str, Any], select_feature: str = "patch") -> TowerShape:
    """The ViT shape of a LlavaConfig's `vision_tower_config` (HF CLIP / SigLIP / open_clip);
    its patches and tokens from the tower's ImageGeometry."""
    vision = tower_config["vision_config"]
    if tower_config["tower_type"] == "open_clip":
        width = vision["vision_cfg"]["width"]
        layers = vision["vision_cfg"]["layers"]
        intermediate = int(width * vision["vision_cfg"].get("mlp_ratio", 4.0))
    else:
        width, layers = vision["hidden_size"], vision["num_hidden_layers"]
        intermediate = vision["intermediate_size"]
    geometry = tower_geometry(tower_config, select_feature)
    return TowerShape(
        layers,
        width,
        intermediate,
        geometry.patch_size,
        geometry.num_patches,
        geometry.positions,
        geometry.num_image_tokens,
    )


def text_shape(text_config: Any) -> TextShape:
    heads = text_config.num_attention_heads
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // heads
    return TextShape(
        layers=text_config.num_hidden_layers,
        hidden=text_config.hidden_size,
        intermediate=text_config.intermediate_size,
        heads=heads,
        kv_heads=getattr(text_config, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        vocab=text_config.vocab_size,
    )


def flop_model_for(config: Any, grads: StageGrads) -> FlopModel:
    """The FLOP model of a LlavaConfig for a stage."""
    tower = tower_shape(config.vision_tower_config, config.mm_vision_select_feature)
    text = text_shape(config.text_config)
    vision_width = config.mm_hidden_size or tower.width
    layers = projector_layers(config.mm_projector_type, vision_width, text.hidden)
    geometry = replace(
        tower_geometry(config.vision_tower_config, config.mm_vision_select_feature),
        reduction=projector_reduction(config.mm_projector_type),
    )
    return build_flop_model(tower, layers, text, grads, geometry.num_image_tokens)


def stage_grads(plan: StagePlan, lora_rank: int = 0) -> StageGrads:
    """What a stage plan trains, by role; `lora_rank` (the LoRA config's r) counts only where
    the plan puts the language model under LoRA."""
    return StageGrads(
        tower=plan.vision == TRAINS,
        projector=plan.connector == TRAINS,
        language_model=plan.language_model == TRAINS,
        head=plan.head == TRAINS,
        lora_rank=lora_rank if plan.language_model == LORA else 0,
    )


def compute_dtype(args: Any) -> torch.dtype:
    if getattr(args, "bf16", False):
        return torch.bfloat16
    if getattr(args, "fp16", False):
        return torch.float16
    return torch.float32


def peak_flops_for(args: Any) -> float | None:
    """`--peak_tflops` when given, else the table's figure for the device and dtype."""
    flag = getattr(args, "peak_tflops", None)
    if flag:
        return flag * 1e12
    return device_peak_flops(args.device, compute_dtype(args))


# ---------------------------------------------------------------------------------------------
# Batch statistics and the logged rates.


def batch_statistics(batch: dict[str, Any]) -> tuple[list[int], torch.Tensor]:
    """Statistics of one batch: (samples, slots, images, cached images) known on the host, and
    (tokens, squared lengths, supervised) as one tensor on the batch's device, so that no step
    waits for the device. Images are pixel_values' rows (an AnyRes view counts as one: the
    tower runs on each); cached images are the rows of `image_features` read from a feature
    cache (the tower does not run on them, the projector does).

    Sample lengths come from `sample_lengths` (packed batches) or from the attention mask
    (padded ones); a batch with neither is taken as unpadded.
    """
    input_ids = batch["input_ids"]  # (B, T)
    lengths = batch.get("sample_lengths")  # (S,)
    if lengths is None:
        mask = batch.get("attention_mask")
        lengths = (
            mask.sum(dim=1)
            if mask is not None
            else input_ids.new_full((input_ids.shape[0],), input_ids.shape[1])
        )
    lengths = lengths.long()
    labels = batch.get("labels")
    supervised = (labels[:, 1:] != IGNORE_INDEX).sum() if labels is not None else lengths.sum() * 0
    pixel_values, features = batch.get("pixel_values"), batch.get("image_features")
    images = 0 if pixel_values is None else pixel_values.shape[0]
    cached_images = 0 if features is None else features.shape[0]
    host = [lengths.shape[0], input_ids.numel(), images, cached_images]
    return host, torch.stack([lengths.sum(), (lengths * lengths).sum(), supervised])


HOST_FIELDS = ("samples", "slots", "images", "cached_images")
DEVICE_FIELDS = ("tokens", "squared_lengths", "supervised")


@dataclass
class ThroughputMeter:
    """Accumulates batch statistics between logging steps and turns them into rates."""

    flop_model: FlopModel | None
    peak_flops: float | None
    host_totals: list[int] = field(default_factory=lambda: [0] * len(HOST_FIELDS))
    device_totals: torch.Tensor | None = None
    window_start: float = field(default_factory=time.perf_counter)

    def record(self, batch: dict[str, Any]) -> None:
        host, device = batch_statistics(batch)
        self.host_totals = [a + b for a, b in zip(self.host_totals, host)]
        totals = self.device_totals
        self.device_totals = device if totals is None else totals + device

    def start(self) -> None:
        self.host_totals, self.device_totals = [0] * len(HOST_FIELDS), None
        self.window_start = time.perf_counter()

    def totals(self) -> dict[str, int]:
        """The window's statistics (reading them waits for the device once)."""
        device = [0, 0, 0] if self.device_totals is None else self.device_totals.tolist()
        return dict(zip(HOST_FIELDS + DEVICE_FIELDS, self.host_totals + device))

    def rates(self) -> dict[str, float]:
        """samples/s, tokens/s, padding fraction, TFLOP/s and MFU since the last call."""
        if self.device_totals is None:
            return {}
        stats = self.totals()
        elapsed = time.perf_counter() - self.window_start
        self.start()
        rates = {
            "samples_per_second": round(stats["samples"] / elapsed, 3),
            "tokens_per_second": round(stats["tokens"] / elapsed, 1),
            "padding_fraction": round(1 - stats["tokens"] / max(stats["slots"], 1), 4),
        }
        if self.flop_model is not None:
            flops = self.flop_model.step_flops(stats) / elapsed
            rates["tflops"] = round(flops / 1e12, 4)
            if self.peak_flops:
                rates["mfu"] = round(flops / self.peak_flops, 4)
        return rates


class ThroughputCallback(TrainerCallback):
    """Builds the meter (FLOP model of the stage plan, the device's peak) when training
    starts; the trainer records each batch into it and adds its rates to the training logs."""

    def __init__(self, plan: StagePlan):
        self.plan = plan
        self.meter: ThroughputMeter | None = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        from llava.train.lora import lora_rank

        flop_model = None
        config = getattr(getattr(model, "config", None), "vision_tower_config", None)
        if config is not None:
            flop_model = flop_model_for(model.config, stage_grads(self.plan, lora_rank(model)))
        self.meter = ThroughputMeter(flop_model, peak_flops_for(args))
