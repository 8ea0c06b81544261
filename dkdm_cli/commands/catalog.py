"""`dkdm students` and `dkdm teachers`: what can be distilled into what."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from dkdm_cli import _console
from dkdm_cli._options import JsonOpt


def students(
    image_size: Annotated[int, typer.Option("--image-size", min=1, help="Image side in pixels.")] = 32,
    channels: Annotated[int, typer.Option("--channels", min=1, help="Image channels.")] = 3,
    classes: Annotated[int, typer.Option(
        "--classes", min=0, help="Count a class-label embedding of this many classes plus a null "
        "class, as a class-conditional teacher's student gets (0: unconditional).")] = 0,
    json_out: JsonOpt = False,
) -> None:
    """List student presets with parameter counts and GFLOPs per forward.

    Every preset takes an optional class-label embedding (UNet: ADM's, added to the timestep
    embedding; DiT: its label table with a null row); a class-conditional teacher's student gets
    one automatically.

    Example: dkdm students --image-size 16 --channels 1 --classes 10 --json
    """
    from dkdm_cli.models import MODELS
    from dkdm_cli.models.summary import summarize_all

    rows = summarize_all(image_size=image_size, channels=channels, num_classes=classes)
    aliases = MODELS.aliases()
    label_note = (f"label embedding: {classes} classes + null" if classes else
                  "unconditional (every preset takes a label embedding: --classes N)")
    if json_out:
        _console.print_json({
            "image_size": image_size, "channels": channels, "classes": classes,
            "label_embedding": label_note,
            "students": [r.to_dict() | {"aliases": sorted(a for a, n in aliases.items() if n == r.name)}
                         for r in rows],
        })
        return
    table = Table(title=f"students at {image_size}x{image_size}x{channels} (learned variance; "
                        f"{label_note})")
    for col in ("name", "family", "params (M)", "GFLOPs", "note"):
        table.add_column(col, justify="right" if col in ("params (M)", "GFLOPs") else "left")
    for r in rows:
        alias = [a for a, n in aliases.items() if n == r.name]
        name = r.name + (f" ({', '.join(alias)})" if alias else "")
        table.add_row(name, r.family,
                      f"{r.parameters / 1e6:.2f}" if r.parameters is not None else "-",
                      f"{r.gflops:.2f}" if r.gflops is not None else "-",
                      r.reason or "")
    _console.out.print(table)


def teachers(json_out: JsonOpt = False) -> None:
    """List registered teachers: source, resolution, channels, classes, parameters, cached or not.

    Classes: "-" for an unconditional teacher, else the number of class labels, "+null" when it
    has a null label (classifier-free guidance, --cfg, is possible).

    Example: dkdm teachers --json
    """
    from dkdm_cli.teachers.spec import TEACHERS

    entries = [TEACHERS.create(n) for n in TEACHERS.names()]
    rows = [e.row(cached=bool(e.is_cached())) for e in entries]
    if json_out:
        _console.print_json({"teachers": rows})
        return
    table = Table(title="teachers")
    for col in ("name", "resolution", "classes", "params (M)", "cached", "source",
                "weights / decoding"):
        table.add_column(col)
    for r in rows:
        params = f"{r['parameters'] / 1e6:.1f}" if r["parameters"] else "?"
        res = f"{r['image_size']}x{r['image_size']}x{r['channels']}" + (" latent" if r["latent"] else "")
        classes = (f"{r['num_classes']}" + ("+null" if r["null_class"] is not None else "")
                   if r["num_classes"] else "-")
        source = r["source"] + (f"@{r['revision']}" if r["revision"] else "")
        notes = r["weights"] + (f"; decode scale {r['decode_scale']:g}: {r['decode_note']}"
                                if r["decode_scale"] is not None else "")
        table.add_row(r["name"], res, classes, params, "yes" if r["cached"] else "no", source, notes)
    _console.out.print(table)
