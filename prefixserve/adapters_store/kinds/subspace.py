"""Intrinsic Prompt Tuning's shared subspace: the decoder from intrinsic vectors to soft prompts."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from prefixserve.adapters_store.kinds.base import (
    AdapterKind,
    Tensors,
    check_intrinsic_dim,
    check_tensors,
    check_virtual_tokens,
    fmt,
)
from prefixserve.errors import AdapterError


class SubspaceKind(AdapterKind):
    """IPT shared decoder z -> soft prompt: linear d->Hd, tanh, linear Hd->P*hidden. Optionally carries
    `source_vectors` [N, d]: the z of the tasks it was fit on, where IST can start a new task."""

    name = "subspace"
    servable = False
    config_schema = {"intrinsic_dim": int, "num_virtual_tokens": int, "decoder_hidden": int}

    @classmethod
    def num_virtual_tokens(cls, config: dict) -> int:
        return config["num_virtual_tokens"]

    @classmethod
    def _check(cls, config, tensors, arch, limits):
        num_tokens = check_virtual_tokens(cls.name, config["num_virtual_tokens"], limits)
        dim = check_intrinsic_dim(cls.name, config["intrinsic_dim"], limits)
        decoder_hidden = config["decoder_hidden"]
        if decoder_hidden < 1:
            raise AdapterError(f"subspace: expected decoder_hidden >= 1, found {decoder_hidden}")
        out = num_tokens * arch.hidden_size if arch else None
        check_tensors(cls.name, tensors, {
            "decoder.0.weight": (decoder_hidden, dim), "decoder.0.bias": (decoder_hidden,),
            "decoder.2.weight": (out, decoder_hidden), "decoder.2.bias": (out,),
        }, optional={"source_vectors": (None, dim)})
        rows, bias = tensors["decoder.2.weight"].shape[0], tensors["decoder.2.bias"].shape[0]
        if rows % num_tokens or bias != rows:
            raise AdapterError(f"subspace: expected decoder.2 to output num_virtual_tokens ({num_tokens}) x hidden "
                               f"values with a bias of the same size, found weight rows {rows} and bias {bias}")

    @classmethod
    def decode(cls, tensors: Tensors, z: torch.Tensor, config: dict) -> torch.Tensor:
        """z: [d] -> soft prompt [P, hidden] in fp32 (config: this subspace artifact's config)."""
        if tuple(z.shape) != (config["intrinsic_dim"],):
            raise AdapterError(f"subspace: expected z of shape [{config['intrinsic_dim']}], found {fmt(z.shape)}")
        w0, b0 = tensors["decoder.0.weight"].float(), tensors["decoder.0.bias"].float()  # [Hd, d], [Hd]
        w2, b2 = tensors["decoder.2.weight"].float(), tensors["decoder.2.bias"].float()  # [P*hidden, Hd], [P*hidden]
        hidden = torch.tanh(F.linear(z.to(w0.device, torch.float32), w0, b0))  # [Hd]
        return F.linear(hidden, w2, b2).view(config["num_virtual_tokens"], -1)  # [P, hidden]

    @classmethod
    def derived_values(cls, config: dict, tensors: Tensors) -> Tensors:
        # IST starts a task at one of the source vectors: its soft prompt must be servable too.
        if "source_vectors" not in tensors:
            return {}
        return {f"the soft prompt decoded from source_vectors[{i}]": cls.decode(tensors, z, config)
                for i, z in enumerate(tensors["source_vectors"])}
