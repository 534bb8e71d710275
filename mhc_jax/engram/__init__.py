"""Engram conditional memory (engram.md): tokenizer compression and n-gram hashing on the host
(compression, hashing, ids; numpy only, imported by the data pipeline) and the NNX module (layer).

The layer is not imported here so that the input pipeline never pulls in the model.
"""

from mhc_jax.engram.compression import CompressedVocab, compress_tokenizer, identity_vocab
from mhc_jax.engram.hashing import NgramHasher, engram_primes
from mhc_jax.engram.ids import EngramIds

__all__ = ["CompressedVocab", "EngramIds", "NgramHasher", "compress_tokenizer", "engram_primes", "identity_vocab"]
