"""CIFAR on the training device: decode once into a cached uint8 tensor, batch and augment there.

Sources, in the order they are tried for ``--data PATH`` (or ``$CIFAR_ROOT``):

- the CIFAR-10 JPEG archive ``cifar10-jpg.tar.gz`` (ImageFolder layout ``train|test/<class>/*.jpg``),
  or a folder holding it, or a folder already in that layout;
- a torchvision ``CIFAR10`` / ``CIFAR100`` root that holds ``cifar-10-batches-py`` or
  ``cifar-100-python`` (nothing is downloaded).

The decoded tensors are cached under ``--cache`` (default ``$XDG_CACHE_HOME/competitive``, that is
``~/.cache/competitive`` where ``XDG_CACHE_HOME`` is unset); the source is only ever read.
"""

import hashlib
import io
import os
import tarfile
from pathlib import Path

import kornia.augmentation as K
import torch
from torch import Tensor
from tqdm import tqdm

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
MEAN = {10: (0.4914, 0.4822, 0.4465), 100: (0.5071, 0.4865, 0.4409)}
STD = {10: (0.2470, 0.2435, 0.2616), 100: (0.2673, 0.2564, 0.2762)}
SHARED = Path("shared") / "data" / "cifar10"


def default_root() -> Path:
    """``$CIFAR_ROOT``, else the first ``shared/data/cifar10`` beside the repository or a parent of it."""
    if "CIFAR_ROOT" in os.environ:
        return Path(os.environ["CIFAR_ROOT"])
    repo = Path(__file__).resolve().parents[1]
    for folder in (repo, *repo.parents, Path.cwd(), *Path.cwd().parents):
        if (folder / SHARED).is_dir():
            return folder / SHARED
    return repo.parent / SHARED


def _decode_jpeg_archive(archive: Path) -> dict[str, tuple[Tensor, Tensor]]:
    from torchvision.io import decode_jpeg

    files: dict[str, list[tuple[str, bytes]]] = {"train": [], "test": []}
    with tarfile.open(archive) as tar:
        members = [m for m in tar.getmembers() if m.isfile() and m.name.endswith(".jpg")]
        for m in tqdm(members, desc=f"reading {archive.name}", unit="img", mininterval=1.0):
            split, label = Path(m.name).parts[-3:-1]
            files[split].append((label, tar.extractfile(m).read()))
    return {split: _decode(items, decode_jpeg) for split, items in files.items()}


def _decode_folder(root: Path) -> dict[str, tuple[Tensor, Tensor]]:
    from torchvision.io import decode_jpeg

    out = {}
    for split in ("train", "test"):
        items = [(p.parent.name, p.read_bytes()) for p in sorted((root / split).glob("*/*.jpg"))]
        out[split] = _decode(items, decode_jpeg)
    return out


def _decode(items, decode_jpeg, chunk: int = 4096) -> tuple[Tensor, Tensor]:
    items.sort(key=lambda item: item[0])
    labels = torch.tensor([CIFAR10_CLASSES.index(label) for label, _ in items])
    encoded = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for _, data in items]
    # torchvision decodes a list of JPEGs in one call
    images = [
        torch.stack(decode_jpeg(encoded[start : start + chunk]))
        for start in tqdm(range(0, len(encoded), chunk), desc="decoding", unit="chunk", mininterval=1.0)
    ]
    return torch.cat(images), labels


def _from_torchvision(root: Path, classes: int) -> dict[str, tuple[Tensor, Tensor]]:
    from torchvision.datasets import CIFAR10, CIFAR100

    dataset = CIFAR10 if classes == 10 else CIFAR100
    out = {}
    for split in ("train", "test"):
        ds = dataset(str(root), train=split == "train", download=False)
        out[split] = (torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(ds.targets))
    return out


def default_cache() -> Path:
    """``$XDG_CACHE_HOME/competitive``, or ``~/.cache/competitive``."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "competitive"


def load_cifar(
    root: Path | None = None, *, classes: int = 10, cache: Path | None = None
) -> dict[str, tuple[Tensor, Tensor]]:
    """``{"train": (images uint8 [N, 3, 32, 32], labels [N]), "test": (...)}``, decoded once and cached."""
    root = Path(root) if root is not None else default_root()
    cache = Path(cache) if cache is not None else default_cache()
    archive = root if root.suffix == ".gz" else root / "cifar10-jpg.tar.gz"
    key = hashlib.sha1(f"{root.resolve()}|{classes}".encode()).hexdigest()[:12]
    cached = cache / f"cifar{classes}-{key}.pt"
    if cached.exists():
        return torch.load(cached)
    if classes == 10 and archive.is_file():
        data = _decode_jpeg_archive(archive)
    elif classes == 10 and (root / "train").is_dir():
        data = _decode_folder(root)
    elif (root / ("cifar-10-batches-py" if classes == 10 else "cifar-100-python")).is_dir():
        data = _from_torchvision(root, classes)
    else:
        raise FileNotFoundError(
            f"No CIFAR-{classes} found at {root}. Pass --data (or set CIFAR_ROOT) to the folder holding "
            "cifar10-jpg.tar.gz, or to a torchvision CIFAR root with cifar-10-batches-py / cifar-100-python."
        )
    cache.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(data, buffer)
    cached.write_bytes(buffer.getvalue())
    return data


class DeviceLoader:
    """Batches of a uint8 dataset that lives on the training device, augmented there with kornia.

    Training batches get the standard CIFAR augmentation (random crop with 4-pixel padding and a
    horizontal flip); every batch is converted to float and normalized on the device. With
    ``per_class=m``, training batches are built from shuffled chunks of ``m`` same-class images, so
    every class in a batch has at least ``m`` images (for MCL on many classes, where random batches
    leave anchors without positives).
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        *,
        batch_size: int,
        device: torch.device,
        classes: int,
        train: bool,
        seed: int = 0,
        drop_last: bool = True,
        per_class: int = 0,
    ):
        self.images, self.labels = images.to(device), labels.to(device)
        self.per_class = per_class
        self.batch_size, self.train, self.drop_last = batch_size, train, drop_last
        self.mean = torch.tensor(MEAN[classes], device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(STD[classes], device=device).view(1, 3, 1, 1)
        self.augment = K.AugmentationSequential(K.RandomCrop((32, 32), padding=4), K.RandomHorizontalFlip())
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        n = len(self.labels)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def _balanced_order(self) -> Tensor:
        """A permutation made of shuffled chunks of ``per_class`` same-class images (MCL's contrastive
        terms need positives: other images of the anchor's class); each class's remainder is dropped."""
        labels = self.labels.cpu()
        pools = [
            c[torch.randperm(len(c), generator=self.generator)]
            for c in (torch.nonzero(labels == k).flatten() for k in labels.unique())
        ]
        chunks = [
            p[i : i + self.per_class] for p in pools for i in range(0, len(p) - self.per_class + 1, self.per_class)
        ]
        chunks = [chunks[i] for i in torch.randperm(len(chunks), generator=self.generator).tolist()]
        return torch.cat(chunks)

    def __iter__(self):
        n = len(self.labels)
        if self.train and self.per_class:
            order = self._balanced_order()
        else:
            order = torch.randperm(n, generator=self.generator) if self.train else torch.arange(n)
        order = order.to(self.images.device)
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            index = order[start : start + self.batch_size]
            if len(index) == 0 or (self.drop_last and len(index) < self.batch_size):
                break  # a class-balanced order drops each class's remainder
            x = self.images[index].float().div_(255)
            if self.train:
                x = self.augment(x)
            yield (x - self.mean) / self.std, self.labels[index]
