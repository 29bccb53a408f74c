"""Pure-PyTorch reference implementation of every fastomni op: the spec all backends are tested
against. One module per op: ``affine_coupling``, ``gabor_filter``, ``stratified_sample``,
``composite``."""
