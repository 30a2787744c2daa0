"""The collaborative tokenizer: the trie of item titles, the CF scores turned into per-position token
distributions (`tokenizer`, Numba `kernels`) and their sparse Zarr store (`store`)."""
