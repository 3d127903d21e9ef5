"""Hardware profiles and model shapes for the expert-offloading simulator, each figure with its source.

A `HardwareProfile` holds what decides the time of one decoding step with offloaded experts:
the host-to-GPU bandwidth achieved for expert copies (an assumption below the spec sheet's PCIe
figure, stated in `h2d_source`), the GPU memory bandwidth (spec sheet), and an optional fixed
software overhead per layer (0 unless a calibration sets it, see `anchor.py`).

A `ModelShape` gives expert and per-layer sizes from a model's config (hidden, intermediate,
attention heads); `expert_bytes(bits)` is the size of one expert at a bit width (3 matrices of
hidden x intermediate, SwiGLU as in Mixtral), and `layer_compute_ms(profile, ...)` is the
memory-bound time of one decoding layer at batch 1: attention weights plus the top-k experts read
once from GPU memory. That roofline is a floor: real kernels (dequantisation, launches) are slower.

Shapes: `MIXTRAL_8X7B`, `OLMOE_1B_7B`, `QWEN3_30B_A3B` (their published configs) and
`shape_from_config(cfg)` for any Mixtral-shaped model; `sizes_at_depth` keeps a shape's sizes on a
trace's own layers and experts. Test: `pytest tests/test_offload_simulator.py`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from typing import Any

from ..errors import InvalidInputError


@dataclass(frozen=True)
class HardwareProfile:
    name: str
    h2d_GBps: float  # achieved host-to-device bandwidth for pinned expert copies (GB/s = 1e9 B/s)
    gpu_mem_GBps: float  # GPU memory bandwidth from the spec sheet
    pcie: str  # link as used in the reference set-up
    h2d_source: str  # where the bandwidth figure comes from, and what is assumed
    gpu_source: str  # spec sheet of the GPU
    overhead_ms_per_layer: float = 0.0  # fixed software time per layer (kernels, Python); 0 = roofline only

    def __post_init__(self) -> None:
        if self.h2d_GBps <= 0 or self.gpu_mem_GBps <= 0:
            raise InvalidInputError(f"hardware {self.name!r}: bandwidths must be positive")
        if self.overhead_ms_per_layer < 0:
            raise InvalidInputError(f"hardware {self.name!r}: overhead_ms_per_layer must be >= 0")

    def with_overhead(self, ms: float) -> "HardwareProfile":
        return replace(self, overhead_ms_per_layer=float(ms))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "HardwareProfile":
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise InvalidInputError(f"unknown hardware profile fields {sorted(unknown)}")
        return cls(**data)


# Achieved pinned host-to-device copies reach roughly 75-85% of the PCIe payload rate
# (15.75 GB/s for Gen3 x16, 31.5 GB/s for Gen4 x16, per direction); we assume ~80%.
PROFILES: dict[str, HardwareProfile] = {
    "a100": HardwareProfile(
        "a100", h2d_GBps=25.0, gpu_mem_GBps=2039.0, pcie="PCIe Gen4 x16",
        h2d_source="PCIe Gen4 x16 = 31.5 GB/s per direction (PCI-SIG 4.0 spec); assumed 80% achieved with pinned memory",
        gpu_source="NVIDIA A100 80GB SXM datasheet: HBM2e 2,039 GB/s",
    ),
    "rtx3060": HardwareProfile(
        "rtx3060", h2d_GBps=12.5, gpu_mem_GBps=360.0, pcie="PCIe Gen3 x16 (host, as in Eliseev & Mazur 2023)",
        h2d_source="PCIe Gen3 x16 = 15.75 GB/s per direction (PCI-SIG 3.0 spec); assumed 80% achieved with pinned memory",
        gpu_source="NVIDIA GeForce RTX 3060 12GB spec: GDDR6 192-bit 15 Gbps = 360 GB/s",
    ),
    "rtx3080m": HardwareProfile(
        "rtx3080m", h2d_GBps=25.0, gpu_mem_GBps=448.0, pcie="PCIe Gen4 x16",
        h2d_source="PCIe Gen4 x16 = 31.5 GB/s per direction (PCI-SIG 4.0 spec); assumed 80% achieved with pinned memory",
        gpu_source="NVIDIA GeForce RTX 3080 Laptop GPU 16GB spec: GDDR6 256-bit 14 Gbps = 448 GB/s",
    ),
    "t4": HardwareProfile(
        "t4", h2d_GBps=12.5, gpu_mem_GBps=320.0, pcie="PCIe Gen3 x16",
        h2d_source="PCIe Gen3 x16 = 15.75 GB/s per direction (NVIDIA T4 datasheet, PCI-SIG 3.0); assumed 80% achieved",
        gpu_source="NVIDIA T4 datasheet: GDDR6 320 GB/s",
    ),
}


def get_profile(name: str) -> HardwareProfile:
    try:
        return PROFILES[name]
    except KeyError:
        raise InvalidInputError(f"--hardware must be one of {sorted(PROFILES)}, got {name!r}") from None


@dataclass(frozen=True)
class ModelShape:
    name: str
    num_layers: int
    num_experts: int
    top_k: int
    hidden: int
    intermediate: int  # one expert's FFN width
    num_heads: int
    num_kv_heads: int
    head_dim: int

    def __post_init__(self) -> None:
        if min(self.num_layers, self.num_experts, self.top_k, self.hidden, self.intermediate) < 1:
            raise InvalidInputError(f"model shape {self.name!r}: sizes must be >= 1")
        if self.top_k > self.num_experts:
            raise InvalidInputError(f"model shape {self.name!r}: top_k > num_experts")

    @property
    def expert_params(self) -> int:
        return 3 * self.hidden * self.intermediate  # w1, w3 (hidden -> inter), w2 (inter -> hidden)

    @property
    def attention_params(self) -> int:
        q_o = 2 * self.hidden * self.num_heads * self.head_dim
        k_v = 2 * self.hidden * self.num_kv_heads * self.head_dim
        return q_o + k_v

    def expert_bytes(self, bits: float) -> float:
        if bits <= 0:
            raise InvalidInputError(f"--bits must be positive, got {bits}")
        return self.expert_params * bits / 8

    def layer_compute_ms(self, profile: HardwareProfile, expert_bits: float, attn_bits: float = 16.0) -> float:
        """Memory-bound time of one decoding layer at batch 1 (weights read once) plus fixed overhead."""
        read_B = self.attention_params * attn_bits / 8 + self.top_k * self.expert_bytes(expert_bits)
        return read_B / (profile.gpu_mem_GBps * 1e9) * 1e3 + profile.overhead_ms_per_layer

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# mistralai/Mixtral-8x7B-v0.1 config.json: hidden 4096, intermediate 14336, 32 layers, 8 experts,
# top-2, 32 heads, 8 KV heads, head_dim 128 (46.7B parameters, of which experts 45.1B).
MIXTRAL_8X7B = ModelShape("mixtral-8x7b", num_layers=32, num_experts=8, top_k=2, hidden=4096, intermediate=14336,
                          num_heads=32, num_kv_heads=8, head_dim=128)
# allenai/OLMoE-1B-7B-0924 config.json: hidden 2048, intermediate 1024 (one expert), 16 layers, 64 experts,
# top-8, 16 heads, 16 KV heads (head_dim 2048 / 16 = 128).
OLMOE_1B_7B = ModelShape("olmoe-1b-7b", num_layers=16, num_experts=64, top_k=8, hidden=2048, intermediate=1024,
                         num_heads=16, num_kv_heads=16, head_dim=128)
# Qwen/Qwen3-30B-A3B config.json: hidden 2048, moe_intermediate_size 768, 48 layers, 128 experts, top-8,
# 32 heads, 4 KV heads, head_dim 128 (attention width 4096 > hidden).
QWEN3_30B_A3B = ModelShape("qwen3-30b-a3b", num_layers=48, num_experts=128, top_k=8, hidden=2048, intermediate=768,
                           num_heads=32, num_kv_heads=4, head_dim=128)
SHAPES = {s.name: s for s in (MIXTRAL_8X7B, OLMOE_1B_7B, QWEN3_30B_A3B)}


def sizes_at_depth(shape: ModelShape, num_layers: int, num_experts: int, top_k: int) -> ModelShape:
    """`shape`'s expert and attention sizes on a model of another depth, expert count and top-k.

    For pricing a trace at its own depth: no layer mapping, the trace's experts and top-k, and only
    the bytes of one expert and of one layer's attention taken from `shape` (its spread over more
    experts or layers is not simulated)."""
    return replace(shape, name=f"{shape.name} sizes, {num_layers} layers x {num_experts} experts top-{top_k}",
                   num_layers=num_layers, num_experts=num_experts, top_k=top_k)


def shape_from_config(config: Any, name: str | None = None) -> ModelShape:
    """A ModelShape from a Mixtral-shaped Hugging Face config (or a dict of its fields)."""
    get = (lambda k, d=None: config.get(k, d)) if isinstance(config, dict) else (lambda k, d=None: getattr(config, k, d))
    hidden, heads = int(get("hidden_size")), int(get("num_attention_heads"))
    head_dim = get("head_dim") or hidden // heads
    experts = get("num_local_experts") or get("num_experts")
    inter = get("moe_intermediate_size") or get("intermediate_size")
    if experts is None or inter is None:
        raise InvalidInputError("model config lacks num_local_experts/num_experts or an intermediate size")
    return ModelShape(name or str(get("_name_or_path", "") or get("model_type", "model")), int(get("num_hidden_layers")),
                      int(experts), int(get("num_experts_per_tok")), hidden, int(inter), heads,
                      int(get("num_key_value_heads") or heads), int(head_dim))


def get_shape(name_or_config: Any) -> ModelShape:
    if isinstance(name_or_config, ModelShape):
        return name_or_config
    if isinstance(name_or_config, str):
        if name_or_config in SHAPES:
            return SHAPES[name_or_config]
        raise InvalidInputError(f"--shape must be one of {sorted(SHAPES)} or 'trace', got {name_or_config!r}")
    return shape_from_config(name_or_config)
