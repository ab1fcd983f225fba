"""The gTop-k exchange schedule: which rank talks to which, stage by stage.

Hypercube (recursive doubling) on the first P' = 2^floor(log2 P) ranks: at stage s rank p
swaps its sparse set with p XOR 2^s.  For P not a power of two, each extra rank e >= P'
folds its set into rank e - P' before the hypercube and gets the result back in an unfold
stage after it (ALGORITHM.md, "P not a power of two").

Every exchange is a Horovod allgather inside the two-rank process set of its pair; all ranks
must register all those sets in one order, which :func:`pair_groups` gives.
"""
import logging
from dataclasses import dataclass

__all__ = ["Stage", "FOLD", "HYPERCUBE", "UNFOLD", "world_split", "stages_for", "pair_groups"]

logger = logging.getLogger(__name__)

FOLD = "fold"
HYPERCUBE = "hypercube"
UNFOLD = "unfold"


@dataclass(frozen=True)
class Stage:
    """One exchange of one rank.

    kind: FOLD, HYPERCUBE or UNFOLD.
    partner: the other rank of the pair.
    sends / receives: whether this rank sends its set / needs the partner's set.  In a
      hypercube stage both are true; in a fold the extra rank only sends and the base rank only
      receives; in an unfold the base rank only sends and the extra rank only receives.
    index: the hypercube stage number s (partner = rank ^ 2^s), or -1 for fold / unfold.
    """
    kind: str
    partner: int
    sends: bool
    receives: bool
    index: int = -1


def world_split(size):
    """Return (m, P', r): hypercube dimension, power-of-two part and number of extra ranks."""
    _check_size(size)
    m = size.bit_length() - 1
    base = 1 << m
    return m, base, size - base


def stages_for(rank, size):
    """The ordered list of :class:`Stage` that ``rank`` runs in a world of ``size`` ranks."""
    _check_size(size)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < size:
        raise ValueError(f"rank must be an int in [0, {size}), got {rank!r}")
    m, base, extra = world_split(size)
    if rank >= base:  # extra rank: fold into rank - P', wait, get the result back
        partner = rank - base
        return [Stage(FOLD, partner, sends=True, receives=False),
                Stage(UNFOLD, partner, sends=False, receives=True)]
    stages = []
    if rank < extra:
        stages.append(Stage(FOLD, rank + base, sends=False, receives=True))
    stages.extend(Stage(HYPERCUBE, rank ^ (1 << s), sends=True, receives=True, index=s)
                  for s in range(m))
    if rank < extra:
        stages.append(Stage(UNFOLD, rank + base, sends=True, receives=False))
    return stages


def pair_groups(size):
    """Every two-rank group the schedule uses, as sorted (low, high) tuples, in one order.

    The order is the same on every rank (fold pairs, then hypercube stage 0, 1, ...), which is
    what collective process-set registration needs.  A pair that is the whole world (size 2)
    is included; adapters map it onto Horovod's global process set.
    """
    m, base, extra = world_split(size)
    groups = [(e - base, e) for e in range(base, base + extra)]
    for s in range(m):
        groups.extend((p, p ^ (1 << s)) for p in range(base) if p < p ^ (1 << s))
    return groups


def _check_size(size):
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"world size must be a positive int, got {size!r}")
