import pytest

from prefixserve.config import CacheConfig, ModelConfig, SchedulerConfig
from prefixserve.errors import ConfigError


@pytest.mark.parametrize("make, message", [
    (lambda: CacheConfig(page_size=12), "page_size must be a positive power of two, found 12"),
    (lambda: CacheConfig(num_pages=0), "num_pages must be positive, found 0"),
    (lambda: SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=4),
     "max_num_batched_tokens must be >= max_num_seqs"),
    (lambda: SchedulerConfig(max_waiting=0), "max_waiting must be positive"),
    (lambda: ModelConfig(dtype="int8"), "dtype must be float32, float16 or bfloat16, found 'int8'"),
])
def test_invalid_config_says_what_was_expected(make, message):
    with pytest.raises(ConfigError) as err:
        make()
    assert message in str(err.value)
