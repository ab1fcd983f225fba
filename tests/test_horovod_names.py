"""A program whose import line was swapped finds every name of Horovod's module in the drop-in
module: forwarded unchanged where gTop-k has nothing to add, gTop-k's own where it replaces
Horovod's (docs/compatibility.md).  One process per framework (plain ``python``), so that
torch and TensorFlow are imported the way a user's program imports them; the TensorFlow one
then runs Horovod's other TensorFlow entry points through the drop-in module (SCRIPT).
"""
import functools
import json

import pytest

from tests.harness import run_python

# Horovod's API, as this test sees it (written apart from the library's own list): the
# public names whose object is defined in a horovod module, or is a horovod submodule
LIST = """
import importlib, inspect, json, sys, types
pairs = [p.split("=") for p in sys.argv[1:]]
report = {}
for horovod_name, gtopk_name in pairs:
    h, g = importlib.import_module(horovod_name), importlib.import_module(gtopk_name)
    api = []
    for name in dir(h):
        if name.startswith("_"):
            continue
        value = getattr(h, name)
        home = value.__name__ if isinstance(value, types.ModuleType) else \\
            getattr(inspect.getmodule(value), "__name__", None) or "horovod"
        if home.startswith("horovod"):
            api.append(name)
    report[gtopk_name] = {
        "missing": [n for n in api if not hasattr(g, n)],
        "same": [n for n in api if hasattr(g, n) and getattr(g, n) is getattr(h, n)],
        "api": api, "all": list(getattr(g, "__all__", []))}
print(json.dumps(report))
"""

# what gTop-k replaces: never Horovod's own object
REPLACED = {
    "gtopk_hvd.torch": ["init", "shutdown", "DistributedOptimizer", "broadcast_optimizer_state",
                        "elastic", "Compression"],
    "gtopk_hvd.tensorflow": ["init", "shutdown", "DistributedGradientTape",
                             "PartialDistributedGradientTape", "DistributedOptimizer",
                             "elastic", "Compression"],
    "gtopk_hvd.tensorflow.keras": ["init", "shutdown", "DistributedOptimizer", "load_model",
                                   "callbacks", "elastic", "Compression"],
}
PAIRS = {
    "torch": ["horovod.torch=gtopk_hvd.torch"],
    "tensorflow": ["horovod.tensorflow=gtopk_hvd.tensorflow",
                   "horovod.tensorflow.keras=gtopk_hvd.tensorflow.keras",
                   "horovod.tensorflow.keras.callbacks=gtopk_hvd.tensorflow.keras.callbacks"],
}


@functools.lru_cache(maxsize=None)
def _run(framework):
    """The stdout lines of one plain ``python`` process per framework: LIST's report, then for
    TensorFlow the lines of SCRIPT (one TensorFlow start for both tests)."""
    return run_python(LIST + (SCRIPT if framework == "tensorflow" else ""), *PAIRS[framework])


@pytest.mark.parametrize("framework", sorted(PAIRS))
def test_every_horovod_name_is_in_the_drop_in_module(framework):
    report = json.loads(next(line for line in _run(framework) if line.startswith("{")))
    for module, names in report.items():
        assert not names["missing"], f"{module} lacks Horovod's {names['missing']}"
        replaced = [n for n in REPLACED.get(module, []) if n in names["same"]]
        assert not replaced, f"{module}: {replaced} are Horovod's own, not gTop-k's"
        forwarded = [n for n in names["api"] if n not in REPLACED.get(module, [])
                     and n not in names["all"] and n in names["same"]]
        assert not forwarded, f"{module}: {forwarded} forwarded but not in __all__"


SCRIPT = """
import tensorflow as tf
import gtopk_hvd.tensorflow as hvd
hvd.init()
try:
    hvd.DistributedOptimizer(tf.compat.v1.train.GradientDescentOptimizer(0.1))
except TypeError as error:
    print("v1 refused:", "DistributedGradientTape" in str(error))
opt = hvd.DistributedOptimizer(tf.keras.optimizers.SGD(0.1), density=0.5)
print("keras:", hasattr(opt, "gtopk_stats"))
dense = tf.keras.layers.Dense(2)
dense.build([None, 3])
local = tf.keras.layers.Dense(1)
local.build([None, 2])
x = tf.ones([4, 3])
with tf.GradientTape() as tape:
    loss = tf.reduce_sum(local(dense(x)))
tape = hvd.PartialDistributedGradientTape(tape, local_layers=local, density=1.0)
variables = dense.trainable_weights + local.trainable_weights
with tf.GradientTape() as plain:
    plain_loss = tf.reduce_sum(local(dense(x)))
want = plain.gradient(plain_loss, variables)
got = tape.gradient(loss, variables)
print("partial:", hasattr(tape, "gtopk_stats"), len(tape._local_sources) == 2,
      all(bool(tf.reduce_all(g == w)) for g, w in zip(got, want)))
import gtopk_hvd.tensorflow.keras as hvd_keras
model = tf.keras.Sequential([tf.keras.layers.Dense(1, input_shape=(3,))])
state = hvd_keras.elastic.KerasState(model, optimizer=tf.keras.optimizers.SGD(0.1), epoch=3)
state.sync()
print("plain KerasState:", state.epoch == 3)
compressor = hvd.Compression.gtopk(0.5)
try:  # a densified IndexedSlices inside tf.function has no static shape
    tf.function(compressor.compress,
                input_signature=[tf.TensorSpec([None], tf.float32)]).get_concrete_function()
    print("unknown shape: accepted")
except Exception as error:  # AutoGraph may re-raise it as its own error, message kept
    said = str(error)
    print("unknown shape refused:", "static shape" in said and "sparse_as_dense" in said)
"""


def test_tensorflow_distributed_optimizer_partial_tape_and_keras_state_as_horovod_s():
    lines = _run("tensorflow")[-5:]
    assert lines == ["v1 refused: True", "keras: True", "partial: True True True",
                     "plain KerasState: True", "unknown shape refused: True"], lines
