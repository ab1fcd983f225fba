"""A SimGrid model of data-parallel training steps with dense, Top-k, gTop-k and hierarchical
gTop-k, driven by gtopk_hvd.common's schedules (benchmarks/README.md, "At scale")."""
