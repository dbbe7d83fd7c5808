"""Linear layers that own their tensor-parallel sharding (gpt-fast / nano-vllm style).

Every parameter carries a ``weight_loader(param, full_weight[, shard_id])`` that
copies this rank's slice out of the full checkpoint tensor, so the model files stay
free of parallelism logic and the loader stays generic.

* ``ColumnParallelLinear``: output features split over ranks, no communication.
* ``MergedColumnParallelLinear``: several column-parallel outputs in one matmul
  (gate and up projections); ``shard_id`` is the index of the sub-matrix.
* ``QKVParallelLinear``: query heads split over ranks, KV heads split too, or
  replicated when ``tp > num_kv_heads`` so each rank holds the head its queries use.
* ``RowParallelLinear``: input features split; partial sums all-reduced.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.parallel import TPContext, divide, kv_head_range


class _ShardedLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool, tp: TPContext) -> None:
        super().__init__()
        self.tp = tp
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.weight.weight_loader = self.weight_loader  # type: ignore[attr-defined]
        if bias:
            self.bias: nn.Parameter | None = nn.Parameter(
                torch.empty(out_features), requires_grad=False
            )
            self.bias.weight_loader = self.weight_loader  # type: ignore[attr-defined]
        else:
            self.bias = None

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, *args: object) -> None:
        raise NotImplementedError


class ReplicatedLinear(_ShardedLinear):
    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, *args: object) -> None:
        param.data.copy_(loaded)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class ColumnParallelLinear(_ShardedLinear):
    def __init__(self, in_features: int, out_features: int, bias: bool, tp: TPContext) -> None:
        super().__init__(in_features, divide(out_features, tp.size, "output features"), bias, tp)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, *args: object) -> None:
        size = param.shape[0]
        param.data.copy_(loaded.narrow(0, self.tp.rank * size, size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class MergedColumnParallelLinear(ColumnParallelLinear):
    def __init__(
        self, in_features: int, output_sizes: list[int], bias: bool, tp: TPContext
    ) -> None:
        self.output_sizes = output_sizes
        super().__init__(in_features, sum(output_sizes), bias, tp)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, *args: object) -> None:
        (shard_id,) = args
        assert isinstance(shard_id, int)
        local = [s // self.tp.size for s in self.output_sizes]
        offset = sum(local[:shard_id])
        size = local[shard_id]
        param.data.narrow(0, offset, size).copy_(loaded.narrow(0, self.tp.rank * size, size))


class QKVParallelLinear(ColumnParallelLinear):
    """Fused Q/K/V projection; output layout per rank is ``[q heads | k heads | v heads]``."""

    def __init__(
        self,
        hidden_size: int,
        head_dim: int,
        num_heads: int,
        num_kv_heads: int,
        bias: bool,
        tp: TPContext,
    ) -> None:
        self.head_dim = head_dim
        self.num_heads = divide(num_heads, tp.size, "attention heads")
        # Rank r uses query heads [r*h, (r+1)*h); its KV heads are the ones they use.
        self.kv_head_start, self.num_kv_heads = kv_head_range(num_kv_heads, tp.size, tp.rank)
        out = (self.num_heads + 2 * self.num_kv_heads) * head_dim
        _ShardedLinear.__init__(self, hidden_size, out, bias, tp)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, *args: object) -> None:
        (shard_id,) = args
        d = self.head_dim
        q_size, kv_size = self.num_heads * d, self.num_kv_heads * d
        if shard_id == "q":
            dst, src = (
                param.data.narrow(0, 0, q_size),
                loaded.narrow(0, self.tp.rank * q_size, q_size),
            )
        elif shard_id in ("k", "v"):
            offset = q_size if shard_id == "k" else q_size + kv_size
            dst = param.data.narrow(0, offset, kv_size)
            src = loaded.narrow(0, self.kv_head_start * d, kv_size)
        else:
            raise ValueError(f"unknown qkv shard {shard_id!r}")
        dst.copy_(src)


class RowParallelLinear(_ShardedLinear):
    def __init__(self, in_features: int, out_features: int, bias: bool, tp: TPContext) -> None:
        super().__init__(divide(in_features, tp.size, "input features"), out_features, bias, tp)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, *args: object) -> None:
        if param.dim() == 1:  # bias: added once, after the reduction
            param.data.copy_(loaded)
            return
        size = param.shape[1]
        param.data.copy_(loaded.narrow(1, self.tp.rank * size, size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.tp.linear_all_reduce(x, self.weight)
        return y if self.bias is None else y + self.bias
