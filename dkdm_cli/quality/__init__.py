"""Sample-quality measures that need no download: `digits` scores 16x16 handwritten digits."""

from dkdm_cli.quality.digits import DigitsQuality, load_real_digits, measure_digits, reference_figures

__all__ = ["DigitsQuality", "load_real_digits", "measure_digits", "reference_figures"]
