"""``hvd.join()`` for gTop-k, the part both frameworks share: a rank that ran out of data
takes part in the others' steps (with zeros, the JOINED flag of gtopk_hvd.common.collective)
round after round until a step's verdict says every rank has joined; then the ranks compare
how many rounds each took part in.  The adapters (gtopk_hvd.torch.functions.join,
gtopk_hvd.tensorflow.join) say what a round is and how the early ranks catch up.
"""

__all__ = ["rounds_until_all_joined", "last_to_join"]


def rounds_until_all_joined(steps):
    """Run ``steps`` (callables, one step of the others each, in the order the others take
    them; each returns whether every rank has joined) round after round until one says so;
    the number of rounds.  Every rank leaves after the same step: the first all-joined one."""
    rounds = 0
    while True:
        rounds += 1
        if any(step() for step in steps):
            return rounds


def last_to_join(rounds):
    """(the rank that joined last, whether the others must catch up with it) from every rank's
    count of rounds: the fewest rounds trained the longest (the lowest such rank); when every
    rank joined in the same round nobody missed a step."""
    rounds = [int(r) for r in rounds]
    return rounds.index(min(rounds)), max(rounds) != min(rounds)
