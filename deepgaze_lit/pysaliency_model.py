"""A trained DeepGaze III network as a pysaliency model (optional extra: `pip install deepgaze-lit[pysaliency]`).

`DeepGazeModel` is a `pysaliency.Model`: its log density per stimulus comes from `DensityPredictor` (input size of
training, centre bias at that size, density resized back to the stimulus), so pysaliency's metrics
(`information_gain`, `log_likelihood`, `AUC`, `NSS`, ...), benchmark tools and `export_model_to_hdf5` work on it.
A scanpath network gets the dummy central fixation there. `DeepGazeScanpathModel` is a `pysaliency.ScanpathModel`
whose `conditional_log_density` feeds each fixation's real history (pixels of the stimulus, chronological).

Example:
    predictor = DensityPredictor(DeepGazeIII.from_release("deepgaze3.pth"),
                                 TemplateCenterbias("centerbias_mit1003.npy"), resize="two_sizes")
    ig = DeepGazeModel(predictor).information_gain(stimuli, fixations, baseline_model, average="image")
"""

from __future__ import annotations

import numpy as np

from deepgaze_lit.inference import DensityPredictor, as_rgb

try:
    import pysaliency
except ImportError as err:
    raise ImportError("deepgaze_lit.pysaliency_model needs pysaliency; install it with "
                      "`pip install 'deepgaze-lit[pysaliency]'`") from err


class DeepGazeModel(pysaliency.Model):
    """pysaliency `Model` of a `DensityPredictor`; keyword arguments (caching, cache_location, memory_cache_size)
    go to `pysaliency.Model`."""

    def __init__(self, predictor: DensityPredictor, **kwargs):
        super().__init__(**kwargs)
        self.predictor = predictor

    def _log_density(self, stimulus: np.ndarray) -> np.ndarray:
        """(H,W) float64 log density (nats) of a stimulus (H,W) or (H,W,3) uint8."""
        return self.predictor.log_density(as_rgb(np.asarray(stimulus)))


class DeepGazeScanpathModel(pysaliency.ScanpathModel):
    """pysaliency `ScanpathModel` of a `DensityPredictor` over a scanpath network."""

    def __init__(self, predictor: DensityPredictor):
        super().__init__()
        if not predictor.network.scanpath:
            raise ValueError("DeepGazeScanpathModel needs a network with scanpath networks (scanpath=True); "
                             "use DeepGazeModel for a spatial network")
        self.predictor = predictor

    def conditional_log_density(self, stimulus, x_hist, y_hist, t_hist, attributes=None, out=None) -> np.ndarray:
        """(H,W) float64 log density (nats) of the next fixation given the previous ones `x_hist`, `y_hist`
        (pixels of the stimulus, chronological; `t_hist`, `attributes` unused). `stimulus`: an (H,W) or (H,W,3) uint8
        array or a pysaliency `Stimulus`."""
        stimulus = getattr(stimulus, "stimulus_data", stimulus)
        return self.predictor.log_density(as_rgb(np.asarray(stimulus)), x_hist, y_hist)
