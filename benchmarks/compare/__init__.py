"""The comparison suite of issue 9: tokenfeed against MosaicML Streaming, LitData, Hugging Face
``datasets`` and a numpy memmap on one corpus (``python -m benchmarks.compare``; see
``benchmarks/run_compare.sh``). Modules named ``peers``, ``formats`` and ``recipe`` run in the
peers' environment (``.venv-bench``), and ``plot`` there too where the project's ``.venv`` has no
matplotlib (the ``bench`` extra declares it); the rest run in the project's ``.venv``."""
