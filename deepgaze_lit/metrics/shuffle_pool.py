"""The pool of fixations that shuffled AUC draws its negatives from (pysaliency `FullShuffledNonfixationProvider`).

Every rank holds the whole split's fixations (the application builds the pool from the split's FixationDataset at
construction), so distributed evaluation needs no gathering: a rank evaluating image n takes the fixations of
all OTHER images of the split, rescaled per axis to image n's size and truncated to whole pixels.
"""

import torch


class ShufflePool:
    """All fixations of a split: `x`, `y` (F,) in pixels of their own image, `n` (F,) image index.

    With `shapes` ((N,2) image heights and widths, pixels) the rescaling is pysaliency's arithmetic exactly,
    x * (W / W_other). Without it, `x`, `y` are relative positions (x / W_other, y / H_other) and the rescaling
    is x_rel * W, which truncates to a different pixel than pysaliency in rare cases where the exact product
    is a whole number (about 4 in 10,000 for integer pixel coordinates).
    """

    def __init__(self, x, y, n, shapes=None):
        self.x = torch.as_tensor(x).to(torch.float64).flatten()
        self.y = torch.as_tensor(y).to(torch.float64).flatten()
        self.n = torch.as_tensor(n).to(torch.int64).flatten()
        if not self.x.numel() == self.y.numel() == self.n.numel():
            raise ValueError(
                f"shuffle pool: x, y and n must have one entry per fixation, got {self.x.numel()}, "
                f"{self.y.numel()} and {self.n.numel()}"
            )
        if shapes is None:
            self.widths = torch.ones_like(self.x)
            self.heights = torch.ones_like(self.y)
        else:
            shapes = torch.as_tensor(shapes).to(torch.float64)
            if self.n.numel() and int(self.n.max()) >= shapes.shape[0]:
                raise ValueError(
                    f"shuffle pool: image index {int(self.n.max())} has no entry in shapes ({shapes.shape[0]} rows)"
                )
            self.heights = shapes[self.n, 0]
            self.widths = shapes[self.n, 1]
        self._flat_cache: dict[tuple[int, int, str], torch.Tensor] = {}

    @classmethod
    def coerce(cls, pool) -> "ShufflePool":
        """A ShufflePool, or the tuple (x_rel, y_rel, n) of relative positions and image indices."""
        if isinstance(pool, cls):
            return pool
        if isinstance(pool, (tuple, list)) and len(pool) == 3:
            return cls(*pool)
        raise TypeError(
            "shuffle_pool must be a ShufflePool or a tuple (x_rel, y_rel, n) of all fixations of the split, "
            f"got {type(pool).__name__}"
        )

    def __len__(self) -> int:
        return self.n.numel()

    def rescaled(self, shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Pixel coordinates (F,) int64 of every pool fixation rescaled to an image of `shape` (H,W)."""
        height, width = int(shape[0]), int(shape[1])
        xs = (self.x * (width / self.widths)).trunc().long().clamp(0, width - 1)
        ys = (self.y * (height / self.heights)).trunc().long().clamp(0, height - 1)
        return xs, ys

    def nonfixations(self, image_index: int, shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """sAUC negatives of image `image_index` shown at `shape` (H,W): the other images' fixations, pixels."""
        xs, ys = self.rescaled(shape)
        others = self.n != int(image_index)
        return xs[others], ys[others]

    def flat_indices(self, shape: tuple[int, int], device: torch.device) -> torch.Tensor:
        """Flat pixel index (F,) of every pool fixation rescaled to `shape`, cached per shape and device."""
        key = (int(shape[0]), int(shape[1]), str(device))
        if key not in self._flat_cache:
            xs, ys = self.rescaled(shape)
            self._flat_cache[key] = (ys * int(shape[1]) + xs).to(device)
        return self._flat_cache[key]

    def image_indices(self, device: torch.device) -> torch.Tensor:
        """Image index (F,) of every pool fixation on `device`."""
        return self.n.to(device)
