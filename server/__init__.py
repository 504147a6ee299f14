"""tokenfeed data server: sources, tokenizers, packing, cache, prefetch and the gRPC service."""
