"""Names ``streaming.vision`` imports; unusable (see the package docstring)."""


class VisionDataset:
    """Placeholder base class: constructing a vision dataset raises."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        raise NotImplementedError("torchvision is stubbed out in the benchmark environment")


class CIFAR10(VisionDataset):
    """Placeholder."""
