"""Building blocks of MemKD: the NR memory and the memory-guided student decoder."""

from .decoder import MemoryResNetDecoder, get_memory_decoder
from .memory import NRMemory

__all__ = ["MemoryResNetDecoder", "NRMemory", "get_memory_decoder"]
