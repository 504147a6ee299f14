"""Supply: shards in memory within byte budgets. The compressed cache (memory, disk), the hot
tier of packed shards, single-flight loads in the executor, and the prefetcher.
"""
