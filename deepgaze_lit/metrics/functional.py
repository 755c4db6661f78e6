"""Saliency metrics with pysaliency 0.2.22's conventions (the MIT/Tuebingen benchmark's numbers).

Public functions take ONE image: a log density (H,W) in nats and its fixations `xs`, `ys` (K,) in pixels,
looked up at ``[int(y), int(x)]`` (truncation; duplicates count separately). Fixation-based metrics return one
value per fixation (K,) float64, so the caller averages per fixation or per image; map-vs-map metrics take two
saliency maps (H,W) and return a 0-dim float64 tensor.

The ``batch_*`` functions are the vectorised cores used by both these functions and the dataset accumulator:
log densities (B,H,W), fixations flattened over the batch with ``fix_batch`` (K,) naming their sample.
Everything is computed in float64. LL, NSS, AUC and sAUC read the density exp(log density) without
renormalising it; CC, KLDiv and SIM normalise both maps as pysaliency does.
"""

import math

import torch

LN2 = math.log(2.0)
"""ln 2: nats per bit, the package's one conversion constant (bit = nat / LN2)."""
MIT_EPS = 2.2204e-16  # the benchmark's regulariser in MIT_KLDiv
KLDIV_MINIMUM = 1e-20  # pysaliency's minimum value added before normalising maps for KLDiv
GAUSSIAN_TRUNCATE = 4.0  # scipy.ndimage.gaussian_filter's default truncation, in standard deviations


def fixation_flat_indices(xs: torch.Tensor, ys: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Flat pixel index ``int(y) * W + int(x)`` (K,) int64 of fixations in pixels; raises if outside the image."""
    height, width = int(shape[0]), int(shape[1])
    x_int = torch.as_tensor(xs).to(torch.float64).trunc().long()
    y_int = torch.as_tensor(ys).to(torch.float64).trunc().long()
    outside = (x_int < 0) | (x_int >= width) | (y_int < 0) | (y_int >= height)
    if bool(outside.any()):
        first = int(outside.nonzero()[0, 0])
        raise ValueError(
            f"fixation ({float(xs[first])}, {float(ys[first])}) lies outside the {height}x{width} image: "
            "fixation coordinates must be pixels of the image the log density is given for"
        )
    return y_int * width + x_int


def ig_uniform_bits(log_likelihood: torch.Tensor, num_pixels: int) -> torch.Tensor:
    """Information gain over the uniform density in bit/fix, `(log p + log(H*W)) / ln 2`, of log likelihoods (any
    shape) in nats on an image of `num_pixels` = H*W pixels."""
    return (log_likelihood + math.log(num_pixels)) / LN2


def _as_batch(log_density: torch.Tensor) -> torch.Tensor:
    """(H,W) log density -> (1,H,W) float64."""
    if log_density.dim() != 2:
        raise ValueError(f"expected one image's log density of shape (H,W), got {tuple(log_density.shape)}")
    return log_density.to(torch.float64).unsqueeze(0)


def _single_image_fixations(log_density: torch.Tensor, xs, ys) -> tuple[torch.Tensor, torch.Tensor]:
    """(fix_batch, flat pixel index) (K,) of one image's fixations, on the log density's device."""
    flat = fixation_flat_indices(xs, ys, log_density.shape[-2:]).to(log_density.device)
    return torch.zeros_like(flat), flat


def batch_log_likelihoods(log_density: torch.Tensor, fix_batch: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
    """Log density at each fixation (K,) in nats; `log_density` (B,H,W)."""
    return log_density.to(torch.float64).flatten(1)[fix_batch, flat]


def batch_nss(density: torch.Tensor, fix_batch: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
    """NSS per fixation (K,): (s - mean(s)) / std(s) with population std; 0 for a constant map."""
    flat_density = density.flatten(1)
    std, mean = torch.std_mean(flat_density, dim=1, correction=0)
    constant = flat_density.amax(dim=1) == flat_density.amin(dim=1)
    scale = torch.where(constant, torch.ones_like(std), std)
    centred = flat_density[fix_batch, flat] - mean[fix_batch]
    return torch.where(constant[fix_batch], torch.zeros_like(centred), centred / scale[fix_batch])


def _slots_per_sample(fix_batch: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, int]:
    """Position (K,) of each fixation among its sample's fixations, and the largest count per sample."""
    counts = torch.bincount(fix_batch, minlength=batch_size)
    order = torch.argsort(fix_batch, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    slots = torch.empty_like(fix_batch)
    slots[order] = torch.arange(fix_batch.numel(), device=fix_batch.device) - starts[fix_batch[order]]
    return slots, int(counts.max()) if fix_batch.numel() else 0


def rank_auc(
    negatives: torch.Tensor, num_negatives: torch.Tensor, positives: torch.Tensor, fix_batch: torch.Tensor
) -> torch.Tensor:
    """AUC of each positive (K,) against its sample's negatives: (#below + 0.5 #equal) / #negatives.

    `negatives` (B,M) float64, entries that are not negatives of a sample set to +inf (never below or equal to a
    finite positive); `num_negatives` (B,) counts the real ones. Each sample's negatives are sorted once.
    """
    sorted_negatives = torch.sort(negatives, dim=1).values
    slots, max_per_sample = _slots_per_sample(fix_batch, negatives.shape[0])
    padded = positives.new_zeros((negatives.shape[0], max_per_sample))
    padded[fix_batch, slots] = positives
    below = torch.searchsorted(sorted_negatives, padded)[fix_batch, slots]
    below_or_equal = torch.searchsorted(sorted_negatives, padded, right=True)[fix_batch, slots]
    ranks = below.to(torch.float64) + 0.5 * (below_or_equal - below).to(torch.float64)
    return ranks / num_negatives[fix_batch].to(torch.float64)


def batch_auc(density: torch.Tensor, fix_batch: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
    """AUC per fixation (K,) with all pixels of its image (fixated ones included) as negatives."""
    flat_density = density.flatten(1)
    num_pixels = torch.full((flat_density.shape[0],), flat_density.shape[1], device=flat_density.device)
    return rank_auc(flat_density, num_pixels, flat_density[fix_batch, flat], fix_batch)


def batch_sauc(
    density: torch.Tensor,
    fix_batch: torch.Tensor,
    flat: torch.Tensor,
    negative_flat: torch.Tensor,
    excluded: torch.Tensor | None = None,
) -> torch.Tensor:
    """Shuffled AUC per fixation (K,): negatives are the pixels `negative_flat` (M,) of each sample's image.

    `excluded` (B,M) bool marks negatives that do not count for a sample (its own image's fixations).
    """
    negatives = density.flatten(1)[:, negative_flat]
    if excluded is None:
        num_negatives = torch.full((negatives.shape[0],), negatives.shape[1], device=negatives.device)
    else:
        negatives = negatives.masked_fill(excluded, math.inf)
        num_negatives = negatives.shape[1] - excluded.sum(dim=1)
    return rank_auc(negatives, num_negatives, density.flatten(1)[fix_batch, flat], fix_batch)


def log_likelihood(log_density: torch.Tensor, xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
    """Log density at each fixation (K,) in nats (pysaliency `log_likelihoods`)."""
    fix_batch, flat = _single_image_fixations(log_density, xs, ys)
    return batch_log_likelihoods(_as_batch(log_density), fix_batch, flat)


def information_gain(
    log_density: torch.Tensor, xs: torch.Tensor, ys: torch.Tensor, baseline_log_density: torch.Tensor | None = None
) -> torch.Tensor:
    """Information gain per fixation (K,) in bit/fix over `baseline_log_density` (H,W), uniform when None."""
    model = log_likelihood(log_density, xs, ys)
    if baseline_log_density is None:
        return ig_uniform_bits(model, log_density.numel())
    if baseline_log_density.shape != log_density.shape:
        raise ValueError(
            f"baseline log density {tuple(baseline_log_density.shape)} and log density "
            f"{tuple(log_density.shape)} must have the same shape"
        )
    return (model - log_likelihood(baseline_log_density, xs, ys)) / LN2


def nss(log_density: torch.Tensor, xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
    """NSS per fixation (K,) of the density exp(log density); 0 for a constant map."""
    fix_batch, flat = _single_image_fixations(log_density, xs, ys)
    return batch_nss(_as_batch(log_density).exp(), fix_batch, flat)


def auc(log_density: torch.Tensor, xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
    """AUC per fixation (K,) against all pixels of the image; ties count one half."""
    fix_batch, flat = _single_image_fixations(log_density, xs, ys)
    return batch_auc(_as_batch(log_density).exp(), fix_batch, flat)


def sauc(
    log_density: torch.Tensor, xs: torch.Tensor, ys: torch.Tensor, other_xs: torch.Tensor, other_ys: torch.Tensor
) -> torch.Tensor:
    """Shuffled AUC per fixation (K,); negatives are the other images' fixations `other_xs`, `other_ys` (M,),
    already rescaled to this image's pixels (see `ShufflePool.nonfixations`); ties count one half."""
    fix_batch, flat = _single_image_fixations(log_density, xs, ys)
    negative_flat = fixation_flat_indices(other_xs, other_ys, log_density.shape).to(log_density.device)
    return batch_sauc(_as_batch(log_density).exp(), fix_batch, flat, negative_flat)


def _to_density(saliency_map: torch.Tensor, minimum_value: float) -> torch.Tensor:
    """pysaliency's `convert_saliency_map_to_density`: shift to min 0 if negative, add minimum, sum to 1."""
    smap = saliency_map.to(torch.float64)
    if bool(smap.min() < 0):
        smap = smap - smap.min()
    smap = smap + minimum_value
    total = smap.sum()
    if bool(total == 0):
        return torch.full_like(smap, 1.0 / smap.numel())
    return smap / total


def _check_same_shape(saliency_map: torch.Tensor, gold_map: torch.Tensor) -> None:
    if saliency_map.shape != gold_map.shape:
        raise ValueError(
            f"saliency map {tuple(saliency_map.shape)} and gold map {tuple(gold_map.shape)} differ in shape"
        )


def cc(saliency_map: torch.Tensor, gold_map: torch.Tensor) -> torch.Tensor:
    """Pearson correlation between two maps (H,W); 0 when either map is constant (pysaliency gives 0 or NaN)."""
    _check_same_shape(saliency_map, gold_map)
    first = saliency_map.to(torch.float64).flatten()
    second = gold_map.to(torch.float64).flatten()
    first = first - first.mean()
    second = second - second.mean()
    norms = torch.sqrt((first * first).sum() * (second * second).sum())
    if bool(norms == 0):
        return norms.new_zeros(())
    return ((first * second).sum() / norms).clamp(-1.0, 1.0)


def kldiv(saliency_map: torch.Tensor, gold_map: torch.Tensor) -> torch.Tensor:
    """pysaliency's image-based KL divergence sum g (log g - log s), both maps (H,W) plus 1e-20, summing to 1."""
    _check_same_shape(saliency_map, gold_map)
    log_model = torch.log(_to_density(saliency_map, KLDIV_MINIMUM))
    log_gold = torch.log(_to_density(gold_map, KLDIV_MINIMUM))
    return (log_gold.exp() * (log_gold - log_model)).sum()


def mit_kldiv(saliency_map: torch.Tensor, gold_map: torch.Tensor) -> torch.Tensor:
    """The benchmark's KLDiv sum g log(eps + g / (s + eps)), eps = 2.2204e-16, maps (H,W) summing to 1."""
    _check_same_shape(saliency_map, gold_map)
    model = _to_density(saliency_map, 0.0)
    gold = _to_density(gold_map, 0.0)
    return (gold * torch.log(MIT_EPS + gold / (model + MIT_EPS))).sum()


def sim(saliency_map: torch.Tensor, gold_map: torch.Tensor) -> torch.Tensor:
    """Similarity: sum of the pixelwise minimum of the two maps (H,W), each normalised to sum 1."""
    _check_same_shape(saliency_map, gold_map)
    return torch.minimum(_to_density(saliency_map, 0.0), _to_density(gold_map, 0.0)).sum()


def gaussian_blur_operator(size: int, sigma: float, device=None) -> torch.Tensor:
    """(size,size) float64 matrix M with M @ v = scipy.ndimage.gaussian_filter1d(v, sigma, mode='reflect').

    Kernel truncated at 4 sigma (radius int(4 sigma + 0.5)); 'reflect' repeats the edge pixel (d c b a | a b c d),
    folding back as often as the radius needs.
    """
    if not sigma > 0:
        raise ValueError(f"gold-standard kernel size must be a positive number of pixels, got {sigma}")
    radius = int(GAUSSIAN_TRUNCATE * float(sigma) + 0.5)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64, device=device)
    weights = torch.exp(-0.5 / (float(sigma) ** 2) * offsets**2)
    weights = weights / weights.sum()
    period = 2 * size
    padded = torch.arange(-radius, size + radius, device=device) % period
    padded = torch.where(padded >= size, period - 1 - padded, padded)
    sources = padded.unfold(0, 2 * radius + 1, 1)
    rows = torch.arange(size, device=device).repeat_interleave(2 * radius + 1)
    operator = torch.zeros((size, size), dtype=torch.float64, device=device)
    operator.index_put_((rows, sources.flatten()), weights.repeat(size), accumulate=True)
    return operator


def blurred_fixation_map(
    flat: torch.Tensor, shape: tuple[int, int], row_operator: torch.Tensor, column_operator: torch.Tensor
) -> torch.Tensor:
    """Fixation counts at flat pixel indices (K,) blurred by the separable operators: (H,W) float64.

    The blur of a count map is a sum of separable blurred deltas, so it is one (H,K) @ (K,W) product.
    """
    width = int(shape[1])
    rows = row_operator[:, torch.div(flat, width, rounding_mode="floor")]
    columns = column_operator[:, flat % width]
    return rows @ columns.T


def fixation_map(xs: torch.Tensor, ys: torch.Tensor, shape: tuple[int, int], kernel_size: float) -> torch.Tensor:
    """Gold-standard map (H,W) float64: fixation counts (duplicates counted) blurred as pysaliency's `FixationMap`,
    i.e. scipy.ndimage.gaussian_filter(counts, sigma=kernel_size, mode='reflect'); `kernel_size` in pixels."""
    height, width = int(shape[0]), int(shape[1])
    flat = fixation_flat_indices(xs, ys, (height, width))
    device = flat.device
    return blurred_fixation_map(
        flat,
        (height, width),
        gaussian_blur_operator(height, kernel_size, device),
        gaussian_blur_operator(width, kernel_size, device),
    )
