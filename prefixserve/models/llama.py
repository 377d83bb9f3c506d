"""Llama-family forward over a flat varlen batch (no padding): RMSNorm, RoPE, GQA, SwiGLU.

Covers Llama (incl. llama3 RoPE scaling), Mistral, Qwen2 (q/k/v bias) and SmolLM. Weight names
follow Hugging Face except that q/k/v and gate/up are stored fused (`fuse_hf_state_dict`), so a
decoder layer does two input matmuls instead of five.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from prefixserve.errors import ModelLoadError
from prefixserve.kernels.bottleneck import BottleneckPlan, add_bottleneck
from prefixserve.kernels.kv_store import store_kv
from prefixserve.kernels.lora import add_lora
from prefixserve.kernels.lora_grouped import GroupedPlan, add_lora_grouped, plan_groups, plan_staged_groups
from prefixserve.kernels.lora_meta import LoRABatchMetadata
from prefixserve.kernels.lora_stage import LoRAStage
from prefixserve.kernels.paged_attention import PagedAttentionMetadata, paged_attention


@dataclass(frozen=True)
class LlamaArch:
    """The shape facts of a backbone that the engine and adapters need."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    tie_word_embeddings: bool
    max_position_embeddings: int
    qkv_bias: bool = False

    @classmethod
    def from_hf_config(cls, config: PretrainedConfig, qkv_bias: bool = False) -> LlamaArch:
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(
            vocab_size=config.vocab_size, hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size, num_layers=config.num_hidden_layers,
            num_heads=config.num_attention_heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
            head_dim=head_dim, rms_norm_eps=config.rms_norm_eps,
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            max_position_embeddings=config.max_position_embeddings, qkv_bias=qkv_bias,
        )


@dataclass
class LoRAStep:
    """This step's batched LoRA: the row pools per target (a [num_layers, rows, in], b [num_layers,
    rows, out]) and the tokens grouped by adapter (`meta`, see kernels/lora_meta.py). On CPU the
    grouping plan for the torch path is built once here and reused by every projection."""

    pools: dict[str, tuple[torch.Tensor, torch.Tensor]]
    meta: LoRABatchMetadata
    plan: GroupedPlan | None = None  # CPU only
    stage: LoRAStage | None = None  # CPU only: where decode groups' weights persist across steps
    serials: list[int] | None = None  # [S] each segment's allocation serial, the stage's keys

    def __post_init__(self):
        if self.plan is None and self.meta.token_indices.device.type != "cuda":
            self.plan = (plan_staged_groups(self.meta, self.stage, self.pools, self.serials)
                         if self.stage is not None else plan_groups(self.meta))

    def apply(self, layer: int, target: str, x: torch.Tensor, y: torch.Tensor) -> None:
        """y += scaling * (x @ A^T) @ B^T per token, in place; y may be a column slice of a fused output."""
        if target not in self.pools:
            return
        a, b = self.pools[target]
        if self.plan is not None:
            staged = partial(self.stage.views, target, layer) if self.stage is not None else None
            add_lora_grouped(x, y, a[layer], b[layer], self.meta, self.plan, staged)
        else:
            add_lora(x, y, a[layer], b[layer], self.meta)


@dataclass
class VectorStep:
    """This step's per-task vectors over projections (engine/vector_pool.py): the pools, (mode, target)
    -> [num_layers, rows, features] fp32, and the tokens of tasks that have vectors with their rows.
    Only those tokens are touched, so the other tasks' rows stay bitwise what the backbone gives."""

    # Gathers and write-backs go through index_select / index_copy_: advanced indexing (y[idx],
    # pool[layer, rows], y[idx] = ...) took ~8x as long on CPU, 30 ms of a 320 ms mixed decode step.
    pools: dict[tuple[str, str], torch.Tensor]
    token_indices: torch.Tensor  # [n] int64: rows of x / y
    token_rows: torch.Tensor  # [n] int64: each one's pool row

    def scales_input(self, target: str) -> bool:
        return ("scale_in", target) in self.pools

    def _rows(self, mode: str, target: str, layer: int) -> torch.Tensor | None:
        pool = self.pools.get((mode, target))  # [num_layers, rows, features]
        return None if pool is None else pool[layer].index_select(0, self.token_rows)  # [n, features]

    def scaled_rows(self, layer: int, target: str, x: torch.Tensor) -> torch.Tensor:
        """[n, in]: the vector tasks' rows of x times their input scales for target (which has some)."""
        rows = x.index_select(0, self.token_indices).float()
        return rows.mul_(self._rows("scale_in", target, layer)).to(x.dtype)

    def scale_input(self, layer: int, target: str, x: torch.Tensor) -> torch.Tensor:
        """x with its vector tasks' rows multiplied by their input scales (a copy; x is not changed)."""
        if not self.scales_input(target):
            return x
        return x.index_copy(0, self.token_indices, self.scaled_rows(layer, target, x))

    def apply_output(self, layer: int, target: str, y: torch.Tensor) -> None:
        """y = y * scale + shift on the vector tasks' tokens, in place; y may be a column slice."""
        scale, shift = self._rows("scale_out", target, layer), self._rows("shift_out", target, layer)
        if scale is None and shift is None:
            return
        out = y.index_select(0, self.token_indices).float()
        if scale is not None:
            out = out.mul_(scale)
        if shift is not None:
            out = out.add_(shift)
        y.index_copy_(0, self.token_indices, out.to(y.dtype))


@dataclass
class BottleneckStep:
    """This step's bottleneck adapters (engine/bottleneck_pool.py): per placement the pool's tensors,
    and the tokens grouped by adapter (`plan`, see kernels/bottleneck.py), shared by every layer."""

    pools: dict[str, dict[str, torch.Tensor]]  # placement -> down, down_bias, up, up_bias
    plan: BottleneckPlan

    def apply(self, layer: int, placement: str, y: torch.Tensor) -> None:
        """y += up(act(down(y))) on the adapters' tokens, in place; y: the sublayer's output [T, hidden]."""
        pool = self.pools.get(placement)
        if pool is not None:
            add_bottleneck(y, pool["down"][layer], pool["down_bias"][layer], pool["up"][layer], pool["up_bias"][layer],
                           self.plan)


def rope_tables(config: PretrainedConfig, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin: [max_len, head_dim] in fp32, computed exactly as transformers does per position."""
    rope = getattr(config, "rope_parameters", None) or {"rope_type": "default"}
    rope_type = rope.get("rope_type", "default")
    if rope_type == "default":
        inv_freq, scaling = LlamaRotaryEmbedding.compute_default_rope_parameters(config)
    elif rope_type in ROPE_INIT_FUNCTIONS and rope_type != "dynamic":
        inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, "cpu")
    else:
        # dynamic NTK rescales with the running length, which a shared table cannot express
        raise ModelLoadError(f"RoPE type {rope_type!r} is not supported; expected default, linear, llama3, yarn "
                             f"or longrope")
    freqs = torch.arange(max_len, dtype=torch.float32)[:, None] * inv_freq.float()[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos() * scaling, emb.sin() * scaling


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 and cast back before the weight, as transformers does (parity in fp16/bf16).
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class DecoderLayer(nn.Module):
    def __init__(self, arch: LlamaArch, index: int):
        super().__init__()
        self.arch = arch
        self.index = index
        qkv_out = (arch.num_heads + 2 * arch.num_kv_heads) * arch.head_dim
        self.input_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.qkv_proj = nn.Linear(arch.hidden_size, qkv_out, bias=arch.qkv_bias)
        self.o_proj = nn.Linear(arch.num_heads * arch.head_dim, arch.hidden_size, bias=False)
        self.post_attention_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.gate_up_proj = nn.Linear(arch.hidden_size, 2 * arch.intermediate_size, bias=False)
        self.down_proj = nn.Linear(arch.intermediate_size, arch.hidden_size, bias=False)
        self.scale = arch.head_dim ** -0.5

    def forward(self, hidden, cos, sin, meta: PagedAttentionMetadata, k_cache, v_cache, lora: LoRAStep | None,
                vectors: VectorStep | None = None, bottlenecks: BottleneckStep | None = None):
        # hidden: [T, hidden]; cos, sin: [T, 1, D]; k_cache, v_cache: [num_pages, page_size, Hkv, D]
        a = self.arch
        num_tokens = hidden.shape[0]
        x = self.input_layernorm(hidden)
        qkv = self.qkv_proj(x)  # [T, (H + 2 Hkv) * D]
        q_end, k_end = a.num_heads * a.head_dim, (a.num_heads + a.num_kv_heads) * a.head_dim
        qkv_slices = {"q_proj": slice(0, q_end), "k_proj": slice(q_end, k_end), "v_proj": slice(k_end, None)}
        if vectors is not None:
            self._rescale_fused_inputs(vectors, self.qkv_proj, x, qkv, qkv_slices)
        for target, columns in qkv_slices.items():
            if lora is not None:
                lora.apply(self.index, target, x, qkv[:, columns])
            if vectors is not None:
                vectors.apply_output(self.index, target, qkv[:, columns])
        qk, v = qkv.split([(a.num_heads + a.num_kv_heads) * a.head_dim, a.num_kv_heads * a.head_dim], dim=-1)
        qk = qk.view(num_tokens, a.num_heads + a.num_kv_heads, a.head_dim)
        qk = qk * cos + _rotate_half(qk) * sin  # RoPE on queries and keys in one pass
        q, k = qk[:, :a.num_heads], qk[:, a.num_heads:]
        v = v.view(num_tokens, a.num_kv_heads, a.head_dim)
        store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        attn = paged_attention(q, k_cache, v_cache, meta, self.scale).view(num_tokens, -1)  # [T, H * D]
        out = self._project(self.o_proj, "o_proj", attn, lora, vectors)
        if bottlenecks is not None:
            bottlenecks.apply(self.index, "attention", out)
        hidden = hidden + out
        x = self.post_attention_layernorm(hidden)
        gate_up = self.gate_up_proj(x)  # [T, 2 * intermediate]
        gate_up_slices = {"gate_proj": slice(0, a.intermediate_size), "up_proj": slice(a.intermediate_size, None)}
        if vectors is not None:
            self._rescale_fused_inputs(vectors, self.gate_up_proj, x, gate_up, gate_up_slices)
        for target, columns in gate_up_slices.items():
            if lora is not None:
                lora.apply(self.index, target, x, gate_up[:, columns])
            if vectors is not None:
                vectors.apply_output(self.index, target, gate_up[:, columns])
        gate, up = gate_up.chunk(2, dim=-1)
        act = F.silu(gate) * up
        out = self._project(self.down_proj, "down_proj", act, lora, vectors)
        if bottlenecks is not None:
            bottlenecks.apply(self.index, "mlp", out)
        return hidden + out

    def _project(self, proj: nn.Linear, target: str, x: torch.Tensor, lora: LoRAStep | None,
                 vectors: VectorStep | None) -> torch.Tensor:
        """An unfused projection with this step's adapters: input scales, the matmul, LoRA, output vectors."""
        scaled = vectors.scale_input(self.index, target, x) if vectors is not None else x
        out = proj(scaled)
        if lora is not None:  # LoRA tokens are never vector tokens: scaled equals x on their rows
            lora.apply(self.index, target, scaled, out)
        if vectors is not None:
            vectors.apply_output(self.index, target, out)
        return out

    def _rescale_fused_inputs(self, vectors: VectorStep, proj: nn.Linear, x: torch.Tensor, y: torch.Tensor,
                              slices: dict[str, slice]) -> None:
        """A fused projection's inputs are shared by its parts, so a part whose input is scaled is
        recomputed for the vector tasks' tokens alone: y[idx, part] = (x[idx] * s) W_part^T + b_part."""
        for target, columns in slices.items():  # [T, out] columns of y
            if vectors.scales_input(target):
                weight = proj.weight[columns]
                bias = proj.bias[columns] if proj.bias is not None else None
                part = F.linear(vectors.scaled_rows(self.index, target, x), weight, bias)  # [n, out_part]
                y[:, columns].index_copy_(0, vectors.token_indices, part)


class LlamaModel(nn.Module):
    """The frozen backbone. `forward` fills the KV cache for this step's tokens and returns hidden
    states; `compute_logits` runs the head only on the rows that will be sampled."""

    def __init__(self, arch: LlamaArch, rope_cos: torch.Tensor, rope_sin: torch.Tensor):
        super().__init__()
        self.arch = arch
        self.embed_tokens = nn.Embedding(arch.vocab_size, arch.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(arch, i) for i in range(arch.num_layers))
        self.norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.lm_head = nn.Linear(arch.hidden_size, arch.vocab_size, bias=False)
        # Tables come in built (see rope_tables) so the model can be constructed on the meta device.
        self.register_buffer("rope_cos", rope_cos, persistent=False)  # [max_model_len, D] fp32
        self.register_buffer("rope_sin", rope_sin, persistent=False)

    def tie_weights(self) -> None:
        if self.arch.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def forward(
        self,
        input_embeds: torch.Tensor,  # [T, hidden]
        positions: torch.Tensor,  # [T] int64
        meta: PagedAttentionMetadata,
        kv_cache: torch.Tensor,  # [num_layers, 2, num_pages, page_size, Hkv, D]
        lora: LoRAStep | None = None,
        vectors: VectorStep | None = None,
        bottlenecks: BottleneckStep | None = None,
    ) -> torch.Tensor:  # [T, hidden], before the final norm
        dtype = input_embeds.dtype
        cos = self.rope_cos[positions].to(dtype)[:, None, :]  # [T, 1, D]
        sin = self.rope_sin[positions].to(dtype)[:, None, :]
        hidden = input_embeds
        for layer, layer_cache in zip(self.layers, kv_cache):
            hidden = layer(hidden, cos, sin, meta, layer_cache[0], layer_cache[1], lora, vectors, bottlenecks)
        return hidden

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [N, hidden] (only the rows to sample) -> fp32 logits [N, vocab]."""
        return self.lm_head(self.norm(hidden)).float()


def fuse_hf_state_dict(state: dict[str, torch.Tensor], arch: LlamaArch) -> dict[str, torch.Tensor]:
    """Map a Hugging Face Llama state dict onto LlamaModel's names, concatenating q/k/v and gate/up."""
    def take(name: str) -> torch.Tensor:
        if name not in state:
            raise ModelLoadError(f"backbone weights are missing {name!r}")
        return state[name]

    fused = {"embed_tokens.weight": take("model.embed_tokens.weight"), "norm.weight": take("model.norm.weight")}
    if "lm_head.weight" in state:
        fused["lm_head.weight"] = state["lm_head.weight"]
    elif not arch.tie_word_embeddings:
        raise ModelLoadError("backbone weights are missing 'lm_head.weight' and the config does not tie embeddings")
    for i in range(arch.num_layers):
        p = f"model.layers.{i}."
        attn = [take(f"{p}self_attn.{n}_proj.weight") for n in "qkv"]
        fused[f"layers.{i}.qkv_proj.weight"] = torch.cat(attn)
        if arch.qkv_bias:
            fused[f"layers.{i}.qkv_proj.bias"] = torch.cat([take(f"{p}self_attn.{n}_proj.bias") for n in "qkv"])
        fused[f"layers.{i}.o_proj.weight"] = take(f"{p}self_attn.o_proj.weight")
        fused[f"layers.{i}.gate_up_proj.weight"] = torch.cat([take(f"{p}mlp.gate_proj.weight"),
                                                              take(f"{p}mlp.up_proj.weight")])
        fused[f"layers.{i}.down_proj.weight"] = take(f"{p}mlp.down_proj.weight")
        fused[f"layers.{i}.input_layernorm.weight"] = take(f"{p}input_layernorm.weight")
        fused[f"layers.{i}.post_attention_layernorm.weight"] = take(f"{p}post_attention_layernorm.weight")
    return fused
