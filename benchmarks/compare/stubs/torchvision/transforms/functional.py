"""Stub (see ``torchvision/__init__.py``)."""


def to_tensor(pic: object) -> object:
    raise NotImplementedError("torchvision is stubbed out in the benchmark environment")
