"""``fisherstore blend``: scale a trained LoRA adapter's per-layer deltas by layer importance."""

from __future__ import annotations

import argparse
import textwrap

from fisherstore.training import REFERENCES, ScaleRule

from ._common import add_out_option

__all__ = ["register", "run"]

_EPILOG = textwrap.dedent(
    """\
    how the factors are made:
      factor_l = clip((importance_l / REF) ** -POWER, MIN, MAX), REF the --reference
      summary of the positive importances (default: geometric mean, so a typical
      layer gets ~1). POWER > 0 damps the layers the Fisher marks as important and
      boosts the others; POWER < 0 does the opposite. Every LoRA delta of layer l
      becomes alpha * factor_l * delta (B is scaled); deltas outside the decoder
      layers, or in layers missing from the importance, get alpha only and are listed.

    examples:
      fisherstore blend runs/lora --importance fisher_store -o runs/lora-blended
      fisherstore blend runs/lora --importance layer_importance.json -o blended \\
          --alpha 0.8 --power 1 --min-factor 0.25 --max-factor 4
      fisherstore blend runs/lora --importance layer_importance.json -o x --dry-run

    The output is an ordinary PEFT adapter directory:
      PeftModel.from_pretrained(base_model, "runs/lora-blended")
    """
)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``blend`` subcommand."""
    p = subparsers.add_parser(
        "blend",
        help="scale a trained LoRA adapter's per-layer deltas by layer-importance factors",
        description=(
            "Write a copy of a PEFT LoRA adapter whose delta in each decoder layer is multiplied by a factor "
            "derived from that layer's Fisher importance (and by a global --alpha), so the layers that matter "
            "most for the base model's behaviour change least when the adapter is merged or applied."
        ),
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "adapter_dir",
        metavar="ADAPTER_DIR",
        help="directory written by PEFT save_pretrained (adapter_config.json + weights)",
    )
    p.add_argument(
        "--importance",
        required=True,
        metavar="PATH",
        help="a Fisher store, its layer_importance.json, or a JSON list / {layer: value} mapping",
    )
    add_out_option(
        p, "output adapter directory (must be new or empty unless --overwrite)", required=True, metavar="DIR"
    )
    p.add_argument(
        "--alpha", type=float, default=1.0, help="global blend strength multiplying every delta (default: %(default)s)"
    )
    default = ScaleRule()
    p.add_argument(
        "--power", type=float, default=default.power, help="exponent of the inverse power (default: %(default)s)"
    )
    p.add_argument(
        "--reference",
        default=default.reference,
        choices=REFERENCES,
        help="what importances are divided by (default: %(default)s)",
    )
    p.add_argument(
        "--min-factor",
        type=float,
        default=default.min_factor,
        help="lower clip of a layer factor (default: %(default)s)",
    )
    p.add_argument(
        "--max-factor",
        type=float,
        default=default.max_factor,
        help="upper clip of a layer factor (default: %(default)s)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--dry-run", action="store_true", help="print the factor table and write nothing")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Print the factor table, blend unless ``--dry-run``, report what was scaled."""
    from fisherstore.blend import blend_adapter
    from fisherstore.importance import load_importance
    from fisherstore.training import format_factor_table

    rule = ScaleRule(power=args.power, reference=args.reference, min_factor=args.min_factor, max_factor=args.max_factor)
    importance = load_importance(args.importance)
    print(format_factor_table(importance, rule, alpha=args.alpha))
    if args.dry_run:
        return 0
    report = blend_adapter(
        args.adapter_dir, importance, args.out, alpha=args.alpha, rule=rule, overwrite=args.overwrite
    )
    print(f"wrote {report.out_dir}: {len(report.scaled)} LoRA B tensors scaled by their layer factor")
    for key, why in report.unscaled.items():
        print(f"  alpha only: {key} ({why})")
    return 0
