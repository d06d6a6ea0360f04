"""The library twin of `treeopt calibrate`: the calibration a CalibrationConfig asks for."""

from __future__ import annotations

from treeopt.calibrate.run import calibrate
from treeopt.calibrate.teacher import calibrate_teacher_forced
from treeopt.calibrate.typical import calibrate_typical
from treeopt.core.record import load_calibration
from treeopt.core.settings import CalibrationConfig
from treeopt.core.treefile import read_tree
from treeopt.decoding.decoder import Acceptance


def run_calibration(config: CalibrationConfig) -> str:
    """`treeopt calibrate`'s twin: the calibration `config` asks for (generated, teacher-forced or the
    typical probe's) into `config.out`; returns the line that says what was written."""
    if config.acceptance == "typical":
        rule = Acceptance(config.acceptance, config.temperature, config.posterior_threshold, config.posterior_alpha,
                          config.seed)
        path = calibrate_typical(config, rule, read_tree(config.probe) if config.probe else None)
        return f"wrote {path}: typical acceptance record (typical.parquet, calibration.json)"
    cal = load_calibration((calibrate_teacher_forced if config.teacher_forced else calibrate)(config))
    unit = "head" if cal.meta.get("drafter", {}).get("kind", "heads") == "heads" else "depth"
    top = ", ".join(f"{unit} {k + 1} {a:.3f}" for k, a in enumerate(cal.accuracy.sum(1)))
    return (f"wrote {config.out}: {cal.meta['num_prompts']} {'assistant turns' if config.teacher_forced else 'prompts'}, "
            f"{cal.num_positions} positions, {cal.meta['tokens_per_s']:.1f} tok/s; top-{cal.top_k} accuracy: {top}")
