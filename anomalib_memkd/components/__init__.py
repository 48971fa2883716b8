"""Building blocks of MemKD: the NR memory and the memory-guided student decoder."""

from .decoder import MemoryResNetDecoder, RecallBlock, get_memory_decoder
from .memory import NRMemory

__all__ = ["MemoryResNetDecoder", "NRMemory", "RecallBlock", "get_memory_decoder"]
