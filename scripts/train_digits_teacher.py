"""Train the built-in `digits` teacher on scikit-learn's bundled handwritten digits.

Data: 1,797 real 8x8 images (no download), scaled from 0..16 to [-1, 1] and upsampled
bilinearly (align_corners=False) to 16x16x1. Model: the registry's `unet-t`, eps prediction with
learned-range variance, T = 1000, cosine schedule, trained with L_hybrid = L_simple + 0.001 L_vlb
and an EMA. Seeded and reproducible on the same machine and torch build.

    python scripts/train_digits_teacher.py --out dkdm_cli/teachers/weights/digits.safetensors
    python scripts/train_digits_teacher.py --arch dit-t/2 --out digits-dit.safetensors  # a DiT teacher

The class-conditional `digits-cond` teacher (labels 0-9 are the real ones; a null class 10 for
classifier-free guidance, given to 10 % of the images) is the unconditional teacher fine-tuned
with labels: every weight starts from `digits`, the label table from zero (so training starts
from the unconditional model):

    python scripts/train_digits_teacher.py --num-classes 10 --class-dropout 0.1 \
        --init-from dkdm_cli/teachers/weights/digits.safetensors --label-lr-scale 25 \
        --iterations 3000 --name digits-cond --out dkdm_cli/teachers/weights/digits-cond.safetensors
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from dkdm_cli.diffusion.settings import DiffusionSettings
from dkdm_cli.distill.ema import EMA
from dkdm_cli.distill.objective import hybrid_loss
from dkdm_cli.models import count_parameters, create_model
from dkdm_cli.models.io import save_model

IMAGE_SIZE = 16
LABEL_TABLES = ("label_emb.weight", "y_embedder.weight")  # the UNet's and the DiT's label table


def init_from(model: torch.nn.Module, path: Path, *, label_std: float = 0.0) -> None:
    """Start `model` (a conditional model) from the unconditional model file `path` of the same
    architecture: every weight copied, the label table drawn from N(0, label_std^2) (0: zeros, so
    the model starts as the unconditional one). Strict: any other difference is an error naming
    it."""
    from dkdm_cli.models.io import load_model, load_state_strict

    source, _ = load_model(Path(path))
    state = dict(source.state_dict())
    label_keys = sorted(set(model.state_dict()) - set(state))
    if not all(k.endswith(LABEL_TABLES) for k in label_keys):
        raise SystemExit(f"{path}: not the unconditional form of this architecture ({label_keys})")
    state.update({k: torch.randn_like(model.state_dict()[k]) * label_std for k in label_keys})
    load_state_strict(model, state, source=str(path))


def load_digits_images() -> torch.Tensor:
    """The real digits as a (1797, 1, 16, 16) float tensor in [-1, 1].

    The same tensor the quality measure (dkdm_cli.quality.digits) classifies, so the teacher's
    data and its yardstick cannot drift apart.
    """
    from dkdm_cli.quality.digits import load_real_digits

    return load_real_digits()


def train_teacher(*, out: Path, arch: str = "unet-t", model_kwargs: dict | None = None,
                  iterations: int = 10000, batch_size: int = 64, lr: float = 2e-4,
                  ema_rate: float = 0.999, seed: int = 0, log_every: int = 250,
                  name: str = "digits", num_classes: int = 0, class_dropout: float = 0.0,
                  init: Path | None = None, label_lr_scale: float = 1.0, label_std: float = 0.0,
                  log=print) -> Path:
    """Train a digits teacher of any registered architecture and save it as a dkdm model file
    (EMA weights) at `out`, with its training log beside it (`<out>.log.json`).

    `num_classes` 10: class-conditional on the real labels, the null class (10) replacing the
    label of a fraction `class_dropout` of the images; `init`: start from that model file;
    `label_lr_scale`: the label table's learning rate over the rest's.
    """
    from dkdm_cli.quality.digits import load_real_digit_labels

    torch.manual_seed(seed)
    data = load_digits_images()
    targets = load_real_digit_labels()  # (1797,) 0..9
    settings = DiffusionSettings(schedule="cosine", num_timesteps=1000, prediction="epsilon",
                                 variance="learned_range", clip_denoised=True)
    diffusion = settings.build()
    labels = dict(num_classes=num_classes, class_null=class_dropout > 0) if num_classes else {}
    model = create_model(arch, image_size=IMAGE_SIZE, in_channels=1, learn_sigma=True,
                         **labels, **(model_kwargs or {}))
    if init is not None:
        init_from(model, init, label_std=label_std)
    # The label table starts at zero (--init-from: the unconditional model) and must grow to the
    # scale of the timestep embedding (norm ~4-7 here); at the network's lr it reached ~0.2 in
    # 3,000 iterations and the labels were ignored, so it learns `label_lr_scale` x faster.
    is_table = {n: n.endswith(LABEL_TABLES) for n, _ in model.named_parameters()}
    table = [p for n, p in model.named_parameters() if is_table[n]]
    rest = [p for n, p in model.named_parameters() if not is_table[n]]
    groups = [{"params": rest, "lr": lr}] + ([{"params": table, "lr": lr * label_lr_scale}] if table else [])
    opt = torch.optim.AdamW(groups, lr=lr, weight_decay=0.0)
    ema = EMA(model, rate=ema_rate)
    gen = torch.Generator().manual_seed(seed)
    history = []
    start = time.time()
    window: list[tuple[float, float, float]] = []
    for it in range(1, iterations + 1):
        idx = torch.randint(0, len(data), (batch_size,), generator=gen)
        x0 = data[idx]  # (B, 1, 16, 16)
        t = torch.randint(0, diffusion.num_timesteps, (batch_size,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        x_t = diffusion.q_sample(x0, t, noise)
        if num_classes:
            y = targets[idx]  # (B,)
            drop = torch.rand(batch_size, generator=gen) < class_dropout
            pred = model(x_t, t, torch.where(drop, torch.full_like(y, num_classes), y))
        else:
            pred = model(x_t, t)
        terms = hybrid_loss(diffusion, model_out=pred, x0=x0, x_t=x_t, t=t, noise=noise)
        opt.zero_grad(set_to_none=True)
        terms.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema.update(model)
        window.append((terms.loss.item(), terms.mse.mean().item(), terms.kl.mean().item()))
        if it % log_every == 0 or it == iterations:
            loss, mse, vb = (sum(v) / len(window) for v in zip(*window, strict=True))
            window = []
            rec = {"iteration": it, "loss": loss, "mse": mse, "vb_bits": vb,
                   "seconds": round(time.time() - start, 1)}
            history.append(rec)
            log(json.dumps(rec))
    seconds = time.time() - start
    ema.shadow.spec = model.spec
    meta = {
        "diffusion": settings.to_dict(),
        "teacher": {
            "name": name, "architecture": arch,
            "data": "scikit-learn load_digits: 1797 8x8 images, 0..16 -> [-1,1], bilinear to 16x16",
            "iterations": iterations, "batch_size": batch_size, "lr": lr,
            "num_classes": num_classes, "class_dropout": class_dropout,
            "label_lr_scale": label_lr_scale, "label_init_std": label_std,
            "init_from": Path(init).name if init is not None else None,
            "ema": ema_rate, "seed": seed, "train_seconds": round(seconds, 1),
            "parameters": count_parameters(model), "final": history[-1],
            "torch": torch.__version__, "threads": torch.get_num_threads(),
        },
    }
    save_model(ema.shadow, out, extra=meta)
    Path(out).with_suffix(".log.json").write_text(json.dumps(history, indent=1))
    log(f"saved {out} ({count_parameters(model)} params, {seconds / 60:.1f} min)")
    return Path(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="unet-t", help="any registered model, e.g. dit-t/2")
    ap.add_argument("--model-kwargs", type=json.loads, default={},
                    help='JSON overrides of the preset, e.g. \'{"hidden_size": 96}\'')
    ap.add_argument("--iterations", type=int, default=10000)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--ema", type=float, default=0.999)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--log-every", type=int, default=250)
    ap.add_argument("--name", default="digits")
    ap.add_argument("--num-classes", type=int, default=0, help="10: class-conditional on the labels")
    ap.add_argument("--class-dropout", type=float, default=0.0,
                    help="fraction of images trained with the null class (classifier-free guidance)")
    ap.add_argument("--init-from", type=Path, default=None,
                    help="start from this unconditional model file (same architecture)")
    ap.add_argument("--label-lr-scale", type=float, default=1.0,
                    help="the label table's learning rate as a multiple of --lr")
    ap.add_argument("--label-init-std", type=float, default=0.0,
                    help="with --init-from: the label table starts N(0, std^2) (0: zeros)")
    ap.add_argument("--out", type=Path, default=Path("dkdm_cli/teachers/weights/digits.safetensors"))
    args = ap.parse_args()
    train_teacher(out=args.out, arch=args.arch, model_kwargs=args.model_kwargs,
                  iterations=args.iterations, batch_size=args.batch_size, lr=args.lr,
                  ema_rate=args.ema, seed=args.seed, log_every=args.log_every, name=args.name,
                  num_classes=args.num_classes, class_dropout=args.class_dropout,
                  init=args.init_from, label_lr_scale=args.label_lr_scale,
                  label_std=args.label_init_std)


if __name__ == "__main__":
    main()
