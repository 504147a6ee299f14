"""A stand-in for torchvision, only on the path of the peers' subprocesses (benchmarks/compare).

``import streaming`` (MosaicML) imports ``torchvision.datasets.VisionDataset`` and
``torchvision.transforms.functional.to_tensor`` for its vision datasets, and the PyPI torchvision
wheel fails to import next to the CPU torch ("operator torchvision::nms does not exist"). The
token benchmarks use none of it: these names exist only so that the import succeeds, and calling
them raises.
"""
