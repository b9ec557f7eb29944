"""Rdep: expert-parallel dispatch and combine by direct writes into peers' symmetric buffers.

Per rank, four symmetric buffers (sized once from RdepConfig):
- recv [C, D]: rows arriving at this owner, grouped by local expert (see plan.py);
- tags [C] int32: for each received row, source * R + (t*K + k), R = max_tokens_per_rank * K;
- ret  [R, D]: rows coming back to this source, at their (t*K + k) slot;
- counts [2, W, E] int32: every source's per-expert counts (double-buffered by epoch parity);
- flags [W] int32: flag[s] = the last epoch source s signalled to this rank (mod EPOCH_PERIOD).

Every phase is: signal peers -> wait for their signals (a device-side spin on the dedicated
stream) -> move rows with one Triton kernel -> signal -> wait. No collective is ever called.

Why a peer's flag is always `epoch - 1`, `epoch` or `epoch + 1` when this rank waits for `epoch`:
a rank signals e + 2 only after its wait for e + 1 passed, which needs this rank's signal e + 1,
sent after this wait. So the wait accepts exactly {epoch, epoch + 1} (wrap-safe, and a world that
fell out of step times out instead of reading a buffer early), and a buffer is written only after
a wait on an epoch its reader signals once it finished reading it (see each phase below).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from nmoe.rdep import kernels
from nmoe.rdep.config import RdepCapacityError, RdepConfig, RdepTimeoutError
from nmoe.rdep.plan import owner_layout, plan_source, source_slots
from nmoe.rdep.transport import (
    SimulatedTransport,
    SimulatedWorldBuffers,
    Steps,
    Transport,
    run_lockstep,
    run_straight,
)

# codes a source puts in its counts row instead of counts, so that every rank raises together
TOO_MANY_TOKENS, BAD_INPUT, BAD_EXPERT_ID = -1, -2, -3


@dataclass
class RdepHandle:
    """What `combine` (and both backwards) need from one `dispatch`, on one rank."""

    n_tokens: int
    n_received: int  # M: rows this rank received as an owner
    dest_rank: torch.Tensor  # [T*K] int32: owner of slot (t,k)
    dest_slot: torch.Tensor  # [T*K] int32: row in the owner's receive buffer, -1 if dropped
    expert_offsets: torch.Tensor  # [El] int32: cumulative end row of each local expert
    topk_weights: torch.Tensor  # [T,K]
    dropped: torch.Tensor  # [] int64: (t,k) slots this source did not send (topk id -1: over capacity)
    tags: torch.Tensor | None = None  # [M] int32: source * R + slot of each received row


class Rdep:
    """One rank's RDEP transport: `dispatch` tokens to expert owners, `combine` results back."""

    def __init__(self, config: RdepConfig, transport: Transport):
        self.config = config
        self.transport = transport
        self.rank, self.world = transport.rank, transport.world
        self.experts_per_rank = config.experts_per_rank(self.world)
        self.receive_rows = config.receive_rows(self.world)
        self.slots_per_rank = config.return_rows()
        if self.world * self.slots_per_rank >= 2**31:
            raise ValueError(
                f"world x max_tokens_per_rank x top_k = {self.world * self.slots_per_rank} overflows the int32 "
                "row tags: lower RdepConfig.max_tokens_per_rank"
            )
        self.recv = transport.symmetric("rdep.recv", (self.receive_rows, config.dim), config.dtype)
        self.tags = transport.symmetric("rdep.tags", (self.receive_rows,), torch.int32)
        self.ret = transport.symmetric("rdep.ret", (self.slots_per_rank, config.dim), config.dtype)
        self.counts = transport.symmetric("rdep.counts", (2, self.world, config.n_routed_experts), torch.int32)
        self.flags = transport.symmetric("rdep.flags", (self.world,), torch.int32)
        transport.ready()
        self._epoch = 0
        self._status = torch.zeros(4, dtype=torch.int32, device=transport.device)  # see kernels.wait
        self.dropped_rows = torch.zeros((), dtype=torch.int64, device=transport.device)
        self._group: _Group = _Group([self], lockstep=False)

    # ---- public surface -------------------------------------------------------------------

    def dispatch(
        self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, RdepHandle]:
        """x[T,D], topk_ids[T,K] int, topk_weights[T,K] -> (expert_x[M,D], expert_offsets[El] int32, handle)."""
        self._require_single()
        (out,) = dispatch_group(self._group, [x], [topk_ids], [topk_weights])
        return out

    def combine(self, expert_y: torch.Tensor, handle: RdepHandle) -> torch.Tensor:
        """expert_y[M,D] (rows of dispatch's expert_x order) -> y[T,D] = sum_k w_tk * y_tk, token order."""
        self._require_single()
        (y,) = combine_group(self._group, [expert_y], [handle])
        return y

    def check(self) -> None:
        """Host sync; raise RdepTimeoutError if any device-side wait of this Rdep gave up on a peer."""
        self._raise_if_timed_out(self._status.tolist())

    def _require_single(self) -> None:
        if len(self._group.members) != 1:
            raise RuntimeError(
                "this Rdep is a rank of a SimulatedWorld: its ranks share one process, so drive them "
                "together with SimulatedWorld.dispatch_all / combine_all"
            )

    # ---- synchronisation ------------------------------------------------------------------

    def _signal_all(self, counts: torch.Tensor | None = None) -> int:
        self._epoch += 1
        epoch = self._epoch % kernels.EPOCH_PERIOD  # EPOCH_PERIOD is even: parity is unchanged
        parity_offset = (epoch % 2) * self.world * self.config.n_routed_experts
        kernels.signal(self.flags.peers, self.rank, epoch, counts, self.counts.peers, parity_offset)
        return epoch

    def _wait_all(self, epoch: int) -> None:
        self.transport.before_wait(self.flags.local, epoch)
        kernels.wait(self.flags.local, epoch, self._status, self.config.wait_timeout_s)

    def _barrier(self) -> Steps:
        epoch = self._signal_all()
        yield
        self._wait_all(epoch)

    # ---- phases (generators: `yield` = wait for the peers) --------------------------------

    def _plan_steps(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> Steps:
        # Any problem with this rank's inputs still takes part in the count exchange, as a code
        # row, so that every rank raises together instead of its peers spinning forever.
        n_experts = self.config.n_routed_experts
        problem = self._input_problem(x, topk_ids, topk_weights)
        n_tokens = x.shape[0] if problem is None else 0
        plan = None
        if problem is not None:
            sent = self._code_row(BAD_INPUT)
        elif n_tokens > self.config.max_tokens_per_rank:
            sent = self._code_row(TOO_MANY_TOKENS)
        else:  # ids outside [-1, E) would make the planning kernels index out of bounds: clamp, flag
            bad_ids = ((topk_ids < -1) | (topk_ids >= n_experts)).any()
            plan = plan_source(topk_ids.clamp(-1, n_experts - 1), n_experts)
            sent = torch.where(bad_ids, BAD_EXPERT_ID, plan.counts)
        epoch = self._signal_all(counts=sent)
        yield
        self._wait_all(epoch)
        count_matrix = self.counts.local[epoch % 2]
        layout = owner_layout(count_matrix.clamp(min=0), self.world)
        # the one host sync of a dispatch: output size M, error codes, wait status
        synced = torch.cat([layout.totals, count_matrix[:, 0].to(torch.int64), self._status.to(torch.int64)]).tolist()
        totals, codes, status = synced[: self.world], synced[self.world : 2 * self.world], synced[2 * self.world :]
        self._raise_if_timed_out(status)
        self._check_codes(codes, problem, n_tokens)
        self._check_capacity(totals)
        dest_rank, dest_slot = source_slots(plan, layout, self.rank)
        dropped = (plan.expert < 0).sum()
        self.dropped_rows += dropped
        return RdepHandle(
            n_tokens=n_tokens,
            n_received=totals[self.rank],
            dest_rank=dest_rank,
            dest_slot=dest_slot,
            expert_offsets=layout.expert_offsets[self.rank].clone(),
            topk_weights=topk_weights,
            dropped=dropped,
        )

    def _send_steps(
        self, handle: RdepHandle, rows: torch.Tensor, scale: torch.Tensor | None, first_send: bool
    ) -> Steps:
        """Source rows[T,D] -> owners' recv; returns this owner's received rows [M,D]."""
        if not first_send:  # a dispatch's count exchange already proved every recv buffer free
            yield from self._barrier()
        kernels.scatter_rows(
            rows.to(self.config.dtype).contiguous(),
            handle.dest_rank,
            handle.dest_slot,
            self.recv.peers,
            scale=scale,
            tag_table=self.tags.peers if first_send else None,
            tag_base=self.rank * self.slots_per_rank,
            aligned_table=self.recv.aligned16,
        )
        yield from self._barrier()
        if first_send:
            handle.tags = self.tags.local[: handle.n_received].clone()
        return self.recv.local[: handle.n_received].clone()

    def _return_steps(
        self, handle: RdepHandle, rows: torch.Tensor, weight: torch.Tensor | None, keep_returned: bool
    ) -> Steps:
        """Owner rows[M,D] -> sources' ret; returns (sum_k weight * ret [T,D], ret copy or None)."""
        yield from self._barrier()  # every source finished reading its previous return buffer
        rows = rows.to(self.config.dtype).contiguous()
        kernels.return_rows(rows, handle.tags, self.ret.peers, self.slots_per_rank, aligned_table=self.ret.aligned16)
        yield from self._barrier()
        n_slots = handle.dest_slot.numel()
        returned = self.ret.local[:n_slots]
        out = kernels.sum_slots(returned, handle.dest_slot, handle.n_tokens, rows.dtype, weight=weight)
        return out, (returned.clone() if keep_returned else None)

    # ---- checks -----------------------------------------------------------------------------

    def _code_row(self, code: int) -> torch.Tensor:
        return torch.full((self.config.n_routed_experts,), code, dtype=torch.int32, device=self.transport.device)

    def _input_problem(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> str | None:
        cfg, device = self.config, self.transport.device
        if not all(isinstance(t, torch.Tensor) for t in (x, topk_ids, topk_weights)):
            return "x, topk_ids and topk_weights must be tensors"
        if x.dim() != 2 or x.shape[1] != cfg.dim or x.dtype != cfg.dtype:
            return f"x must be [T, {cfg.dim}] {cfg.dtype} (RdepConfig), got {tuple(x.shape)} {x.dtype}"
        expected = (x.shape[0], cfg.top_k)
        if tuple(topk_ids.shape) != expected or tuple(topk_weights.shape) != expected:
            return (
                f"topk_ids and topk_weights must be {expected} (T, RdepConfig.top_k), got "
                f"{tuple(topk_ids.shape)} and {tuple(topk_weights.shape)}"
            )
        if topk_ids.dtype.is_floating_point or topk_ids.dtype == torch.bool:
            return f"topk_ids must be an integer tensor, got {topk_ids.dtype}"
        if any(t.device != device for t in (x, topk_ids, topk_weights)):
            return f"x, topk_ids and topk_weights must be on {device} (the transport's device)"
        return None

    def _check_codes(self, codes: Sequence[int], problem: str | None, n_tokens: int) -> None:
        if problem is not None:
            raise ValueError(f"rank {self.rank}: {problem} (every rank's dispatch raises with it)")
        bad_input = [rank for rank, code in enumerate(codes) if code == BAD_INPUT]
        if bad_input:
            raise ValueError(
                f"ranks {bad_input} passed invalid inputs to dispatch (their ValueError names the problem); "
                "every rank raises so that none waits forever"
            )
        bad_ids = [rank for rank, code in enumerate(codes) if code == BAD_EXPERT_ID]
        if bad_ids:
            raise ValueError(
                f"topk_ids on ranks {bad_ids} hold expert ids outside [0, n_routed_experts="
                f"{self.config.n_routed_experts})"
            )
        self._check_tokens([rank for rank, code in enumerate(codes) if code == TOO_MANY_TOKENS], n_tokens)

    def _raise_if_timed_out(self, status: Sequence[int]) -> None:
        n_late, epoch, peer, seen = status
        if n_late:
            raise RdepTimeoutError(
                f"RDEP rank {self.rank}: waited more than RdepConfig.wait_timeout_s={self.config.wait_timeout_s} s "
                f"for {n_late} peer(s) to signal epoch {epoch} (e.g. rank {peer}, whose flag shows {seen}). A peer "
                "stopped (crashed, raised alone) or ran RDEP operations in a different order; the buffers of this "
                "world are no longer consistent: restart the job"
            )

    def _check_tokens(self, ranks_over: list[int], n_tokens: int) -> None:
        if ranks_over:
            raise RdepCapacityError(
                f"ranks {ranks_over} dispatch more tokens than the buffers were sized for "
                f"(RdepConfig.max_tokens_per_rank={self.config.max_tokens_per_rank}; this rank: {n_tokens}): raise it"
            )

    def _check_capacity(self, totals: Sequence[int]) -> None:
        worst = max(totals)
        if worst <= self.receive_rows:
            return
        owner = totals.index(worst)
        cfg = self.config
        needed = worst / (cfg.max_tokens_per_rank * cfg.top_k)
        raise RdepCapacityError(
            f"RDEP receive buffer overflow: owner rank {owner} would receive {worst} rows but each receive "
            f"buffer holds {self.receive_rows} rows (max_tokens_per_rank={cfg.max_tokens_per_rank} x "
            f"top_k={cfg.top_k} x capacity_margin={cfg.capacity_margin}). Raise RdepConfig.capacity_margin "
            f"(nmoe-train: parallel.capacity_margin) to at least {needed:.2f}, or drop the excess before dispatch "
            "with a capacity limit (nmoe.kernels.drop_over_capacity; nmoe-train: model.capacity_factor)."
        )


class _Group:
    """The ranks this process drives: one real rank, or every rank of a simulated world."""

    def __init__(self, members: list[Rdep], lockstep: bool):
        self.members = members
        self.lockstep = lockstep

    def run(self, all_steps: list[Steps]) -> list:
        if self.lockstep:
            return run_lockstep(all_steps)
        (member,), (steps,) = self.members, all_steps
        with member.transport.steps():
            return [run_straight(steps)]


class _SendRows(torch.autograd.Function):
    """Forward: dispatch's row movement. Backward: return the gradient rows and sum them over k."""

    @staticmethod
    def forward(ctx, group: _Group, handles: list[RdepHandle], *xs: torch.Tensor):
        steps = [m._send_steps(h, x, None, first_send=True) for m, h, x in zip(group.members, handles, xs)]
        outs = group.run(steps)
        ctx.group, ctx.handles = group, handles
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        steps = [
            m._return_steps(h, g, None, keep_returned=False) for m, h, g in zip(ctx.group.members, ctx.handles, grads)
        ]
        grad_xs = [out for out, _ in ctx.group.run(steps)]
        return (None, None, *grad_xs)


class _ReturnRows(torch.autograd.Function):
    """Forward: combine's row movement and weighted sum. Backward: dispatch w * dy, plus dw."""

    @staticmethod
    def forward(ctx, group: _Group, handles: list[RdepHandle], *tensors: torch.Tensor):
        n = len(handles)
        ys, weights = tensors[:n], tensors[n:]
        need_dw = [ctx.needs_input_grad[2 + n + i] for i in range(n)]
        steps = [
            m._return_steps(h, y, w, keep_returned=keep)
            for m, h, y, w, keep in zip(group.members, handles, ys, weights, need_dw)
        ]
        results = group.run(steps)
        ctx.group, ctx.handles = group, handles
        ctx.returned = [returned for _, returned in results]
        ctx.save_for_backward(*weights)
        return tuple(out for out, _ in results)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        weights = ctx.saved_tensors
        steps = [
            m._send_steps(h, g, w.reshape(-1), first_send=False)
            for m, h, g, w in zip(ctx.group.members, ctx.handles, grads, weights)
        ]
        grad_ys = ctx.group.run(steps)
        grad_ws = [
            None if returned is None else _weight_grad(g, returned, h, w)
            for g, returned, h, w in zip(grads, ctx.returned, ctx.handles, weights)
        ]
        return (None, None, *grad_ys, *grad_ws)


def _weight_grad(
    grad_y: torch.Tensor, returned: torch.Tensor, handle: RdepHandle, weight: torch.Tensor
) -> torch.Tensor:
    """dL/dw[t,k] = <dy[t], y_tk> for sent slots, 0 for dropped ones."""
    n_tokens, top_k = weight.shape
    acc = torch.float64 if grad_y.dtype == torch.float64 else torch.float32
    per_slot = returned.view(n_tokens, top_k, grad_y.shape[1]).to(acc) * grad_y.to(acc)[:, None, :]
    sent = (handle.dest_slot >= 0).view(n_tokens, top_k)
    return (per_slot.sum(-1) * sent).to(weight.dtype)


def dispatch_group(
    group: _Group, xs: Sequence[torch.Tensor], ids: Sequence[torch.Tensor], weights: Sequence[torch.Tensor]
) -> list[tuple[torch.Tensor, torch.Tensor, RdepHandle]]:
    """Dispatch for every rank this process drives (one, or all of a simulated world)."""
    handles = group.run([m._plan_steps(x, i, w) for m, x, i, w in zip(group.members, xs, ids, weights)])
    expert_xs = _SendRows.apply(group, handles, *xs)
    return [(ex, h.expert_offsets, h) for ex, h in zip(expert_xs, handles)]


def combine_group(
    group: _Group, expert_ys: Sequence[torch.Tensor], handles: Sequence[RdepHandle]
) -> list[torch.Tensor]:
    """Combine for every rank this process drives."""
    for member, y, h in zip(group.members, expert_ys, handles):
        if tuple(y.shape) != (h.n_received, member.config.dim):
            raise ValueError(
                f"rank {member.rank}: expert_y must be [M={h.n_received}, D={member.config.dim}] "
                f"(dispatch's expert_x shape), got {tuple(y.shape)}"
            )
    return list(_ReturnRows.apply(group, list(handles), *expert_ys, *(h.topk_weights for h in handles)))


class SimulatedWorld:
    """W RDEP ranks in one process (CPU tests): peer buffers are ordinary tensors, same kernels."""

    def __init__(self, world: int, config: RdepConfig, device: torch.device | str = "cpu"):
        self.world = world
        self.config = config
        self.buffers = SimulatedWorldBuffers(world, torch.device(device))
        self.ranks = [Rdep(config, SimulatedTransport(self.buffers, rank)) for rank in range(world)]
        self._group = _Group(self.ranks, lockstep=True)
        for rank in self.ranks:
            rank._group = self._group

    def dispatch_all(
        self, xs: Sequence[torch.Tensor], topk_ids: Sequence[torch.Tensor], topk_weights: Sequence[torch.Tensor]
    ) -> list[tuple[torch.Tensor, torch.Tensor, RdepHandle]]:
        """Per rank r: xs[r][T_r,D], ids/weights[T_r,K] -> [(expert_x[M_r,D], expert_offsets[El], handle)]."""
        self._check_world(xs, topk_ids, topk_weights)
        return dispatch_group(self._group, xs, topk_ids, topk_weights)

    def combine_all(self, expert_ys: Sequence[torch.Tensor], handles: Sequence[RdepHandle]) -> list[torch.Tensor]:
        """Per rank r: expert_ys[r][M_r,D] -> y_r[T_r,D]."""
        self._check_world(expert_ys, handles)
        return combine_group(self._group, expert_ys, handles)

    def _check_world(self, *per_rank: Sequence) -> None:
        for values in per_rank:
            if len(values) != self.world:
                raise ValueError(f"expected one entry per rank ({self.world}), got {len(values)}")
