import os

import torch

# Triton picks interpreter vs compiler when a kernel is decorated, i.e. at import: set it before
# any test module imports prefixserve.kernels. CI has no GPU, so kernels run interpreted there.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


from pathlib import Path

import pytest

from prefixserve.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig


@pytest.fixture(scope="session")
def tiny_hf():
    """transformers' LlamaForCausalLM with random weights: the reference for the tiny backbone."""
    from prefixserve.models.tiny import tiny_hf_model

    return tiny_hf_model(seed=0)


@pytest.fixture(scope="session")
def tiny_backbone(tiny_hf):
    from prefixserve.models.tiny import tiny_backbone

    return tiny_backbone(tiny_hf)


@pytest.fixture
def make_tiny_engine(tiny_backbone):
    from prefixserve.engine.llm_engine import LLMEngine

    def make(num_pages=64, max_num_seqs=16, max_num_batched_tokens=256, max_waiting=64):
        return LLMEngine(tiny_backbone, EngineConfig(
            cache=CacheConfig(page_size=16, num_pages=num_pages),
            scheduler=SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                                      max_waiting=max_waiting)))
    return make


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The embedded backbone as a Hugging Face directory (dequantized once into the user cache)."""
    from prefixserve.models.embedded import prepare_embedded_backbone

    # The same place `make test`'s `prefixserve prepare` wrote to.
    return prepare_embedded_backbone(Path(os.environ.get("PREFIXSERVE_CACHE_DIR", ModelConfig.cache_dir)).expanduser())


@pytest.fixture(scope="session")
def smollm2(smollm2_dir):
    from prefixserve.models import load_backbone

    return load_backbone(ModelConfig(source=str(smollm2_dir)))


@pytest.fixture(scope="session")
def smollm2_hf(smollm2_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()



@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    """REDIS_URL if set, else a private redis-server on a free loopback port for the session.
    A missing redis-server FAILS the test: a skipped Redis suite would hide a broken store."""
    from redis_server import redis_url_from_env_or_start

    try:
        url, server = redis_url_from_env_or_start(tmp_path_factory.mktemp("redis"))
    except RuntimeError as e:  # no redis-server, one that did not start, or REDIS_URL unreachable
        pytest.fail(str(e), pytrace=False)
    yield url
    if server is not None:
        server.stop()


@pytest.fixture
def redis_namespace(redis_url):
    """A key namespace no other test uses; removed afterwards."""
    from redis_server import delete_namespace, unique_namespace

    namespace = unique_namespace()
    yield namespace
    delete_namespace(redis_url, namespace)
