"""cops_deploy.train: training the learned CoPS parameters (METHOD.md section 6).

- ``forward``: the training-time forward pass (one ICTS sample, no SAGA, detached prototypes);
- ``losses``: each term of the CoPS loss;
- ``policy``: the reference's dataset-dependent choices (neighbour kernel, recon loss);
- ``checkpoint``: atomic, pickle-free per-epoch checkpoints;
- ``trainer``: ``train(TrainCfg(...))``, what ``cops train`` runs, with exact ``--resume``.
"""
