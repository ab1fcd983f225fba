"""The gTop-k state of the TensorFlow backend: hyperparameters, residuals and statistics.

A ``tf.Module``, so ``tf.train.Checkpoint`` and Keras' TensorFlow-format checkpoints save and
restore it with the model: the residuals (one float32 variable per model variable, named after
it) and the synchronisation step (so density schedules continue where they stopped) are
tracked; the statistics are not.  ``state_dict()`` / ``load_state_dict()`` give the same
content as NumPy arrays, as the torch backend's state does.

Hierarchical gTop-k keeps one residual per buffer, over this rank's shard of it
(:meth:`GTopkState.shard_residual`), tracked apart for each layout N x L (``shards_<N>x<L>``),
with the layout that wrote them (``layout``).

Policy for the per-rank residuals at load time (gtopk_hvd.common.validation
.check_world_size_on_load and .check_layout_on_load): they are kept when the checkpoint was
written by the same rank of a world of the same size and the same layout (flat, or
hierarchical N x L), otherwise dropped with a warning (training goes on; only the
not-yet-applied residual mass is lost).  With ``tf.train.Checkpoint`` the check runs at the
first step after the restore, which is when the residual variables are created and filled.
"""
import logging
from collections import Counter

import numpy as np
import tensorflow as tf

from gtopk_hvd.common.cost import as_link, logged_methods
from gtopk_hvd.common.density import ConstantDensity, as_schedule, k_for
from gtopk_hvd.common.errors import GTopkError
from gtopk_hvd.common.validation import (check_algorithm, check_granularity,
                                         check_layout_on_load, check_non_negative_int,
                                         check_world_size_on_load)

__all__ = ["GTopkState"]

logger = logging.getLogger(__name__)

_FORMAT = 1
_STATS = {"density": tf.float64, "k": tf.int64, "numel": tf.int64, "dense_numel": tf.int64,
          "bytes_sent": tf.int64, "dense_bytes": tf.int64, "finite": tf.bool,
          "nonfinite_steps": tf.int64, "loss_scale": tf.float64,
          "bytes_sent_node": tf.int64, "bytes_sent_cross": tf.int64}
_HIERARCHICAL_STATS = ("bytes_sent_node", "bytes_sent_cross")  # shown after such a step
_NO_LAYOUT = (-1, -1)  # the layout variable before any step wrote it


class _Untracked:
    """Bookkeeping the checkpoint must not see (a plain object is not tracked by tf.Module)."""

    def __init__(self):
        self.index = {}       # variable ref -> position of its residual
        self.names = []       # residual names, by position
        self.sizes = {}       # position -> numel, for residuals not created yet
        self.pending = {}     # position -> values from load_state_dict, applied at creation
        self.stats = {}       # statistic name -> tf.Variable
        self.written = False  # whether a step has run since construction
        self.world = None     # the (size, rank) this process last wrote into _world
        self.methods = {}     # buffer name -> method of the last step (algorithm="auto")
        self.said = None      # what was last logged of those methods
        self.verified = False  # a finite eager step found every rank with the same plan
        self.layout = None    # the (nodes, local size) this process last wrote; (0, 0): flat
        self.pending_shards = None  # (layout key, {kind: {buffer: values}}), load_state_dict
        self.hierarchical = False  # a step ran hierarchically (gtopk_stats splits the bytes)
        self.placements = {}  # buffer -> (layout key or None, lo, hi) where it is held back


class GTopkState(tf.Module):
    """Everything gTop-k keeps between steps on one rank.

    Hyperparameters: ``schedule`` (density per synchronisation step), ``algorithm``,
    ``granularity``, ``dense_threshold``.
    Internal state (checkpointed): ``step`` (synchronisations done), ``residuals`` ({variable
    name: flat float32 tf.Variable}, this rank's error feedback) and the world size and rank
    that wrote them.
    Statistics of the last step: :meth:`gtopk_stats`.
    ``algorithm="auto"``: ``link`` (a :class:`~gtopk_hvd.common.cost.Link`, measured once or
    given) and ``methods`` ({buffer name: method} of the last step traced or run).

    Args:
        density: a float in (0, 1], a :class:`~gtopk_hvd.common.density.DensitySchedule` or a
            ``callable(step)``.
        algorithm: ``"gtopk"``, ``"topk"`` or ``"auto"`` (per buffer the cheapest of a dense
            allreduce and gTop-k by gtopk_hvd.common.cost).
        granularity: ``"model"`` or ``"layer"``.
        dense_threshold: tensors with fewer elements are allreduced densely.
        link: for ``"auto"``: a Link or a tuple (alpha, beta[, select[, overhead]]); None:
            measured after the first eager step (see :meth:`methods_for`).
    """

    def __init__(self, density, algorithm="gtopk", granularity="model", dense_threshold=0,
                 link=None, name="gtopk_state"):
        super().__init__(name=name)
        self.schedule = as_schedule(density)
        self.algorithm = check_algorithm(algorithm, auto=True)
        self.link = as_link(link)
        self.granularity = check_granularity(granularity)
        self.dense_threshold = check_non_negative_int(dense_threshold, "dense_threshold")
        self._book = _Untracked()
        with tf.init_scope():
            self._step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
            # (world size, rank) that wrote the residuals; (-1, -1) before the first step
            self._world = tf.Variable([-1, -1], dtype=tf.int32, trainable=False, name="world")
            # (nodes, ranks a node) of the hierarchical layout that wrote the residuals, (0, 0)
            # for flat gTop-k, (-1, -1) before the first step
            self._layout = tf.Variable(list(_NO_LAYOUT), dtype=tf.int32, trainable=False,
                                       name="layout")
            for key, dtype in _STATS.items():
                initial = tf.ones([], dtype) if key == "loss_scale" else tf.zeros([], dtype)
                self._book.stats[key] = tf.Variable(initial, trainable=False,
                                                    name=f"last_{key}")
        self._slots = []  # tracked: the residuals, by position

    # hyperparameters ---------------------------------------------------------------------

    @property
    def step(self):
        """Synchronisations done (a Python int)."""
        return int(self._step.numpy())

    def density(self):
        """The density of the coming synchronisation step."""
        return self.schedule(self.step)

    def set_density(self, density):
        """Replace the density (a float, schedule or callable); takes effect at the next step,
        also inside an already traced ``tf.function``."""
        self.schedule = as_schedule(density)

    def densities(self, numels):
        """(density, [k per buffer]) for the coming step: Python values eagerly; in a graph,
        tensors computed at run time from the step variable (the schedule is Python code)."""
        numels = list(numels)
        if tf.executing_eagerly():
            density = self.density()
            return density, [k_for(n, density) for n in numels]

        def evaluate(step):
            density = self.schedule(int(step))
            return (tf.constant(density, tf.float64),
                    tf.constant([k_for(n, density) for n in numels], tf.int32))

        density, ks = tf.py_function(evaluate, [self._step.read_value()], [tf.float64, tf.int32])
        density.set_shape([])
        ks.set_shape([len(numels)])
        return density, [ks[i] for i in range(len(numels))]

    def methods_for(self, names, numels, size, rank, dense_paid, nodes=None):
        """Per buffer, the method of the coming step (gtopk_hvd.common.cost.buffer_methods;
        ``nodes``: (N, L) where hierarchical gTop-k may run), recorded in ``methods`` and
        logged once per change on rank 0.

        With ``algorithm="auto"`` inside a ``tf.function`` the choice is made when the step is
        traced, so it needs the link (``link=``, or measured by an earlier eager step or
        :func:`~gtopk_hvd.tensorflow.measure_link`) and a constant density; a schedule that
        varies is refused there, as the choice would not follow it.  Raised before any
        communication, on every rank alike.
        """
        eager = tf.executing_eagerly()
        if self.algorithm == "auto" and not eager and size > 1:
            if self.link is None:
                raise GTopkError(
                    "algorithm='auto' inside tf.function needs the link, as the choice is "
                    "made when the step is traced: pass link=gtopk_hvd.tensorflow."
                    "measure_link() (called eagerly on every rank after init()) or "
                    "link=(alpha_s, beta_s_per_byte); or run the first step eagerly")
            if not isinstance(self.schedule, ConstantDensity):
                raise GTopkError(
                    f"algorithm='auto' inside tf.function chooses each buffer's method when "
                    f"the step is traced, so it needs a constant density, got "
                    f"{self.schedule!r}: pass a float density, run the steps eagerly, or "
                    f"pick algorithm='gtopk'")
        density = None  # only "auto" reads it
        if self.algorithm == "auto":
            with tf.init_scope():
                density = self.density()
        methods, self._book.said = logged_methods(self.algorithm, numels, density, size,
                                                  self.link, dense_paid, rank, self._book.said,
                                                  nodes=nodes)
        self._book.methods = dict(zip(names, methods))
        return methods

    def mark_verified(self):
        """Note that a finite eager step found every rank with the same plan (then, with
        ``algorithm="auto"``, the dense allreduce may carry the verdict)."""
        self._book.verified = True

    def is_verified(self):
        """Whether a finite eager step found every rank with the same plan."""
        return self._book.verified

    @property
    def methods(self):
        """{buffer name: method} of the last step traced or run."""
        return dict(self._book.methods)

    # residuals ---------------------------------------------------------------------------

    @property
    def residuals(self):
        """{variable name: flat float32 tf.Variable}, in the order the variables were first
        synchronised (the order in which checkpoints match them, whatever the names)."""
        return dict(zip(self._book.names, self._slots))

    def _index(self, variable):
        ref = variable.ref()
        index = self._book.index.get(ref)
        if index is None:
            base = variable.name.split(":")[0]
            name, i = base, 1
            while name in self._book.names:
                name, i = f"{base}_{i}", i + 1
            index = self._book.index[ref] = len(self._book.names)
            self._book.names.append(name)
        return index

    def residual_name(self, variable):
        """The residual's name for ``variable``: its own name, made unique in first-use order."""
        return self._book.names[self._index(variable)]

    def residual(self, variable):
        """This rank's residual of ``variable``: a flat float32 tf.Variable, created on first
        use with zeros, or with what a pending checkpoint restore (``tf.train.Checkpoint``,
        Keras ``load_weights``) or :meth:`load_state_dict` holds at its position."""
        index = self._index(variable)
        numel = variable.shape.num_elements()
        while len(self._slots) <= index:
            position = len(self._slots)
            size = numel if position == index else self._book.sizes.get(position)
            if size is None:
                raise ValueError("gTop-k residuals are created in variable order; a variable "
                                 "was skipped")
            with tf.init_scope():
                eps = tf.Variable(tf.zeros([size], tf.float32), trainable=False,
                                  name="gtopk_residual")
            self._slots.append(eps)  # a pending checkpoint restore fills it here
            pending = self._book.pending.pop(position, None)
            if pending is not None:
                eps.assign(pending)
        eps = self._slots[index]
        if eps.shape.num_elements() != numel:
            raise ValueError(
                f"the residual of {self._book.names[index]!r} has {eps.shape.num_elements()} "
                f"elements but the variable has {numel}; a restored gTop-k state must belong to "
                f"the same model (residuals are matched by position)")
        return eps

    def shard_residual(self, name, numel, key, kind="shards"):
        """Hierarchical gTop-k: this rank's residual of its shard of buffer ``name``
        (``numel`` entries) under the layout ``key`` (gtopk_hvd.common.validation.layout_key):
        a flat float32 tf.Variable created on first use with zeros, or with what a pending
        checkpoint restore or :meth:`load_state_dict` of the same layout holds.  Each layout
        keeps its shards under its own name, so a checkpoint of another layout never fills
        them (:meth:`check_layout` says so).  ``kind="carry"``: the buffer's :meth:`carry`."""
        attr = f"_{kind}_{key[1]}x{key[2]}"
        shards = getattr(self, attr, None)
        if shards is None:
            setattr(self, attr, {})  # tracked: a pending restore fills what is added to it
            shards = getattr(self, attr)
        eps = shards.get(name)
        if eps is None:
            with tf.init_scope():
                eps = tf.Variable(tf.zeros([numel], tf.float32), trainable=False,
                                  name="gtopk_shard_residual" if kind == "shards" else
                                  "gtopk_carry")
            shards[name] = eps
            pending = self._book.pending_shards
            if pending is not None and pending[0] == list(key) and \
                    name in pending[1].get(kind, {}):
                eps.assign(np.asarray(pending[1][kind].pop(name), np.float32).reshape(-1))
                if kind == "carry":
                    self.carry_pending(name, key).assign(True)
        if eps.shape.num_elements() != numel:
            raise ValueError(
                f"the shard residual of {name!r} has {eps.shape.num_elements()} elements but "
                f"this rank's shard has {numel}; a restored gTop-k state must belong to the "
                f"same model")
        return eps

    def carry(self, name, numel, key, create=True):
        """Hierarchical gTop-k: what a switch of buffer ``name`` (``numel`` entries) to
        hierarchical gTop-k (``algorithm="auto"``, :meth:`settle_modes`) or a change of layout
        (Horovod Elastic, :meth:`reshard`) left outside this rank's shard; the next step
        that applies adds it to its gradients before the node's reduce-scatter.  ``create``
        False: None where there is none."""
        if not create and name not in getattr(self, f"_carry_{key[1]}x{key[2]}", {}):
            return None
        return self.shard_residual(name, numel, key, kind="carry")

    def carry_pending(self, name, key):
        """Whether buffer ``name``'s :meth:`carry` under layout ``key`` holds something to
        apply (a bool tf.Variable, checkpointed): the moves set it, the step that applies the
        carry clears it, and a step without one skips the carry (no pass over the buffer)."""
        attr = f"_pending_{key[1]}x{key[2]}"
        flags = getattr(self, attr, None)
        if flags is None:
            setattr(self, attr, {})  # tracked, as the shards
            flags = getattr(self, attr)
        if name not in flags:
            with tf.init_scope():
                flags[name] = tf.Variable(False, trainable=False, name="gtopk_carry_pending")
        return flags[name]

    def reshard(self, buffers, key, layout, rank):
        """Hierarchical gTop-k under Horovod Elastic, before a step: where a reset changed
        where this process holds back a buffer (its shard under the old layout, or the whole
        buffer when flat), move the entries there, eagerly (in a ``tf.function`` when it is
        traced again after the reset, before its first step): the part of the new place joins
        its residual, the rest is carried (:meth:`carry`) into the next applied step's
        gradients, where the node's reduce-scatter adds it to the shard of the rank that now
        owns it; a flat layout takes it all into the whole-buffer residuals.  Entries are
        moved, never summed with another rank's (as PyTorch's GTopkState.reshard, which takes
        the places).  ``buffers``: (buffer name, its variables, numel); ``key``: this step's
        layout key, None for flat."""
        for name, variables, numel in buffers:
            lo, hi = (0, numel) if key is None else layout.shard(numel, rank)
            new = (None if key is None else tuple(key), lo, hi)
            old = self._book.placements.get(name)
            self._book.placements[name] = new
            if old is None or old == new:
                continue
            with tf.init_scope():
                whole = np.zeros(numel, np.float32)
                if old[0] is None:
                    flat = [self.residual(v) for v in variables]
                    whole = np.concatenate([e.numpy() for e in flat])
                    for e in flat:
                        e.assign(tf.zeros_like(e))
                else:
                    suffix = f"{old[0][1]}x{old[0][2]}"
                    shard = getattr(self, f"_shards_{suffix}", {}).get(name)
                    if shard is not None and shard.shape.num_elements() == old[2] - old[1]:
                        whole[old[1]:old[2]] = shard.numpy()
                        shard.assign(tf.zeros_like(shard))
                    carry = getattr(self, f"_carry_{suffix}", {}).get(name)
                    if carry is not None and carry.shape.num_elements() == numel:
                        whole = whole + carry.numpy()
                        carry.assign(tf.zeros_like(carry))
                        self.carry_pending(name, old[0]).assign(False)
                if key is None:
                    offset = 0
                    for v in variables:
                        eps, n = self.residual(v), v.shape.num_elements()
                        eps.assign_add(whole[offset:offset + n])
                        offset += n
                else:
                    self.shard_residual(name, hi - lo, key).assign_add(whole[lo:hi])
                    whole[lo:hi] = 0
                    if whole.any():
                        self.carry(name, numel, key).assign_add(whole)
                        self.carry_pending(name, key).assign(True)
            logger.info("gtopk_hvd: buffer %r: held back now over entries %d..%d of %d "
                        "(before %d..%d); the rest joins the next step's gradients",
                        name, lo, hi, numel, old[1], old[2])

    def held_variables(self, with_flags=False):
        """Every variable of every layout that holds back gradient mass (residuals, shards,
        carries); ``with_flags``: also whether each carry is pending (:meth:`carry_pending`),
        for Horovod Elastic's commit and restore."""
        kinds = ("_shards_", "_carry_") + (("_pending_",) if with_flags else ())
        out = list(self._slots)
        for attr, value in sorted(vars(self).items()):
            if attr.startswith(kinds) and hasattr(value, "values"):
                out += list(value.values())
        return out

    def settle_modes(self, buffers, layout, key, rank):
        """``algorithm="auto"`` with hierarchical gTop-k, before a step's first operation:
        where a buffer's mode (hierarchical gTop-k, or flat: gTop-k or dense) differs from its
        last step's, move this rank's residual of it to the new mode's storage, eagerly or at
        run time inside a ``tf.function`` (each buffer's mode is kept in a variable).  To
        hierarchical: the entries of this rank's shard join its shard residual, the rest is
        carried (:meth:`carry`); to flat: the shard residual and any carry go back into the
        whole-buffer residuals.  Entries are moved, never summed with another rank's, so what
        this rank holds back stays exactly what it was (PyTorch:
        gtopk_hvd.torch.state.GTopkState.reshard).  ``buffers``: (buffer name, its variables,
        numel, hierarchical: bool) for every buffer of the step."""
        if not hasattr(self, "_modes"):
            self._modes = {}  # tracked: buffer name -> 1 hierarchical, 0 flat, -1 not known
        moves = []
        for name, variables, numel, hierarchical in buffers:
            lo, hi = layout.shard(numel, rank)
            if name not in self._modes:
                with tf.init_scope():
                    self._modes[name] = tf.Variable(-1, dtype=tf.int32, trainable=False,
                                                    name="gtopk_mode")
            moves.append((self._modes[name], int(hierarchical), lo, hi,
                          [self.residual(v) for v in variables],
                          self.shard_residual(name, hi - lo, key), self.carry(name, numel, key),
                          self.carry_pending(name, key)))
        for mode, target, lo, hi, flat, shard, carry, pending in moves:
            def move(mode=mode, target=target, lo=lo, hi=hi, flat=flat, shard=shard,
                     carry=carry, pending=pending):
                whole = tf.concat([e.read_value() for e in flat], 0) + carry.read_value()
                if target:
                    shard.assign_add(whole[lo:hi])
                    carry.assign(tf.concat([whole[:lo], tf.zeros([hi - lo]), whole[hi:]], 0))
                    pending.assign(True)
                    parts = [tf.zeros_like(e) for e in flat]
                else:
                    whole = whole + tf.pad(shard.read_value(),
                                           [[lo, int(carry.shape[0]) - hi]])
                    parts = tf.split(whole, [int(e.shape[0]) for e in flat])
                    shard.assign(tf.zeros_like(shard))
                    carry.assign(tf.zeros_like(carry))
                    pending.assign(False)
                for e, part in zip(flat, parts):
                    e.assign(part)
                mode.assign(target)
                return tf.constant(True)
            if tf.executing_eagerly():
                if int(mode.numpy()) != target:
                    move()
            else:
                tf.cond(tf.not_equal(mode.read_value(), target), move,
                        lambda: tf.constant(False))

    def _shards(self, kind="shards"):
        """{buffer name: shard residual} of the layout this process runs (empty when flat);
        ``kind="carry"``: the carries."""
        layout = self._book.layout
        if not layout or layout == (0, 0):
            return {}
        return dict(getattr(self, f"_{kind}_{layout[0]}x{layout[1]}", {}))

    def _held(self):
        """Every variable that holds back gradient mass: residuals, shards, carries."""
        return list(self._slots) + list(self._shards().values()) + \
            list(self._shards("carry").values())

    def check_layout(self, key):
        """Record the layout of the coming step (``key``: None for flat gTop-k) and, where the
        residuals were restored from a checkpoint of another layout, say that they are dropped
        (they are kept under another name and never read here).  Python, like
        :meth:`check_world`."""
        current = (0, 0) if key is None else (int(key[1]), int(key[2]))
        with tf.init_scope():
            saved = tuple(int(v) for v in self._layout.numpy())
            if saved not in (_NO_LAYOUT, current, self._book.layout):
                check_layout_on_load(_layout_key(saved), key)  # the warning
            self._layout.assign(list(current))
            self._book.layout = current
        if key is not None:
            self._book.hierarchical = True

    def check_world(self, size, rank):
        """Apply the world-size policy to residuals restored from a checkpoint (Python; in a
        ``tf.function`` it runs when the step is traced).  Residuals this process wrote itself
        are kept whatever the world became (a Horovod Elastic reset: they belong to the
        process); only restored ones, whose (size, rank) record differs from what this
        process last wrote, are checked."""
        with tf.init_scope():
            saved = tuple(int(v) for v in self._world.numpy())
            own = saved == self._book.world
            if saved[0] >= 0 and not own and not check_world_size_on_load(*saved, size, rank):
                for eps in self._held():
                    eps.assign(tf.zeros_like(eps))
            self._world.assign([size, rank])
            self._book.world = (size, rank)

    def residual_norm(self):
        total = sum(float(tf.reduce_sum(tf.square(tf.cast(eps, tf.float64))))
                    for eps in self._held())
        return total ** 0.5

    # statistics --------------------------------------------------------------------------

    def record_step(self, finite, values):
        """Store the statistics of the step just taken (eagerly or in a graph).  A finite step
        advances the schedule step; a non-finite one (``finite`` False) only counts as such,
        so the density schedule and the residuals continue as if it had not happened."""
        for key, value in values.items():
            var = self._book.stats[key]
            if isinstance(value, (tf.Tensor, tf.Variable)):
                var.assign(tf.cast(value, var.dtype))
            else:  # a Python number: no detour through float32
                var.assign(tf.constant(value, var.dtype))
        self._book.written = True
        self._book.stats["finite"].assign(finite)
        nonfinite = tf.cast(tf.logical_not(finite), tf.int64)
        self._book.stats["nonfinite_steps"].assign_add(nonfinite)
        return self._step.assign_add(1 - nonfinite)

    def record_joined_step(self, finite, all_joined):
        """A step of the others on a rank that joined (gtopk_hvd.tensorflow.join): the
        schedule step and the count of non-finite steps move as theirs do; nothing moves
        once every rank has joined."""
        counted = tf.logical_not(all_joined)
        self._book.stats["nonfinite_steps"].assign_add(
            tf.cast(tf.logical_and(counted, tf.logical_not(finite)), tf.int64))
        return self._step.assign_add(tf.cast(tf.logical_and(counted, finite), tf.int64))

    def gtopk_stats(self):
        """Statistics of the last synchronisation on this rank.

        density / k: of the last step (k summed over the buffers); numel: sparsified entries;
        dense_numel: entries reduced densely (below ``dense_threshold``); bytes_sent: bytes
        this rank sent (hierarchical gTop-k: also bytes_sent_node, inside the node, and
        bytes_sent_cross, across nodes); dense_bytes: what a dense ring allreduce of all gradients would send,
        2(P-1)/P * 4d; finite: whether the last step was finite on every rank; step: finite
        synchronisations so far; nonfinite_steps: steps in which some rank's gradients were
        not finite (NaN gradients everywhere, residuals kept); loss_scale: the loss scale the
        gradients carried (1.0 without loss scaling); residual_norm: L2 norm of the residuals
        (unscaled units).  With ``algorithm="auto"`` also methods ({method: number of
        buffers} of the last step) and link (alpha, beta, select, overhead in seconds; None
        before it is measured).
        """
        with tf.init_scope():
            stats = {key: var.numpy().item() for key, var in self._book.stats.items()}
            if not self._book.written:
                stats["finite"] = True
            if not self._book.written and self.step == 0:
                stats["density"] = self.density()
            stats["step"] = self.step
            stats["residual_norm"] = self.residual_norm()
            if not self._book.hierarchical:
                for key in _HIERARCHICAL_STATS:
                    stats.pop(key)
        if self.algorithm == "auto":
            stats["methods"] = dict(Counter(self.methods.values()))
            stats["link"] = None if self.link is None else dict(vars(self.link))
        return stats

    # checkpoints as plain dictionaries ---------------------------------------------------

    def state_dict(self, size, rank):
        """Residuals as NumPy arrays (copies, in position order), the step, and the world
        and layout that wrote them (hierarchical gTop-k: its shard residuals, by buffer)."""
        layout = self._book.layout
        state = {"format": _FORMAT, "step": self.step, "world_size": size, "rank": rank,
                 "algorithm": self.algorithm, "granularity": self.granularity,
                 "layout": None if layout in (None, (0, 0)) else _layout_key(layout),
                 "residuals": {name: eps.numpy().copy()
                               for name, eps in self.residuals.items()}}
        if state["layout"] is not None:
            state["shard_residuals"] = {name: eps.numpy().copy()
                                        for name, eps in self._shards().items()}
            if self._shards("carry"):
                state["carry"] = {name: eps.numpy().copy()
                                  for name, eps in self._shards("carry").items()}
        return state

    def load_state_dict(self, state, size, rank):
        """Restore :meth:`state_dict`'s content.  Residuals are matched by position; those of
        variables not synchronised yet are applied when they are created.  Residuals written
        by another rank or world size are dropped with a warning."""
        if not isinstance(state, dict) or "step" not in state:
            raise ValueError("not a gtopk_hvd state: expected the dictionary that "
                             "GTopkState.state_dict() returns")
        self._step.assign(int(state["step"]))
        self._world.assign([size, rank])
        for eps in self._held():
            eps.assign(tf.zeros_like(eps))
        for mode in getattr(self, "_modes", {}).values():
            mode.assign(-1)  # the next step moves what was restored where it runs
        self._book.pending.clear()
        self._book.pending_shards = None
        if not check_world_size_on_load(state.get("world_size"), state.get("rank"), size, rank):
            return
        self._load_shards(state)
        for position, value in enumerate(state.get("residuals", {}).values()):
            value = np.asarray(value, np.float32).reshape(-1)
            if position < len(self._slots):
                if self._slots[position].shape.num_elements() != value.size:
                    raise ValueError(
                        f"residual {position} has {value.size} elements in the state but "
                        f"{self._slots[position].shape.num_elements()} here; the state belongs "
                        f"to another model")
                self._slots[position].assign(value)
            else:
                self._book.pending[position] = value
                self._book.sizes[position] = value.size

    def _load_shards(self, state):
        """The shard residuals of :meth:`load_state_dict`: into this layout's variables when
        the state's layout is the one this process runs, pending (applied when the variables
        are created, if the layout is the same) before its first step."""
        saved = state.get("layout")
        self._book.pending_shards = (None if saved is None else list(saved),
                                     {"shards": dict(state.get("shard_residuals", {})),
                                      "carry": dict(state.get("carry", {}))})
        layout = self._book.layout
        if layout is None:
            return
        key = None if layout == (0, 0) else _layout_key(layout)
        if not check_layout_on_load(saved, key):
            self._book.pending_shards = None
            return
        for kind, pending in self._book.pending_shards[1].items():
            for name, eps in self._shards(kind).items():
                value = pending.pop(name, None)
                if value is not None:
                    eps.assign(np.asarray(value, np.float32).reshape(-1))
                    if kind == "carry":
                        self.carry_pending(name, _layout_key(self._book.layout)).assign(True)

    def __repr__(self):
        return (f"GTopkState(schedule={self.schedule!r}, algorithm={self.algorithm!r}, "
                f"granularity={self.granularity!r}, dense_threshold={self.dense_threshold}, "
                f"link={self.link!r})")



def _layout_key(nodes_local):
    """The layout_key (gtopk_hvd.common.validation) of a recorded (nodes, local size)."""
    nodes, local = nodes_local
    if (nodes, local) == (0, 0):
        return None
    return ["node" if nodes == 1 else "hierarchical", nodes, local]
