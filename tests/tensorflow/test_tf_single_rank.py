"""One rank (plain ``python``, no horovodrun): with a float16 wire an own value beyond float16's
range makes the step non-finite there too, eagerly and in tf.function (no exchange happens,
so the verdict comes from the flags alone); a TensorFlow 1 graph is refused by every entry
point, and eager use in the same process goes on."""
import functools

from tests.harness import run_python

SCRIPT = """
import numpy as np, tensorflow as tf
import gtopk_hvd.tensorflow as hvd
from gtopk_hvd.tensorflow.collective import exchange
hvd.init()
acc = tf.constant(np.arange(16, dtype=np.float32) * 7000.0)
graph = tf.function(lambda a, wire: exchange(a, 4, wire=wire).verdict)
print([int(exchange(acc, 4, wire=w).verdict) for w in ("float32", "float16")],
      [int(graph(acc, w)) for w in ("float32", "float16")])
"""


def test_float16_overflow_on_a_single_rank_is_nonfinite():
    lines = _tf1_then_float16()
    assert lines[-4] == "[0, 1] [0, 1]", lines


HIERARCHICAL_COMPRESSOR = """
print("hierarchical compressor:", repr(hvd.Compression.gtopk(0.5, hierarchical=True)))
try:
    hvd.Compression.gtopk(0.5, hierarchical="yes")
    print("a bad hierarchical accepted")
except ValueError as error:
    print("a bad hierarchical refused:", "hierarchical must be True or False" in str(error))
"""


def test_the_hierarchical_compressor_is_made_on_one_rank_and_a_bad_value_refused():
    """Compression.gtopk(hierarchical=True) on one rank: a flat layout, nothing to register;
    a value that is not a bool is refused naming it (its runs: test_tf_hierarchical.py)."""
    lines = _tf1_then_float16()
    assert lines[-3] == ("hierarchical compressor: Compression.gtopk(density=0.5, "
                         "algorithm='gtopk', hierarchical=True)"), lines
    assert lines[-2] == "a bad hierarchical refused: True", lines


ELASTIC = """
import tensorflow as tf
import gtopk_hvd.tensorflow as hvd
import gtopk_hvd.tensorflow.keras as hvd_keras
for make in (lambda: hvd.DistributedGradientTape(tf.GradientTape(), algorithm="auto"),
             lambda: hvd_keras.DistributedOptimizer(tf.keras.optimizers.SGD(0.1),
                                                    algorithm="auto")):
    try:
        make()
    except ValueError as exc:
        print("refused", "Horovod Elastic needs link=" in str(exc))
try:
    hvd.DistributedGradientTape(tf.GradientTape(), algorithm="auto", link=(0.0, 1e-9))
except Exception as exc:
    print("with a link", type(exc).__name__)
"""


def test_auto_without_a_link_is_refused_under_elastic_before_horovod_is_touched():
    lines = run_python(ELASTIC, env={"HOROVOD_ELASTIC": "1"})
    # with a link it gets as far as the next check: Horovod is not initialised
    assert lines[-3:] == ["refused True", "refused True", "with a link GTopkError"], lines


TF1_SCRIPT = """
import tensorflow as tf
import gtopk_hvd.tensorflow as hvd
hvd.init()
refused = []
with tf.Graph().as_default():  # TensorFlow 1 graph mode, as Horovod's own tests run it
    w = tf.compat.v1.get_variable("w", [4])
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(w * 2.0)
    for make in (lambda: hvd.DistributedGradientTape(tape, density=0.5),
                 lambda: hvd.gtopk_allreduce(tf.ones([4]), density=0.5),
                 lambda: hvd.Compression.gtopk(0.5).compress(tf.ones([4]))):
        try:
            make()
            refused.append("accepted")
        except hvd.GTopkError as error:
            refused.append("TensorFlow 1 graph" in str(error) and "tf.function" in str(error))
print("tf1:", refused)
v = tf.Variable(tf.ones([4]))  # eager use afterwards is not poisoned by the graph
with tf.GradientTape() as tape:
    loss = tf.reduce_sum(v * tf.constant([3.0, 1.0, 4.0, 2.0]))
print("eager:", hvd.DistributedGradientTape(tape, density=0.5).gradient(loss, [v])[0]
      .numpy().tolist())
"""


RELOCATE = """
from gtopk_hvd.common.hierarchy import hierarchical_layout
state = hvd.GTopkState(0.1)
vs = [tf.Variable(tf.zeros([5])), tf.Variable(tf.zeros([4]))]
whole = np.random.default_rng(3).standard_normal(9).astype(np.float32)
state.residual(vs[0]).assign(whole[:5])
state.residual(vs[1]).assign(whole[5:])
buffers = [("model", vs, 9)]
def flat():
    return np.concatenate([state.residual(v).numpy() for v in vs])
def moved(layout, key, rank):  # held back where it should be, and nothing else anywhere
    state.reshard(buffers, key, layout, rank)
    lo, hi = layout.shard(9, rank)
    shard, carry = state.shard_residual("model", hi - lo, key), state.carry("model", 9, key)
    rest = whole.copy()
    rest[lo:hi] = 0
    others = sum(float(np.abs(v.numpy()).sum()) for v in state.held_variables()
                 if v.ref() not in (shard.ref(), carry.ref()))
    return (np.array_equal(shard.numpy(), whole[lo:hi]) and np.array_equal(carry.numpy(), rest)
            and others == 0.0)
state.reshard(buffers, None, None, 0)  # first sight: where it is held back, flat
checks = [moved(hierarchical_layout(2, 2, 1, True), ["node", 1, 2], 1)]
state.reshard(buffers, None, None, 0)  # unequal hosts: all back into the whole buffer
checks.append(np.array_equal(flat(), whole))
checks.append(moved(hierarchical_layout(4, 2, 2, True), ["hierarchical", 2, 2], 2))
print("reshard:", checks)
"""


def test_reshard_moves_what_a_rank_holds_back_when_the_layout_changes():
    """GTopkState.reshard (Horovod Elastic with hierarchical=True): flat -> rank 1 of one
    node of two (its shard's entries in the shard residual, the rest carried) -> flat (all
    back, bit for bit) -> local rank 0 of 2 x 2; at each place nothing is left anywhere
    else, so nothing is lost or counted twice (test_tf_elastic.py runs it in a job)."""
    assert _tf1_then_float16()[-1] == "reshard: [True, True, True]"


@functools.lru_cache(maxsize=None)
def _tf1_then_float16():
    """One process (one TensorFlow start): TF1_SCRIPT, then SCRIPT; its stdout lines.  The
    TensorFlow 1 graph comes first, so that gtopk_hvd meets it before any eager use."""
    return run_python(TF1_SCRIPT + SCRIPT + HIERARCHICAL_COMPRESSOR + RELOCATE)


def test_a_tensorflow_1_graph_is_refused_and_eager_use_afterwards_works():
    lines = _tf1_then_float16()
    assert lines[-6:-4] == ["tf1: [True, True, True]", "eager: [3.0, 0.0, 4.0, 0.0]"], lines
