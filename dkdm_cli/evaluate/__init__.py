"""`dkdm eval` as a library: score samples (a folder, an .npz, or a model sampled on the fly)
against a reference (the teacher's own samples by default: the data-free score; a folder of
images; or an .npz of images and/or statistics) with FID, sFID, IS, KID and precision/recall.

    from dkdm_cli.config import EvalConfig
    from dkdm_cli.evaluate import evaluate
    result = evaluate("runs/digits-unet-n", cfg=EvalConfig(num=1000), metrics={"fid", "isc"})
    result.values["fid"], result.to_dict()   # every number and what reproduces it

Everything expensive is cached under dkdm's cache folder (DKDM_CACHE_DIR or the platform's user
cache): teacher reference samples keyed by teacher + sampler + steps + num + seed (+ eta, batch
size, device type), and Inception features keyed by content hash + weights hash.
"""

from dkdm_cli.evaluate.scoring import EvalResult, evaluate

__all__ = ["EvalResult", "evaluate"]
