"""Start a prefix-tuning run from the backbone's own keys and values of real text.

A prefix drawn at random puts keys and values in front of every sequence that look like nothing the
backbone has seen: attention spreads onto them and the training loss starts far above zero-shot (about
5 nats on the suite against below 2) and falls slowly. The prefix-tuning paper (Li & Liang 2021,
section 7.2) initialises from the activations of real words instead, which matters most with little
data. Here the words are the task's instruction (or its label words): the run starts exactly where
the backbone would be with that text written in front of the prompt, and learns from there.

With the reparameterisation MLP (`embedding -> Linear -> tanh -> Linear`, what peft trains), the
target cannot be written into a table. The last Linear is solved for instead: with the first layer's
random features H [P, hidden] fixed, least squares on [H, 1] gives the weight and bias that make the
MLP output the target exactly (P <= hidden + 1, so the system is underdetermined and the minimum-norm
solution is taken).
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from prefixserve.errors import TrainingFailedError
from prefixserve.training.adapter_guard import library_versions
from prefixserve.training.backbone import TrainingBackbone
from prefixserve.training.hf_cache import cache_kwarg

SEPARATOR = "\n"  # between the prefix text and the prompt, as an instruction is written above a question


def text_token_ids(tokenizer, text: str, num_virtual_tokens: int) -> list[int]:
    """`num_virtual_tokens` ids of `text` and a separator: cut when longer, repeated when shorter
    (peft's rule for a TEXT-initialised soft prompt)."""
    ids = tokenizer(text + SEPARATOR, add_special_tokens=False)["input_ids"]  # never empty: the separator
    repeats = -(-num_virtual_tokens // len(ids))
    return (ids * repeats)[:num_virtual_tokens]


@torch.no_grad()
def real_token_prefix(backbone: TrainingBackbone, text: str, num_virtual_tokens: int) -> torch.Tensor:
    """[P, num_layers * 2 * kv_heads * head_dim]: the backbone's cached keys and values of `text` at
    positions 0..P-1, laid out as peft's prefix encoder outputs them (per layer: keys, then values)."""
    ids = text_token_ids(backbone.tokenizer, text, num_virtual_tokens)
    device = backbone.model.get_input_embeddings().weight.device
    cache = DynamicCache()  # filled in place: the output's name for it moved in transformers 5.24
    backbone.model(input_ids=torch.tensor([ids], device=device), use_cache=True,
                   **{cache_kwarg(backbone.model): cache})
    if len(cache.layers) != backbone.arch.num_layers:
        raise TrainingFailedError(f"expected the backbone to fill a cache of {backbone.arch.num_layers} layers with "
                                  f"the prefix text's keys and values, found {len(cache.layers)}: the installed "
                                  f"libraries ({library_versions()}) ignore the cache argument. Nothing was trained "
                                  f"or published; install the versions in requirements.lock")
    per_layer = []
    for layer in range(len(cache.layers)):
        keys, values = cache.layers[layer].keys[0], cache.layers[layer].values[0]  # [kv_heads, P, head_dim]
        per_layer.append(torch.stack([keys, values]).permute(2, 0, 1, 3))  # [P, 2, kv_heads, head_dim]
    return torch.stack(per_layer, dim=1).reshape(num_virtual_tokens, -1).float()


@torch.no_grad()
def fit_prefix_encoder(encoder: torch.nn.Module, target: torch.Tensor) -> float:
    """Set the last Linear of peft's PrefixEncoder so that it outputs `target` [P, out]; returns the
    largest absolute error left (float32 rounding only)."""
    first, last = encoder.transform[0], encoder.transform[2]
    embedding = encoder.embedding.weight  # [P, token_dim]
    features = torch.tanh(first(embedding)).double()  # [P, hidden]
    design = torch.cat([features, torch.ones_like(features[:, :1])], dim=1)  # [P, hidden + 1]
    # P <= hidden + 1 rows: the pseudo-inverse gives the exact, minimum-norm solution.
    solution = torch.linalg.pinv(design) @ target.to(design)  # [hidden + 1, out]
    last.weight.copy_(solution[:-1].T.to(last.weight))
    last.bias.copy_(solution[-1].to(last.bias))
    return (encoder(torch.arange(target.shape[0], device=embedding.device)) - target).abs().max().item()
