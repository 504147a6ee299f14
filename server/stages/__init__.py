"""Stages: sync code that turns a corpus into rows, with no asyncio and no gRPC.

Sources read documents, tokenizers make tokens, packing makes rows, ``dataset`` and ``mixture``
are what a server serves, and ``order`` is the global order as arithmetic on counts.
"""
