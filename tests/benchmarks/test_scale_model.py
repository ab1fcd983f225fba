"""The SimGrid model of benchmarks/scale: its layer lists, that its programs are the library's
schedules (bytes and operations per rank), and, where SimGrid's bindings are installed
(benchmarks/scale/setup.sh), that the simulator gives the times its flow model implies."""
import pytest

from gtopk_hvd.common.collective import gtopk_wire_bytes, message_bytes
from gtopk_hvd.common.density import k_for
from gtopk_hvd.common.schedule import stages_for

from benchmarks.scale import layers
from benchmarks.scale.programs import LocalWork, horovod_ops, program
from benchmarks.scale.simulate import Platform, available

NO_WORK = LocalWork(0.0, 0.0, 0.0)


def test_layer_lists_match_the_benchmark_models_and_the_published_counts():
    torch = pytest.importorskip("torch")
    from benchmarks.models import MODELS, count_parameters
    del torch
    for name, ours in (("resnet20", "resnet20"), ("vgg16", "vgg16_cifar"), ("mlp25m", "mlp25m")):
        assert layers.total_params(ours) == count_parameters(MODELS[name]())
    # torchvision's resnet50 / vgg16 and Hugging Face's bert-base-uncased BertModel
    assert layers.total_params("resnet50") == 25_557_032
    assert layers.total_params("vgg16") == 138_357_544
    assert layers.total_params("bert_base") == 109_482_240


def _sent(prog, rank):
    """Bytes ``rank`` sends in its program: a ring allgatherv forwards every block but its
    right neighbour's; an alltoall sends to every other member."""
    total = 0
    for op in prog:
        if op[0] == "gather":
            members, blocks = op[1], op[2]
            right = members[(members.index(rank) + 1) % len(members)]
            total += sum(b for m, b in blocks.items() if m != right)
        elif op[0] == "alltoall":
            total += op[2] * (len(op[1]) - 1)
        elif op[0] == "ring":
            total += op[2] * op[3]
    return total


@pytest.mark.parametrize("size", [2, 3, 4, 5, 6, 7, 8, 11, 16])
def test_gtopk_program_is_the_library_schedule(size):
    d, density = 10_000, 0.01
    k = k_for(d, density)
    for rank in range(size):
        prog = program("gtopk", d, density, size, rank, NO_WORK)
        gathers = [op for op in prog if op[0] == "gather"]
        assert [op[1] for op in gathers] == [st.group for st in stages_for(rank, size)]
        assert _sent(prog, rank) == gtopk_wire_bytes(k, rank, size)
        assert len(gathers) == horovod_ops("gtopk", size)


def test_dense_and_topk_programs_send_what_the_cost_model_says():
    d, size = 1_000_000, 4
    dense = program("dense", d, 1.0, size, 0, NO_WORK)
    assert _sent(dense, 0) == 2 * (size - 1) * 4 * d // size
    topk = program("topk", d, 0.001, size, 0, NO_WORK)
    assert _sent(topk, 0) == (size - 1) * message_bytes(k_for(d, 0.001))


@pytest.mark.parametrize("nodes,local", [(2, 2), (3, 2), (4, 8), (1, 4), (3, 1)])
def test_hierarchical_program_sends_a_factor_l_fewer_bytes_across_nodes(nodes, local):
    d, density = 80_000, 0.01
    size = nodes * local
    for rank in range(size):
        prog = program("hierarchical", d, density, size, rank, NO_WORK, local)
        node = set(range(rank // local * local, (rank // local + 1) * local))
        cross = sum(b for op in prog if op[0] == "gather" and not set(op[1]) <= node
                    for m, b in op[2].items()
                    if m != op[1][(op[1].index(rank) + 1) % len(op[1])])
        if local == 1:  # the flat fallback
            assert cross == gtopk_wire_bytes(k_for(d, density), rank, size)
        elif nodes > 1:
            k_l = k_for(d // local, density)
            assert cross == gtopk_wire_bytes(k_l, rank // local, nodes)
        else:
            assert cross == 0


needs_simgrid = pytest.mark.skipif(not available(), reason="SimGrid's Python bindings are not "
                                   "installed (benchmarks/scale/setup.sh)")


@needs_simgrid
def test_a_ring_step_takes_latency_plus_bytes_over_the_tcp_bandwidth():
    from benchmarks.scale.simulate import run_programs
    plat = Platform(4, 1, 1.0, 10e-6)
    nbytes, steps = 1_000_000, 6
    got = run_programs(plat, [[("ring", (0, 1, 2, 3), nbytes, steps)] for _ in range(4)])
    want = steps * (2 * 10e-6 + nbytes / (0.97 * 1e9 / 8))
    assert all(abs(t - want) < 1e-3 * want for t in got), (got, want)
    # a long ring is extrapolated from its second step: the same time as simulated in full
    long = run_programs(plat, [[("ring", (0, 1, 2, 3), nbytes, 20)] for _ in range(4)])
    assert abs(long[0] - 20 / steps * want) < 1e-3 * long[0]


@needs_simgrid
def test_the_ranks_of_a_node_share_its_network_card():
    """Flat gTop-k on 2 nodes of 4 ranks: the cross-node stage puts 4 flows on each card, so
    it takes 4 times one flow's transfer; hierarchical sends k/4 per rail over it."""
    from benchmarks.scale.model import exchange_time
    d, density = 4_000_000, 0.01
    one = exchange_time(Platform(2, 1, 1.0, 1e-6), "gtopk", d, density, NO_WORK)
    shared = exchange_time(Platform(2, 4, 1.0, 1e-6, intra_gbit=1e4), "gtopk", d, density,
                           NO_WORK)
    # a swap: each direction's flow shares its links with the other's acknowledgements
    # (SimGrid's TCP cross traffic, 5%)
    wire = message_bytes(k_for(d, density)) / (0.97 * 1e9 / 8) * 1.05
    assert abs(one - wire) < 0.01 * wire
    assert shared > 3.9 * wire  # the 2-rank stages inside a node are nearly free here
    hier = exchange_time(Platform(2, 4, 1.0, 1e-6, intra_gbit=1e4), "hierarchical", d,
                         density, NO_WORK)
    assert hier < shared / 3
