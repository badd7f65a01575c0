"""Ground floor, torch-free: decode images, preprocess them for the model, draw result pictures.

Used by the run side (``cops_deploy.runtime``) and by the build side (datasets, training,
evaluation reports) alike, so both read and resize an image the same way.

- :mod:`~cops_deploy.imaging.decode`: any file, PIL image or array -> (H, W, 3) uint8 RGB.
- :mod:`~cops_deploy.imaging.preprocess`: RGB -> (3, S, S) float32 input; maps back to (H, W).
- :mod:`~cops_deploy.imaging.visualize`: jet colour map, overlays, the three-panel result PNG.
"""
