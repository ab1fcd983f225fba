"""The gTop-k exchange schedule: which ranks exchange with which, stage by stage.

Hypercube (recursive doubling) on P' = 2^m virtual ranks, m = floor(log2 P): at stage s
virtual rank v swaps its sparse set with v XOR 2^s.  For P not a power of two, each extra rank
e >= P' is the *mirror* of virtual rank e - P' (ALGORITHM.md, "P not a power of two"):

- stage 0 holds the fold: its group is {v, w} plus their mirrors, every member sends its set,
  and every member computes fold(v) = truncate(merge(S_v, S_mirror(v))), the same for w, then
  the stage merge;
- in stages s >= 1 a mirror belongs to its virtual rank's group and sends no entries (a header
  only); it receives both sets and computes the same merge, so it holds the same set as its
  virtual rank and tracks its own alive flags: no unfold stage.

So every rank runs exactly m exchanges, one per stage, in the same order: Horovod names an
unnamed operation after a per-process counter, and a rank that ran one exchange more than
another would break the user's next unnamed collective (ALGORITHM.md, "Operation
symmetry").  Every exchange is a Horovod allgather inside the process set of its group; all
ranks must register all those sets in one order, which :func:`exchange_groups` gives.
"""
import logging
from dataclasses import dataclass
from typing import Tuple

__all__ = ["Stage", "world_split", "virtual_rank", "stages_for", "exchange_groups"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Stage:
    """One exchange (hypercube stage ``index``) as one rank sees it.

    group: every rank of the exchange, sorted (the process set; Horovod's allgather returns
      the members' messages in this order).
    low / high: the two virtual ranks whose sets are merged, low < high (low's set first).
    senders: the members that send entries (a mirror sends a header only after stage 0).
    fold: whether the stage merges each virtual rank with its mirror first (stage 0 with
      extra ranks).
    """
    index: int
    group: Tuple[int, ...]
    low: int
    high: int
    senders: Tuple[int, ...]
    fold: bool

    def sends(self, rank):
        """Whether ``rank`` sends its entries in this stage."""
        return rank in self.senders


def world_split(size):
    """Return (m, P', r): hypercube dimension, power-of-two part and number of extra ranks."""
    _check_size(size)
    m = size.bit_length() - 1
    base = 1 << m
    return m, base, size - base


def virtual_rank(rank, size):
    """The hypercube rank ``rank`` plays: itself, or ``rank - P'`` for an extra rank."""
    _, base, _ = world_split(size)
    return rank - base if rank >= base else rank


def _members(v, size):
    """Virtual rank ``v`` and its mirror, if it has one."""
    _, base, extra = world_split(size)
    return (v, v + base) if v < extra else (v,)


def _stage(s, v, size):
    w = v ^ (1 << s)
    low, high = min(v, w), max(v, w)
    group = tuple(sorted(_members(low, size) + _members(high, size)))
    fold = s == 0 and len(group) > 2
    senders = group if s == 0 else (low, high)
    return Stage(s, group, low, high, senders, fold)


def stages_for(rank, size):
    """The ordered list of :class:`Stage` that ``rank`` runs: one per hypercube stage,
    the same number on every rank."""
    _check_size(size)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < size:
        raise ValueError(f"rank must be an int in [0, {size}), got {rank!r}")
    m, _, _ = world_split(size)
    v = virtual_rank(rank, size)
    return [_stage(s, v, size) for s in range(m)]


def exchange_groups(size):
    """Every group the schedule exchanges in, as sorted tuples, in one order (stage 0, 1, ...;
    by lowest virtual rank), the same on every rank, which is what collective process-set
    registration needs.  A group that is the whole world is included; adapters map it onto
    Horovod's global process set.
    """
    m, base, _ = world_split(size)
    groups = []
    for s in range(m):
        groups.extend(_stage(s, v, size).group for v in range(base) if v < v ^ (1 << s))
    return groups


def _check_size(size):
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"world size must be a positive int, got {size!r}")
